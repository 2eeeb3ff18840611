"""What a pipeline run reports: the summary table (printed and `runs/<name>/summary.md`) and the
headline numbers of an evaluation."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from gptforge.io import write_text
from gptforge.pipeline.manifest import read_manifest
from gptforge.pipeline.stages import Pipeline


@dataclasses.dataclass
class StageResult:
    stage: str
    action: str  # ran | resumed | skipped | interrupted | failed
    seconds: float
    metrics: dict
    outputs: dict


SPLIT_PREFIX = {"validation": "val"}  # flat metric keys name the validation split as the trainer does


def summarize_evaluation(m: dict) -> dict:
    """The headline numbers of an evaluation's metrics.json, flat as the trainer writes them:
    `<split>_<metric>` with `val` for the validation split (`val_accuracy`, `test_loss`, ...)."""
    out: dict[str, Any] = {}
    for split, sm in (m.get("splits") or {}).items():
        prefix = SPLIT_PREFIX.get(split, split)
        for key in (
            "accuracy",
            "macro_f1",
            "loss",
            "perplexity",
            "rouge_l_f1",
            "exact_match",
            "rewards/accuracy",
        ):
            if isinstance(sm, dict) and isinstance(sm.get(key), (int, float)):
                out[f"{prefix}_{key}"] = sm[key]
    judge = m.get("judge") or {}
    if isinstance(judge, dict) and judge.get("mean_score") is not None:
        out["judge_mean_score"], out["judge_n_scored"] = judge["mean_score"], judge.get("n_scored")
    if isinstance(judge, dict) and judge.get("win_rate") is not None:  # DPO: against its starting model
        out["judge_win_rate"], out["judge_n_compared"] = judge["win_rate"], judge.get("n_compared")
    return out


# -- the summary table ---------------------------------------------------------------------------------------

HEADLINE = {
    "pretrain": ("val_loss", "val_perplexity"),
    "classify": ("train_accuracy", "val_accuracy", "test_accuracy"),
    "instruct": ("val_loss", "test_loss"),
    "dpo": ("val_rewards/accuracy", "test_rewards/accuracy", "val_rewards/margins"),
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
