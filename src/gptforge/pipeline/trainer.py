"""The one training loop, on `accelerate.Accelerator`, shared by pretraining, classification and instructions.

Why it is written the way it is:
- Gradient accumulation is done by hand so the loss is normalised exactly: every micro-batch contributes
  its *summed* token loss, divided by the number of target tokens of the whole accumulation window across
  all processes (one all-reduce before the window). So 4 x 2 equals 8 x 1 and 2 processes equal 1, even
  with uneven padding. Non-final micro-batches run under `no_sync`.
- The scheduler is stepped once per optimizer step (`step_scheduler_with_optimizer=False`), never
  `num_processes` times.
- Exact resume: a seedable sampler (seed + epoch) fixes the data order, `save_state` stores model,
  optimizer, scheduler and RNG, `trainer_state.json` stores where in the epoch we were, and
  `skip_first_batches` replays the rest of the epoch. The data loaders get their own generator so that
  creating an iterator never consumes the global RNG (which drives dropout).
- FSDP (`train.distributed fsdp`, or an `accelerate launch` FSDP config) is FSDP2 sharding done by the
  trainer (`pipeline.fsdp`: Accelerate turns its own FSDP on only for GPUs); model and optimizer are then
  saved with DCP beside Accelerate's state, and the final weights are gathered into a plain GPT.
- No host synchronisation per step: losses, target counts, grad norms and token counts stay on the device
  (`StepTotals`) and are read once where a log line is written, an evaluation or a save runs, or the run
  ends; a non-finite loss is still reported at the step it happened. On CUDA batches come from pinned
  memory with non-blocking copies.
- The trainer decides when to save and what a save holds; the files of a run dir (temp dirs, manifests
  written last and verified on resume, rotation, `final/`) are `pipeline.checkpoints`' job.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from gptforge.errors import ConfigError, TrainingError
from gptforge.io import fault_point, storage_error, write_json, write_text
from gptforge.machine import keep_freed_memory, release_freed_memory
from gptforge.model.config import IGNORE_INDEX
from gptforge.model.gpt import GPT
from gptforge.model.lora import describe_trainable
from gptforge.pipeline.accelerator import end_iteration, make_accelerator, share_from_main, tracker_config
from gptforge.pipeline.checkpoints import (
    CHECKPOINTS,
    FINAL,
    LOSS_PNG,
    METRICS,
    checkpoint_name,
    clean_run_dir,
    discard,
    find_resume_checkpoint,
    finish_checkpoint,
    list_checkpoints,
    read_checkpoint_state,
    resumable_bytes,
    rotate_checkpoints,
    start_checkpoint,
    write_final,
)
from gptforge.pipeline.config import TrainConfig
from gptforge.pipeline.evaluate.report import plot_losses
from gptforge.pipeline.fsdp import (
    SHARDED_DIR,
    fsdp_requested,
    gather_full_state_dict,
    load_sharded,
    save_sharded,
    shard_model,
)
from gptforge.pipeline.lora_state import register_adapter_checkpointing
from gptforge.pipeline.optim import lr_lambda, make_optimizer
from gptforge.pipeline.runinfo import git_commit, package_versions, read_metrics


class RunResult(NamedTuple):
    """What a task function returns: the output checkpoint dir and the final metrics."""

    checkpoint: Path
    metrics: dict


@dataclass
class TrainState:
    """Where the run is; saved as trainer_state.json in every resumable checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of the current epoch consumed (per process)
    tokens_seen: int = 0  # input tokens over all processes
    metrics_lines: int = 0  # lines of metrics.jsonl written so far (resume truncates to this)
    last_val_loss: float | None = None
    last_val_step: int | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)  # checkpoint name -> val_loss
    # what the run was made with; a resume with other values could not replay the same batches
    batch_size: int = 0
    grad_accum: int = 0
    num_processes: int = 0
    seed: int = 0
    sharded: bool = False  # FSDP: model and optimizer are DCP shards under fsdp/
    # sums over the steps since the last log line ("steps": how many), so a resumed run's next line
    # averages exactly the steps the uninterrupted run's would
    log_window: dict[str, float] = field(default_factory=dict)


