"""AdamW and its learning-rate schedule, built from a TrainConfig: what the trainer steps, not how it loops."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptforge.pipeline.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only Linear weights; biases, LayerNorms and embeddings (incl. tied head) never."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix = isinstance(module, nn.Linear) and name in ("weight", "lora_A", "lora_B")
            (decay if is_matrix and weight_decay > 0 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; the fused kernel where every parameter lives on CPU or CUDA.

    On CPU the fused step is about 10x the default foreach one, which matters for a small model whose
    50k-token embedding is most of its parameters.
    """
    groups = param_groups(model, cfg.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """LR multiplier of optimizer step s (0-based): linear warmup, then cosine / linear / constant."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
