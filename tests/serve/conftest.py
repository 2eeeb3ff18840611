"""A tiny random GPT-2 (full vocabulary, so the real tokenizer works) saved as a checkpoint."""

from __future__ import annotations

import pytest
import torch

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT

TINY = dict(vocab_size=50257, context_length=96, emb_dim=32, n_layers=2, n_heads=2, dropout=0.0)


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **kw}))
    with torch.no_grad():  # larger weights than GPT-2's init: peaked logits, no near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_lm() -> GPT:
    return tiny_model()
