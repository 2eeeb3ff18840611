"""A training run's directory on disk: resumable `checkpoints/step-N`, the `final/` checkpoint, and their files.

The trainer decides when to save and what goes into a save (Accelerate's `save_state` runs on every process);
this module owns the files around it, on the main process:
- Layout: `checkpoints/step-00000012/` (Accelerate state + `trainer_state.json`), `final/`, `metrics.jsonl`,
  `loss.png` under the run dir.
- A checkpoint is written into a temporary dir (io's `.step-N.tmp-PID-XXXXXX` naming, so the next run removes
  what a killed one left) with `files.sha256.json` written last, then renamed into place. Resume checks that
  manifest (sizes and sha256): `--resume auto` skips a damaged checkpoint with one warning and takes the
  newest intact one; a damaged checkpoint named explicitly stops the run.
- Old checkpoints are renamed out of the way before they are deleted, so a kill mid-delete never leaves a
  half-deleted checkpoint under its real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from gptforge.errors import CheckpointError, ConfigError
from gptforge.io import (
    atomic_dir,
    clean_stale_temps,
    fix_modes,
    temp_path,
    verify_file_manifest,
    write_file_manifest,
    write_json,
)
from gptforge.model.checkpoint import save_checkpoint, state_dict_for_save, tensor_bytes
from gptforge.model.lora import adapter_state_dict, lora_config, save_adapter

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"
LOSS_PNG = "loss.png"
_STEP_DIR = re.compile(r"step-(\d+)")

_RESUME_FIX = "resume from another checkpoint (train.resume auto skips damaged ones) or start a new out_dir"


def checkpoint_name(step: int) -> str:
    """`step-00000012`: zero-padded, so names sort like steps."""
    return f"step-{step:08d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete resumable checkpoints of a run, oldest first (temporary dirs are never listed)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike, fix: str = _RESUME_FIX) -> None:
    """A resumable checkpoint must match its files.sha256.json (sizes and sha256); CheckpointError names the
    first file that does not. A checkpoint without one is incomplete (or from before manifests)."""
    verify_file_manifest(path, required=True, deep=True, fix=fix)


def find_resume_checkpoint(resume: str | None, out_dir: str | os.PathLike, warn: bool = True) -> Path | None:
    """`auto` -> the newest intact checkpoint of `out_dir` (None if there is none); a path -> that checkpoint.

    With `auto`, a checkpoint that fails its integrity check is skipped with one warning line naming the
    file; a checkpoint named explicitly must be intact (CheckpointError otherwise).
    """
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        for p in reversed(found):
            try:
                verify_checkpoint(p, fix="skipped; trying an older checkpoint")
                return p
            except CheckpointError as e:
                if warn:
                    print(f"warning: train.resume=auto: {e}", file=sys.stderr)
        if found and warn:
            print(
                f"warning: no intact checkpoint in {Path(out_dir) / CHECKPOINTS}; starting from step 0",
                file=sys.stderr,
            )
        return None
    p = Path(resume)
    if not (p / STATE).is_file():
        raise ConfigError(
            f"train.resume={resume}: not a resumable checkpoint (no {STATE}); "
            f"use `auto` or a dir under {Path(out_dir) / CHECKPOINTS}"
        )
    verify_checkpoint(p)
    return p


def read_checkpoint_state(path: Path) -> dict:
    """The `trainer_state.json` of a checkpoint, verified again first: cheap (hashes are cached), and the dir
    may have changed since it was chosen."""
    verify_checkpoint(path)
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def clean_run_dir(out_dir: Path) -> None:
    """Remove what killed runs left: temp checkpoint and final dirs of dead writers (main process only)."""
    clean_stale_temps(out_dir / CHECKPOINTS)
    clean_stale_temps(out_dir)


def start_checkpoint(final: Path) -> Path:
    """A fresh temp dir beside `final`, named with this process's pid (main process only)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    tmp = temp_path(final)
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, final: Path, state: dict) -> None:
    """trainer_state.json, umask modes, files.sha256.json (last: it marks the checkpoint complete), rename."""
    write_json(tmp / STATE, state)
    fix_modes(tmp)  # umask permissions, not the 0600 safetensors gives its files
    write_file_manifest(tmp)  # last: it is what marks the checkpoint complete
    if final.exists():
        remove_dir(final)
    os.replace(tmp, final)


def discard(tmp: Path | None) -> None:
    """Remove a temp checkpoint dir after a failed save."""
    shutil.rmtree(tmp, ignore_errors=True)


def rotate_checkpoints(out_dir: Path, keep_last: int, best_step: int | None) -> list[str]:
    """Keep the last `keep_last` checkpoints and the best one; returns the names removed."""
    found = list_checkpoints(out_dir)
    best = checkpoint_name(best_step) if best_step is not None else None
    removed = []
    for p in found[: max(0, len(found) - keep_last)]:
        if p.name != best:
            remove_dir(p)
            removed.append(p.name)
    return removed


def resumable_bytes(model, optimizer) -> int:
    """About what a resumable checkpoint takes: model and optimizer tensors (the rest is small)."""
    local = [
        getattr(t, "_local_tensor", t) for t in model.state_dict().values()
    ]  # FSDP: this process's shard
    unique = {t.data_ptr(): t for t in local}  # a tied head is stored once
    n = tensor_bytes(unique)
    for st in optimizer.state.values() if optimizer is not None else []:
        n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return n


def write_final(out_dir: Path, model, metadata: dict, base: str | None, plot: bool) -> Path:
    """`final/`, atomically: the gptforge checkpoint (adapter + head only for a LoRA model; the frozen base
    stays where it was), metrics.jsonl and loss.png, with files.sha256.json written last over all of them."""
    out = out_dir / FINAL

    def write(tmp: Path) -> None:
        if lora_config(model) is not None:
            save_adapter(model, tmp, base=base, metadata=metadata)
        else:
            save_checkpoint(model, tmp, metadata=metadata)
        shutil.copyfile(out_dir / METRICS, tmp / METRICS)
        if plot and (out_dir / LOSS_PNG).is_file():
            shutil.copyfile(out_dir / LOSS_PNG, tmp / LOSS_PNG)
        write_file_manifest(tmp)  # again, last: it now covers metrics.jsonl and loss.png too

    weights = adapter_state_dict(model) if lora_config(model) is not None else state_dict_for_save(model)
    atomic_dir(out, write, need_bytes=tensor_bytes(weights))
    return out


def remove_dir(p: Path) -> None:
    """Rename out of the way first: a kill mid-delete then leaves a `.NAME.old-PID-*` dir that the next run
    removes, not a half-deleted checkpoint under its real name."""
    old = temp_path(p, "old")
    os.replace(p, old)
    shutil.rmtree(old, ignore_errors=True)
