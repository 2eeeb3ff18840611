"""The stage graph: `gptforge run PIPELINE.yaml` runs pretrain -> classify -> instruct -> evaluate -> export.

A pipeline YAML names its stages and their configs; `model.init: pretrain` (any earlier stage's name) feeds
that stage's output checkpoint in. Each stage runs in `runs/<name>/<stage>/` and leaves a `manifest.json`
(status, config hash, input hashes, metrics, timings). A re-run skips a finished stage whose config and
inputs are unchanged, resumes an interrupted one from its last checkpoint, and reruns what changed
downstream (a stage's inputs are the hashes of its upstream stages' outputs).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError, GPTForgeError
from gptforge.io import fault_point, fingerprint, tracking_reads, write_json, write_text

STAGES = ("pretrain", "classify", "instruct", "evaluate", "export")
TRAIN_STAGES = ("pretrain", "classify", "instruct")
TOP_KEYS = ("name", "runs_dir", "stages", "quick", *STAGES)
MANIFEST = "manifest.json"


# -- the spec ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """A parsed pipeline file: which stages run, in order, and each stage's config section."""

    name: str
    runs_dir: Path
    stages: list[str]
    sections: dict[str, dict]
    source: str = "<pipeline>"
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    """Dotted key (`classify.train.epochs`) -> where it was set, when not in the file: `--set` or `quick:`."""

    @property
    def root(self) -> Path:
        return self.runs_dir / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def load_pipeline(
    path: str | os.PathLike, overrides: list[str] | None = None, quick: bool = False, **top: Any
) -> Pipeline:
    """Read and check a pipeline YAML; `overrides` are `section.key=value` strings (values parsed as YAML).

    `quick` applies the file's `quick:` mapping of dotted overrides first (a short run of the same graph).
    Every stage section is validated as its config dataclass before anything runs.
    """
    import yaml

    from gptforge.schema import leaf_keys, load_yaml_mapping, set_dotted

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: pipeline file not found; see configs/ for examples")
    raw = load_yaml_mapping(p, "pipeline file")
    quick_set = raw.pop("quick", None)
    if quick and quick_set is None:
        raise ConfigError(
            f"{p}: --quick (or GPTFORGE_QUICK=1) needs a `quick:` section of dotted overrides "
            "(e.g. classify.train.epochs: 1); this file has none"
        )
    if quick_set is not None and not isinstance(quick_set, dict):
        raise ConfigError(f"{p}: `quick:` must map dotted keys to values, e.g. classify.train.epochs: 1")
    items = [(str(k), v, "quick:") for k, v in (quick_set or {}).items()] if quick else []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use section.key=value, e.g. classify.train.epochs=3")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value  # not YAML: the text itself (a path, a name)
        items.append((key.strip(), parsed, "--set"))
    origins: dict[str, str] = {}
    for key, value, label in items:
        if key.split(".", 1)[0] not in TOP_KEYS:
            top_key = key.split(".", 1)[0]
            raise ConfigError(f"{p} ({label}): unknown key {top_key!r}; {_suggest(top_key, TOP_KEYS)}")
        try:
            set_dotted(raw, key, value)
        except ConfigError as e:
            raise ConfigError(f"{p} ({label}): {e}") from None
        subkeys = leaf_keys(value, f"{key}.") if isinstance(value, dict) and value else [key]
        origins.update({k: label for k in subkeys})
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{p}: unknown key {key!r}; {_suggest(key, TOP_KEYS)}")
    stages = raw.get("stages") or [s for s in STAGES if s in raw]
    if isinstance(stages, str):
        stages = [stages]
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"{p}: stages: unknown stage {s!r}; {_suggest(s, STAGES)}")
    stages = [s for s in STAGES if s in stages]  # canonical order
    if not stages:
        raise ConfigError(f"{p}: no stages; list them under `stages:` (any of {', '.join(STAGES)})")
    sections = {s: copy.deepcopy(raw.get(s) or {}) for s in STAGES}
    for s, sec in sections.items():
        if not isinstance(sec, dict):
            raise ConfigError(f"{p}: section {s!r} must be a mapping")
    name = str(top.get("name") or raw.get("name") or p.stem)
    runs_dir = Path(top.get("runs_dir") or raw.get("runs_dir") or "runs")
    pipe = Pipeline(
        name=name, runs_dir=runs_dir, stages=stages, sections=sections, source=str(p), origins=origins
    )
    for s in pipe.stages:  # fail fast on any bad key before the first stage runs
        stage_config(pipe, s, check_only=True)
    return pipe


