"""LoRA: low-rank adapters on the GPT's linear layers, merged back or exported to PEFT.

A targeted `nn.Linear` becomes a `LoRALinear` (a subclass that keeps `weight` and `bias` under the same
names, so base checkpoints, converters and tied weights work unchanged) with two extra fp32 parameters:
`lora_A` (r, in) and `lora_B` (out, r); the output is `base(x) + B(A(dropout(x))) * alpha / r`, the same
computation and initialisation as PEFT (A: kaiming_uniform(a=sqrt(5)), B: zeros), so an adapter exported
with `export.peft.export_peft` gives the same logits in `peft` on `transformers` GPT-2.

An adapter checkpoint stores only the adapter tensors plus the classification head (a new head is not in
the base): `adapter.safetensors`, `adapter.json` (LoRA config, base path, base fingerprint), `config.json`
(the finetuned model's GPTConfig) and the usual metadata files of a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import CheckpointError, ConfigError, ConversionError
from gptforge.io import atomic_dir, write_file_manifest, write_json
from gptforge.model.checkpoint import (
    CONFIG,
    is_checkpoint,
    load_checkpoint,
    load_safetensors,
    read_config,
    read_json,
    tensor_bytes,
    verify_checkpoint_files,
)
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT, Linear
from gptforge.model.hf import from_hf
from gptforge.schema import from_dict

# Our target names (module paths inside a block, plus the head) and their transformers GPT-2 names.
BLOCK_TARGETS: dict[str, str] = {
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
TARGETS = (*BLOCK_TARGETS, "score")
# Accepted spellings: transformers' names and a few unambiguous short ones.
ALIASES: dict[str, str] = {
    "qkv": "attn.qkv",
    "c_attn": "attn.qkv",
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "fc": "mlp.fc",
    "c_fc": "mlp.fc",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
    "head": "score",
}
DEFAULT_TARGETS = list(BLOCK_TARGETS)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
FORMAT = "gptforge-lora"
# Fields that must agree between an adapter's config and its base model (the head and dropout may differ).
SHAPE_FIELDS = (
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_layers",
    "n_heads",
    "mlp_dim",
    "qkv_bias",
    "tie_embeddings",
    "layer_norm_eps",
    "activation",
)


@dataclass
class LoRAConfig:
    """LoRA settings. `r=0` means LoRA is off (full finetuning); scaling is `alpha / r`.

    `targets` names layers: attn.qkv, attn.proj, mlp.fc, mlp.proj, score (the classification head), or
    "all" (every block linear, plus the head of a classifier). transformers' names (c_attn, ...) also work.
    Without "score", a classifier's head is trained in full and saved with the adapter.
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))  # "a,b" works too

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ConfigError(f"lora.r={self.r!r} must be a non-negative integer (0 turns LoRA off)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be positive (scaling is alpha / r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ConfigError(f"lora.targets is empty; name one or more of {list(TARGETS)} or 'all'")
        for t in self.targets:
            if t != "all" and t not in TARGETS and t not in ALIASES:
                close = difflib.get_close_matches(t, [*TARGETS, *ALIASES, "all"], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"lora.targets: unknown layer {t!r}{hint}; use {list(TARGETS)} or 'all'")

    def resolved_targets(self, classifier: bool) -> list[str]:
        """Canonical target names in a fixed order; "all" adds the head only for a classifier."""
        names = set()
        for t in self.targets:
            if t == "all":
                names.update(BLOCK_TARGETS)
                if classifier:
                    names.add("score")
            else:
                names.add(ALIASES.get(t, t))
        return [t for t in TARGETS if t in names]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> LoRAConfig:
        """An adapter.json `lora` mapping, keys and types checked (nested under `lora.` in messages)."""
        return from_dict(cls, d, where=where, prefix="lora.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LoRAConfig:
        if name not in LORA_PRESETS:
            raise ConfigError(f"unknown LoRA preset {name!r}; presets: {', '.join(LORA_PRESETS)}")
        return cls(**{**LORA_PRESETS[name], **overrides})


LORA_PRESETS: dict[str, dict] = {
    # rasbt LLMs-from-scratch appendix E: rank 16, alpha 16, every linear layer including the head.
    "book": dict(r=16, alpha=16.0, dropout=0.0, targets=["all"]),
}


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update. `weight`/`bias` keep their names; the update is kept in fp32."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared, not copied: a tied or frozen weight stays what it was
        self.bias = base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and PEFT use for A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True  # False inside `adapters_disabled`: the layer is its base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        a = self.lora_dropout(x).to(self.lora_A.dtype)  # under autocast F.linear recasts to the compute dtype
        delta = F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out, in) fp32 matrix: scaling * B @ A."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def _target_modules(model: GPT, targets: list[str]) -> dict[str, nn.Linear]:
    """Our module name -> module for every targeted layer."""
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(model.blocks):
        for t in targets:
            if t in BLOCK_TARGETS:
                out[f"blocks.{i}.{t}"] = block.get_submodule(t)
    if "score" in targets:
        out["score"] = model.score
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_config(model: GPT) -> LoRAConfig | None:
    """The LoRA config applied to `model`, or None for a plain model."""
    return getattr(model, "lora_cfg", None)


def apply_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Freeze the base, add adapters in place, and leave trainable only the adapters (and a full head).

    Call after the model (and its classification head) is built and before the optimizer is made.
    """
    if not cfg.enabled:
        raise ConfigError("lora.r=0: LoRA is off; set lora.r to a positive rank (e.g. 16) to use adapters")
    if lora_config(model) is not None:
        raise ConfigError("LoRA is already applied to this model; merge it first or start from the base")
    if any("score" == ALIASES.get(t, t) for t in cfg.targets) and not model.is_classifier:
        raise ConfigError(
            "lora.targets includes 'score' but the model has no classification head; "
            "drop 'score' for a language model"
        )
    targets = cfg.resolved_targets(model.is_classifier)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in _target_modules(model, targets).items():
        _set_module(model, name, LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout))
    if model.is_classifier and "score" not in targets:
        model.score.weight.requires_grad_(True)  # a new head is not in the base: train it in full
    model.lora_cfg = cfg
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, adapters skipped, for the duration: DPO's reference without a second copy."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.adapter_enabled = True


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should see: only parameters that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_trainable(model: nn.Module) -> str:
    """One line for the start of a run, e.g. 'trainable parameters: 1,327,104 of 125,766,912 (1.06%)'."""
    n_train, n_all = count_parameters(model)
    return f"trainable parameters: {n_train:,} of {n_all:,} ({100.0 * n_train / max(n_all, 1):.2f}%)"


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and turn the model back into a plain GPT, in place.

    The merged model's logits equal the adapted model's up to float rounding; all weights become trainable
    again, as in any freshly loaded model.
    """
    for name, m in lora_modules(model).items():
        m.weight.add_(m.delta_weight().to(m.weight.dtype))
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _set_module(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_cfg"):
        del model.lora_cfg
    return model


# -- adapter checkpoints ----------------------------------------------------------------------------
def adapter_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds: every lora_A/lora_B, plus the whole head of a classifier."""
    if lora_config(model) is None:
        raise ConfigError("the model has no LoRA adapters; apply_lora first or save a full checkpoint")
    sd = model.state_dict()
    return {k: sd[k].detach().contiguous() for k in sorted(sd) if is_adapter_key(k)}


def load_adapter_state(model: GPT, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Load adapter tensors strictly: a missing or unexpected tensor is an error that names it."""
    expected = set(adapter_state_dict(model))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: adapter tensors do not match the LoRA config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; was it saved with other lora.targets?"
        )
    current = model.state_dict()
    for k, v in sd.items():
        if v.shape != current[k].shape:
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(current[k].shape)}"
            )
    model.load_state_dict(sd, strict=False)


