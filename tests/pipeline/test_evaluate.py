"""Metrics on hand-computed cases, response extraction, LM loss and the reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.tokenizer import Tokenizer
from gptforge.pipeline.evaluate import (
    classification_metrics,
    lm_metrics,
    normalize_text,
    response_scores,
    summarize_response_scores,
    write_classification_report,
    write_lm_report,
)
from gptforge.tasks.instruct import extract_response

STOPS = ("### Instruction:", "### Input:")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_classification_metrics_hand_computed():
    # rows = true, cols = predicted:  a: [2 1 0]  b: [0 1 1]  c: [0 0 1]
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2], ["a", "b", "c"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[2, 1, 0], [0, 1, 1], [0, 0, 1]]}
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert m["macro"]["precision"] == pytest.approx(2 / 3)
    assert m["macro"]["recall"] == pytest.approx(13 / 18)
    assert (
        m["macro"]["f1"] == m["macro_f1"] == pytest.approx(59 / 90)
    )  # mean of per-class F1, not F1 of the means


def test_classification_metrics_class_never_seen():
    m = classification_metrics([0, 0, 1], [0, 0, 1], ["ham", "spam", "other"])
    assert m["accuracy"] == 1.0
    assert m["per_class"]["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro"]["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["matrix"] == [[2, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_rouge_exact_and_length_hand_computed():
    preds = ["the cat sat on the mat", "a b c d", "The cat!", "", "Paris is the capital."]
    refs = ["the cat is on the mat", "a c e", "the cat", "something", "paris is  the capital"]
    s = response_scores(preds, refs)
    # LCS "the cat on the mat" = 5 of 6 tokens each side
    assert s[0]["rouge_l_f1"] == pytest.approx(5 / 6)
    # LCS "a c": P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7
    assert s[1]["rouge_l_f1"] == pytest.approx(4 / 7)
    assert s[2]["rouge_l_f1"] == 1.0  # lower-cased, punctuation dropped
    assert s[3]["rouge_l_f1"] == 0.0
    assert [x["exact_match"] for x in s] == [False, False, False, False, False]
    assert [x["exact_match_normalized"] for x in s] == [False, False, False, False, True]
    assert [x["response_words"] for x in s] == [6, 4, 2, 0, 4]
    summary = summarize_response_scores(s)
    assert summary["n"] == 5
    assert summary["rouge_l_f1"] == pytest.approx((5 / 6 + 4 / 7 + 1 + 0 + 1) / 5)
    assert summary["exact_match_normalized"] == pytest.approx(0.2)
    assert summary["response_words_mean"] == pytest.approx(16 / 5)
    assert summary["empty_responses"] == 1
    assert response_scores(["Same."], [" Same.\n"])[0]["exact_match"] is True
    assert normalize_text("  Hello\n  World. ") == "hello world"


# -- extraction ---------------------------------------------------------------------------------------
PROMPT = "Below is an instruction.\n\n### Instruction:\nSay hi.\n\n### Response:\n"


def test_extract_plain_cut_at_eos(tok):
    ids = tok.encode("Hello there!") + [50256] + tok.encode("garbage after eos")
    assert extract_response(ids, tok, stop_strings=STOPS) == "Hello there!"


def test_extract_prompt_echoed_as_tokens_and_as_text(tok):
    p = tok.encode(PROMPT)
    assert extract_response(p + tok.encode("Hi!") + [50256], tok, prompt_ids=p) == "Hi!"
    # The model re-emits the prompt with different tokens (one token per character here).
    echoed = [t for ch in PROMPT for t in tok.encode(ch)] + tok.encode("Hi!")
    assert echoed[: len(p)] != p
    assert extract_response(echoed, tok, prompt_ids=p) == "Hi!"


def test_extract_no_eos_uses_everything(tok):
    assert (
        extract_response(tok.encode("  an answer that ran out of tokens"), tok)
        == "an answer that ran out of tokens"
    )


def test_extract_stop_string_and_header(tok):
    gen = "### Response:\nThe answer is 4.\n\n### Instruction:\nNext task ### Response: junk"
    assert extract_response(tok.encode(gen), tok, stop_strings=STOPS) == "The answer is 4."
    # the reference strips every "### Response:" it finds
    assert extract_response(tok.encode("A ### Response: B"), tok) == "A  B"


def test_extract_empty_response(tok):
    assert extract_response([], tok) == ""
    assert extract_response([50256, 123, 456], tok) == ""
    assert extract_response(tok.encode("\n\n### Instruction:\nMore"), tok, stop_strings=STOPS) == ""
    assert extract_response(tok.encode("### Response:\n"), tok) == ""


def test_extract_unicode(tok):
    text = "Café ☕ in 日本語 — naïve ✓"
    ids = tok.encode(text)
    assert extract_response(ids + [50256], tok) == text
    # stopped mid-character: the partial byte sequence is dropped, never shown as U+FFFD
    snowman = tok.encode("☃")
    assert len(snowman) > 1
    cut = extract_response(tok.encode("It snows ") + snowman[:-1], tok)
    assert cut == "It snows" and "\ufffd" not in cut


# -- language-model loss ------------------------------------------------------------------------------
def test_lm_metrics_is_token_weighted():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=64)).eval()
    x1 = torch.randint(0, 64, (2, 8))
    t1 = torch.randint(0, 64, (2, 8))
    x2 = torch.randint(0, 64, (1, 8))
    t2 = torch.randint(0, 64, (1, 8))
    t2[0, :5] = -100  # only 3 targets count
    m = lm_metrics(model, [{"input_ids": x1, "targets": t1}, {"input_ids": x2, "targets": t2}], device="cpu")
    with torch.no_grad():
        logits = torch.cat([model(x1), model(x2)])
    targets = torch.cat([t1, t2])
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item()
    assert m["tokens"] == 19
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # a batch-mean average would weight the 3-token batch like the 16-token one
    assert m["loss"] != pytest.approx(
        0.5 * (model(x1, targets=t1).item() + model(x2, targets=t2).item()), rel=1e-4
    )


# -- reports ------------------------------------------------------------------------------------------
def test_classification_report_files(tmp_path):
    train = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["ham", "spam"])
    test = classification_metrics([0, 1], [0, 1], ["ham", "spam"])
    out = tmp_path / "eval"
    metrics = write_classification_report({"train": train, "test": test}, out, source={"checkpoint": "ck"})
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_test.json",
        "confusion_test.png",
        "confusion_train.json",
        "confusion_train.png",
        "metrics.json",
        "report.md",
    ]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "confusion_train.json").read_text())["matrix"] == [[2, 0], [1, 1]]
    assert (out / "confusion_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![confusion matrix, train](confusion_train.png)" in report
    assert "| spam | 1.0000 | 0.5000 | 0.6667 | 2 |" in report
    assert "Accuracy **0.7500**" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_lm_report(tmp_path):
    splits = {"validation": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 100}}
    write_lm_report(splits, tmp_path / "e")
    report = (tmp_path / "e" / "report.md").read_text()
    assert "| validation | 2.0000 | 7.39 | 100 |" in report
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["splits"] == splits
