"""gptforge's own checkpoint directory: config.json + model.safetensors (+ metadata JSON). Nothing pickled.

Layout:
  config.json        GPTConfig (includes num_labels / id2label for classifiers)
  model.safetensors  weights; a tied LM head is stored once (as tok_emb.weight)
  tokenizer.json     {"name": "gpt2"}: the tokenizer is GPT-2 BPE, rebuilt offline on load
  labels.json        classifiers: {"id2label": {...}}
  prompt_style.json  instruction models: {"name": "alpaca", ...}
  run.json, metrics.jsonl: written by the trainer
  files.sha256.json  sizes and sha256 of the files above, written last (io.write_file_manifest)

Every weights file gptforge reads (its own checkpoints, LoRA adapters, Hugging Face dirs) goes through
`load_safetensors` / `open_safetensors`, so a truncated, corrupt or unreadable file is one line naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptforge.errors import CheckpointError, GPTForgeError
from gptforge.io import (
    atomic_dir,
    record_read,
    storage_error,
    verify_file_manifest,
    write_file_manifest,
    write_json,
)
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RESAVE = "re-save/re-export it"


def check_readable(path: Path, fix: str) -> None:
    """Open the file ourselves first: safetensors reports a permission problem as "No such file"."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        err = storage_error(e, path)
        if err is e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e}); {fix}") from None
        raise err from None


def _bad_file(path: Path, e: Exception, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e}); {fix}")


def load_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", fix: str = RESAVE
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged or unreadable file is one CheckpointError naming it."""
    from safetensors.torch import load_file

    p = Path(path)
    check_readable(p, fix)
    try:
        return load_file(str(p), device=str(device))
    except OSError as e:
        err = storage_error(e, p)
        raise (err if err is not e else _bad_file(p, e, fix)) from None
    except Exception as e:  # safetensors' SafetensorError (bad header, file shorter than its header says)
        raise _bad_file(p, e, fix) from None


class SafeTensorsFile:
    """`safe_open` (pread where available, so nothing stays mapped) whose errors name the file."""

    def __init__(self, path: str | os.PathLike, fix: str = RESAVE):
        from safetensors import safe_open

        self.path, self.fix = Path(path), fix
        check_readable(self.path, fix)
        try:
            try:
                self._h = safe_open(str(self.path), framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors < 0.8 has no backend argument
                self._h = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:
            raise _bad_file(self.path, e, fix) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._h.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self._h.get_tensor(key)
        except Exception as e:
            raise _bad_file(self.path, e, self.fix) from None

    def get_slice(self, key: str):
        return self._h.get_slice(key)


def open_safetensors(path: str | os.PathLike, fix: str = RESAVE) -> SafeTensorsFile:
    """A lazily read safetensors file (a context manager); errors are one CheckpointError naming it."""
    return SafeTensorsFile(path, fix)


def verify_checkpoint_files(path: str | os.PathLike, deep: bool = False) -> bool:
    """Check a checkpoint dir against its files.sha256.json when it has one (older dirs have none).

    Sizes catch what really happens to a finished dir (a copy or a disk that filled up half-way);
    `deep` adds sha256 (about 0.5 s a GB; see the README) for resume, where a damaged file must not pass.
    """
    return verify_file_manifest(
        path,
        required=False,
        deep=deep,
        fix="re-save/re-export it (if you edited it on purpose, delete files.sha256.json)",
    )


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
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if bad := [k for k in sorted(sd) if tuple(sd[k].shape) != shapes[k]]:
        raise CheckpointError(
            f"{source}: tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the config says {shapes[bad[0]]}; "
            "the weights belong to another model (re-save/re-export it)"
        )
    model.load_state_dict(sd, strict=False)  # tied lm_head.weight is covered by tok_emb.weight


def save_checkpoint(
    model: GPT,
    out_dir: str | os.PathLike,
    metadata: dict[str, dict] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save a self-describing checkpoint. `metadata` maps extra file names (e.g. "prompt_style.json") to JSON.

    Written in a temp dir with its files.sha256.json last, then renamed into place; a full disk is one line
    naming the dir and the space needed.
    """
    from safetensors.torch import save_file

    sd = state_dict_for_save(model)

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.cfg.save(tmp / CONFIG)
        write_json(tmp / "tokenizer.json", {"name": "gpt2"})
        if model.cfg.num_labels:
            write_json(tmp / "labels.json", {"id2label": {str(k): v for k, v in model.cfg.labels().items()}})
        for name, obj in (metadata or {}).items():
            write_json(tmp / name, obj)
        write_file_manifest(tmp)

    return atomic_dir(out_dir, write, overwrite=overwrite, need_bytes=tensor_bytes(sd))


def tensor_bytes(sd: dict[str, torch.Tensor]) -> int:
    """The bytes a state dict takes on disk (near enough: safetensors adds a small header)."""
    return sum(t.numel() * t.element_size() for t in sd.values())


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A full gptforge checkpoint dir (`model.load.is_model_dir` also accepts LoRA adapter dirs)."""
    p = Path(path)
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file() and "emb_dim" in read_json(p / CONFIG)


def read_json(path: Path, fix: str = "re-save the checkpoint") -> dict:
    """A checkpoint's JSON file; an unreadable one is a CheckpointError naming the file and the fix."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        err = storage_error(e, path)
        raise (
            err if err is not e else CheckpointError(f"{path}: cannot read ({e.strerror}); {fix}")
        ) from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{path}: cannot read JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix}")
    return obj


def read_config(path: Path, fix: str = RESAVE) -> GPTConfig:
    """A checkpoint's config.json as a GPTConfig; a damaged or edited one is one line naming the file."""
    d = read_json(path, fix)
    try:
        return GPTConfig.from_dict(d)
    except (GPTForgeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid model config ({e}); {fix}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", deep: bool = False) -> GPT:
    """Load a full gptforge checkpoint directory in one call (`model.load.load_model` also takes adapters).

    Its files are checked against files.sha256.json where there is one (sizes; `deep`: sha256 too).
    """
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
    verify_checkpoint_files(p, deep=deep)
    cfg = read_config(p / CONFIG)
    with torch.device("meta"):
        model = GPT(cfg)
    sd = load_safetensors(p / WEIGHTS, device=device)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    load_weights_into(model, sd, source=str(p / WEIGHTS))
    return model.eval()


def read_metadata(path: str | os.PathLike, name: str) -> dict | None:
    """An optional metadata file of a checkpoint (e.g. "prompt_style.json"), or None."""
    f = Path(path) / name
    return read_json(f) if f.is_file() else None