def base_fingerprint(model: GPT) -> str:
    """A cheap hash of the frozen base weights (first and last 64 values of each), to catch a wrong base."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith("score.") or k.endswith((".lora_A", ".lora_B")) or k == "lm_head.weight":
            continue
        flat = v.detach().reshape(-1).float().cpu()
        h.update(k.encode())
        h.update(torch.cat([flat[:64], flat[-64:]]).numpy().tobytes())
    return h.hexdigest()[:16]


def _labels(cfg: GPTConfig) -> dict[str, str]:
    return {str(k): v for k, v in cfg.labels().items()}


def save_adapter(
    model: GPT,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    metadata: dict[str, dict] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an adapter-only checkpoint dir atomically. `base` (path or id) is recorded for loading later."""
    from safetensors.torch import save_file

    cfg = lora_config(model)
    if cfg is None:
        raise ConfigError("the model has no LoRA adapters; use checkpoint.save_checkpoint for a full model")
    base_str = None
    if base is not None:
        base_str = str(Path(base).resolve()) if Path(base).exists() else str(base)
    meta = {
        "format": FORMAT,
        "lora": cfg.to_dict(),
        "targets": cfg.resolved_targets(model.is_classifier),
        "base": base_str,
        "base_fingerprint": base_fingerprint(model),
    }

    sd = adapter_state_dict(model)

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        model.cfg.save(tmp / CONFIG)
        write_json(tmp / ADAPTER_META, meta)
        write_json(tmp / "tokenizer.json", {"name": "gpt2"})
        if model.cfg.num_labels:
            write_json(tmp / "labels.json", {"id2label": _labels(model.cfg)})
        for name, obj in (metadata or {}).items():
            write_json(tmp / name, obj)
        write_file_manifest(tmp)  # last: it marks the dir complete

    return atomic_dir(out_dir, write, overwrite=overwrite, need_bytes=tensor_bytes(sd))


