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
from gptforge.io import write_json

STAGES = ("pretrain", "classify", "instruct", "evaluate", "export")
TRAIN_STAGES = ("pretrain", "classify", "instruct")
TOP_KEYS = ("name", "runs_dir", "stages", "quick", *STAGES)
EVALUATE_KEYS = ("models", "batch_size", "max_new_tokens", "splits", "judge", "use_stemmer")
EXPORT_KEYS = ("models", "verify")
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

    @property
    def root(self) -> Path:
        return self.runs_dir / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load_pipeline(
    path: str | os.PathLike, overrides: list[str] | None = None, quick: bool = False, **top: Any
) -> Pipeline:
    """Read and check a pipeline YAML; `overrides` are `section.key=value` strings (values parsed as YAML).

    `quick` applies the file's `quick:` mapping of dotted overrides first (a short run of the same graph).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: pipeline file not found; see configs/ for examples")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a pipeline file is a mapping with `stages:` and one section per stage")
    quick_set = raw.pop("quick", None) or {}
    if not isinstance(quick_set, dict):
        raise ConfigError(f"{p}: `quick:` must map dotted keys to values, e.g. classify.train.epochs: 1")
    items = [f"{k}={json.dumps(v)}" for k, v in quick_set.items()] if quick else []
    for item in items + list(overrides or []):
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: use section.key=value, e.g. classify.train.epochs=3")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
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
    pipe = Pipeline(name=name, runs_dir=runs_dir, stages=stages, sections=sections, source=str(p))
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
    return [models] if isinstance(models, str) else list(models)


def _inputs(pipe: Pipeline, stage: str) -> list[str]:
    ups = _upstream_models(pipe, stage)
    if stage == "export" and "evaluate" in pipe.stages:
        ups = [*ups, "evaluate"]  # the model card carries the evaluation metrics
    return ups


def stage_config(pipe: Pipeline, stage: str, check_only: bool = False) -> Any:
    """The resolved config of a stage: a task config dataclass for training, a dict otherwise."""
    sec = copy.deepcopy(pipe.sections[stage])
    where = f"{pipe.source}: {stage}"
    if stage in TRAIN_STAGES:
        from gptforge.pipeline.config import load_config

        init = (sec.get("model") or {}).get("init")
        if init in STAGES:
            if init not in TRAIN_STAGES or STAGES.index(init) >= STAGES.index(stage):
                raise ConfigError(f"{where}.model.init={init!r}: only an earlier training stage can feed it")
            if init not in pipe.stages:
                raise ConfigError(f"{where}.model.init={init!r}: that stage is not in `stages:`; add it")
            sec["model"]["init"] = str(final_checkpoint(pipe, init)) if not check_only else "scratch"
        train = sec.setdefault("train", {})
        if "out_dir" in train:
            raise ConfigError(
                f"{where}.train.out_dir: the runner sets it to {pipe.stage_dir(stage)}; remove it"
            )
        train["out_dir"] = str(pipe.stage_dir(stage))
        flat: dict[str, Any] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict) and k in ("model", "data", "train", "lora"):
                    walk(v, f"{prefix}{k}.")
                else:
                    flat[f"{prefix}{k}"] = v

        walk(sec, "")
        try:
            return load_config(stage, None, **flat)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    keys = EVALUATE_KEYS if stage == "evaluate" else EXPORT_KEYS
    for k in sec:
        if k not in keys:
            raise ConfigError(f"{where}: unknown key {k!r}; {_suggest(k, keys)}")
    for m in _upstream_models(pipe, stage):
        if m not in TRAIN_STAGES or m not in pipe.stages:
            raise ConfigError(f"{where}.models: {m!r} is not a training stage of this pipeline")
    if stage == "evaluate" and sec.get("judge"):
        from gptforge.pipeline.judge import JudgeConfig

        try:
            JudgeConfig(**sec["judge"])
        except TypeError as e:
            raise ConfigError(f"{where}.judge: {e}") from None
    return sec


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


def _run_evaluate(pipe: Pipeline, sec: dict) -> tuple[str, dict, dict]:
    from gptforge.pipeline.config import EvaluateConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint

    judge = None
    if sec.get("judge"):
        from gptforge.pipeline.judge import JudgeConfig

        judge = JudgeConfig(**sec["judge"])
    metrics, outputs = {}, {}
    for model_stage in _upstream_models(pipe, "evaluate"):
        out = pipe.stage_dir("evaluate") / model_stage
        cfg = EvaluateConfig(
            checkpoint=str(final_checkpoint(pipe, model_stage)),
            out=str(out),
            task=model_stage,
            judge=judge,
            splits=sec.get("splits"),
            batch_size=int(sec.get("batch_size", 8)),
            max_new_tokens=int(sec.get("max_new_tokens", 256)),
            use_stemmer=bool(sec.get("use_stemmer", False)),
        )
        m = evaluate_checkpoint(cfg)
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


def _run_export(pipe: Pipeline, sec: dict) -> tuple[str, dict, dict]:
    from gptforge.model.checkpoint import load_checkpoint, read_metadata
    from gptforge.model.hf import export

    eval_man = read_manifest(pipe.stage_dir("evaluate")) if "evaluate" in pipe.stages else None
    metrics, outputs = {}, {}
    for model_stage in _upstream_models(pipe, "export"):
        ckpt = final_checkpoint(pipe, model_stage)
        model = load_checkpoint(ckpt)
        card_metrics = ((eval_man or {}).get("metrics") or {}).get(model_stage)
        out = pipe.stage_dir("export") / model_stage
        export(
            model,
            out,
            metrics=card_metrics,
            prompt_style=read_metadata(ckpt, "prompt_style.json"),
            overwrite=True,
            verify=bool(sec.get("verify", True)),
        )
        outputs[model_stage] = str(out)
        metrics[model_stage] = {"verified": bool(sec.get("verify", True))}
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
    log=print,
) -> list[StageResult]:
    """Run the pipeline; returns one StageResult per considered stage and writes summary.md."""
    import torch
    from accelerate import PartialState

    # Under torchrun / accelerate launch: the process group the trainer uses (gloo on CPU).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1 and only is None:
        raise ConfigError(
            "under torchrun / accelerate launch, run one stage per launch: add --only STAGE "
            "(scripts/01_pretrain.sh ... and scripts/run_all.sh with LAUNCH= do this)"
        )
    stages = plan(pipe, from_stage=from_stage, only=only)
    forced = set(stages) if force else set()
    if from_stage:
        forced |= set(pipe.stages[pipe.stages.index(from_stage) :])
    results: list[StageResult] = []
    for stage in stages:
        sdir = pipe.stage_dir(stage)
        cfg = stage_config(pipe, stage)
        record = _config_record(cfg)
        inputs = {
            u: (read_manifest(pipe.stage_dir(u)) or {}).get("output_hash") for u in _inputs(pipe, stage)
        }
        for u, h in inputs.items():
            if h is None and u in TRAIN_STAGES:
                raise GPTForgeError(f"stage {stage!r} needs {u!r}, which has not finished; run it first")
        chash = _hash_obj(record)
        old = read_manifest(sdir)
        state.wait_for_everyone()  # every process has read the manifest before the main one rewrites it
        same = bool(old) and old.get("config_hash") == chash and old.get("inputs") == inputs
        if same and old.get("status") == "done" and stage not in forced:
            log(f"[{stage}] up to date: skipped ({sdir})")
            results.append(StageResult(stage, "skipped", 0.0, old.get("metrics", {}), old.get("outputs", {})))
            continue
        resume = same and stage in TRAIN_STAGES and stage not in forced and old.get("status") != "done"
        if not resume and sdir.exists() and state.is_main_process:
            shutil.rmtree(sdir)
        state.wait_for_everyone()
        log(f"[{stage}] {'resuming' if resume else 'running'} in {sdir}")
        manifest = {
            "stage": stage,
            "status": "running",
            "config_hash": chash,
            "inputs": inputs,
            "config": record,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if state.is_main_process:
            _write_manifest(sdir, manifest)
        t0 = time.perf_counter()
        try:
            if stage in TRAIN_STAGES:
                status, metrics, outputs = _run_train(pipe, stage, cfg, resume)
            elif state.is_main_process:
                status, metrics, outputs = (_run_evaluate if stage == "evaluate" else _run_export)(pipe, cfg)
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
        if status == "done":
            manifest["output_hash"] = _output_hash(stage, outputs) if state.is_main_process else None
        if state.is_main_process:
            _write_manifest(sdir, manifest)
        action = "interrupted" if status == "interrupted" else ("resumed" if resume else "ran")
        results.append(StageResult(stage, action, seconds, manifest["metrics"], outputs))
        if status == "interrupted":
            log(f"[{stage}] interrupted: run the same command again to resume")
            break
    if state.is_main_process:
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
    path = pipe.root / "summary.md"
    tmp = path.with_name(f".summary.md.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


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
