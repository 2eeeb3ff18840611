"""`gptforge run PIPELINE.yaml`: the whole staged pipeline, with skip/resume and a summary."""

from __future__ import annotations

import argparse
import os


def _error(message: str):
    """argparse's usage errors as one line, exit 2 (the CLI's ConfigError path)."""
    from gptforge.errors import ConfigError

    raise ConfigError(f"{message} (see `gptforge run --help`)")


def run(argv: list[str]) -> int:
    from gptforge.pipeline.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="gptforge run",
        allow_abbrev=False,
        description="Run a pipeline's stages (pretrain -> classify -> instruct -> evaluate -> export). "
        "A re-run skips finished stages whose config and inputs are unchanged and resumes interrupted ones.",
    )
    parser.add_argument("pipeline", help="pipeline YAML, e.g. configs/default.yaml")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and all after it")
    parser.add_argument(
        "--only",
        choices=STAGES,
        help="consider only this stage (skipped if up to date; add --force to rerun it)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun every stage considered, even when up to date"
    )
    parser.add_argument("--name", help="run name (default: the file's `name:` or its stem)")
    parser.add_argument("--runs-dir", help="where run dirs go (default: the file's `runs_dir:` or runs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set classify.train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("GPTFORGE_QUICK") == "1",
        help="apply the file's `quick:` overrides: a short run of the same graph (or GPTFORGE_QUICK=1)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print each stage's resolved config and exit"
    )
    parser.add_argument(
        "--explain",
        "--dry-run",
        dest="explain",
        action="store_true",
        help="run nothing: print, per stage, whether it would run, resume or be skipped, and why",
    )
    parser.add_argument(
        "--list-stages", action="store_true", help="print the pipeline's stages, one a line, and exit"
    )
    parser.error = _error  # type: ignore[method-assign]
    args = parser.parse_args(argv)

    from gptforge.pipeline.runner import run_pipeline
    from gptforge.pipeline.stages import load_pipeline, stage_config
    from gptforge.pipeline.summary import print_summary

    pipe = load_pipeline(
        args.pipeline, args.overrides, quick=args.quick, name=args.name, runs_dir=args.runs_dir
    )
    if args.list_stages:
        print("\n".join(pipe.stages))
        return 0
    if args.print_config:
        import yaml

        from gptforge.pipeline.stages import stage_record

        for stage in pipe.stages:
            cfg = stage_config(pipe, stage, check_only=True)
            print(yaml.safe_dump({stage: stage_record(stage, cfg)}, sort_keys=False), end="")
        return 0
    if args.explain:
        run_pipeline(pipe, from_stage=args.from_stage, only=args.only, force=args.force, explain=True)
        return 0
    results = run_pipeline(pipe, from_stage=args.from_stage, only=args.only, force=args.force)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print_summary(results, pipe)
    return 0