def is_adapter(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ADAPTER_META).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def load_base(base: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """A base model from a gptforge checkpoint dir, an adapter dir (merged), or a Hugging Face GPT-2."""
    if (Path(base) / ADAPTER_META).is_file():
        return merge_lora(load_adapter(base, device=device))
    if is_checkpoint(base):
        return load_checkpoint(base, device=device)
    return from_hf(base).to(device)


def load_adapter(
    path: str | os.PathLike,
    base: str | os.PathLike | GPT | None = None,
    device: str | torch.device = "cpu",
    deep: bool = False,
) -> GPT:
    """Base model + adapter, ready to run or to train on (adapters and head trainable, base frozen).

    `base` defaults to the path recorded at save time; it must be the model the adapter was trained on.
    The adapter dir is checked against its files.sha256.json where there is one (`deep`: sha256 too).
    """
    p = Path(path)
    if not is_adapter(p):
        raise CheckpointError(f"{p}: not a LoRA adapter dir (needs {ADAPTER_META} and {ADAPTER_WEIGHTS})")
    verify_checkpoint_files(p, deep=deep)
    meta = read_json(p / ADAPTER_META, "re-save the adapter")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / ADAPTER_META}: format {meta.get('format')!r} is not {FORMAT!r}")
    cfg = read_config(p / CONFIG, "re-save the adapter")
    lcfg = LoRAConfig.from_dict(meta["lora"])
    if base is None:
        base = meta.get("base")
        if base is None:
            raise CheckpointError(f"{p}: the adapter records no base model; pass the base (--base DIR)")
        if Path(base).is_absolute() and not Path(base).exists():
            raise CheckpointError(f"{p}: recorded base {base} does not exist; pass the base (--base DIR)")
    model = base if isinstance(base, GPT) else load_base(base, device=device)
    where = "the given model" if isinstance(base, GPT) else str(base)
    for f in SHAPE_FIELDS:
        if getattr(model.cfg, f) != getattr(cfg, f):
            raise CheckpointError(
                f"{p}: base {where} has {f}={getattr(model.cfg, f)!r} but the adapter was trained on "
                f"{f}={getattr(cfg, f)!r}; pass the base model it was trained on"
            )
    fp = meta.get("base_fingerprint")
    if fp is not None and fp != base_fingerprint(model):
        raise CheckpointError(
            f"{p}: base {where} has other weights than the one the adapter was trained on "
            f"(recorded base: {meta.get('base')}); pass that base model"
        )
    if cfg.num_labels:
        if model.cfg.num_labels != cfg.num_labels:
            model.add_classification_head(cfg.num_labels, cfg.id2label)
        model.cfg.id2label = cfg.id2label
    elif model.is_classifier:
        raise CheckpointError(f"{p}: the adapter is for a language model but base {where} is a classifier")
    apply_lora(model, lcfg)
    sd = load_safetensors(p / ADAPTER_WEIGHTS, device=device, fix="re-save the adapter")
    load_adapter_state(model, sd, source=str(p))
    return model.eval()


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrap the model's parameter names


def strip_wrappers(key: str) -> str:
    """A parameter name without the prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def is_adapter_key(key: str) -> bool:
    """True for the tensors an adapter checkpoint keeps: lora_A/lora_B and the classification head."""
    key = strip_wrappers(key)
    return key.endswith((".lora_A", ".lora_B")) or key.startswith("score.")


# -- PEFT conversion ---------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."


def to_peft(model: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """Adapter tensors and adapter_config for `peft` on transformers GPT-2 (Conv1D, fan_in_fan_out).

    Our lora_A (r, in) / lora_B (out, r) are PEFT's lora_A.weight / lora_B.weight unchanged (PEFT keeps
    nn.Linear layout for the adapter even on Conv1D). The classifier head goes as a module to save; a LoRA
    on the head is folded into it first, since PEFT does not put adapters on modules it saves.
    """
    cfg = lora_config(model)
    if cfg is None:
        raise ConversionError("the model has no LoRA adapters to export; apply or load an adapter first")
    sd: dict[str, torch.Tensor] = {}
    targets = cfg.resolved_targets(model.is_classifier)
    for name, m in lora_modules(model).items():
        if name == "score":
            continue
        parts = name.split(".")  # blocks.{i}.{attn|mlp}.{layer}
        ours = ".".join(parts[2:])
        if parts[0] != "blocks" or len(parts) != 4 or ours not in BLOCK_TARGETS:
            raise ConversionError(f"LoRA layer {name!r} has no PEFT equivalent on transformers GPT-2")
        hf = f"{PEFT_PREFIX}transformer.h.{parts[1]}.{BLOCK_TARGETS[ours]}"
        sd[f"{hf}.lora_A.weight"] = m.lora_A.detach().contiguous()
        sd[f"{hf}.lora_B.weight"] = m.lora_B.detach().contiguous()
    modules_to_save = None
    if model.is_classifier:
        head = model.score
        w = head.weight.detach().float()
        if isinstance(head, LoRALinear):
            w = w + head.delta_weight()
        sd[f"{PEFT_PREFIX}score.weight"] = w.to(head.weight.dtype).contiguous()
        modules_to_save = ["score"]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if model.is_classifier else "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [BLOCK_TARGETS[t] for t in targets if t in BLOCK_TARGETS],
        "fan_in_fan_out": True,
        "bias": "none",
        "modules_to_save": modules_to_save,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    return sd, adapter_config
