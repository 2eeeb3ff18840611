"""The stage runner end to end through `gptforge run`: skip, resume after a kill, --from, upstream changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptforge.cli import main
from gptforge.model.checkpoint import load_checkpoint
from gptforge.pipeline.manifest import read_manifest
from gptforge.pipeline.runner import run_pipeline
from gptforge.pipeline.stages import load_pipeline

PIPELINE = {
    "name": "mini",
    "stages": ["pretrain", "classify", "export"],
    "pretrain": {
        "model": {"init": "scratch", "preset": "test-tiny"},
        "data": {"sources": ["the-verdict"], "context_length": 32},
        "train": {"epochs": 1, "max_steps": 6, "batch_size": 4, "progress": False, "save_every": 2},
    },
    "classify": {
        "model": {"init": "pretrain"},
        "data": {"limit": 24, "max_length": 32},
        "train": {"epochs": 1, "batch_size": 8, "progress": False, "eval_every": 0},
        "trainable": "all",
    },
    "export": {},
    "quick": {"pretrain.train.max_steps": 2},
}


def write_pipeline(tmp_path: Path, data: dict | None = None) -> Path:
    p = tmp_path / "mini.yaml"
    p.write_text(yaml.safe_dump(data or PIPELINE), encoding="utf-8")
    return p


def actions(results) -> dict[str, str]:
    return {r.stage: r.action for r in results}


@pytest.fixture
def data_env(shared_data_dir, monkeypatch):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))


def test_run_skip_from_and_upstream_change(tmp_path, data_env):
    path = write_pipeline(tmp_path)
    runs = tmp_path / "runs"
    pipe = load_pipeline(path, runs_dir=runs)
    first = run_pipeline(pipe, log=lambda *_: None)
    assert actions(first) == {"pretrain": "ran", "classify": "ran", "export": "ran"}
    root = runs / "mini"
    manifests = {s: read_manifest(root / s) for s in ("pretrain", "classify", "export")}
    assert all(m["status"] == "done" for m in manifests.values())
    # The classifier was started from the pretrain stage's output: its body weights equal nothing random.
    assert manifests["classify"]["inputs"] == {"pretrain": manifests["pretrain"]["output_hash"]}
    assert manifests["classify"]["metrics"]["step"] == 3  # 24 examples / batch 8
    assert (root / "export" / "classify" / "model.safetensors").is_file()
    summary = (root / "summary.md").read_text()
    assert "| classify | ran |" in summary and "test_accuracy" in summary

    # Unchanged config and inputs: everything is skipped, nothing is rewritten.
    mtime = (root / "classify" / "final" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(load_pipeline(path, runs_dir=runs), log=lambda *_: None)
    assert actions(again) == {"pretrain": "skipped", "classify": "skipped", "export": "skipped"}
    assert (root / "classify" / "final" / "model.safetensors").stat().st_mtime_ns == mtime

    # --from classify reruns classify and export, never pretrain.
    res = run_pipeline(load_pipeline(path, runs_dir=runs), from_stage="classify", log=lambda *_: None)
    assert actions(res) == {"pretrain": "skipped", "classify": "ran", "export": "ran"}

    # --only with an up-to-date stage skips; with --force it reruns just that stage.
    res = run_pipeline(load_pipeline(path, runs_dir=runs), only="export", log=lambda *_: None)
    assert actions(res) == {"export": "skipped"}
    res = run_pipeline(load_pipeline(path, runs_dir=runs), only="export", force=True, log=lambda *_: None)
    assert actions(res) == {"export": "ran"}

    # A changed upstream config reruns it and, since its output changed, everything downstream.
    changed = load_pipeline(path, ["pretrain.train.max_steps=4"], runs_dir=runs)
    res = run_pipeline(changed, log=lambda *_: None)
    assert actions(res) == {"pretrain": "ran", "classify": "ran", "export": "ran"}
    assert read_manifest(root / "pretrain")["metrics"]["step"] == 4

    # A downstream-only change reruns only that stage (and what reads it).
    res = run_pipeline(
        load_pipeline(path, ["pretrain.train.max_steps=4", "classify.train.lr=1e-4"], runs_dir=runs),
        log=lambda *_: None,
    )
    assert actions(res) == {"pretrain": "skipped", "classify": "ran", "export": "ran"}


def test_killed_stage_resumes(tmp_path, data_env):
    data = json.loads(json.dumps(PIPELINE))
    data["stages"] = ["pretrain"]
    data["pretrain"]["train"].update(epochs=2, max_steps=20, save_every=5)
    path = write_pipeline(tmp_path, data)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gptforge.cli", "run", str(path), "--runs-dir", str(runs)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_ckpt = runs / "mini" / "pretrain" / "checkpoints" / "step-00000005"
    deadline = time.monotonic() + 240
    while not first_ckpt.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (rc {proc.returncode}) before its first checkpoint: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(runs / "mini" / "pretrain")["status"] == "running"  # killed: never marked done

    res = run_pipeline(load_pipeline(path, runs_dir=runs), log=lambda *_: None)
    assert actions(res) == {"pretrain": "resumed"}
    man = read_manifest(runs / "mini" / "pretrain")
    assert man["status"] == "done" and man["metrics"]["step"] == 20
    records = [json.loads(line) for line in (runs / "mini" / "pretrain" / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "lr" in r]
    assert steps == list(range(1, 21))  # resumed from a checkpoint: no gap and no step logged twice
    assert load_checkpoint(man["outputs"]["checkpoint"]).cfg.emb_dim == 32


def test_cli_errors_are_one_line(tmp_path, data_env, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "pipeline file not found" in capsys.readouterr().err
    bad = json.loads(json.dumps(PIPELINE))
    bad["classify"]["train"]["epocs"] = 2
    assert main(["run", str(write_pipeline(tmp_path, bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epocs" in err and "epochs" in err
    bad = json.loads(json.dumps(PIPELINE))
    bad["stages"] = ["pretrain", "clasify"]
    assert main(["run", str(write_pipeline(tmp_path, bad))]) == 2
    assert "did you mean 'classify'" in capsys.readouterr().err
    bad = json.loads(json.dumps(PIPELINE))
    bad["classify"]["model"]["init"] = "instruct"
    assert main(["run", str(write_pipeline(tmp_path, bad))]) == 2
    assert "only an earlier training stage" in capsys.readouterr().err


def test_quick_and_print_config(tmp_path, data_env, capsys):
    path = write_pipeline(tmp_path)
    assert main(["run", str(path), "--quick", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["pretrain"]["train"]["max_steps"] == 2
    assert out["classify"]["trainable"] == "all"
    assert main(["run", str(path), "--print-config", "--set", "classify.train.epochs=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["classify"]["train"]["epochs"] == 3


def test_stage_under_torchrun_two_processes(tmp_path, data_env):
    """A launcher runs one stage per launch: both processes train it, the main one writes the manifest."""
    data = json.loads(json.dumps(PIPELINE))
    data["stages"] = ["pretrain"]
    path = write_pipeline(tmp_path, data)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gptforge.cli"]
    cmd = [*torchrun, "run", str(path), "--runs-dir", str(runs)]
    out = subprocess.run([*cmd, "--only", "pretrain"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("Pipeline mini:") == 1  # one summary, from the main process
    man = read_manifest(runs / "mini" / "pretrain")
    assert man["status"] == "done" and man["metrics"]["step"] == 6
    run_json = json.loads((runs / "mini" / "pretrain" / "run.json").read_text())
    assert run_json["num_processes"] == 2  # really two processes, not two separate runs
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "run one stage per launch" in bad.stderr


def test_evaluate_stage_reports_the_trainers_names_and_numbers(tmp_path, data_env):
    """The evaluate stage scores the pretrain stage's checkpoint on the data it was trained with; the
    summary carries the trainer's metric names, and the validation loss is the trainer's own."""
    data = json.loads(json.dumps(PIPELINE))
    data["stages"] = ["pretrain", "evaluate"]
    data["evaluate"] = {"batch_size": 4}
    data["pretrain"]["train"].update(max_steps=2, save_every=0)
    path = write_pipeline(tmp_path, data)
    runs = tmp_path / "runs"
    run_pipeline(load_pipeline(path, runs_dir=runs), log=lambda *_: None)
    pre = read_manifest(runs / "mini" / "pretrain")["metrics"]
    ev = read_manifest(runs / "mini" / "evaluate")["metrics"]["pretrain"]
    assert set(ev) == {"val_loss", "val_perplexity"}
    assert ev["val_loss"] == pytest.approx(pre["val_loss"], rel=1e-5)
    assert ev["val_perplexity"] == pytest.approx(pre["val_perplexity"], rel=1e-5)
    assert "val_perplexity" in (runs / "mini" / "summary.md").read_text()
