"""The stage graph: `gptforge run PIPELINE.yaml` runs pretrain -> classify -> instruct -> dpo -> evaluate -> export.

Each stage runs in `runs/<name>/<stage>/` and leaves a `manifest.json` (pipeline/manifest.py: status,
config hash, code version, upstream output hashes, the fingerprints of every file it read, metrics,
timings). A re-run skips a stage whose keys are all unchanged, resumes an interrupted one from its last
intact checkpoint, and reruns what changed and what reads it. The file and its stages: pipeline/stages.py;
the summary: pipeline/summary.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

from gptforge.errors import ConfigError, GPTForgeError
from gptforge.io import fault_point, tracking_reads
from gptforge.pipeline.manifest import (
    always_read,
    code_version,
    decide,
    fingerprint_reads,
    hash_obj,
    output_hash,
    read_manifest,
    write_manifest,
)
from gptforge.pipeline.stages import (
    TRAIN_STAGES,
    Pipeline,
    config_record,
    final_checkpoint,
    stage_config,
    stage_inputs,
    upstream_models,
)
from gptforge.pipeline.summary import StageResult, summarize_evaluation, write_summary

# -- running stages --------------------------------------------------------------------------------


def _run_train(pipe: Pipeline, stage: str, cfg: Any, resume: bool) -> tuple[str, dict, dict]:
    from gptforge.pipeline.train import train

    if resume:
        cfg.train.resume = "auto"
    result = train(stage, cfg)
    metrics = dict(result.metrics)
    status = "interrupted" if metrics.get("status") == "interrupted" else "done"
    return status, metrics, {"checkpoint": str(result.checkpoint)}


def _key_metrics(metrics: dict) -> dict:
    """Scalars only, for manifests and the summary."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _run_evaluate(pipe: Pipeline, cfg: Any) -> tuple[str, dict, dict]:
    from gptforge.pipeline.config import EvaluateConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint

    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvaluateConfig)}
    metrics, outputs = {}, {}
    for model_stage in upstream_models(pipe, "evaluate"):
        fault_point("evaluate")
        out = pipe.stage_dir("evaluate") / model_stage
        one = EvaluateConfig(
            **{
                **shared,
                "checkpoint": str(final_checkpoint(pipe, model_stage)),
                "out": str(out),
                "task": model_stage,
            }
        )
        m = evaluate_checkpoint(one)
        metrics[model_stage] = summarize_evaluation(m)
        outputs[model_stage] = str(out)
    return "done", metrics, outputs


def _run_export(pipe: Pipeline, cfg: Any) -> tuple[str, dict, dict]:
    from gptforge.export.hf import export
    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.load import load_model

    eval_man = read_manifest(pipe.stage_dir("evaluate")) if "evaluate" in pipe.stages else None
    metrics, outputs = {}, {}
    for model_stage in upstream_models(pipe, "export"):
        fault_point("export")
        ckpt = final_checkpoint(pipe, model_stage)
        model = load_model(ckpt)
        card_metrics = ((eval_man or {}).get("metrics") or {}).get(model_stage)
        out = pipe.stage_dir("export") / model_stage
        metrics[model_stage] = {"verified": cfg.verify}
        if "hf" in cfg.formats:
            export(
                model,
                out,
                metrics=card_metrics,
                prompt_style=read_metadata(ckpt, "prompt_style.json"),
                overwrite=True,
                verify=cfg.verify,
            )
            outputs[model_stage] = str(out)
        if "gguf" in cfg.formats:
            from gptforge.export.gguf import export_gguf
            from gptforge.tasks.instruct import get_prompt_style

            style = read_metadata(ckpt, "prompt_style.json")
            g = export_gguf(
                model,
                # a dir per model: its Modelfile, if any, sits beside its file
                pipe.stage_dir("export") / f"{model_stage}-gguf" / f"{model_stage}-{cfg.gguf.quant}.gguf",
                cfg.gguf.quant,
                name=f"{pipe.name}-{model_stage}",
                metrics=card_metrics,
                prompt_style=get_prompt_style(style) if style else None,
                license=cfg.license,
                overwrite=True,
                verify=cfg.verify,
                ollama=cfg.gguf.ollama,
            )
            outputs[f"{model_stage}_gguf"] = str(g.path)
            if g.check:
                metrics[model_stage]["gguf"] = g.check.short(g.quant)
    return "done", metrics, outputs


# -- the runner --------------------------------------------------------------------------------------


def plan(pipe: Pipeline, *, from_stage: str | None = None, only: str | None = None) -> list[str]:
    """The stages this invocation considers, in order."""
    for flag, s in (("--from", from_stage), ("--only", only)):
        if s is not None and s not in pipe.stages:
            raise ConfigError(f"{flag} {s}: not a stage of {pipe.source}; stages: {', '.join(pipe.stages)}")
    if only:
        return [only]
    return pipe.stages


