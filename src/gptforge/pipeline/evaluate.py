"""The evaluation stage: metrics, generation, judges and reports for the three tasks.

- pretrain: token-weighted loss and perplexity on validation and test.
- classify: accuracy, per-class and macro precision/recall/F1, confusion matrices (JSON + PNG) per split.
- instruct: batched KV-cache generation over the test split, response extraction, ROUGE-L F1, exact
  match, response length, and optionally an LLM judge (`pipeline.judge`).

Each evaluation writes one directory, atomically: `metrics.json`, `report.md` (plots embedded by
relative path) and the task's artifacts. `evaluate_checkpoint` is what the pipeline runner calls.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from gptforge.errors import DataError, GPTForgeError
from gptforge.io import atomic_dir, write_json, write_jsonl
from gptforge.pipeline.judge import JudgeConfig, judge_records, write_judgments
from gptforge.tasks.instruct import RESPONSE_HEADER, extract_response

TASKS = ("pretrain", "classify", "instruct")
REFERENCE_RESPONSES = "instruction-data-with-response.json"  # the reference's file name and format


# -- classification metrics ---------------------------------------------------------------------------
def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1 and the confusion matrix (rows = true class).

    Macro F1 is the mean of per-class F1 (scikit-learn's definition); a class never predicted has
    precision 0 rather than a warning.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} targets but {len(y_pred)} predictions")
    if not len(y_true):
        raise DataError("no examples to evaluate: the split is empty")
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average="macro", zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=ids)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "macro_f1": float(mf),  # the headline number, flat for summaries
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": cm.tolist()},
    }


# -- language-model metrics ---------------------------------------------------------------------------
def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    from accelerate import PartialState

    return PartialState().device


@torch.no_grad()
def lm_metrics(model, batches: Iterable[dict], device: str | torch.device | None = None) -> dict:
    """Loss averaged over every target token (not over batches) and its perplexity."""
    dev = _device(device)
    model.eval().to(dev)
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].to(dev)
        loss = model(batch["input_ids"].to(dev), targets=targets, reduction="sum")
        total += float(loss)
        count += int((targets != -100).sum())
    if count == 0:
        raise DataError("no target tokens to evaluate: the split is empty or shorter than one block")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


# -- classification inference -------------------------------------------------------------------------
def label_names(model) -> list[str]:
    """Class names in id order, from the checkpoint's config (LABEL_i where none were saved)."""
    cfg = model.cfg
    if not cfg.num_labels:
        raise GPTForgeError("this checkpoint is a language model (num_labels=0); classify needs a classifier")
    names = cfg.id2label or {}
    return [str(names.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]


@torch.no_grad()
def predict_classes(model, batches: Iterable[dict], device: str | torch.device | None = None):
    """(targets, predictions, probabilities) over batches from `ClassificationCollator`."""
    dev = _device(device)
    model.eval().to(dev)
    y_true: list[int] = []
    y_pred: list[int] = []
    probs: list[list[float]] = []
    for batch in batches:
        logits = model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        p = logits.float().softmax(-1).cpu()
        y_pred += p.argmax(-1).tolist()
        probs += p.tolist()
        if "targets" in batch:
            y_true += batch["targets"].tolist()
    return y_true, y_pred, probs


def classify_texts(
    model,
    texts: Sequence[str],
    *,
    tokenizer=None,
    max_length: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Label new texts: per text the predicted label, its probability and every class's probability.

    Texts longer than `max_length` tokens (default: the model's context) keep their first tokens, as in
    training; the count of truncated texts is returned in each result's `truncated` flag.
    """
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.tasks.classify import ClassificationCollator

    names = label_names(model)
    tok = tokenizer or Tokenizer()
    limit = min(max_length or model.cfg.context_length, model.cfg.context_length)
    ids = tok.encode_batch(list(texts)) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    for i, x in enumerate(ids):
        if not x:
            raise DataError(f"text {i + 1} is empty; give at least one character to classify")
    collate = ClassificationCollator(pad_token_id=model.cfg.pad_token_id, max_length=limit)
    items = [{"input_ids": x, "label": 0} for x in ids]
    batches = (collate(items[b : b + batch_size]) for b in range(0, len(items), batch_size))
    _, pred, probs = predict_classes(model, batches, device)
    return [
        {
            "text": text,
            "label": names[k],
            "score": p[k],
            "probabilities": dict(zip(names, p)),
            "truncated": len(x) > limit,
        }
        for text, x, k, p in zip(texts, ids, pred, probs)
    ]


# -- instruction responses ----------------------------------------------------------------------------
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """For the lenient exact match: NFKC, case-folded, whitespace collapsed, trailing period dropped."""
    text = _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def response_scores(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False
) -> list[dict]:
    """Per-record ROUGE-L F1 (rouge_score, offline), exact matches and word counts."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} responses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    out = []
    for pred, ref in zip(predictions, references):
        out.append(
            {
                "rouge_l_f1": float(scorer.score(ref, pred)["rougeL"].fmeasure),
                "exact_match": pred.strip() == ref.strip(),
                "exact_match_normalized": normalize_text(pred) == normalize_text(ref),
                "response_words": len(pred.split()),
                "reference_words": len(ref.split()),
                "response_chars": len(pred),
            }
        )
    return out


def summarize_response_scores(scores: Sequence[dict], use_stemmer: bool = False) -> dict:
    n = len(scores)
    if n == 0:
        raise DataError("no responses to score: the responses list is empty")

    def mean(key: str) -> float:
        return sum(float(s[key]) for s in scores) / n

    return {
        "n": n,
        "rouge_l_f1": mean("rouge_l_f1"),
        "exact_match": mean("exact_match"),
        "exact_match_normalized": mean("exact_match_normalized"),
        "response_words_mean": mean("response_words"),
        "reference_words_mean": mean("reference_words"),
        "response_chars_mean": mean("response_chars"),
        "empty_responses": sum(s["response_chars"] == 0 for s in scores),
        "rouge": {"type": "rougeL", "tokenizer": "rouge_score default", "use_stemmer": use_stemmer},
    }


def load_responses(path: str | os.PathLike, response_key: str = "model_response") -> list[dict]:
    """A responses file in the reference format: a JSON list of records with `output` and the response."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: responses file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: not a JSON file ({e}); give a JSON list of records") from None
    if not isinstance(data, list) or not data:
        raise DataError(
            f"{p}: expected a non-empty JSON list of records like the reference's {REFERENCE_RESPONSES}"
        )
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{p}: record {i} is not a JSON object")
        for key in ("output", response_key):
            if not isinstance(rec.get(key), str):
                hint = "; pass --response-key to name the response field" if key == response_key else ""
                raise DataError(f"{p}: record {i} has no string field {key!r}{hint}")
    return data


# -- plots (matplotlib's Agg canvas directly: no pyplot state, no display) ----------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, path)


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


# -- reports ------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


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


# -- scoring responses (with or without a model) -------------------------------------------------------
def score_responses(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    response_key: str = "model_response",
    judge: JudgeConfig | None = None,
    source: dict | None = None,
    generations: Sequence[dict] | None = None,
    split: str = "test",
    use_stemmer: bool = False,
    progress: bool = False,
) -> dict:
    """Score reference-format records (each with `output` and the response) and write the evaluation dir.

    Writes metrics.json, report.md, the records in the reference format, a per-record JSONL (with the
    prompt and raw generation when `generations` is given), a ROUGE-L histogram and, with a judge,
    judgments.jsonl and a score histogram.
    """
    preds = [r[response_key] for r in records]
    refs = [r["output"] for r in records]
    per = response_scores(preds, refs, use_stemmer=use_stemmer)
    summary = summarize_response_scores(per, use_stemmer=use_stemmer)
    summary["plot"] = f"rouge_l_{split}.png"
    judgments, judge_summary = None, None
    if judge is not None:
        judgments, judge_summary = judge_records(records, judge, response_key=response_key, progress=progress)
        if judge_summary["n_scored"]:
            judge_summary["plot"] = "judge_scores.png"
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

    rows = []
    for i, (rec, s) in enumerate(zip(records, per)):
        g = dict(generations[i]) if generations is not None else {}
        row = {
            "index": i,
            "prompt": g.get("prompt"),
            "generation": g.get("generation"),
            "new_tokens": g.get("new_tokens"),
        }
        row.update(response=rec[response_key], reference=rec["output"], **s)
        if judgments is not None:
            row["judge_score"] = judgments[i]["score"]
            row["judge_status"] = judgments[i]["status"]
        rows.append(row)

    def write(tmp: Path) -> None:
        write_json(tmp / REFERENCE_RESPONSES, list(records))
        write_jsonl(tmp / "generations.jsonl", rows)
        plot_histogram([s["rouge_l_f1"] for s in per], tmp / summary["plot"], "ROUGE-L F1", range_=(0, 1))
        if judgments is not None:
            write_judgments(tmp / "judgments.jsonl", judgments)
            if judge_summary.get("plot"):
                ok = [j["score"] for j in judgments if j["status"] == "ok"]
                plot_histogram(ok, tmp / judge_summary["plot"], "judge score", bins=20, range_=(0, 100))
        write_json(tmp / "metrics.json", metrics)
        (tmp / "report.md").write_text(render_report(metrics), encoding="utf-8")

    atomic_dir(out_dir, write)
    return metrics


def evaluate_responses_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    response_key: str = "model_response",
    judge: JudgeConfig | None = None,
    use_stemmer: bool = False,
    progress: bool = False,
) -> dict:
    """Score an existing reference-format responses file; no model needed."""
    records = load_responses(path, response_key)
    return score_responses(
        records,
        out_dir,
        response_key=response_key,
        judge=judge,
        source={"responses_file": str(path), "response_key": response_key},
        use_stemmer=use_stemmer,
        progress=progress,
    )


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
        (tmp / "report.md").write_text(render_report(metrics), encoding="utf-8")

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
        (tmp / "report.md").write_text(render_report(metrics), encoding="utf-8")

    atomic_dir(out_dir, write)
    return metrics


# -- generation ---------------------------------------------------------------------------------------
def generate_responses(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    format_prompt,
    stop_strings: Sequence[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    eos_token_id: int | None = 50256,
    response_header: str = RESPONSE_HEADER,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[dict]:
    """Greedy, batched, KV-cached generation for every record; per record the prompt, the raw
    generation (decoded new tokens), the extracted response and the number of new tokens.

    Prompts are batched by length (less left padding); results come back in record order.
    """
    from gptforge.model.generate import generate

    dev = _device(device)
    model.eval().to(dev)
    prompts = [format_prompt(r) for r in records]
    ids = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generate", unit="batch")
    out: list[dict | None] = [None] * len(ids)
    for chunk in chunks:
        new = generate(
            model,
            [ids[i] for i in chunk],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            stop_strings=list(stop_strings) or None,
            tokenizer=tokenizer,
        )
        for i, toks in zip(chunk, new):
            out[i] = {
                "prompt": prompts[i],
                "generation": tokenizer.decode(toks),
                "response": extract_response(
                    toks,
                    tokenizer,
                    eos_token_id=eos_token_id,
                    stop_strings=stop_strings,
                    response_header=response_header,
                ),
                "new_tokens": len(toks),
            }
    return out  # type: ignore[return-value]


# -- the stage ----------------------------------------------------------------------------------------
def infer_task(ckpt_dir: str | os.PathLike, model=None) -> str:
    """classify for a classifier, instruct when a prompt style is saved, else pretrain."""
    from gptforge.model.checkpoint import read_metadata

    if model is not None and model.cfg.num_labels:
        return "classify"
    if read_metadata(ckpt_dir, "prompt_style.json") is not None:
        return "instruct"
    run = read_metadata(ckpt_dir, "run.json") or {}
    if run.get("task") in TASKS:
        return run["task"]
    return "pretrain"


def _given(data) -> dict:
    """The explicitly set (non-None) fields of a data dict or data config dataclass."""
    import dataclasses

    if data is None:
        return {}
    d = dataclasses.asdict(data) if dataclasses.is_dataclass(data) else dict(data)
    return {k: v for k, v in d.items() if v is not None}


def _data_config(ckpt_dir: str | os.PathLike, data) -> dict:
    """The data config the model was trained with (run.json), overridden by `data`."""
    from gptforge.model.checkpoint import read_metadata

    run_cfg = (read_metadata(ckpt_dir, "run.json") or {}).get("config") or {}
    base = dict(run_cfg.get("data") or {})
    # The split seed and the classifier's effective truncation are recorded outside the data section.
    seed = (run_cfg.get("train") or {}).get("seed")
    if seed is not None:
        base["seed"] = seed
    if run_cfg.get("max_length") is not None:
        base["max_length"] = run_cfg["max_length"]
    return {**base, **_given(data)}


def _limit(dsd, limit: int | None):
    if not limit:
        return dsd
    from datasets import DatasetDict

    return DatasetDict({k: v.select(range(min(limit, len(v)))) for k, v in dsd.items()})


def load_classification_splits(model, data: dict):
    """The task's DatasetDict with labels mapped to the checkpoint's class names."""
    from gptforge.tasks.classify import load_classification_data, load_sms_spam

    names = label_names(model)
    dataset = data.get("dataset") or "sms_spam"
    if dataset == "sms_spam":
        dsd = load_sms_spam(
            split=data.get("split") or "book", path=data.get("path"), seed=data.get("seed", 123)
        )
        data_names = dsd["train"].features["label"].names
        if len(data_names) != len(names):
            raise DataError(
                f"sms_spam has labels {data_names} but the checkpoint has {names}; evaluate it on its own "
                "data with --data FILE"
            )
    else:
        dsd, _ = load_classification_data(
            dataset,
            text_column=data.get("text_column") or "text",
            label_column=data.get("label_column") or "label",
            labels=names,
            seed=data.get("seed", 123),
        )
    return _limit(dsd, data.get("limit"))


def evaluate_classifier(
    model,
    dsd,
    *,
    splits: Sequence[str] = ("train", "validation", "test"),
    max_length: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Metrics and per-example predictions for each split.

    Texts are cut to `max_length` tokens (default: the longest training example, capped at the
    context, as training does); the number cut is reported per split.
    """
    from torch.utils.data import DataLoader

    from gptforge.tasks.classify import ClassificationCollator, longest_length, tokenize_classification

    names = label_names(model)
    missing = [s for s in splits if s not in dsd]
    if missing:
        raise DataError(f"no split {missing[0]!r} in the data (splits: {list(dsd)})")
    tokenized = tokenize_classification(dsd, max_length=None)
    ctx = model.cfg.context_length
    if max_length is None:
        max_length = min(longest_length(tokenized["train"]), ctx) if len(tokenized.get("train", [])) else ctx
    max_length = min(max_length, ctx)
    collate = ClassificationCollator(pad_token_id=model.cfg.pad_token_id, max_length=max_length)
    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    for split in splits:
        ds = tokenized[split]
        if len(ds) == 0:
            continue
        loader = DataLoader(ds.with_format(None), batch_size=batch_size, collate_fn=collate)
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"classify {split}", unit="batch")
        y_true, y_pred, probs = predict_classes(model, loader, device)
        m = classification_metrics(y_true, y_pred, names)
        m["truncated"] = sum(len(x) > max_length for x in ds["input_ids"])
        m["max_length"] = max_length
        results[split] = m
        predictions[split] = [
            {"text": t, "label": names[a], "predicted": names[b], "probability": p[b]}
            for t, a, b, p in zip(ds["text"], y_true, y_pred, probs)
        ]
    return results, predictions


def evaluate_checkpoint(
    task: str | None,
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data=None,
    judge: JudgeConfig | None = None,
    splits: Sequence[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    device: str | torch.device | None = None,
    use_stemmer: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a gptforge checkpoint on its task and write `out_dir`; returns the metrics dict.

    `task` None infers it from the checkpoint. `data` (a dict or a task data config) overrides the
    data config saved in the checkpoint's run.json. `judge` is used by the instruct task only.
    """
    import datasets

    quiet = not progress and not datasets.are_progress_bars_disabled()
    if quiet:  # the `datasets` map bars too, not only ours
        datasets.disable_progress_bars()
    try:
        return _evaluate_checkpoint(
            task,
            ckpt_dir,
            out_dir,
            data,
            judge,
            splits,
            batch_size,
            max_new_tokens,
            device,
            use_stemmer,
            progress,
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _evaluate_checkpoint(
    task, ckpt_dir, out_dir, data, judge, splits, batch_size, max_new_tokens, device, use_stemmer, progress
) -> dict:
    from gptforge.model.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt_dir)
    task = task or infer_task(ckpt_dir, model)
    if task not in TASKS:
        raise GPTForgeError(f"task={task!r} is not one of {TASKS}")
    cfg = _data_config(ckpt_dir, data)
    source = {"checkpoint": str(ckpt_dir)}
    if cfg.get("limit"):
        source["limit"] = f"first {cfg['limit']} examples of each split"
    if task == "classify":
        if not model.cfg.num_labels:
            raise GPTForgeError(
                f"{ckpt_dir}: a language model (num_labels=0) cannot be evaluated as a classifier"
            )
        dsd = load_classification_splits(model, cfg)
        source["data"] = cfg.get("dataset") or "sms_spam"
        results, preds = evaluate_classifier(
            model,
            dsd,
            splits=splits or ("train", "validation", "test"),
            max_length=cfg.get("max_length"),
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        return write_classification_report(results, out_dir, source=source, predictions=preds)
    if model.cfg.num_labels:
        raise GPTForgeError(
            f"{ckpt_dir}: a classifier cannot be evaluated as task={task!r}; use --task classify"
        )
    if task == "instruct":
        given = _given(data)
        return _evaluate_instruct(
            model,
            ckpt_dir,
            out_dir,
            cfg,
            given,
            judge,
            splits,
            batch_size,
            max_new_tokens,
            device,
            use_stemmer,
            progress,
            source,
        )
    return _evaluate_pretrain(model, ckpt_dir, out_dir, cfg, splits, batch_size, device, progress, source)


def _response_header(style) -> str:
    """The last line of the style's prompt ("### Response:" for alpaca), which models sometimes repeat."""
    lines = [
        line
        for line in style.format_prompt({"instruction": "x", "input": "", "output": ""}).splitlines()
        if line.strip()
    ]
    return lines[-1].strip() if lines else ""


def _evaluate_instruct(
    model,
    ckpt_dir,
    out_dir,
    cfg: dict,
    given: dict,
    judge,
    splits,
    batch_size,
    max_new_tokens,
    device,
    use_stemmer,
    progress,
    source,
) -> dict:
    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.tasks.instruct import get_prompt_style, load_instruction_data

    splits = list(splits or ["test"])
    if len(splits) != 1:
        raise GPTForgeError(f"instruct evaluates one split at a time, got {splits}; run once per split")
    split = splits[0]
    style = get_prompt_style(
        given.get("prompt_style")
        or read_metadata(ckpt_dir, "prompt_style.json")
        or cfg.get("prompt_style")
        or "alpaca"
    )
    dataset = cfg.get("dataset") or "instruction"
    columns = {
        cfg[f"{k}_column"]: k for k in ("instruction", "input", "output") if cfg.get(f"{k}_column", k) != k
    }
    dsd = _limit(
        load_instruction_data(
            None if dataset == "instruction" else dataset, columns=columns or None, seed=cfg.get("seed", 123)
        ),
        cfg.get("limit"),
    )
    if split not in dsd or len(dsd[split]) == 0:
        raise DataError(
            f"{dataset}: split {split!r} is missing or empty (splits: { {k: len(v) for k, v in dsd.items()} })"
        )
    records = [dict(r) for r in dsd[split]]
    tok = Tokenizer()
    gens = generate_responses(
        model,
        tok,
        records,
        format_prompt=style.format_prompt,
        stop_strings=style.stop_strings,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        eos_token_id=model.cfg.eos_token_id,
        response_header=_response_header(style),
        device=device,
        progress=progress,
    )
    for rec, g in zip(records, gens):
        rec["model_response"] = g["response"]
    source.update(data=dataset, prompt_style=style.name, max_new_tokens=max_new_tokens, decoding="greedy")
    return score_responses(
        records,
        out_dir,
        judge=judge,
        source=source,
        generations=gens,
        split=split,
        use_stemmer=use_stemmer,
        progress=progress,
    )


def _evaluate_pretrain(
    model, ckpt_dir, out_dir, cfg: dict, splits, batch_size, device, progress, source
) -> dict:
    from torch.utils.data import DataLoader

    from gptforge.tasks.pretrain import PretrainCollator, load_corpus

    srcs = cfg.get("dataset") or cfg.get("sources") or ["the-verdict"]
    srcs = srcs.split(",") if isinstance(srcs, str) else list(srcs)
    ctx = min(cfg.get("context_length") or model.cfg.context_length, model.cfg.context_length)
    dsd = dict(
        load_corpus(
            srcs,
            context_length=ctx,
            stride=cfg.get("stride"),
            val_fraction=cfg.get("val_fraction") or 0.1,
            seed=cfg.get("seed", 123),  # the training run's split: validation it never trained on
        )
    )
    if cfg.get("test_sources"):
        test = cfg["test_sources"]
        test = test.split(",") if isinstance(test, str) else list(test)
        dsd["test"] = load_corpus(test, context_length=ctx, val_fraction=0.0)["train"]
        source["test_data"] = ",".join(map(str, test))
    wanted = list(splits or [s for s in ("validation", "test") if s in dsd])
    missing = [s for s in wanted if s not in dsd]
    if missing:
        hint = "; give a held-out corpus with --test-data" if "test" in missing else ""
        raise DataError(f"no split {missing[0]!r} in the corpus (splits: {sorted(dsd)}){hint}")
    results = {}
    for split in wanted:
        ds = dsd[split]
        if cfg.get("limit"):
            ds = ds.select(range(min(cfg["limit"], len(ds))))
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=PretrainCollator())
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"loss {split}", unit="batch")
        results[split] = {**lm_metrics(model, loader, device), "blocks": len(ds), "context_length": ctx}
        names = getattr(ds.features.get("source"), "names", None)  # several sources: each one's loss too
        for g, name in enumerate(names or []):
            sub = ds.select([i for i, s in enumerate(ds["source"]) if s == g])
            if len(sub):
                sub_loader = DataLoader(sub, batch_size=batch_size, collate_fn=PretrainCollator())
                results[f"{split}/{name}"] = {**lm_metrics(model, sub_loader, device), "blocks": len(sub)}
    source.update(data=",".join(map(str, srcs)))
    loss_png = Path(ckpt_dir) / "loss.png"
    return write_lm_report(
        results, out_dir, source=source, training_plot=loss_png if loss_png.is_file() else None
    )
