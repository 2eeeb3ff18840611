"""No leftovers, normal permissions (issue 13 items 8 and 9): what a killed export, save or run leaves
(`.NAME.tmp-PID-*`) is removed by the next one once its writer is gone, never while it runs; and final
files and dirs get the permissions the umask gives (0755 / 0644 under umask 022), not mkdtemp's 0700 / 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.export.hf import export
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.tokenizer import save_hf_tokenizer
from gptforge.pipeline.config import load_config
from gptforge.pipeline.train import run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def pids():
    """A dead pid and the pid of a live (sleeping) child."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield dead.pid, live.pid
    live.kill()
    live.wait()


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("test-tiny", context_length=16))


def stale(parent: Path, name: str, pid: int) -> Path:
    d = parent / f".{name}.tmp-{pid}-abc"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * 1000)  # half-written
    return d


def modes(root: Path) -> set[tuple[str, int]]:
    """(kind, mode) of a dir and everything in it."""
    out = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


def test_export_removes_dead_writers_temps_keeps_live_ones(tmp_path, pids):
    dead, live = pids
    gone, kept = stale(tmp_path, "out", dead), stale(tmp_path, "out", live)
    other = stale(tmp_path, "other", dead)  # another destination's: its own writer cleans it
    export(tiny(), tmp_path / "out")
    assert not gone.exists() and kept.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_checkpoint_and_tokenizer_writers_remove_dead_temps(tmp_path, pids):
    dead, live = pids
    gone, kept = stale(tmp_path, "ck", dead), stale(tmp_path, "ck", live)
    save_checkpoint(tiny(), tmp_path / "ck")
    assert not gone.exists() and kept.is_dir()
    tok = tmp_path / "tok"
    gone = stale(tok, "tokenizer", dead)
    save_hf_tokenizer(tok)
    assert not gone.exists() and not [p for p in tok.iterdir() if p.name.startswith(".")]
    assert {"merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"} <= {
        p.name for p in tok.iterdir()
    }


def pretrain_overrides(shared_data_dir: Path, tmp_path: Path) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:1000])
    return {
        "model.preset": "test-tiny",
        "model.context_length": 16,
        "data.sources": [str(corpus)],
        "train.epochs": 1,
        "train.batch_size": 2,
        "train.save_every": 3,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(tmp_path / "run"),
    }


def test_a_run_removes_what_killed_runs_left_and_outputs_get_umask_modes(
    shared_data_dir, tmp_path, pids, umask022
):
    dead, live = pids
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    gone = [stale(ckpts, "step-00000003", dead), stale(run, "final", dead)]
    kept = stale(ckpts, "step-00000009", live)  # another live writer's (its pid is alive): left alone
    res = run_pretrain(load_config("pretrain", **pretrain_overrides(shared_data_dir, tmp_path)))
    assert res.metrics["status"] == "completed"
    assert not any(p.exists() for p in gone) and kept.is_dir()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # item 9: umask 022 -> dirs 0755, files 0644, for final/ and the resumable checkpoints
    assert modes(run / "final") == {("dir", 0o755), ("file", 0o644)}
    for ck in (p for p in ckpts.iterdir() if not p.name.startswith(".")):
        assert modes(ck) == {("dir", 0o755), ("file", 0o644)}, ck


def test_export_and_checkpoint_get_umask_modes(tmp_path, umask022):
    export(tiny(), tmp_path / "hf")
    save_checkpoint(tiny(), tmp_path / "ck")
    for d in (tmp_path / "hf", tmp_path / "ck"):
        assert modes(d) == {("dir", 0o755), ("file", 0o644)}, d
    os.umask(0o027)  # a stricter umask is followed too
    export(tiny(), tmp_path / "hf2")
    assert modes(tmp_path / "hf2") == {("dir", 0o750), ("file", 0o640)}
