"""Evaluating a classifier: class predictions per split, scored and written with a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import DataError
from gptforge.pipeline.config import EvaluateConfig
from gptforge.pipeline.evaluate.inference import label_names, predict_classes
from gptforge.pipeline.evaluate.metrics import classification_metrics
from gptforge.pipeline.evaluate.report import write_classification_report
from gptforge.tasks import classify


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

    names = label_names(model)
    missing = [s for s in splits if s not in dsd]
    if missing:
        raise DataError(f"no split {missing[0]!r} in the data (splits: {list(dsd)})")
    tokenized = classify.tokenize_classification(dsd, max_length=None)
    ctx = model.cfg.context_length
    if max_length is None:
        max_length = (
            min(classify.longest_length(tokenized["train"]), ctx) if len(tokenized.get("train", [])) else ctx
        )
    max_length = min(max_length, ctx)
    collate = classify.ClassificationCollator(pad_token_id=model.cfg.pad_token_id, max_length=max_length)
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


def evaluate_classify(model, cfg: EvaluateConfig, data: Any, seed: int, out: Path, source: dict) -> dict:
    """The checkpoint's train/validation/test splits (as training drew them), scored and written to `out`."""
    dsd, _ = classify.load_splits(data, seed=seed, labels=label_names(model))
    source["data"] = data.dataset
    results, preds = evaluate_classifier(
        model,
        dsd,
        splits=cfg.splits or ("train", "validation", "test"),
        max_length=data.max_length,
        batch_size=cfg.batch_size,
        device=cfg.device,
        progress=cfg.progress,
    )
    return write_classification_report(results, out, source=source, predictions=preds)
