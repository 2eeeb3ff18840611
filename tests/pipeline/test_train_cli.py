"""`gptforge pretrain` / `gptforge finetune`: YAML + overrides, --print-config, one-line errors with a
suggestion (exit 2), and a tiny real run through the verb."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from gptforge.cli import main
from gptforge.errors import ConfigError
from gptforge.pipeline.cli_args import parse_config
from gptforge.pipeline.config import ClassifyConfig, load_config
from gptforge.pipeline.train import build_model


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_print_config_merges_yaml_and_overrides(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  init: scratch\n  preset: test-tiny\ntrain:\n  lr: 0.001\n  epochs: 3\n")
    code, out, err = run_cli(
        capsys, "finetune", "classify", "--config", str(cfg_file), "--train.lr", "2e-4", "--print-config"
    )
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["model"] == {**shown["model"], "init": "scratch", "preset": "test-tiny"}
    assert shown["train"]["lr"] == 2e-4 and shown["train"]["epochs"] == 3  # override beats the file
    assert shown["train"]["batch_size"] == 8 and shown["trainable"] == "last_blocks:1"  # book defaults
    # the printed config is itself a valid --config file giving the same config
    again = tmp_path / "again.yaml"
    again.write_text(out)
    cfg, _ = parse_config("classify", ["--config", str(again)])
    assert cfg.train.lr == 2e-4 and cfg.model.preset == "test-tiny"


def test_resume_flag_is_short_for_train_resume():
    assert parse_config("pretrain", ["--resume", "auto"])[0].train.resume == "auto"
    assert parse_config("instruct", ["--resume=runs/x/checkpoints/step-00000004"])[0].train.resume.endswith(
        "04"
    )


def test_task_defaults_follow_the_reference_recipes():
    c, i, p = load_config("classify"), load_config("instruct"), load_config("pretrain")
    assert isinstance(c, ClassifyConfig)
    assert (c.train.lr, c.train.weight_decay, c.train.epochs, c.train.batch_size) == (5e-5, 0.1, 5, 8)
    assert (i.train.lr, i.train.weight_decay, i.train.epochs, i.train.batch_size) == (5e-5, 0.1, 2, 8)
    assert (p.train.lr, p.train.weight_decay, p.train.epochs, p.train.batch_size) == (4e-4, 0.1, 10, 2)
    assert p.train.schedule == "cosine" and c.train.schedule == i.train.schedule == "constant"
    assert c.model.init == i.model.init == "gpt2" and p.model.init == "scratch"  # GPT-2 124M, as the book
    assert c.trainable == "last_blocks:1"


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "--train.lrr", "1e-4"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        (
            ["pretrain", "--trian.epochs", "2"],
            "unknown config key 'trian.epochs'; did you mean 'train.epochs'?",
        ),
        (["finetune", "classify", "--train.epochs", "x"], "train.epochs='x': expected int"),
        (
            ["pretrain", "--train.mixed_precision", "fp61"],
            "train.mixed_precision='fp61' is not valid; did you mean 'fp16'?",
        ),
        (["finetune", "classify", "--trainable", "last:1"], "trainable='last:1' is not valid"),
        (["finetune", "clasify"], "unknown finetune task 'clasify'; did you mean 'classify'?"),
        (["pretrain", "--config", "missing.yaml"], "--config missing.yaml: file not found"),
        (
            ["pretrain", "--train.resume", "no/such/dir"],
            "train.resume=no/such/dir: not a resumable checkpoint",
        ),
        (["pretrain", "--train.grad_accum", "0"], "train.grad_accum=0 must be >= 1"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_trackers_must_be_known_and_installed(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "pretrain", "--train.trackers", "[tensorbord]")
    assert code == 2 and "unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in err
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])
    code, _, err = run_cli(capsys, "pretrain", "--train.trackers", "[wandb]")
    assert code == 2 and "'wandb' is not installed" in err and "pip install wandb" in err


def test_unknown_yaml_key_names_file_key_and_suggestion(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  warmup_step: 10\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(bad))
    assert code == 2
    assert f"{bad}: unknown config key 'train.warmup_step'; did you mean 'train.warmup_steps'?" in err
    bad.write_text("train:\n  epochs: many\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(bad), "--train.lr", "1e-3")
    assert code == 2 and f"{bad}: train.epochs='many': expected int" in err


def test_size_overrides_only_apply_to_scratch(tmp_path):
    from gptforge.model.checkpoint import save_checkpoint
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    ckpt = save_checkpoint(GPT(GPTConfig.from_preset("test-tiny", vocab_size=97)), tmp_path / "ck")
    cfg = load_config("pretrain", **{"model.init": str(ckpt), "model.emb_dim": 64})
    with pytest.raises(ConfigError, match="model.emb_dim applies to model.init=scratch only"):
        build_model(cfg.model)
    cfg = load_config("pretrain", **{"model.init": str(ckpt)})
    assert build_model(cfg.model).cfg.vocab_size == 97
    scratch = build_model(load_config("pretrain", **{"model.preset": "test-tiny", "model.n_layers": 1}).model)
    assert len(scratch.blocks) == 1 and scratch.training


def test_pretrain_verb_runs_from_a_yaml_file(shared_data_dir, tmp_path, capsys):
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")[:1200]
    (tmp_path / "tiny.txt").write_text(text, encoding="utf-8")
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "test-tiny", "context_length": 16},
                "data": {"sources": [str(tmp_path / "tiny.txt")]},
                "train": {"out_dir": str(tmp_path / "out"), "max_steps": 3, "progress": False, "plot": False},
            }
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_cli(
            capsys, "pretrain", "--config", str(tmp_path / "run.yaml"), "--train.lr", "1e-3"
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert f"model: {tmp_path / 'out' / 'final'}" in out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["status"] == "completed" and metrics["step"] == 3
    run = json.loads((tmp_path / "out" / "final" / "run.json").read_text())
    assert run["config"]["train"]["lr"] == 1e-3 and run["task"] == "pretrain"
