"""Issue 13 items 1-2: a stage is keyed on the content of everything it read, not on paths.

A copied data file with swapped labels, or a `model.init` checkpoint whose weights were overwritten, must
rerun the stage and everything downstream; an untouched one must not be read again (stat cache).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gptforge import io
from gptforge.cli import main
from gptforge.model import GPT, GPTConfig
from gptforge.model.checkpoint import save_checkpoint
from gptforge.pipeline import runner
from gptforge.pipeline.manifest import read_manifest
from gptforge.pipeline.runner import run_pipeline
from gptforge.pipeline.stages import load_pipeline

REPO = Path(__file__).resolve().parents[2]


def actions(results) -> dict[str, str]:
    return {r.stage: r.action for r in results}


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(GPT(GPTConfig.from_preset("test-tiny")), init)
    data = tmp_path / "tickets.csv"
    shutil.copy(REPO / "examples" / "data" / "tickets.csv", data)
    spec = {
        "name": "custom",
        "stages": ["classify", "evaluate", "export"],
        "classify": {
            "model": {"init": str(init)},
            "data": {"dataset": str(data), "text_column": "message", "label_column": "category"},
            "trainable": "all",
            "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 0, "progress": False},
        },
        "evaluate": {"batch_size": 16},
        "export": {},
    }
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path, tmp_path / "runs", data, init


def swap_labels(path: Path) -> None:
    rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    swap = {"billing": "technical", "technical": "billing"}
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["message", "category"])
        w.writeheader()
        for r in rows:
            w.writerow({"message": r["message"], "category": swap.get(r["category"], r["category"])})


def weights(runs: Path) -> dict[str, torch.Tensor]:
    return load_file(str(runs / "custom" / "classify" / "final" / "model.safetensors"))


def run(path, runs, **kw):
    return run_pipeline(load_pipeline(path, runs_dir=runs), log=lambda *_: None, **kw)


def test_changed_data_file_reruns_stage_and_downstream(setup, capsys):
    path, runs, data, _ = setup
    assert actions(run(path, runs)) == {"classify": "ran", "evaluate": "ran", "export": "ran"}
    before = weights(runs)
    reads = read_manifest(runs / "custom" / "classify")["reads"]
    assert reads[str(data.absolute())]["kind"] == "data file"
    assert any(r["kind"] == "checkpoint" for r in reads.values())
    assert any(r["kind"] == "tokenizer file" for r in reads.values())
    assert actions(run(path, runs)) == {"classify": "skipped", "evaluate": "skipped", "export": "skipped"}

    swap_labels(data)
    # --explain says what would happen and why, and runs nothing.
    manifest_before = (runs / "custom" / "classify" / "manifest.json").read_bytes()
    assert main(["run", str(path), "--runs-dir", str(runs), "--explain"]) == 0
    out = capsys.readouterr().out
    assert f"[classify] run: data file {data.absolute()} changed" in out
    assert "[evaluate] run: upstream stage 'classify' runs first" in out
    assert "[export] run: upstream stage 'classify' runs first" in out
    assert (runs / "custom" / "classify" / "manifest.json").read_bytes() == manifest_before

    assert actions(run(path, runs)) == {"classify": "ran", "evaluate": "ran", "export": "ran"}
    after = weights(runs)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_overwritten_init_checkpoint_reruns(setup, tmp_path):
    path, runs, _, init = setup
    run(path, runs)
    before = weights(runs)
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_checkpoint(GPT(GPTConfig.from_preset("test-tiny")), other)
    shutil.copy(other / "model.safetensors", init / "model.safetensors")
    res = run(path, runs)
    assert actions(res) == {"classify": "ran", "evaluate": "ran", "export": "ran"}
    after = weights(runs)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # ... and what it gave equals a forced run on the new weights: nothing stale was reused.
    forced = run(path, runs, force=True)
    assert actions(forced) == {"classify": "ran", "evaluate": "ran", "export": "ran"}
    again = weights(runs)
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_unchanged_inputs_are_not_reread_and_touch_is_not_a_change(setup, monkeypatch):
    path, runs, data, _ = setup
    run(path, runs)
    hashed: list[str] = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    io._HASH_CACHE.clear()
    assert actions(run(path, runs)) == {"classify": "skipped", "evaluate": "skipped", "export": "skipped"}
    assert hashed == []  # (path, size, mtime) unchanged: nothing was read to decide
    # A new mtime with the same bytes: hashed again, and still up to date.
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert actions(run(path, runs)) == {"classify": "skipped", "evaluate": "skipped", "export": "skipped"}
    assert str(data.absolute()) in hashed or str(data) in hashed


def test_a_rerun_for_another_reason_does_not_reread_unchanged_inputs(setup, monkeypatch):
    """A config change reruns the stage; the data file it reads again is unchanged (same size and mtime),
    so recording what the new run read reuses the earlier hash instead of reading the file once more."""
    path, runs, data, _ = setup
    run(path, runs)
    hashed: list[str] = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    io._HASH_CACHE.clear()
    res = run_pipeline(load_pipeline(path, ["classify.train.lr=2e-3"], runs_dir=runs), log=lambda *_: None)
    assert actions(res)["classify"] == "ran"
    assert str(data.absolute()) not in hashed and str(data) not in hashed
    reads = read_manifest(runs / "custom" / "classify")["reads"]
    assert reads[str(data.absolute())]["hash"] == io.content_hash(data)  # and the recorded hash is right


def test_code_change_reruns(setup, monkeypatch, capsys):
    path, runs, _, _ = setup
    run(path, runs)
    real = runner.code_version()
    monkeypatch.setattr(runner, "code_version", lambda: {**real, "gptforge": "99.0"})
    assert main(["run", str(path), "--runs-dir", str(runs), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "[classify] run: gptforge code changed (gptforge" in out and "-> 99.0)" in out
    assert actions(run(path, runs))["classify"] == "ran"