# -- hashing ---------------------------------------------------------------------------------------


def _hash_obj(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file or of every file in a directory (names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# -- manifests -------------------------------------------------------------------------------------


def read_manifest(stage_dir: Path) -> dict | None:
    f = stage_dir / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn manifest means the stage never finished: rerun it


def _write_manifest(stage_dir: Path, manifest: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(stage_dir / MANIFEST, manifest)


# -- stage configs -----------------------------------------------------------------------------------


def _upstream_models(pipe: Pipeline, stage: str) -> list[str]:
    """The trained stages a stage reads (evaluate/export: every trained stage, unless `models:` names them)."""
    sec = pipe.sections[stage]
    if stage in TRAIN_STAGES:
        init = (sec.get("model") or {}).get("init")
        return [init] if init in TRAIN_STAGES else []
    models = sec.get("models")
    if models is None:
        trained = [s for s in TRAIN_STAGES if s in pipe.stages]
        finetuned = [s for s in trained if s != "pretrain"]
        return finetuned or trained
    if isinstance(models, str):  # `models: classify` or `--set evaluate.models=classify,instruct`
        return [m.strip() for m in models.split(",") if m.strip()]
    return list(models)


def _inputs(pipe: Pipeline, stage: str) -> list[str]:
    ups = _upstream_models(pipe, stage)
    if stage == "export" and "evaluate" in pipe.stages:
        ups = [*ups, "evaluate"]  # the model card carries the evaluation metrics
    return ups


def _where(pipe: Pipeline, stage: str):
    """Messages about a stage's key name the file, the stage, and `--set`/`quick:` when it came from there."""

    def where(key: str) -> str:
        k = f"{stage}.{key.split('[', 1)[0]}"
        while k:
            if k in pipe.origins:
                return f"{pipe.source} ({pipe.origins[k]}): {stage}: "
            k = k.rpartition(".")[0]
        return f"{pipe.source}: {stage}: "

    return where


def stage_config(pipe: Pipeline, stage: str, check_only: bool = False) -> Any:
    """The resolved config dataclass of a stage: the task config for training, EvaluateStageConfig or
    ExportStageConfig otherwise (their runner-filled fields stay unset: the runner fills them per model).
    """
    from gptforge.pipeline.config import RUNNER_FILLED, STAGE_CONFIGS, config_from_mapping

    sec = copy.deepcopy(pipe.sections[stage])
    where = _where(pipe, stage)
    if stage in TRAIN_STAGES:
        model = sec.get("model")
        init = model.get("init") if isinstance(model, dict) else None
        if isinstance(init, str) and init in STAGES:
            if init not in TRAIN_STAGES or STAGES.index(init) >= STAGES.index(stage):
                raise ConfigError(
                    f"{where('model.init')}model.init={init!r}: only an earlier training stage can feed it"
                )
            if init not in pipe.stages:
                raise ConfigError(
                    f"{where('model.init')}model.init={init!r}: that stage is not in `stages:`; add it"
                )
            sec["model"]["init"] = str(final_checkpoint(pipe, init)) if not check_only else "scratch"
        train = sec.setdefault("train", {})
        if isinstance(train, dict) and "out_dir" in train:
            raise ConfigError(
                f"{where('train.out_dir')}train.out_dir: the runner sets it to {pipe.stage_dir(stage)}; remove it"
            )
        if isinstance(train, dict):
            train["out_dir"] = str(pipe.stage_dir(stage))
        return config_from_mapping(STAGE_CONFIGS[stage], sec, where=where)
    exclude = RUNNER_FILLED[stage]
    cfg = config_from_mapping(STAGE_CONFIGS[stage], sec, where=where, exclude=exclude)
    for m in _upstream_models(pipe, stage):
        if m not in TRAIN_STAGES or m not in pipe.stages:
            raise ConfigError(f"{where('models')}models: {m!r} is not a training stage of this pipeline")
    return cfg


def stage_record(stage: str, cfg: Any) -> dict:
    """A stage's config as a pipeline file section accepts it (runner-filled keys dropped): --print-config."""
    from gptforge.pipeline.config import RUNNER_FILLED

    d = dataclasses.asdict(cfg)
    for key in RUNNER_FILLED[stage]:
        *parents, last = key.split(".")
        sub = d
        for part in parents:
            sub = sub.get(part) or {}
        sub.pop(last, None)
    return d


def final_checkpoint(pipe: Pipeline, stage: str) -> Path:
    """The output checkpoint of a finished training stage."""
    man = read_manifest(pipe.stage_dir(stage))
    if not man or man.get("status") != "done":
        raise GPTForgeError(
            f"stage {stage!r} has not finished in {pipe.stage_dir(stage)}; run it first (drop --only/--from)"
        )
    return Path(man["outputs"]["checkpoint"])


def _config_record(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
        d.get("train", {}).pop("resume", None)
        return d
    return cfg


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
    for model_stage in _upstream_models(pipe, "evaluate"):
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


SPLIT_PREFIX = {"validation": "val"}  # flat metric keys name the validation split as the trainer does


def summarize_evaluation(m: dict) -> dict:
    """The headline numbers of an evaluation's metrics.json, flat as the trainer writes them:
    `<split>_<metric>` with `val` for the validation split (`val_accuracy`, `test_loss`, ...)."""
    out: dict[str, Any] = {}
    for split, sm in (m.get("splits") or {}).items():
        prefix = SPLIT_PREFIX.get(split, split)
        for key in ("accuracy", "macro_f1", "loss", "perplexity", "rouge_l_f1", "exact_match"):
            if isinstance(sm, dict) and isinstance(sm.get(key), (int, float)):
                out[f"{prefix}_{key}"] = sm[key]
    judge = m.get("judge") or {}
    if isinstance(judge, dict) and judge.get("mean_score") is not None:
        out["judge_mean_score"], out["judge_n_scored"] = judge["mean_score"], judge.get("n_scored")
    return out


def _run_export(pipe: Pipeline, cfg: Any) -> tuple[str, dict, dict]:
    from gptforge.export.hf import export
    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.load import load_model

    eval_man = read_manifest(pipe.stage_dir("evaluate")) if "evaluate" in pipe.stages else None
    metrics, outputs = {}, {}
    for model_stage in _upstream_models(pipe, "export"):
        fault_point("export")
        ckpt = final_checkpoint(pipe, model_stage)
        model = load_model(ckpt)
        card_metrics = ((eval_man or {}).get("metrics") or {}).get(model_stage)
        out = pipe.stage_dir("export") / model_stage
        export(
            model,
            out,
            metrics=card_metrics,
            prompt_style=read_metadata(ckpt, "prompt_style.json"),
            overwrite=True,
            verify=cfg.verify,
        )
        outputs[model_stage] = str(out)
        metrics[model_stage] = {"verified": cfg.verify}
    return "done", metrics, outputs


def _output_hash(stage: str, outputs: dict) -> str:
    if stage in TRAIN_STAGES:
        ckpt = Path(outputs["checkpoint"])
        return _hash_obj([hash_path(ckpt / "model.safetensors"), hash_path(ckpt / "config.json")])
    return _hash_obj(
        {
            k: hash_path(Path(v) / "metrics.json") if (Path(v) / "metrics.json").is_file() else v
            for k, v in outputs.items()
        }
    )


# -- what a stage depends on -------------------------------------------------------------------------


def code_version() -> dict:
    """The code that computes a stage: gptforge's version and, in a git checkout, its commit."""
    from gptforge import __version__
    from gptforge.pipeline.runinfo import git_commit

    return {"gptforge": __version__, "git": git_commit()}


def _always_read() -> dict[str, str]:
    """What every stage reads without naming it: the GPT-2 BPE files the tokenizer is built from."""
    from gptforge.model.tokenizer import bpe_files_dir

    d = bpe_files_dir()
    return {str(d / f): "tokenizer file" for f in ("encoder.json", "vocab.bpe") if (d / f).is_file()}


def _shown(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def fingerprint_reads(reads: dict[str, str], own_dir: Path, old: dict | None = None) -> dict[str, dict]:
    """{path: {kind, stat, hash}} of what a stage read, leaving out its own outputs (checkpoints it resumes)."""
    own = str(own_dir.absolute())
    out = {}
    for path, kind in sorted(reads.items()):
        if path == own or path.startswith(own + os.sep):
            continue
        fp = fingerprint(path, (old or {}).get(path))
        if fp is not None:
            out[path] = {"kind": kind, **fp}
    return out


def _changed_reads(old_reads: dict[str, dict]) -> str | None:
    """The first recorded input whose content changed (or that is gone), as a reason; None if none did."""
    for path, rec in old_reads.items():
        fp = fingerprint(path, rec)
        if fp is None:
            return f"{rec.get('kind', 'input')} {_shown(path)} is gone"
        if fp["hash"] != rec.get("hash"):
            return f"{rec.get('kind', 'input')} {_shown(path)} changed"
    return None


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def decide(
    stage: str, old: dict | None, chash: str, record: Any, inputs: dict, code: dict, forced: bool
) -> tuple[str, str]:
    """What to do with a stage and why: ("skip" | "resume" | "run", reason)."""
    if forced:
        return "run", "forced (--force / --from)"
    if not old:
        return "run", "no earlier run"
    if old.get("config_hash") != chash:
        diff = _config_diff(old.get("config"), record)
        return "run", "config changed" + (f": {'; '.join(diff[:3])}" if diff else "")
    if old.get("code") != code:
        was, now = old.get("code") or {}, code
        keys = [k for k in ("gptforge", "git") if was.get(k) != now.get(k)] or ["code"]
        return "run", "gptforge code changed (" + ", ".join(
            f"{k} {was.get(k)} -> {now.get(k)}" for k in keys
        ) + ")"
    if old.get("inputs") != inputs:
        ups = [u for u in inputs if (old.get("inputs") or {}).get(u) != inputs[u]] or list(inputs)
        return "run", f"output of upstream stage {ups[0]!r} changed"
    changed = _changed_reads(old.get("reads") or {})
    if changed:
        return "run", changed
    status = old.get("status")
    if status == "done":
        return "skip", "up to date (config, code, upstream outputs and every file it read unchanged)"
    if stage in TRAIN_STAGES and status in ("running", "interrupted"):
        return "resume", f"{status} earlier; resuming from its last checkpoint"
    return "run", f"last run {status or 'unknown'}"


# -- the runner --------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
    stage: str
    action: str  # ran | resumed | skipped | interrupted | failed
    seconds: float
    metrics: dict
    outputs: dict


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
        record = _config_record(cfg)
        ups = _inputs(pipe, stage)
        inputs = {u: (read_manifest(pipe.stage_dir(u)) or {}).get("output_hash") for u in ups}
        waiting = [u for u in ups if u in will_run]
        if explain and waiting:
            action, reason = "run", f"upstream stage {waiting[0]!r} runs first"
        else:
            for u, h in inputs.items():
                if h is None and u in TRAIN_STAGES and not explain:
                    raise GPTForgeError(f"stage {stage!r} needs {u!r}, which has not finished; run it first")
            chash = _hash_obj(record)
            action, reason = decide(stage, old, chash, record, inputs, code, stage in forced)
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
            _write_manifest(sdir, manifest)
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
                    _write_manifest(sdir, manifest)
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
            manifest["reads"] = fingerprint_reads({**_always_read(), **reads}, sdir)
        if status == "done":
            manifest["output_hash"] = _output_hash(stage, outputs) if state.is_main_process else None
        if state.is_main_process:
            _write_manifest(sdir, manifest)
        action = "interrupted" if status == "interrupted" else ("resumed" if resume else "ran")
        results.append(StageResult(stage, action, seconds, manifest["metrics"], outputs))
        if status == "interrupted":
            log(f"[{stage}] interrupted: run the same command again to resume")
            break
    if state.is_main_process and not explain:
        write_summary(pipe, results)
    return results


# -- summary ---------------------------------------------------------------------------------------

HEADLINE = {
    "pretrain": ("val_loss", "val_perplexity"),
    "classify": ("train_accuracy", "val_accuracy", "test_accuracy"),
    "instruct": ("val_loss", "test_loss"),
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _headline(stage: str, metrics: dict) -> str:
    if stage in HEADLINE:
        keys = [k for k in HEADLINE[stage] if k in metrics] or list(metrics)[:3]
        return ", ".join(f"{k} {_fmt(metrics[k])}" for k in keys)
    parts = []
    for model_stage, m in metrics.items():
        if isinstance(m, dict):
            keys = [k for k in m if k.startswith("test_") or k.startswith("judge")] or list(m)[:2]
            parts.append(f"{model_stage}: " + ", ".join(f"{k} {_fmt(m[k])}" for k in keys))
    return "; ".join(parts)


def summary_table(results: list[StageResult]) -> str:
    rows = ["| stage | action | time | key metrics | outputs |", "|---|---|---:|---|---|"]
    for r in results:
        outs = ", ".join(f"`{v}`" for v in r.outputs.values())
        rows.append(
            f"| {r.stage} | {r.action} | {r.seconds:.1f}s | {_headline(r.stage, r.metrics)} | {outs} |"
        )
    return "\n".join(rows)


def write_summary(pipe: Pipeline, results: list[StageResult]) -> Path:
    """`runs/<name>/summary.md` for the whole pipeline: every stage's latest manifest, not only this run's."""
    by_stage = {r.stage: r for r in results}
    full = []
    for stage in pipe.stages:
        if stage in by_stage:
            full.append(by_stage[stage])
            continue
        man = read_manifest(pipe.stage_dir(stage))
        if man:
            full.append(
                StageResult(
                    stage, man.get("status", "?"), 0.0, man.get("metrics", {}), man.get("outputs", {})
                )
            )
    text = f"# Pipeline `{pipe.name}`\n\nFrom `{pipe.source}`; stage dirs under `{pipe.root}`.\n\n"
    text += summary_table(full) + "\n"
    pipe.root.mkdir(parents=True, exist_ok=True)
    return write_text(pipe.root / "summary.md", text)


def print_summary(results: list[StageResult], pipe: Pipeline, file=sys.stdout) -> None:
    width = max((len(r.stage) for r in results), default=5)
    print(f"\nPipeline {pipe.name}: {pipe.root}/summary.md", file=file)
    for r in results:
        print(
            f"  {r.stage:<{width}}  {r.action:<11} {r.seconds:7.1f}s  {_headline(r.stage, r.metrics)}",
            file=file,
        )
        for name, path in r.outputs.items():
            print(f"  {'':<{width}}  -> {name}: {path}", file=file)