class StepTotals:
    """What the steps since the last log line add up to, kept on the device so that a step never waits.

    `read` is the one host sync; the trainer calls it only where it writes a log line, evaluates, saves or
    ends. The first non-finite loss is remembered with its step and epoch, so a divergence is reported at
    the step it happened even though it is noticed at the next read.
    """

    def __init__(self, device: torch.device, window: dict[str, float] | None = None) -> None:
        self.device = device
        window = dict(window or {})
        self.steps = int(window.pop("steps", 0))
        self.sums: dict[str, torch.Tensor] = {k: self._zero() + v for k, v in window.items()}
        self.tokens = self._zero()
        self.bad_step, self.bad_epoch, self.bad_value = self._zero(), self._zero(), self._zero()

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)  # a fill: no copy from the host

    def add(
        self, step: int, epoch: int, values: dict[str, torch.Tensor | float], tokens: torch.Tensor
    ) -> None:
        """One optimizer step's values (`loss` among them), as device tensors or host numbers."""
        self.steps += 1
        self.tokens = self.tokens + tokens
        for k, v in values.items():
            self.sums[k] = (self.sums[k] if k in self.sums else self._zero()) + v
        first = ~torch.isfinite(values["loss"]) & (self.bad_step == 0)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_epoch = torch.where(first, float(epoch), self.bad_epoch)
        self.bad_value = torch.where(first, values["loss"], self.bad_value)

    def read(self, reset: bool) -> tuple[dict[str, float], int, tuple[int, int, float] | None]:
        """(sums since the last reset with "steps", tokens since the last read, (step, epoch, loss) of
        the first non-finite loss or None); one host sync. `reset` starts a new log window."""
        keys = sorted(self.sums)
        flat = torch.stack(
            [self.tokens, self.bad_step, self.bad_epoch, self.bad_value] + [self.sums[k] for k in keys]
        )
        tokens, bad_step, bad_epoch, bad_value, *sums = flat.tolist()
        window = {"steps": float(self.steps), **dict(zip(keys, sums))}
        self.tokens = self._zero()
        if reset:
            self.steps, self.sums = 0, {}
        bad = (int(bad_step), int(bad_epoch), bad_value) if bad_step else None
        return window, int(round(tokens)), bad


# -- the trainer ------------------------------------------------------------------------------------


