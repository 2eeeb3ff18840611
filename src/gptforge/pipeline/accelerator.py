"""The Accelerator a run trains with, and the small pieces of Accelerate glue the training loop needs.

`make_accelerator` turns a TrainConfig into one Accelerator (checking precision and trackers against the
machine first); the rest moves values between processes and tells Accelerate about abandoned iterations.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from gptforge.errors import ConfigError
from gptforge.machine import cpu_has_native_bf16
from gptforge.pipeline.config import TrainConfig


class _TiedHeadNote(logging.Filter):
    """Accelerate warns that it stored the tied LM head once; that is exactly what we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()


def make_accelerator(cfg: TrainConfig):
    """One Accelerator per run; in a single process a previous run's Accelerate state is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import DataLoaderConfiguration, LoggerType

    cfg.resolve()  # `auto` precision and compile become what this machine gets
    cpu = cfg.cpu or not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on CPU use bf16 or no")
    if cfg.mixed_precision == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision=bf16: this GPU has no bf16 support; use fp16 or no")
    if cfg.mixed_precision == "bf16" and cpu and cpu_has_native_bf16() is False:
        import warnings

        warnings.warn(
            "train.mixed_precision=bf16 on a CPU without bf16 units (no avx512_bf16/amx_bf16): "
            "autocast still works but is likely slower than fp32",
            stacklevel=2,
        )
    available = {str(t) for t in get_available_trackers()}
    known = [str(t) for t in LoggerType if str(t) != "all"]
    for t in cfg.trackers:
        if t not in known:
            import difflib

            close = difflib.get_close_matches(t, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}"
            raise ConfigError(f"train.trackers: unknown tracker {t!r}; {hint}")
        if t not in available:
            raise ConfigError(
                f"train.trackers: {t!r} is not installed (available: {sorted(available) or 'none'}); "
                f"`pip install {t}` or remove it"
            )
    note = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _TiedHeadNote) for f in note.filters):
        note.addFilter(_TiedHeadNote())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # Several runs in one process (the pipeline runner): each gets a fresh Accelerate state.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    # FSDP is the trainer's own (pipeline.fsdp, on every device): Accelerate must not also turn an
    # `accelerate launch` FSDP config into its FSDP plugin, so it sees a plain multi-process run.
    use_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=None if cfg.mixed_precision == "no" else cfg.mixed_precision,
            # CUDA: batches come from pinned memory (the trainer's loaders pin there) and are copied
            # without making the host wait; on CPU there is no copy at all
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=not cpu
            ),
            step_scheduler_with_optimizer=False,
            log_with=list(cfg.trackers) or None,
            project_dir=cfg.out_dir,
            dynamo_backend="inductor" if cfg.compile is True else None,
        )
    finally:
        if use_fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = use_fsdp
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
        raise ConfigError(
            "train.grad_accum > 1 is not supported under DeepSpeed (it steps on every backward); "
            "set gradient_accumulation_steps in the DeepSpeed config instead and keep train.grad_accum=1"
        )
    return acc


def tracker_config(d: dict, prefix: str = "") -> dict:
    """A run config flattened to dotted scalar keys, the shape trackers take as hyperparameters."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(tracker_config(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def share_from_main(accelerator, path: Path | None) -> Path:
    """The main process's path, on every process."""
    if accelerator.num_processes == 1:
        return path  # type: ignore[return-value]
    from accelerate.utils import broadcast_object_list

    return Path(broadcast_object_list([str(path) if path is not None else None], from_process=0)[0])


def end_iteration(loader) -> None:
    """Tell Accelerate an abandoned loader iteration is over (it only does so when exhausted)."""
    end = getattr(loader, "end", None)
    if callable(end):
        with contextlib.suppress(Exception):
            end()
