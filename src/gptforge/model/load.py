"""Open any model dir gptforge writes: a full checkpoint, or a LoRA adapter dir merged onto its base.

`checkpoint.py` knows the full-checkpoint format and `lora.py` the adapter format; an adapter's base is a
checkpoint, so `lora` imports `checkpoint`. The loader that takes either kind of dir sits above both, so
neither has to import the other (inside a function or not) to tell them apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptforge.io import record_read
from gptforge.model.checkpoint import is_checkpoint, load_checkpoint
from gptforge.model.gpt import GPT
from gptforge.model.lora import ADAPTER_META, load_adapter, merge_lora


def is_model_dir(path: str | os.PathLike) -> bool:
    """A gptforge checkpoint dir or a LoRA adapter dir: what `load_model` opens."""
    return (Path(path) / ADAPTER_META).is_file() or is_checkpoint(path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", deep: bool = False) -> GPT:
    """The model in a gptforge checkpoint dir, in eval mode.

    A LoRA run's adapter dir (adapter.json) loads onto the base it records and comes back merged: a plain
    GPT that evaluates, generates and exports like any other. Files are checked against their
    files.sha256.json where there is one (sizes; `deep`: sha256 too).
    """
    if (Path(path) / ADAPTER_META).is_file():
        record_read(path, "LoRA adapter dir")  # its base is recorded when load_adapter opens it
        return merge_lora(load_adapter(path, device=device, deep=deep)).eval()
    return load_checkpoint(path, device=device, deep=deep)
