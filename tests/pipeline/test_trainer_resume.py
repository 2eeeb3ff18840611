"""Through the CLI, as a user or a cluster would do it: SIGTERM saves and exits 0, `--train.resume auto`
continues, a SIGKILL mid-epoch loses only the steps after the last checkpoint, and the end is the
uninterrupted run's, bit for bit (dropout on, so the RNG state must be restored too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import overrides_to_argv
from safetensors.torch import load_file

from gptforge.pipeline.checkpoints import FINAL, list_checkpoints
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_pretrain

TOTAL = 36  # 36 train blocks of 16 tokens, batch 2 -> 18 steps an epoch, 2 epochs


@pytest.fixture(scope="module")
def corpus(shared_data_dir, tmp_path_factory) -> Path:
    """The first 2,600 characters of The Verdict: 40 blocks of 16 tokens."""
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:2600]
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(text, encoding="utf-8")
    return path


def overrides(corpus: Path, out_dir: Path) -> dict:
    return {
        "model.preset": "test-tiny",
        "model.context_length": 16,
        "model.dropout": 0.1,
        "data.sources": [str(corpus)],
        "train.epochs": 2,
        "train.batch_size": 2,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.save_every": 5,  # 5, 10, ..., 35: never an epoch end (18, 36)
        "train.keep_last": 3,
        "train.seed": 5,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(out_dir),
    }


argv = overrides_to_argv


def start(ov: dict, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "gptforge.cli", "pretrain", *argv(ov), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"run ended (rc {proc.returncode}) before {path.name} appeared:\n{out}\n{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def train_losses(out_dir: Path) -> dict[int, float]:
    recs = [r for r in read_metrics(out_dir / "metrics.jsonl") if "lr" in r]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), "metrics.jsonl has a duplicate or out-of-order step"
    return {r["step"]: r["loss"] for r in recs}


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted_run(corpus, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: same float order
    try:
        ref = run_pretrain(load_config("pretrain", **overrides(corpus, tmp_path / "ref")))
        assert ref.metrics["step"] == TOTAL

        out = tmp_path / "run"
        ov = overrides(corpus, out)
        ckpts = out / "checkpoints"

        # 1. SIGTERM (what Slurm / Kubernetes / Ctrl-C send): finish the step, save, exit 0.
        a = start(ov)
        wait_for(ckpts / "step-00000005", a)
        a.send_signal(signal.SIGTERM)
        stdout, stderr = a.communicate(timeout=240)
        assert a.returncode == 0, stderr[-3000:]
        assert "interrupted at step" in stdout
        k = step_of(list_checkpoints(out)[-1])
        assert 5 <= k < TOTAL and f"step-{k:08d}" in stdout
        assert not (out / FINAL).exists()

        # 2. Resume with --train.resume auto, then SIGKILL it (no handler can run) after a later save.
        b = start(ov, "--train.resume", "auto")
        target = (k // 5 + 1) * 5
        wait_for(ckpts / f"step-{target:08d}", b)
        b.kill()
        b.wait(timeout=60)
        assert b.returncode == -signal.SIGKILL
        m = step_of(list_checkpoints(out)[-1])
        assert k < m < TOTAL and m % 18 != 0  # mid-epoch
        assert not (out / FINAL).exists()
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")] or m >= target

        # 3. Resume again (in-process this time) and run to the end.
        res = run_pretrain(load_config("pretrain", **{**ov, "train.resume": "auto"}))
        assert res.metrics["status"] == "completed" and res.checkpoint == out / FINAL
    finally:
        torch.set_num_threads(threads)

    got, want = train_losses(out), train_losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, TOTAL + 1))  # continues without a gap
    assert got == want  # the same losses, bit for bit
    w_ref, w_out = (
        load_file(tmp_path / "ref" / FINAL / "model.safetensors"),
        load_file(out / FINAL / "model.safetensors"),
    )
    assert w_ref.keys() == w_out.keys()
    for name in w_ref:
        assert torch.equal(w_ref[name], w_out[name]), name
    assert res.metrics["val_loss"] == ref.metrics["val_loss"]
    finals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("final")]
    assert len(finals) == 1
