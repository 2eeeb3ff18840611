"""A pipeline file and its stages: `load_pipeline` reads and checks the YAML (with `--set` and `quick:`
overrides), `stage_config` resolves each stage's section into its verb's typed config; `model.init:
pretrain` (an earlier stage's name) becomes that stage's output checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError, GPTForgeError
from gptforge.pipeline.manifest import read_manifest

STAGES = ("pretrain", "classify", "instruct", "dpo", "evaluate", "export")
TRAIN_STAGES = ("pretrain", "classify", "instruct", "dpo")
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


# -- stage configs -----------------------------------------------------------------------------------


def upstream_models(pipe: Pipeline, stage: str) -> list[str]:
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


def stage_inputs(pipe: Pipeline, stage: str) -> list[str]:
    ups = upstream_models(pipe, stage)
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
    for m in upstream_models(pipe, stage):
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


def config_record(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
        d.get("train", {}).pop("resume", None)
        return d
    return cfg
