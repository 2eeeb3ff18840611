"""`torchrun --nproc_per_node 2` (gloo, CPU) through the CLI equals one process with the same global
batch: same per-step losses, same validation loss (gather_for_metrics drops the padded duplicate of an
odd validation set), same final weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import torchrun_cli
from safetensors.torch import load_file

from gptforge.pipeline.checkpoints import FINAL
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_pretrain


@pytest.fixture(scope="module")
def corpus(shared_data_dir, tmp_path_factory) -> Path:
    """The first 2,600 characters of The Verdict: 37 train and 3 validation blocks of 16 tokens."""
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:2600]
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(text, encoding="utf-8")
    return path


def overrides(corpus: Path, out_dir: Path, batch_size: int) -> dict:
    return {
        "model.preset": "test-tiny",
        "model.context_length": 16,
        "data.sources": [str(corpus)],
        "data.val_fraction": 0.08,
        "train.epochs": 1,
        "train.batch_size": batch_size,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.eval_every": 6,
        "train.eval_batches": 2,
        "train.seed": 11,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(out_dir),
    }


def test_torchrun_two_processes_equal_one_process(corpus, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_pretrain(load_config("pretrain", **overrides(corpus, tmp_path / "one", batch_size=2)))
    finally:
        torch.set_num_threads(threads)

    proc = torchrun_cli("pretrain", overrides(corpus, tmp_path / "two", batch_size=1))
    assert proc.stdout.count("model: ") == 1  # only rank 0 reports

    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["distributed_type"].endswith("MULTI_CPU")
    recs1 = read_metrics(tmp_path / "one" / "metrics.jsonl")
    recs2 = read_metrics(tmp_path / "two" / "metrics.jsonl")
    train1 = {r["step"]: r["loss"] for r in recs1 if "lr" in r}
    train2 = {r["step"]: r["loss"] for r in recs2 if "lr" in r}
    assert sorted(train1) == sorted(train2) == list(range(1, 19))  # 37 blocks // 2 = 18 steps
    for step, loss in train1.items():
        assert train2[step] == pytest.approx(loss, abs=1e-5), step
    assert [r["tokens"] for r in recs2 if "lr" in r] == [32 * s for s in range(1, 19)]
    val1 = [(r["step"], r["val_loss"]) for r in recs1 if "val_loss" in r]
    val2 = [(r["step"], r["val_loss"]) for r in recs2 if "val_loss" in r]
    assert [s for s, _ in val1] == [s for s, _ in val2] == [6, 12, 18, 18]
    for (_, a), (_, b) in zip(val1, val2):
        assert b == pytest.approx(a, abs=1e-5)
    w1 = load_file(tmp_path / "one" / FINAL / "model.safetensors")
    w2 = load_file(tmp_path / "two" / FINAL / "model.safetensors")
    for name in w1:
        if name.endswith("attn.qkv.bias"):  # key bias: zero true gradient, AdamW-amplified float noise
            d = w1[name].numel() // 3
            w1[name], w2[name] = w1[name][:d], w2[name][:d]
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)
    assert one.metrics["val_loss"] == pytest.approx(
        json.loads((tmp_path / "two" / FINAL / "run.json").read_text())["metrics"]["val_loss"], abs=1e-5
    )