def run_pipeline(
    pipe: Pipeline,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    explain: bool = False,
    log=print,
) -> list[StageResult]:
    """Run the pipeline; returns one StageResult per considered stage and writes summary.md.

    A stage is skipped only when its config, the gptforge code, its upstream stages' outputs and the
    content of every file it read last time (data, `model.init`, a LoRA base, the tokenizer files) are
    unchanged. `explain=True` runs nothing: it logs, per stage, what would happen and why.
    """
    import torch
    from accelerate import PartialState

    # Under torchrun / accelerate launch: the process group the trainer uses (gloo on CPU).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1 and only is None and not explain:
        raise ConfigError(
            "under torchrun / accelerate launch, run one stage per launch: add --only STAGE "
            "(scripts/01_pretrain.sh ... and scripts/run_all.sh with LAUNCH= do this)"
        )
    stages = plan(pipe, from_stage=from_stage, only=only)
    forced = set(stages) if force else set()
    if from_stage:
        forced |= set(pipe.stages[pipe.stages.index(from_stage) :])
    code = code_version()
    results: list[StageResult] = []
    will_run: set[str] = set()  # explain: stages that would run, so what reads them would too
    for stage in stages:
        sdir = pipe.stage_dir(stage)
        old = read_manifest(sdir)
        try:
            cfg = stage_config(pipe, stage)
        except GPTForgeError:
            if not explain:
                raise
            cfg = stage_config(pipe, stage, check_only=True)  # its upstream has not finished: it will run
        record = config_record(cfg)
        ups = stage_inputs(pipe, stage)
        inputs = {u: (read_manifest(pipe.stage_dir(u)) or {}).get("output_hash") for u in ups}
        waiting = [u for u in ups if u in will_run]
        if explain and waiting:
            action, reason = "run", f"upstream stage {waiting[0]!r} runs first"
        else:
            for u, h in inputs.items():
                if h is None and u in TRAIN_STAGES and not explain:
                    raise GPTForgeError(f"stage {stage!r} needs {u!r}, which has not finished; run it first")
            chash = hash_obj(record)
            action, reason = decide(stage in TRAIN_STAGES, old, chash, record, inputs, code, stage in forced)
        if explain:
            log(f"[{stage}] {action}: {reason}")
            if action != "skip":
                will_run.add(stage)
            results.append(StageResult(stage, f"would {action}", 0.0, (old or {}).get("metrics", {}), {}))
            continue
        state.wait_for_everyone()  # every process has read the manifest before the main one rewrites it
        if action == "skip":
            log(f"[{stage}] up to date: skipped ({sdir})")
            results.append(StageResult(stage, "skipped", 0.0, old.get("metrics", {}), old.get("outputs", {})))
            continue
        resume = action == "resume"
        if not resume and sdir.exists() and state.is_main_process:
            shutil.rmtree(sdir)
        state.wait_for_everyone()
        log(f"[{stage}] {'resuming' if resume else 'running'} in {sdir} ({reason})")
        manifest = {
            "stage": stage,
            "status": "running",
            "config_hash": chash,
            "inputs": inputs,
            "code": code,
            "config": record,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if state.is_main_process:
            write_manifest(sdir, manifest)
        t0 = time.perf_counter()
        with tracking_reads() as reads:
            try:
                if stage in TRAIN_STAGES:
                    status, metrics, outputs = _run_train(pipe, stage, cfg, resume)
                elif state.is_main_process:
                    runner = _run_evaluate if stage == "evaluate" else _run_export
                    status, metrics, outputs = runner(pipe, cfg)
                else:
                    status, metrics, outputs = "done", {}, {}
            except BaseException as e:
                manifest.update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
                manifest["seconds"] = round(time.perf_counter() - t0, 2)
                if state.is_main_process:
                    write_manifest(sdir, manifest)
                raise
        seconds = time.perf_counter() - t0
        manifest.update(
            status=status,
            metrics=_key_metrics(metrics) if stage in TRAIN_STAGES else metrics,
            outputs=outputs,
            seconds=round(seconds + float((old or {}).get("seconds", 0)) * resume, 2),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        if state.is_main_process:
            manifest["reads"] = fingerprint_reads({**always_read(), **reads}, sdir, (old or {}).get("reads"))
        if status == "done":
            manifest["output_hash"] = (
                output_hash(stage in TRAIN_STAGES, outputs) if state.is_main_process else None
            )
        if state.is_main_process:
            write_manifest(sdir, manifest)
        action = "interrupted" if status == "interrupted" else ("resumed" if resume else "ran")
        results.append(StageResult(stage, action, seconds, manifest["metrics"], outputs))
        if status == "interrupted":
            log(f"[{stage}] interrupted: run the same command again to resume")
            break
    if state.is_main_process and not explain:
        write_summary(pipe, results)
    return results
