"""`gptforge pretrain` and `gptforge finetune classify|instruct|dpo`: parse the config, train, report."""

from __future__ import annotations

import difflib
import json
import os
import sys

from gptforge.errors import ConfigError

FINETUNE_TASKS = {
    "classify": "a classification head (SMS spam or your labelled file)",
    "instruct": "instruction tuning (Alpaca-style records)",
    "dpo": "preference tuning of an instruction model (chosen/rejected pairs, DPO)",
}


def _run(task: str, argv: list[str], prog: str) -> int:
    from gptforge.pipeline.cli_args import cli_config

    cfg = cli_config(task if task == "pretrain" else f"finetune {task}", argv)
    if cfg is None:  # --help or --print-config answered
        return 0
    from gptforge.pipeline.train import train

    result = train(task, cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: report once
        return 0
    metrics = result.metrics
    if metrics.get("status") == "interrupted":
        print(f"interrupted at step {metrics['step']}; resumable checkpoint: {result.checkpoint}")
        return 0
    print(f"model: {result.checkpoint}")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    print(json.dumps(shown))
    return 0


def pretrain(argv: list[str]) -> int:
    """`gptforge pretrain [--config FILE.yaml] [--train.lr 1e-4 ...]`."""
    return _run("pretrain", argv, "gptforge pretrain")


def finetune(argv: list[str]) -> int:
    """`gptforge finetune classify|instruct|dpo [--config FILE.yaml] [overrides]`."""
    if not argv or argv[0] in ("-h", "--help"):
        lines = [
            "usage: gptforge finetune TASK [--config FILE.yaml] [--section.field VALUE ...]",
            "",
            "tasks:",
        ]
        lines += [f"  {k:<9} {v}" for k, v in FINETUNE_TASKS.items()]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    task = argv[0]
    if task not in FINETUNE_TASKS:
        close = difflib.get_close_matches(task, FINETUNE_TASKS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use {' or '.join(FINETUNE_TASKS)}"
        raise ConfigError(f"unknown finetune task {task!r}; {hint}")
    return _run(task, argv[1:], f"gptforge finetune {task}")