class Trainer:
    """Trains a GPT on map-style datasets whose collated batches hold `input_ids` and `targets`.

    `kind="lm"`: `targets` are next-token ids (B, T) with IGNORE_INDEX ignored; `kind="classify"`: class ids (B,)
    and an `attention_mask`; `kind="dpo"`: a subclass (`pipeline.train.DPOTrainer`) supplies the loss hooks,
    and every other per-example stat it returns is reported as its mean. Create the Trainer first (it seeds everything and owns the Accelerator),
    prepare data inside `trainer.main_process_first()`, build the model, then call `fit`.
    """

    def __init__(self, cfg: TrainConfig, kind: str = "lm") -> None:
        from accelerate.utils import set_seed

        if kind not in ("lm", "classify", "dpo"):
            raise ValueError(f"kind must be 'lm', 'classify' or 'dpo', not {kind!r}")
        cfg.validate()
        self.cfg = cfg
        self.kind = kind
        self.out_dir = Path(cfg.out_dir)
        wants_fsdp = fsdp_requested(cfg.distributed)
        self.accelerator = make_accelerator(cfg)
        # one process has nothing to shard with: it trains the plain model (and says so)
        self.fsdp = wants_fsdp and self.accelerator.num_processes > 1
        if wants_fsdp and not self.fsdp:
            print(
                "note: FSDP needs several processes (torchrun); one process trains unsharded", file=sys.stderr
            )
        # a bad --train.resume fails now, before any data is prepared
        self.resume_from = find_resume_checkpoint(cfg.resume, self.out_dir, warn=self.is_main)
        if self.is_main:  # what killed runs left: temp checkpoint and final dirs of dead writers
            clean_run_dir(self.out_dir)
        register_adapter_checkpointing(self.accelerator)  # LoRA: resumable checkpoints hold only the adapter
        set_seed(cfg.seed)
        self._signal: int | None = None
        self.step_stats: dict[str, torch.Tensor] = {}  # per-example sums `compute_loss` adds (dpo: rewards)

    # -- hooks a task (or a test) may override --------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed loss of a micro-batch (token-level for LM, example-level for classification)."""
        return model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            targets=batch["targets"],
            reduction="sum",
            **packing_inputs(batch),
        )

    def count_targets(self, batch: dict) -> torch.Tensor:
        """How many terms `compute_loss` summed: non-ignored target tokens, or examples."""
        t = batch["targets"]
        return t.numel() if self.kind == "classify" else (t != IGNORE_INDEX).sum()

    def example_stats(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example sums for evaluation, (B,) each, so `gather_for_metrics` can drop duplicates."""
        x, y, mask = batch["input_ids"], batch["targets"], batch.get("attention_mask")
        if self.kind == "classify":
            logits = model(x, attention_mask=mask).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            return {"loss": loss, "count": torch.ones_like(loss), "correct": (logits.argmax(-1) == y).float()}
        loss = model(x, attention_mask=mask, targets=y, reduction="none", **packing_inputs(batch))
        loss = loss.view(y.shape[0], -1)
        return {"loss": loss.sum(1), "count": (y != IGNORE_INDEX).sum(1).float()}

    # -- public API -----------------------------------------------------------------------------------
    def main_process_first(self):
        """Context for data preparation: the main process builds the `datasets` cache, the others reuse it."""
        return self.accelerator.main_process_first()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(
        self,
        model: GPT,
        train_dataset,
        collate_fn,
        val_dataset=None,
        *,
        final_eval: dict[str, Any] | None = None,
        run_config: dict | None = None,
        metadata: dict[str, dict] | None = None,
        eval_collate_fn=None,
        train_lengths: list[int] | None = None,
    ) -> RunResult:
        """Train; returns the final gptforge checkpoint (or the resumable one if interrupted) and metrics.

        `final_eval` maps split names to datasets evaluated in full at the end (e.g. train/val/test
        accuracy); `metadata` maps extra JSON files (prompt_style.json, ...) saved beside the final model.
        `train_lengths` (each training example's length) groups training batches by length
        (`pipeline.sampler.LengthGroupedSampler`, seeded by train.seed and the epoch) instead of shuffling.
        """
        cfg, acc = self.cfg, self.accelerator
        self.run_config = run_config or {}
        self.metadata = metadata or {}
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()

        sampler = None
        if train_lengths is not None:
            from gptforge.pipeline.sampler import LengthGroupedSampler

            sampler = LengthGroupedSampler(train_lengths, cfg.batch_size, cfg.seed)
        train_loader = self._loader(
            train_dataset, collate_fn, shuffle=sampler is None, drop_last=cfg.drop_last, sampler=sampler
        )
        eval_collate = eval_collate_fn or collate_fn  # e.g. every target scored, where training samples them
        val_loader = self._loader(val_dataset, eval_collate) if val_dataset is not None else None
        self.val_sources = source_names_of(val_dataset)  # per-source validation loss, when it has sources
        if self.is_main:
            print(describe_trainable(model), file=sys.stderr)
        if self.fsdp:
            model, optimizer, train_loader, val_loader = self._prepare_fsdp(model, train_loader, val_loader)
        else:
            optimizer = make_optimizer(model, cfg)
            if val_loader is not None:
                model, optimizer, train_loader, val_loader = acc.prepare(
                    model, optimizer, train_loader, val_loader
                )
            else:
                model, optimizer, train_loader = acc.prepare(model, optimizer, train_loader)

        n_batches = len(train_loader)
        spe = n_batches // cfg.grad_accum if cfg.drop_last else math.ceil(n_batches / cfg.grad_accum)
        if spe == 0:
            raise ConfigError(
                f"the training set ({len(train_dataset)} examples) is smaller than one optimizer step "
                f"(train.batch_size={cfg.batch_size} x train.grad_accum={cfg.grad_accum} x "
                f"{acc.num_processes} processes); lower them or set train.drop_last=false"
            )
        total = cfg.max_steps if cfg.max_steps is not None else spe * cfg.epochs
        n_epochs = math.ceil(total / spe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            lr_lambda(cfg.schedule, cfg.warmup_steps, total, cfg.min_lr_ratio),
        )
        scheduler = acc.prepare(scheduler)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.steps_per_epoch, self.total_steps = spe, total

        state = TrainState(
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            num_processes=acc.num_processes,
            seed=cfg.seed,
            sharded=self.fsdp,
        )
        if self.resume_from is not None:
            state = self._load(self.resume_from)
        else:
            self._truncate_metrics(0)
        self.state = state
        self.totals = StepTotals(acc.device, state.log_window)
        if acc.trackers == [] and cfg.trackers:
            acc.init_trackers(self.out_dir.name, config=tracker_config(self.run_config))

        from tqdm.auto import tqdm

        pbar = tqdm(
            total=total,
            initial=state.step,
            desc=f"train ({self.kind})",
            disable=not (cfg.progress and acc.is_local_main_process),
            dynamic_ncols=True,
        )
        old_handlers = self._install_signal_handlers()
        # CPU: freed step memory is reused, not unmapped and faulted in anew every step (perf.py).
        tuned = acc.device.type == "cpu" and keep_freed_memory()
        # One CPU process, steps through loss.backward(): a classifier's embedding gradient may live in one
        # buffer zeroed row by row (GPT.touched_rows_embedding) instead of a dense one zero-filled each step.
        inner = acc.unwrap_model(model)
        touched = (
            acc.device.type == "cpu" and acc.num_processes == 1 and hasattr(inner, "touched_rows_embedding")
        )
        if touched:
            inner.touched_rows_embedding = True
        status = "completed"
        saved_at = -1
        try:
            model.train()
            t_last, tok_last = time.perf_counter(), state.tokens_seen
            for epoch in range(state.epoch, n_epochs):
                if state.step >= total:
                    break
                train_loader.set_epoch(epoch)
                skip = state.batches_in_epoch if epoch == state.epoch else 0
                state.epoch, state.batches_in_epoch = epoch, skip
                loader = acc.skip_first_batches(train_loader, skip) if skip else train_loader
                it = iter(loader)
                stop = False
                while self._steps_in_epoch(state) < spe and state.step < total:
                    window = self._next_window(it)
                    if not window:
                        break
                    values, n_tok, lr = self._train_step(window, state)
                    state.batches_in_epoch += len(window)
                    state.step += 1
                    self.totals.add(state.step, epoch, values, n_tok)
                    pbar.update(1)
                    fault_point("train_step")
                    # whether this step read the device (then a stop request is cheap to share)
                    synced = False
                    if state.step % cfg.log_every == 0 or state.step == total:
                        means = self._read_totals(state, log=True)
                        synced = True
                        now = time.perf_counter()
                        tps = (state.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                        t_last, tok_last = now, state.tokens_seen
                        loss = means.pop("loss")
                        grad_norm = means.pop("grad_norm", None)
                        rec = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr}
                        rec.update({k.removeprefix("stats."): v for k, v in sorted(means.items())})
                        rec.update({"tokens": state.tokens_seen, "tokens_per_s": round(tps, 1)})
                        if grad_norm is not None:
                            rec["grad_norm"] = grad_norm
                        self._log(rec)
                        pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    if cfg.eval_every and state.step % cfg.eval_every == 0 and val_loader is not None:
                        self._read_totals(state)
                        synced = True
                        self._eval_and_log(state, epoch)
                    if cfg.save_every and state.step % cfg.save_every == 0:
                        self._read_totals(state)
                        synced = True
                        self._save(state)
                        saved_at = state.step
                    if self._stop_requested(synced):
                        stop = True
                        break
                end_iteration(loader)
                if stop:
                    if saved_at != state.step:
                        self._read_totals(state)
                        self._save(state)
                    status = "interrupted"
                    break
                if self._steps_in_epoch(state) >= spe:
                    state.epoch, state.batches_in_epoch = epoch + 1, 0
                    if cfg.eval_every == 0 and val_loader is not None:
                        self._read_totals(state)
                        self._eval_and_log(state, epoch)
                    if cfg.save_every == 0:
                        self._read_totals(state)
                        self._save(state)
                        saved_at = state.step
            self._read_totals(state)  # the run's last steps: tokens counted, a late non-finite loss caught
        finally:
            pbar.close()
            self._restore_signal_handlers(old_handlers)
            if touched:
                inner.touched_rows_embedding = False
                inner._emb_grad = inner._emb_dirty = None
            if tuned:
                release_freed_memory()

        if status == "interrupted":
            ckpt = list_checkpoints(self.out_dir)[-1]
            self._write_run_json(status, {"step": state.step})
            if self.is_main:
                print(
                    f"stopped by signal at step {state.step}/{total}; resumable checkpoint {ckpt}; "
                    "continue with --train.resume auto",
                    file=sys.stderr,
                )
            acc.end_training()
            return RunResult(ckpt, {"status": status, "step": state.step, "resume_from": str(ckpt)})

        if saved_at != state.step:
            self._save(state)
        final_metrics = self._final_metrics(state, final_eval, eval_collate)
        out = self._write_final(final_metrics)
        acc.end_training()
        return RunResult(out, final_metrics)

    # -- internals ----------------------------------------------------------------------------------
    def _prepare_fsdp(self, model: GPT, train_loader, val_loader):
        """Shard the model (FSDP2), then build the optimizer over the shards; Accelerate prepares the loaders
        and applies autocast/compile to the model but keeps model and optimizer out of `save_state`."""
        from gptforge.model.lora import lora_config

        acc = self.accelerator
        if lora_config(model) is not None:
            raise ConfigError(
                "train.distributed=fsdp with LoRA: an adapter is a few MB and needs no sharding; "
                "use train.distributed ddp"
            )
        model = shard_model(model, acc.device, acc.num_processes)
        optimizer = make_optimizer(model, self.cfg)
        loaders = [train_loader] + ([val_loader] if val_loader is not None else [])
        loaders = acc.prepare(*loaders)
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        n_models = len(acc._models)
        model = acc.prepare_model(model, evaluation_mode=True)  # autocast / compile only: no DDP on DTensors
        del acc._models[n_models:]  # its DTensors are saved by save_sharded, not by Accelerate's rank-0 save
        return model, optimizer, loaders[0], (loaders[1] if val_loader is not None else None)

    def _loader(self, dataset, collate_fn, shuffle: bool = False, drop_last: bool = False, sampler=None):
        from torch.utils.data import DataLoader

        # `sampler` (length-grouped) has a set_epoch that Accelerate's loader calls, as it does the
        # seedable random sampler that `shuffle` becomes; both resume through skip_first_batches.
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",  # so the copy to the GPU need not wait
            # own generator: iterator creation must not consume the global RNG (dropout)
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _steps_in_epoch(self, state: TrainState) -> int:
        """Optimizer steps done in the current epoch (a last, partial window counts as one)."""
        return -(-state.batches_in_epoch // self.cfg.grad_accum)

    def _next_window(self, it: Iterator) -> list[dict]:
        window = []
        for _ in range(self.cfg.grad_accum):
            try:
                window.append(next(it))
            except StopIteration:
                break
        return window

    def _train_step(
        self, window: list[dict], state: TrainState
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """One optimizer step over a window of micro-batches: (values to log, input tokens, lr used).

        The values (`loss`, `grad_norm`, `stats.<name>`: per-example stat means) and the token count stay
        device tensors: nothing here makes the host wait for the device (fp16's loss scaler aside).
        """
        acc, model, cfg = self.accelerator, self.model, self.cfg
        counts = torch.zeros((), device=acc.device)
        tokens = torch.zeros((), device=acc.device)
        for b in window:  # device tensors or host ints; adding either launches work, never waits
            counts = counts + self.count_targets(b)
            tokens = tokens + (b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel())
        totals = acc.reduce(torch.stack([counts, tokens]), "sum")
        n_targets = totals[0].clamp(min=1.0)
        scale = n_targets.new_full((), float(acc.num_processes)) / n_targets
        loss_sum = torch.zeros((), device=acc.device)
        self.step_stats = {}
        for i, batch in enumerate(window):
            ctx = contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(model)
            with ctx:
                loss = self.compute_loss(model, batch)
                acc.backward(loss * scale)
            loss_sum += loss.detach().float()
        n64 = n_targets.double()  # the logged values are float64 quotients, as Python's floats were
        values: dict[str, torch.Tensor] = {"loss": acc.reduce(loss_sum, "sum").double() / n64}
        if self.step_stats:  # their means over the window's examples on all processes, logged with the loss
            keys = sorted(self.step_stats)
            sums = acc.reduce(torch.stack([self.step_stats[k].float() for k in keys]), "sum")
            values.update({f"stats.{k}": v.double() / n64 for k, v in zip(keys, sums)})
        if cfg.grad_clip is not None:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if grad_norm is not None:  # DeepSpeed without its engine reports none
                if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every shard, already reduced
                    grad_norm = grad_norm.full_tensor()
                values["grad_norm"] = grad_norm
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return values, totals[1], lr

    def _read_totals(self, state: TrainState, log: bool = False) -> dict[str, float]:
        """Read the device totals (one host sync): tokens into `state`, stop on a non-finite loss, and with
        `log` the means of the steps since the last log line (a new window starts)."""
        window, tokens, bad = self.totals.read(reset=log)
        state.tokens_seen += tokens
        if bad is not None:
            self._diverged(*bad)
        steps = window.pop("steps")
        state.log_window = {} if log else {"steps": steps, **window}
        return {k: v / steps for k, v in window.items()} if log else {}

    def _stop_requested(self, synced: bool) -> bool:
        """Whether a SIGTERM/SIGINT asks to stop after this step. One process: the handler's flag, no device
        read. Several: Accelerate's all-reduced trigger, read only at steps that synchronised anyway (log,
        evaluation, save), which are the same steps on every process, so all stop together."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._signal is not None
        if self._signal is not None:
            acc.set_trigger()
        return synced and acc.check_trigger()

    def _diverged(self, step: int, epoch: int, value: float) -> None:
        self._log({"step": step, "epoch": epoch, "event": "nonfinite_loss", "loss": str(value)})
        found = list_checkpoints(self.out_dir)
        last = found[-1] if found else None
        self._write_run_json("diverged", {"step": step, "last_checkpoint": str(last) if last else None})
        self.accelerator.end_training()
        where = f"last good checkpoint {last}" if last else "no checkpoint was saved yet"
        raise TrainingError(
            f"loss became {value} at step {step} (epoch {epoch}); stopped without saving; "
            f"{where}; lower train.lr, set train.grad_clip or use train.mixed_precision=no, then resume"
        )

    @torch.no_grad()
    def evaluate(
        self, loader, max_batches: int | None = None, sources: list[str] | None = None
    ) -> dict[str, float]:
        """Mean loss (and accuracy for classifiers) over `loader`, exact across processes.

        With `sources` (names for the ids in a batch's `source`), also `loss/<name>` and `perplexity/<name>`:
        each source's mean over its own target tokens, so their token-weighted mean is `loss`.
        """
        acc, model = self.accelerator, self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            stats = self.example_stats(model, batch)
            if sources and "source" in batch:
                stats["source"] = batch["source"]
            stats = acc.gather_for_metrics(stats)
            group = stats.pop("source", None)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v.double().sum())
            if group is not None:
                for g in group.unique().tolist():
                    for k in ("loss", "count"):
                        key = f"{k}/{sources[g]}"
                        sums[key] = sums.get(key, 0.0) + float(stats[k][group == g].double().sum())
        end_iteration(loader)
        model.train(was_training)
        n = max(sums.get("count", 0.0), 1.0)
        out = {"loss": sums.get("loss", float("nan")) / n}
        if self.kind == "classify":
            out["accuracy"] = sums.get("correct", 0.0) / n
        elif self.kind == "lm":
            out["perplexity"] = math.exp(min(out["loss"], 700.0))
        else:
            out.update({k: v / n for k, v in sums.items() if k not in ("loss", "count")})
        for name in sources or []:
            if sums.get(f"count/{name}"):
                out[f"loss/{name}"] = sums[f"loss/{name}"] / sums[f"count/{name}"]
                out[f"perplexity/{name}"] = math.exp(min(out[f"loss/{name}"], 700.0))
        return out

    def _eval_and_log(self, state: TrainState, epoch: int) -> None:
        res = self.evaluate(self.val_loader, self.cfg.eval_batches, self.val_sources)
        state.last_val_loss, state.last_val_step = res["loss"], state.step
        self._log({"step": state.step, "epoch": epoch, **{f"val_{k}": v for k, v in res.items()}})

    def _log(self, rec: dict) -> None:
        if self.is_main:
            with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        self.state.metrics_lines += 1
        if self.cfg.trackers:
            scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(scalars, step=rec["step"])

    def _truncate_metrics(self, n_lines: int) -> None:
        """Keep the first `n_lines` records: a resumed run continues exactly where its checkpoint was."""
        if self.is_main:
            path = self.out_dir / METRICS
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, "".join(lines[:n_lines]))
        self.accelerator.wait_for_everyone()

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save(self, state: TrainState) -> Path:
        """Accelerate state + trainer_state.json + files.sha256.json (last), in a temp dir renamed into place.

        The temp dir carries the main process's pid (io's naming), so a killed save leaves nothing the next
        save or run does not remove; a failed one (a full disk) removes it at once and is one line.
        """
        acc = self.accelerator
        name = checkpoint_name(state.step)
        final = self.out_dir / CHECKPOINTS / name
        tmp = start_checkpoint(final) if self.is_main else None
        tmp = share_from_main(acc, tmp)
        try:
            acc.save_state(str(tmp))
            if self.fsdp:
                save_sharded(tmp / SHARDED_DIR, self.model, self.optimizer)
            fault_point("checkpoint_write")
            acc.wait_for_everyone()
            score = state.last_val_loss if state.last_val_step == state.step else None
            state.scores[name] = score
            if score is not None and (state.best_val_loss is None or score < state.best_val_loss):
                state.best_val_loss, state.best_step = score, state.step
            if self.is_main:
                finish_checkpoint(tmp, final, asdict(state))
                # keep the last `keep_last` checkpoints and the best one (lowest val_loss at save time)
                for removed in rotate_checkpoints(self.out_dir, self.cfg.keep_last, state.best_step):
                    state.scores.pop(removed, None)
        except Exception as e:
            if self.is_main:
                discard(tmp)
            need = resumable_bytes(acc.unwrap_model(self.model), getattr(self, "optimizer", None))
            err = storage_error(e, final, need_bytes=need)
            if err is e:
                raise
            raise err from None
        except BaseException:
            if self.is_main:
                discard(tmp)
            raise
        acc.wait_for_everyone()
        return final

    def _load(self, path: Path) -> TrainState:
        acc, cfg = self.accelerator, self.cfg
        state = TrainState(**read_checkpoint_state(path))
        now = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": acc.num_processes}
        for k, v in now.items():
            if getattr(state, k) != v:
                raise TrainingError(
                    f"{path}: made with {k}={getattr(state, k)}, this run has {k}={v}; resume with the same "
                    "train.batch_size, train.grad_accum and number of processes (or start a new out_dir)"
                )
        if state.seed != cfg.seed:
            raise TrainingError(
                f"{path}: made with train.seed={state.seed}, not {cfg.seed}; use the same seed"
            )
        if state.sharded != self.fsdp:
            made, now_ = ("fsdp", "ddp") if state.sharded else ("ddp", "fsdp")
            raise TrainingError(
                f"{path}: made with train.distributed={made}, this run is {now_}; resume it with "
                f"train.distributed {made} (or start a new out_dir)"
            )
        acc.load_state(str(path))
        if self.fsdp:
            load_sharded(path / SHARDED_DIR, self.model, self.optimizer)
        self.state = state
        self._truncate_metrics(state.metrics_lines)
        if self.is_main:
            print(f"resuming from {path} (step {state.step}, epoch {state.epoch})", file=sys.stderr)
        return state

    # -- signals --------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):  # finish the step, save, stop
            self._signal = signum

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    # -- the end --------------------------------------------------------------------------------------
    def _final_metrics(self, state: TrainState, final_eval: dict | None, collate_fn) -> dict:
        acc = self.accelerator
        metrics: dict[str, Any] = {"status": "completed", "step": state.step, "tokens": state.tokens_seen}
        if self.val_loader is not None:
            res = self.evaluate(self.val_loader, sources=self.val_sources)
            metrics.update({f"val_{k}": v for k, v in res.items()})
        for split, ds in (final_eval or {}).items():
            if split == "val" and self.val_loader is not None:
                continue
            loader = acc.prepare(self._loader(ds, collate_fn))
            res = self.evaluate(loader)
            metrics.update({f"{split}_{k}": v for k, v in res.items()})
        if state.best_step is not None:
            metrics["best_step"], metrics["best_val_loss"] = state.best_step, state.best_val_loss
        self._log({"final": True, **metrics})
        return metrics

    def _write_run_json(self, status: str, extra: dict) -> dict:
        acc = self.accelerator
        run = {
            "status": status,
            "task": self.run_config.get("task"),
            "config": self.run_config,
            "seed": self.cfg.seed,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "num_processes": acc.num_processes,
            "distributed_type": "FSDP" if self.fsdp else str(acc.distributed_type),
            "mixed_precision": acc.mixed_precision,
            "compile": self.cfg.compile,  # resolved (`auto` -> what this device got)
            "device": str(acc.device),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            **extra,
        }
        if self.is_main:
            write_json(self.out_dir / "run.json", run)
        return run

    def _export_model(self) -> GPT:
        """A plain GPT holding the trained weights (full state dict gathered under FSDP/DeepSpeed)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        if self.fsdp:
            sd = gather_full_state_dict(self.model)  # every process takes part; rank 0 gets the tensors
        elif acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            sd = acc.get_state_dict(self.model)
        else:
            return unwrapped
        if not self.is_main:
            return unwrapped
        return plain_model_from(unwrapped.cfg, sd, source="the gathered model")

    def _write_final(self, metrics: dict) -> Path:
        run = self._write_run_json("completed", {"metrics": metrics})
        model = self._export_model()
        out = self.out_dir / FINAL
        if self.is_main:
            if self.cfg.plot:
                try:
                    plot_losses(read_metrics(self.out_dir / METRICS), self.out_dir / LOSS_PNG)
                except Exception as e:  # a plot must never lose a trained model
                    print(f"warning: could not plot losses: {e}", file=sys.stderr)
            meta = {"run.json": run, **self.metadata}
            base = (self.run_config.get("model") or {}).get("init")  # a LoRA adapter's base
            write_final(self.out_dir, model, meta, base=base, plot=self.cfg.plot)
        self.accelerator.wait_for_everyone()
        return out


def plain_model_from(cfg, sd: dict[str, torch.Tensor], source: str) -> GPT:
    """A plain GPT of `cfg` loaded strictly from a gathered full state dict: a missing or unexpected tensor
    is a CheckpointError naming it, never a silently re-initialised weight in the final checkpoint."""
    import copy

    from gptforge.model.checkpoint import load_weights_into

    plain = GPT(copy.deepcopy(cfg))
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    if plain.cfg.tie_embeddings:  # the tied head is tok_emb.weight; gathered dicts may list it twice
        sd.pop("lm_head.weight", None)
    load_weights_into(plain, sd, source=source)
    return plain


def packing_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """`position_ids`, `segment_ids` and `cu_seqlens` of packed rows (`data.packing`); nothing for ordinary
    batches."""
    return {k: batch[k] for k in ("position_ids", "segment_ids", "cu_seqlens") if k in batch}


def source_names_of(dataset) -> list[str] | None:
    """The names of a dataset's `source` ClassLabel column (pretraining validation from several sources)."""
    feature = (getattr(dataset, "features", None) or {}).get("source")
    return list(feature.names) if hasattr(feature, "names") else None
