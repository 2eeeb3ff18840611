"""Evaluating instruction responses: generate them for a checkpoint's test split, or read a file of
them; score with ROUGE-L and exact match, optionally an LLM judge; write the reference's format."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptforge.errors import DataError, GPTForgeError
from gptforge.pipeline.config import EvaluateConfig
from gptforge.pipeline.evaluate.inference import generate_responses
from gptforge.pipeline.evaluate.metrics import response_scores, summarize_response_scores
from gptforge.pipeline.evaluate.report import REFERENCE_RESPONSES, write_responses_report
from gptforge.pipeline.judge import JudgeConfig, check_judgments, judge_records


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

    With a judge, failed requests are named on stderr with their cause; when every one failed the dir
    is still written (judgments.jsonl says why) and a `JudgeError` follows: no judge mean is reported.
    """
    preds = [r[response_key] for r in records]
    refs = [r["output"] for r in records]
    per = response_scores(preds, refs, use_stemmer=use_stemmer)
    summary = summarize_response_scores(per, use_stemmer=use_stemmer)
    judgments, judge_summary = None, None
    if judge is not None:
        judgments, judge_summary = judge_records(records, judge, response_key=response_key, progress=progress)
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
    metrics = write_responses_report(
        out_dir,
        split=split,
        summary=summary,
        records=records,
        rows=rows,
        response_key=response_key,
        source=source,
        judgments=judgments,
        judge_summary=judge_summary,
    )
    if judge_summary is not None:
        check_judgments(judge_summary, Path(out_dir) / "judgments.jsonl")
    return metrics


def _response_header(style) -> str:
    """The last line of the style's prompt ("### Response:" for alpaca), which models sometimes repeat."""
    lines = [
        line
        for line in style.format_prompt({"instruction": "x", "input": "", "output": ""}).splitlines()
        if line.strip()
    ]
    return lines[-1].strip() if lines else ""


def style_responses(model, records: list[dict], style, cfg: EvaluateConfig) -> list[dict]:
    """Greedy responses to `records` in a prompt style, cut at its stop strings (generate_responses)."""
    from gptforge.model.tokenizer import Tokenizer

    return generate_responses(
        model,
        Tokenizer(),
        records,
        format_prompt=style.format_prompt,
        stop_strings=style.stop_strings,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        eos_token_id=model.cfg.eos_token_id,
        response_header=_response_header(style),
        device=cfg.device,
        progress=cfg.progress,
    )


def evaluate_instruct(model, cfg: EvaluateConfig, data: Any, seed: int, out: Path, source: dict) -> dict:
    """Greedy responses to one split's records (the test split by default), scored and written to `out`."""
    from gptforge.model.checkpoint import read_metadata
    from gptforge.tasks.instruct import get_prompt_style, load_splits

    splits = list(cfg.splits or ["test"])
    if len(splits) != 1:
        raise GPTForgeError(f"instruct evaluates one split at a time, got {splits}; run once per split")
    split = splits[0]
    style = get_prompt_style(
        cfg.data.prompt_style or read_metadata(cfg.checkpoint, "prompt_style.json") or data.prompt_style
    )
    dsd = load_splits(data, seed=seed)
    if split not in dsd or len(dsd[split]) == 0:
        raise DataError(
            f"{data.dataset}: split {split!r} is missing or empty (splits: { {k: len(v) for k, v in dsd.items()} })"
        )
    records = [dict(r) for r in dsd[split]]
    gens = style_responses(model, records, style, cfg)
    for rec, g in zip(records, gens):
        rec["model_response"] = g["response"]
    source.update(
        data=data.dataset, prompt_style=style.name, max_new_tokens=cfg.max_new_tokens, decoding="greedy"
    )
    return score_responses(
        records,
        out,
        judge=cfg.judge,
        source=source,
        generations=gens,
        split=split,
        use_stemmer=cfg.use_stemmer,
        progress=cfg.progress,
    )
