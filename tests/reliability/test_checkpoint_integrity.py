"""Checkpoints prove their integrity (issue 13 item 3): every resumable checkpoint carries
files.sha256.json, written last; resume checks it. `train.resume auto` skips a damaged checkpoint with one
warning naming the file and resumes from the newest intact one, ending bit-identical to an uninterrupted
run; a damaged checkpoint named explicitly stops the run with exit 2 and one line."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import overrides_to_argv
from safetensors.torch import load_file

from gptforge.cli import main as cli_main
from gptforge.errors import CheckpointError
from gptforge.io import FILE_MANIFEST
from gptforge.pipeline.checkpoints import FINAL, find_resume_checkpoint, list_checkpoints
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_pretrain
from gptforge.pipeline.trainer import Trainer

STOP_AT = 6  # the interrupted run saves at 3 and 6 and stops; the whole run is 9 steps (one epoch)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(shared_data_dir, tmp_path_factory) -> Path:
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:1300]
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(text, encoding="utf-8")
    return path


def overrides(corpus: Path, out_dir: Path) -> dict:
    return {
        "model.preset": "test-tiny",
        "model.context_length": 16,
        "model.dropout": 0.1,  # dropout on: the RNG state in random_states_0.pkl matters
        "data.sources": [str(corpus)],
        "train.epochs": 1,
        "train.batch_size": 2,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.save_every": 3,
        "train.keep_last": 5,
        "train.seed": 5,
        "train.progress": False,
        "train.plot": False,
        "train.out_dir": str(out_dir),
    }


argv = overrides_to_argv


def interrupted_run(ov: dict, monkeypatch) -> None:
    """Run until the checkpoint at STOP_AT is saved, then stop as SIGTERM would (in-process)."""
    save = Trainer._save

    def save_then_stop(self, state):
        out = save(self, state)
        if state.step == STOP_AT:
            self._signal = signal.SIGTERM
        return out

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save", save_then_stop)
        res = run_pretrain(load_config("pretrain", **ov))
    assert res.metrics["status"] == "interrupted" and res.metrics["step"] == STOP_AT


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / FINAL / "model.safetensors")


def test_auto_resume_skips_a_damaged_checkpoint_and_ends_bit_identical(corpus, tmp_path, monkeypatch, capsys):
    ref = run_pretrain(load_config("pretrain", **overrides(corpus, tmp_path / "ref")))
    assert ref.metrics["step"] == 9

    out = tmp_path / "run"
    ov = overrides(corpus, out)
    interrupted_run(ov, monkeypatch)
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["step-00000003", "step-00000006"]
    assert all((p / FILE_MANIFEST).is_file() for p in ckpts)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left

    # explicit resume of the damaged checkpoint: exit 2, one line naming the file
    rng = ckpts[-1] / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])
    capsys.readouterr()
    assert cli_main(["pretrain", *argv(ov), "--train.resume", str(ckpts[-1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(rng) in err[0] and "truncated or replaced" in err[0], err
    assert not (out / FINAL).exists()

    # resume auto: one warning naming the file, then from step 3, and the end is the uninterrupted run's
    res = run_pretrain(load_config("pretrain", **{**ov, "train.resume": "auto"}))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and str(rng) in warnings[0]
        and "skipped; trying an older checkpoint" in warnings[0]
    )
    assert f"resuming from {ckpts[0]} (step 3" in err
    assert res.metrics["status"] == "completed" and res.metrics["step"] == 9
    w_ref, w_out = weights(tmp_path / "ref"), weights(out)
    assert w_ref.keys() == w_out.keys()
    for name in w_ref:
        assert torch.equal(w_ref[name], w_out[name]), name
    assert res.metrics["val_loss"] == ref.metrics["val_loss"]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert steps == list(range(1, 10))
    # final/ is protected by the same manifest, covering what the trainer adds (metrics.jsonl)
    assert "metrics.jsonl" in (out / FINAL / FILE_MANIFEST).read_text()


def damage_missing(d: Path) -> Path:
    f = d / "optimizer.bin"
    f.unlink()
    return f


def damage_truncated(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    return f


def damage_replaced(d: Path) -> Path:  # same size, other bytes: only sha256 sees it
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))
    return f


def damage_no_manifest(d: Path) -> Path:
    f = d / FILE_MANIFEST
    f.unlink()
    return d


@pytest.mark.parametrize("damage", [damage_missing, damage_truncated, damage_replaced, damage_no_manifest])
def test_every_kind_of_damage_is_named(tmp_path, capsys, damage):
    """Resume-time checks on copies of one real checkpoint layout, without training."""
    from accelerate import Accelerator

    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    acc = Accelerator(cpu=True)
    model = acc.prepare(GPT(GPTConfig.from_preset("test-tiny", context_length=16)))
    opt = acc.prepare(torch.optim.AdamW(model.parameters()))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    root = tmp_path / "out" / "checkpoints"
    good, bad = root / "step-00000002", root / "step-00000004"
    acc.save_state(str(good))
    (good / "trainer_state.json").write_text("{}")
    from gptforge.io import write_file_manifest

    write_file_manifest(good)
    shutil.copytree(good, bad)

    named = damage(bad)
    assert find_resume_checkpoint("auto", tmp_path / "out") == good
    warn = capsys.readouterr().err.strip().splitlines()
    assert len(warn) == 1 and str(named) in warn[0], warn
    with pytest.raises(CheckpointError, match=str(named).replace(".", r"\.")):
        find_resume_checkpoint(str(bad), tmp_path / "out")

    damage_truncated(good)  # none intact: a fresh start, and it says so
    assert find_resume_checkpoint("auto", tmp_path / "out") is None
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "starting from step 0" in err
