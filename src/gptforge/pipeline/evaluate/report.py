"""What an evaluation leaves behind: metrics.json, report.md with its plots, and per-example files.

Every writer builds its whole directory through `gptforge.io.atomic_dir`, so an evaluation dir is
either complete or absent. Plots use matplotlib's Agg canvas directly (no pyplot state, no display).
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from collections.abc import Sequence
from pathlib import Path

from gptforge.io import atomic_dir, write_bytes, write_json, write_jsonl, write_text

REFERENCE_RESPONSES = "instruction-data-with-response.json"  # the reference's file name and format


# -- plots --------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Counts in every cell; rows are true classes, columns predictions."""
    n = len(labels)
    fig = _figure(1.6 + 0.9 * n, 1.2 + 0.9 * n)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(n), labels=list(labels), rotation=45 if n > 4 else 0)
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    _save(fig, Path(path))
    return Path(path)


def plot_histogram(
    values: Sequence[float], path: str | os.PathLike, xlabel: str, bins: int = 20, range_=None
) -> Path:
    fig = _figure(5, 3.2)
    ax = fig.add_subplot()
    ax.hist(list(values), bins=bins, range=range_, color="#4878cf", edgecolor="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("records")
    _save(fig, Path(path))
    return Path(path)


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """A run's loss.png: training and validation loss against optimizer steps, from its metrics.jsonl
    records; a DPO run (records with `rewards/margins`) gets a second panel with the reward margin and
    accuracy, training and validation."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and isinstance(r["loss"], float)]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and not r.get("final")]
    rewards = any("rewards/margins" in r for r in records)
    fig = _figure(6, 7 if rewards else 4)
    ax = fig.add_subplot(2, 1, 1) if rewards else fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), marker="o", linestyle="-.", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    if rewards:
        rx = fig.add_subplot(2, 1, 2)
        for key, style, label in (
            ("rewards/margins", "-", "reward margin"),
            ("val_rewards/margins", "-.", "validation reward margin"),
            ("rewards/accuracy", ":", "reward accuracy"),
            ("val_rewards/accuracy", "--", "validation reward accuracy"),
        ):
            pts = [(r["step"], r[key]) for r in records if key in r and not r.get("final")]
            if pts:
                rx.plot(
                    *zip(*pts), linestyle=style, marker="o" if key.startswith("val_") else None, label=label
                )
        rx.set_xlabel("optimizer step")
        rx.set_ylabel("reward (beta x log-ratio) / accuracy")
        rx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- reports ------------------------------------------------------------------------------------------
def _classify_section(split: str, m: dict) -> list[str]:
    lines = [
        f"### {split} (n={m['n']})",
        "",
        f"Accuracy **{m['accuracy']:.4f}**, macro F1 **{m['macro']['f1']:.4f}**",
        "",
    ]
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, c in m["per_class"].items():
        lines.append(
            f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
        )
    mac = m["macro"]
    lines.append(f"| *macro* | {mac['precision']:.4f} | {mac['recall']:.4f} | {mac['f1']:.4f} | {m['n']} |")
    if m.get("plot"):
        lines += ["", f"![confusion matrix, {split}]({m['plot']})"]
    return lines + [""]


def _judge_section(j: dict) -> list[str]:
    cfg = j.get("config", {})
    mean = "n/a" if j["mean_score"] is None else f"{j['mean_score']:.2f}"
    lines = [
        "## LLM judge",
        "",
        f"Judge `{cfg.get('model')}` ({cfg.get('backend')} at {cfg.get('url')}): mean score **{mean}** / 100 "
        f"over n={j['n_scored']} of {j['n_total']} records; {j['n_unparseable']} unparseable and "
        f"{j['n_failed']} failed replies are not in the mean (see `judgments.jsonl`).",
    ]
    if j.get("error"):
        lines += ["", f"Failed requests, most common cause: `{j['error']}`"]
    if j.get("plot"):
        lines += ["", f"![judge scores]({j['plot']})"]
    return lines + [""]


def render_report(metrics: dict) -> str:
    """report.md: what was evaluated, the numbers, and the plots by relative path."""
    task = metrics["task"]
    src = metrics.get("source", {})
    lines = [f"# Evaluation: {task}", ""]
    for k, v in src.items():
        lines.append(f"- {k}: `{v}`")
    lines += [f"- created: {metrics.get('created', '')}", ""]
    splits = metrics.get("splits", {})
    if task == "pretrain":
        lines += [
            "## Language modelling",
            "",
            "| split | loss | perplexity | tokens |",
            "|---|---:|---:|---:|",
        ]
        for split, m in splits.items():
            lines.append(f"| {split} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['tokens']} |")
        lines.append("")
        if metrics.get("training_plot"):
            lines += [
                "Training and validation loss during training:",
                "",
                f"![training loss]({metrics['training_plot']})",
                "",
            ]
    elif task == "classify":
        lines += ["## Classification", ""]
        for split, m in splits.items():
            lines += _classify_section(split, m)
    else:
        lines += [
            "## Responses",
            "",
            "| split | n | ROUGE-L F1 | exact match | exact (normalized) | words (response / reference) | empty |",
        ]
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for split, m in splits.items():
            lines.append(
                f"| {split} | {m['n']} | {m['rouge_l_f1']:.4f} | {m['exact_match']:.1%} | "
                f"{m['exact_match_normalized']:.1%} | {m['response_words_mean']:.1f} / {m['reference_words_mean']:.1f} | "
                f"{m['empty_responses']} |"
            )
        lines += [
            "",
            "ROUGE-L F1 from `rouge_score` (default tokenizer, no stemming unless stated in metrics.json). "
            "For scale: the reference's GPT-2 medium finetune reaches 0.589 mean ROUGE-L F1 and 15.5% exact "
            "match on the reference's 110 test records.",
            "",
        ]
        for split, m in splits.items():
            if m.get("plot"):
                lines += [f"![ROUGE-L F1 per record, {split}]({m['plot']})", ""]
        if metrics.get("judge"):
            lines += _judge_section(metrics["judge"])
        if metrics.get("files"):
            lines += ["## Files", ""] + [f"- `{f}`: {d}" for f, d in metrics["files"].items()] + [""]
    return "\n".join(lines)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_classification_report(
    splits: dict[str, dict],
    out_dir: str | os.PathLike,
    source: dict | None = None,
    predictions: dict[str, list[dict]] | None = None,
) -> dict:
    """metrics.json + report.md + a confusion matrix (JSON and PNG) per split, and per-example
    predictions_<split>.jsonl when given; written atomically."""
    metrics = {"task": "classify", "created": _now(), "source": dict(source or {}), "splits": {}}
    for split, m in splits.items():
        metrics["splits"][split] = {**m, "plot": f"confusion_{split}.png"}

    def write(tmp: Path) -> None:
        for split, m in metrics["splits"].items():
            cm = m["confusion_matrix"]
            plot_confusion_matrix(cm["matrix"], cm["labels"], tmp / m["plot"], title=f"{split} (n={m['n']})")
            write_json(tmp / f"confusion_{split}.json", cm)
        for split, rows in (predictions or {}).items():
            write_jsonl(tmp / f"predictions_{split}.jsonl", rows)
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "report.md", render_report(metrics))

    atomic_dir(out_dir, write)
    return metrics


def write_lm_report(
    splits: dict[str, dict],
    out_dir: str | os.PathLike,
    source: dict | None = None,
    training_plot: str | os.PathLike | None = None,
) -> dict:
    """metrics.json + report.md (with the checkpoint's training-loss plot copied in, when it has one)."""
    import shutil

    metrics = {"task": "pretrain", "created": _now(), "source": dict(source or {}), "splits": dict(splits)}
    if training_plot is not None:
        metrics["training_plot"] = "training_loss.png"

    def write(tmp: Path) -> None:
        if training_plot is not None:
            shutil.copyfile(training_plot, tmp / "training_loss.png")
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "report.md", render_report(metrics))

    atomic_dir(out_dir, write)
    return metrics


def write_responses_report(
    out_dir: str | os.PathLike,
    *,
    split: str,
    summary: dict,
    records: Sequence[dict],
    rows: Sequence[dict],
    response_key: str,
    source: dict | None = None,
    judgments: Sequence[dict] | None = None,
    judge_summary: dict | None = None,
) -> dict:
    """metrics.json + report.md, the records in the reference format, one JSONL row per record, a
    ROUGE-L histogram and, with a judge, judgments.jsonl and a score histogram; written atomically."""
    summary = {**summary, "plot": f"rouge_l_{split}.png"}
    if judge_summary is not None and judge_summary["n_scored"]:
        judge_summary = {**judge_summary, "plot": "judge_scores.png"}
    files = {
        REFERENCE_RESPONSES: f"the {split} records with `{response_key}` (the reference's format)",
        "generations.jsonl": "per record: prompt, raw generation, extracted response, reference, scores",
    }
    if judgments is not None:
        files["judgments.jsonl"] = "per record: judge prompt, raw reply, parsed score, status, error"
    metrics = {
        "task": "instruct",
        "created": _now(),
        "source": dict(source or {}),
        "splits": {split: summary},
        "judge": judge_summary,
        "files": files,
    }

    def write(tmp: Path) -> None:
        write_json(tmp / REFERENCE_RESPONSES, list(records))
        write_jsonl(tmp / "generations.jsonl", rows)
        plot_histogram([r["rouge_l_f1"] for r in rows], tmp / summary["plot"], "ROUGE-L F1", range_=(0, 1))
        if judgments is not None:
            write_jsonl(tmp / "judgments.jsonl", judgments)
            if judge_summary.get("plot"):
                ok = [j["score"] for j in judgments if j["status"] == "ok"]
                plot_histogram(ok, tmp / judge_summary["plot"], "judge score", bins=20, range_=(0, 100))
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "report.md", render_report(metrics))

    atomic_dir(out_dir, write)
    return metrics
