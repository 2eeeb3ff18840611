"""gptforge's own checkpoint directory: config.json + model.safetensors (+ metadata JSON). Nothing pickled.

Layout:
  config.json        GPTConfig (includes num_labels / id2label for classifiers)
  model.safetensors  weights; a tied LM head is stored once (as tok_emb.weight)
  tokenizer.json     {"name": "gpt2"}: the tokenizer is GPT-2 BPE, rebuilt offline on load
  labels.json        classifiers: {"id2label": {...}}
  prompt_style.json  instruction models: {"name": "alpaca", ...}
  run.json, metrics.jsonl: written by the trainer
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptforge.errors import CheckpointError
from gptforge.io import atomic_dir, record_read, write_json
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_dict_for_save(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors, with a tied head stored once and every tensor contiguous."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def load_weights_into(model: GPT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `sd` strictly: a missing or unexpected tensor is an error that names it."""
    expected = set(state_dict_for_save(model))
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(sd, strict=False)  # tied lm_head.weight is covered by tok_emb.weight


def save_checkpoint(
    model: GPT,
    out_dir: str | os.PathLike,
    metadata: dict[str, dict] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save a self-describing checkpoint. `metadata` maps extra file names (e.g. "prompt_style.json") to JSON."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.cfg.save(tmp / CONFIG)
        write_json(tmp / "tokenizer.json", {"name": "gpt2"})
        if model.cfg.num_labels:
            write_json(tmp / "labels.json", {"id2label": {str(k): v for k, v in model.cfg.labels().items()}})
        for name, obj in (metadata or {}).items():
            write_json(tmp / name, obj)

    return atomic_dir(out_dir, write, overwrite=overwrite)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A full gptforge checkpoint dir (`model.load.is_model_dir` also accepts LoRA adapter dirs)."""
    p = Path(path)
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file() and "emb_dim" in read_json(p / CONFIG)


def read_json(path: Path, fix: str = "re-save the checkpoint") -> dict:
    """A checkpoint's JSON file; an unreadable one is a CheckpointError naming the file and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e}); {fix}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """Load a full gptforge checkpoint directory in one call (`model.load.load_model` also takes adapters)."""
    from safetensors.torch import load_file

    p = Path(path)
    record_read(p, "checkpoint")
    if (p / "adapter.json").is_file():
        raise CheckpointError(
            f"{p}: a LoRA adapter dir, not a full checkpoint; load it with gptforge.model.load.load_model, "
            "which merges it onto its base"
        )
    if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
        raise CheckpointError(
            f"{p}: not a gptforge checkpoint (needs {CONFIG} and {WEIGHTS}); "
            "for a Hugging Face model use `gptforge convert`"
        )
    cfg = GPTConfig.from_dict(read_json(p / CONFIG))
    with torch.device("meta"):
        model = GPT(cfg)
    sd = load_file(str(p / WEIGHTS), device=str(device))
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    load_weights_into(model, sd, source=str(p / WEIGHTS))
    return model.eval()


def read_metadata(path: str | os.PathLike, name: str) -> dict | None:
    """An optional metadata file of a checkpoint (e.g. "prompt_style.json"), or None."""
    f = Path(path) / name
    return read_json(f) if f.is_file() else None
