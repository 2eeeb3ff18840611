"""The evaluation stage's entry points: a checkpoint (its task, the data it was trained on, one output
dir) or a responses file. The CLI verb and the pipeline runner both call these with an `EvaluateConfig`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError, GPTForgeError
from gptforge.pipeline.config import TASK_CONFIGS, EvaluateConfig, EvaluateDataConfig, TrainConfig
from gptforge.pipeline.evaluate.classify import evaluate_classify
from gptforge.pipeline.evaluate.dpo import evaluate_dpo
from gptforge.pipeline.evaluate.instruct import evaluate_instruct, load_responses, score_responses
from gptforge.pipeline.evaluate.pretrain import evaluate_pretrain, source_names

TASKS = ("pretrain", "classify", "instruct", "dpo")
EVALUATORS = {
    "pretrain": evaluate_pretrain,
    "classify": evaluate_classify,
    "instruct": evaluate_instruct,
    "dpo": evaluate_dpo,
}


def infer_task(ckpt_dir: str | os.PathLike, model=None) -> str:
    """classify for a classifier, dpo for a DPO run's model, instruct when a prompt style is saved, else pretrain."""
    from gptforge.model.checkpoint import read_metadata

    if model is not None and model.cfg.num_labels:
        return "classify"
    if (read_metadata(ckpt_dir, "run.json") or {}).get("task") == "dpo":
        return "dpo"
    if read_metadata(ckpt_dir, "prompt_style.json") is not None:
        return "instruct"
    run = read_metadata(ckpt_dir, "run.json") or {}
    if run.get("task") in TASKS:
        return run["task"]
    return "pretrain"


def output_dir(cfg: EvaluateConfig) -> Path:
    """`cfg.out`, else eval/<responses file name> or eval/<parent>-<checkpoint dir name>."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.responses:
        return Path("eval") / Path(cfg.responses).stem
    return Path("eval") / "-".join(Path(cfg.checkpoint).resolve().parts[-2:])


def _given(cfg: EvaluateConfig) -> EvaluateDataConfig:
    data = cfg.data
    if data is None:
        return EvaluateDataConfig()
    return EvaluateDataConfig(**data) if isinstance(data, dict) else data


def trained_data(task: str, ckpt_dir: str | os.PathLike, given: EvaluateDataConfig) -> tuple[Any, int]:
    """The task's data config as the checkpoint was trained with (its run.json), `given`'s set fields
    over it, and the split seed: evaluation reads exactly the splits training held out.

    A checkpoint without run.json (or trained on another task) gets the task's default data.
    """
    from gptforge.model.checkpoint import read_metadata

    run_cfg = (read_metadata(ckpt_dir, "run.json") or {}).get("config") or {}
    seed = (run_cfg.get("train") or {}).get("seed")
    seed = TrainConfig.seed if seed is None else int(seed)
    saved = dict(run_cfg.get("data") or {}) if run_cfg.get("task", task) == task else {}
    if run_cfg.get("max_length") is not None:  # the classifier's effective truncation, not data.max_length
        saved["max_length"] = run_cfg["max_length"]
    over = {k: v for k, v in dataclasses.asdict(given).items() if v is not None}
    if task == "pretrain" and "dataset" in over:
        over["sources"] = source_names(over.pop("dataset"))
    cls = type(TASK_CONFIGS[task]().data)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**saved, **over}.items() if k in known}), seed


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """Evaluate `cfg.checkpoint` on its task and write `output_dir(cfg)`; returns the metrics dict.

    `cfg.task` None infers it from the checkpoint; `cfg.data`'s set fields override the data config
    saved in the checkpoint's run.json; `cfg.judge` is used by the instruct task only.
    """
    import datasets

    if not cfg.checkpoint:
        raise ConfigError("evaluate: no checkpoint given; name a checkpoint directory")
    quiet = not cfg.progress and not datasets.are_progress_bars_disabled()
    if quiet:  # the `datasets` map bars too, not only ours
        datasets.disable_progress_bars()
    try:
        return _evaluate_checkpoint(cfg)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    from gptforge.model.load import load_model as load_checkpoint  # adapter dirs too, merged

    ckpt = cfg.checkpoint
    model = load_checkpoint(ckpt)
    task = cfg.task or infer_task(ckpt, model)
    if task not in TASKS:
        raise GPTForgeError(f"task={task!r} is not one of {TASKS}")
    if task == "classify" and not model.cfg.num_labels:
        raise GPTForgeError(f"{ckpt}: a language model (num_labels=0) cannot be evaluated as a classifier")
    if task != "classify" and model.cfg.num_labels:
        raise GPTForgeError(f"{ckpt}: a classifier cannot be evaluated as task={task!r}; use --task classify")
    given = _given(cfg)
    cfg = dataclasses.replace(cfg, data=given)
    data, seed = trained_data(task, ckpt, given)
    source = {"checkpoint": str(ckpt)}
    limit = getattr(data, "limit", given.limit)
    if limit:
        source["limit"] = f"first {limit} examples of each split"
    return EVALUATORS[task](model, cfg, data, seed, output_dir(cfg), source)


def evaluate_responses_file(cfg: EvaluateConfig) -> dict:
    """Score `cfg.responses`, a reference-format responses file, into `output_dir(cfg)`; no model needed."""
    if not cfg.responses:
        raise ConfigError("evaluate: no responses file given; pass --responses FILE.json")
    records = load_responses(cfg.responses, cfg.response_key)
    return score_responses(
        records,
        output_dir(cfg),
        response_key=cfg.response_key,
        judge=cfg.judge,
        source={"responses_file": str(cfg.responses), "response_key": cfg.response_key},
        use_stemmer=cfg.use_stemmer,
        progress=cfg.progress,
    )
