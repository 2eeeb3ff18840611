"""Metrics as pure functions over predictions, labels and texts: no model, no files, no plots."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from gptforge.errors import DataError


# -- classification -----------------------------------------------------------------------------------
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
    """Means of the per-record scores, and the count of empty responses."""
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
