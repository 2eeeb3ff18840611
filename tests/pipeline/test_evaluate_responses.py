"""Scoring a responses file in the reference format end to end, through `gptforge evaluate --responses`."""

from __future__ import annotations

import json

import pytest
from rouge_score.tokenizers import DefaultTokenizer

from gptforge.cli import main
from gptforge.pipeline.config import EvaluateConfig
from gptforge.pipeline.evaluate import REFERENCE_RESPONSES, evaluate_responses_file


@pytest.fixture(scope="module")
def test_records(shared_data_dir):
    data = json.loads((shared_data_dir / "instruction" / "instruction-data.json").read_text(encoding="utf-8"))
    assert len(data) == 1100
    return data[935:1045]  # the reference's 110 test records


def make_responses(records):
    """Four kinds of response with hand-derivable scores; returns (records, expected per-record ROUGE-L)."""
    tok = DefaultTokenizer(use_stemmer=False)
    out, expected = [], []
    for i, rec in enumerate(records):
        rec = dict(rec)
        kind = i % 4
        if kind == 0:  # exact copy
            rec["model_response"], r = rec["output"], 1.0
        elif kind == 1:  # different case and spacing: same ROUGE tokens, only the normalized match
            rec["model_response"], r = "  " + rec["output"].upper() + "\n", 1.0
        elif kind == 2:  # empty
            rec["model_response"], r = "", 0.0
        else:  # the first half of the reference's ROUGE tokens: P = 1, R = k/n, F = 2k/(k+n)
            toks = tok.tokenize(rec["output"])
            k, n = max(1, len(toks) // 2), len(toks)
            rec["model_response"], r = " ".join(toks[:k]), 2 * k / (k + n)
        out.append(rec)
        expected.append(r)
    return out, expected


def test_score_reference_file_via_cli(tmp_path, test_records, capsys):
    records, expected = make_responses(test_records)
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--responses", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["splits"]["test"]
    n_exact = sum(1 for i in range(110) if i % 4 == 0)
    upper_differs = sum(
        1 for i in range(110) if i % 4 == 1 and records[i]["output"].upper() != records[i]["output"]
    )
    assert m["n"] == 110
    assert m["rouge_l_f1"] == pytest.approx(sum(expected) / 110)
    assert m["exact_match"] == pytest.approx((n_exact + (28 - upper_differs)) / 110)
    # kinds 0 and 1 (28 each), plus half-responses that are the whole reference (e.g. "yes" for "Yes.")
    whole = sum(
        1
        for i in range(3, 110, 4)
        if records[i]["model_response"] == test_records[i]["output"].lower().rstrip(".")
    )
    assert whole == 2
    assert m["exact_match_normalized"] == pytest.approx((28 + 28 + whole) / 110)
    assert m["empty_responses"] == 27
    assert metrics["judge"] is None
    assert f"ROUGE-L F1 {m['rouge_l_f1']:.4f}" in printed

    # the reference-format file round-trips, and the per-record JSONL carries the scores
    assert json.loads((out / REFERENCE_RESPONSES).read_text()) == records
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 110
    assert [r["rouge_l_f1"] for r in rows] == pytest.approx(expected)
    assert (
        rows[3]["response"] == records[3]["model_response"] and rows[3]["reference"] == records[3]["output"]
    )
    report = (out / "report.md").read_text()
    assert "![ROUGE-L F1 per record, test](rouge_l_test.png)" in report
    assert (out / "rouge_l_test.png").read_bytes()[:4] == b"\x89PNG"


def test_other_response_key_and_bad_files(tmp_path, test_records, capsys):
    recs = [dict(r, **{"model 1 response": r["output"]}) for r in test_records[:5]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recs))
    m = evaluate_responses_file(
        EvaluateConfig(responses=str(path), out=str(tmp_path / "e"), response_key="model 1 response")
    )
    assert m["splits"]["test"]["exact_match"] == 1.0 and m["splits"]["test"]["rouge_l_f1"] == 1.0

    # a user's mistakes are one line on stderr and exit 2, and no output dir appears
    assert main(["evaluate", "--responses", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "record 0 has no string field 'model_response'" in err and "--response-key" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["evaluate", "--responses", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json: not a JSON file" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
