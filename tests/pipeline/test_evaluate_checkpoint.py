"""`evaluate_checkpoint` and `gptforge classify` on tiny checkpoints: batched results equal one-at-a-time ones."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from gptforge.cli import main
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.generate import generate
from gptforge.model.gpt import GPT
from gptforge.model.tokenizer import Tokenizer
from gptforge.pipeline.config import EvaluateConfig, EvaluateDataConfig
from gptforge.pipeline.evaluate import REFERENCE_RESPONSES, evaluate_checkpoint
from gptforge.tasks.instruct import extract_response, get_prompt_style

WORDS = "alpha beta gamma delta free prize win call now meeting lunch tomorrow thanks ok".split()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = GPT(GPTConfig.from_preset("test-tiny"))
    model.add_classification_head(2, {0: "ham", 1: "spam"})
    with torch.no_grad():  # make the tiny classifier's two classes both appear
        model.score.weight.mul_(50)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("ck") / "clf")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(2)
    model = GPT(GPTConfig.from_preset("test-tiny", context_length=256)).eval()
    return save_checkpoint(
        model, tmp_path_factory.mktemp("ck") / "lm", metadata={"prompt_style.json": {"name": "alpaca"}}
    )


def single_probs(model, tok, text: str, max_length: int) -> torch.Tensor:
    ids = torch.tensor([tok.encode(text)[:max_length]])
    with torch.no_grad():
        return model(ids).softmax(-1)[0]


def test_classify_checkpoint_on_a_csv(clf_dir, tmp_path, tok):
    from gptforge.model.checkpoint import load_checkpoint

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        n = 1 + int(torch.randint(0, 12, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
        rows.append({"message": " ".join(words), "kind": "spam" if i % 3 == 0 else "ham"})
    path = tmp_path / "sms.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["message", "kind"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "eval"
    data = EvaluateDataConfig(dataset=str(path), text_column="message", label_column="kind", max_length=6)
    metrics = evaluate_checkpoint(
        EvaluateConfig(checkpoint=str(clf_dir), out=str(out), data=data, batch_size=4, progress=False)
    )
    assert metrics["task"] == "classify"
    sizes = {k: v["n"] for k, v in metrics["splits"].items()}
    assert list(sizes) == ["train", "validation", "test"] and sum(sizes.values()) == 40 and sizes["test"] == 8

    model = load_checkpoint(clf_dir)
    for split, m in metrics["splits"].items():
        preds = [json.loads(x) for x in (out / f"predictions_{split}.jsonl").read_text().splitlines()]
        correct = 0
        for p in preds:  # each text alone, unpadded, cut to max_length: the same class and probability
            probs = single_probs(model, tok, p["text"], 6)
            assert p["predicted"] == ["ham", "spam"][int(probs.argmax())]
            assert p["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
            correct += p["predicted"] == p["label"]
        assert m["accuracy"] == pytest.approx(correct / len(preds))
        assert sum(map(sum, m["confusion_matrix"]["matrix"])) == len(preds)
        assert m["truncated"] == sum(len(tok.encode(p["text"])) > 6 for p in preds)
    assert (
        len(
            {
                p["predicted"]
                for s in ("train", "test")
                for p in map(json.loads, (out / f"predictions_{s}.jsonl").read_text().splitlines())
            }
        )
        == 2
    )
    for split in ("train", "validation", "test"):
        assert (out / f"confusion_{split}.png").is_file()
        assert f"![confusion matrix, {split}](confusion_{split}.png)" in (out / "report.md").read_text()


def test_classify_verb(clf_dir, tmp_path, tok, capsys):
    from gptforge.model.checkpoint import load_checkpoint

    model = load_checkpoint(clf_dir)
    texts = ["win a free prize now", "lunch tomorrow?", "Ünïcödé ☃ text"]
    assert main(["classify", str(clf_dir), *texts, "--json", "--batch-size", "2"]) == 0
    results = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in results] == texts
    for r in results:
        probs = single_probs(model, tok, r["text"], 64)
        assert r["label"] == ["ham", "spam"][int(probs.argmax())]
        assert [r["probabilities"]["ham"], r["probabilities"]["spam"]] == pytest.approx(
            probs.tolist(), abs=1e-5
        )

    # --file: a CSV column, JSONL, and plain lines give the same labels
    (tmp_path / "t.csv").write_text('id,body\n1,"win a free prize now"\n2,"lunch tomorrow?"\n')
    (tmp_path / "t.jsonl").write_text('{"body": "win a free prize now"}\n{"body": "lunch tomorrow?"}\n')
    (tmp_path / "t.txt").write_text("win a free prize now\n\nlunch tomorrow?\n")
    outs = []
    for f, col in (("t.csv", ["--column", "body"]), ("t.jsonl", ["--column", "body"]), ("t.txt", [])):
        assert (
            main(
                [
                    "classify",
                    str(clf_dir),
                    "--file",
                    str(tmp_path / f),
                    *col,
                    "--out",
                    str(tmp_path / "o.jsonl"),
                ]
            )
            == 0
        )
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0].splitlines()[0].endswith("\twin a free prize now")
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2

    assert main(["classify", str(clf_dir), "--file", str(tmp_path / "t.csv"), "--column", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["classify", str(clf_dir)]) == 2
    assert "nothing to classify" in capsys.readouterr().err


def test_instruct_checkpoint(lm_dir, tmp_path, tok):
    from gptforge.model.checkpoint import load_checkpoint

    recs = [
        {"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else w, "output": w}
        for i, w in enumerate(WORDS * 2)
    ]
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(recs[:20]))  # 17 train, 2 test, 1 validation
    out = tmp_path / "eval"
    cfg = EvaluateConfig(
        checkpoint=str(lm_dir),
        out=str(out),
        data=EvaluateDataConfig(dataset=str(path)),
        batch_size=2,
        max_new_tokens=6,
        progress=False,
    )
    metrics = evaluate_checkpoint(cfg)
    assert metrics["task"] == "instruct" and metrics["source"]["prompt_style"] == "alpaca"
    m = metrics["splits"]["test"]
    assert m["n"] == 2
    saved = json.loads((out / REFERENCE_RESPONSES).read_text())
    assert [r["instruction"] for r in saved] == [recs[17]["instruction"], recs[18]["instruction"]]
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]

    model = load_checkpoint(lm_dir)
    style = get_prompt_style("alpaca")
    prompts = [style.format_prompt(r) for r in saved]
    # the same batch as the evaluation builds (sorted by prompt length), so greedy ties break alike
    order = sorted(range(2), key=lambda i: len(tok.encode(prompts[i])))
    batch = generate(
        model,
        [tok.encode(prompts[i]) for i in order],
        max_new_tokens=6,
        stop_strings=style.stop_strings,
        tokenizer=tok,
    )
    news = {i: b for i, b in zip(order, batch)}
    for i, (rec, row) in enumerate(zip(saved, rows)):
        new = news[i]
        assert row["prompt"] == prompts[i]
        assert row["generation"] == tok.decode(new) and row["new_tokens"] == len(new) > 0
        expected = extract_response(new, tok, stop_strings=style.stop_strings)
        assert rec["model_response"] == row["response"] == expected
        assert row["reference"] == rec["output"]
    assert m["exact_match"] == sum(r["model_response"] == r["output"] for r in saved) / 2


def test_pretrain_checkpoint(lm_dir, tmp_path):
    """The corpus, block size and validation share come from run.json; --test-data adds a test split."""
    from gptforge.model.checkpoint import load_checkpoint
    from gptforge.tasks.pretrain import load_corpus

    text = tmp_path / "a.txt"
    text.write_text(" ".join(WORDS * 40))
    held = tmp_path / "b.txt"
    held.write_text(" ".join(reversed(WORDS * 12)))
    out = tmp_path / "eval"
    model = load_checkpoint(lm_dir)
    data = {"sources": [str(text)], "context_length": 32, "val_fraction": 0.25}
    run = {"config": {"task": "pretrain", "data": data, "train": {"seed": 123}}}
    ck = save_checkpoint(model, tmp_path / "ck", metadata={"run.json": run})
    cfg = EvaluateConfig(
        checkpoint=str(ck),
        out=str(out),
        task="pretrain",
        data=EvaluateDataConfig(test_sources=[str(held)]),
        batch_size=3,
        progress=False,
    )
    metrics = evaluate_checkpoint(cfg)
    val = load_corpus([str(text)], context_length=32, val_fraction=0.25, cache_dir=None)["validation"]
    test = load_corpus([str(held)], context_length=32, val_fraction=0.0)["train"]
    for split, ds in (("validation", val), ("test", test)):
        blocks = torch.tensor([list(b) for b in ds["input_ids"]])
        with torch.no_grad():
            logits = model(blocks[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)
        ).item()
        m = metrics["splits"][split]
        assert m["tokens"] == blocks[:, 1:].numel() and m["blocks"] == len(ds)
        assert m["loss"] == pytest.approx(loss, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    report = (out / "report.md").read_text()
    assert f"| validation | {metrics['splits']['validation']['loss']:.4f} |" in report


def test_classify_uses_the_training_run_config(tmp_path):
    """Data, split seed, limit and truncation come from run.json, so test examples stay the held-out ones."""
    from gptforge.model.checkpoint import load_checkpoint
    from gptforge.tasks.classify import load_classification_data

    path = tmp_path / "d.csv"
    lines = ["text,label"] + [
        f"{WORDS[i % len(WORDS)]} message number {i},{'b' if i % 2 else 'a'}" for i in range(30)
    ]
    path.write_text("\n".join(lines) + "\n")
    torch.manual_seed(3)
    model = GPT(GPTConfig.from_preset("test-tiny"))
    model.add_classification_head(2, {0: "a", 1: "b"})
    run = {
        "config": {
            "task": "classify",
            "data": {"dataset": str(path), "limit": 5},
            "train": {"seed": 7},
            "max_length": 2,
        }
    }
    ck = save_checkpoint(model.eval(), tmp_path / "ck", metadata={"run.json": run})
    metrics = evaluate_checkpoint(
        EvaluateConfig(checkpoint=str(ck), out=str(tmp_path / "eval"), progress=False)
    )
    expected, _ = load_classification_data(str(path), seed=7)
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["text"] for p in preds] == expected["test"]["text"][:5]
    assert metrics["splits"]["test"]["max_length"] == 2
    assert metrics["splits"]["test"]["truncated"] == 5  # every text is longer than 2 tokens
    assert metrics["source"]["limit"] == "first 5 examples of each split"
    model = load_checkpoint(ck)
    for p in preds:
        probs = single_probs(model, Tokenizer(), p["text"], 2)
        assert p["predicted"] == ["a", "b"][int(probs.argmax())]
