"""GPTConfig and its presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from gptforge.errors import ConfigError
from gptforge.schema import from_dict

ACTIVATIONS = ("gelu_new", "gelu")
IGNORE_INDEX = -100  # a target the loss skips (padding, masked prompt tokens); PyTorch's and HF's default


def default_id2label(num_labels: int) -> dict[int, str]:
    """Class names for a classifier saved without any: LABEL_0, LABEL_1, ... (as transformers names them)."""
    return {i: f"LABEL_{i}" for i in range(num_labels)}


@dataclass
class GPTConfig:
    """Shape of a GPT-2-class model. Field names follow the book; `to_dict()` is what checkpoints store."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_dim: int | None = None  # None -> 4 * emb_dim
    dropout: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"  # "gelu_new" (tanh approximation, GPT-2) or "gelu" (exact)
    num_labels: int = 0  # > 0 adds a classification head
    pad_token_id: int = 50256
    eos_token_id: int = 50256
    id2label: dict[int, str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.emb_dim

    def labels(self) -> dict[int, str]:
        """Class id -> name: the saved names, else LABEL_i; empty for a language model."""
        return dict(self.id2label or default_id2label(self.num_labels))

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"model.emb_dim={self.emb_dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides emb_dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation={self.activation!r} is not supported; use one of {ACTIVATIONS}"
            )
        if self.num_labels < 0 or self.num_labels == 1:
            raise ConfigError(
                f"model.num_labels={self.num_labels}: use 0 (language model) or 2 or more classes"
            )
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels and sorted(self.id2label) != list(range(self.num_labels)):
                raise ConfigError(
                    f"model.id2label has keys {sorted(self.id2label)} but num_labels={self.num_labels}; "
                    "give one name per class id 0..num_labels-1"
                )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["id2label"] is not None:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> GPTConfig:
        """A config.json mapping, keys and types checked (`where`, e.g. "ckpt/config.json: ", prefixes errors)."""
        return from_dict(cls, d, where=where)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            import difflib

            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(PRESETS)}"
            raise ConfigError(f"unknown model preset {name!r}{hint}")
        return cls(**{**PRESETS[name], **overrides})

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


PRESETS: dict[str, dict] = {
    "gpt2": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
    # CPU-sized presets: the embedded default pipeline and quick experiments.
    "cpu-small": dict(emb_dim=256, n_layers=4, n_heads=4, context_length=256),
    "cpu-tiny": dict(emb_dim=128, n_layers=2, n_heads=2, context_length=128),
    # For tests: a few thousand parameters beyond the embeddings.
    "test-tiny": dict(emb_dim=32, n_layers=2, n_heads=2, context_length=64),
}
