"""End-to-end finetunes: gptforge against the Hugging Face Trainer (SMS classification) and TRL (instructions).

The same finetune runs on both sides: one set of initial weights (a seeded gptforge model of a CPU
preset, copied into transformers with `to_hf`), the same tokenized examples (gptforge's tokenization,
handed to the baselines as `input_ids`), epochs, batch size, AdamW (fused; same betas, eps, weight decay
and the same decayed parameters: Linear/Conv1D weights only), learning-rate schedule (gptforge's
warmup + cosine, given to the Trainer as its scheduler), fp32, no gradient clipping, the last
incomplete batch kept. What differs is what each tool does with padding:

- classification: gptforge pads each random batch to its longest message and pools the last real
  token; `GPT2ForSequenceClassification` gets right padding with pad = <|endoftext|> (which it pools
  by: the rightmost non-pad token, the same token since no SMS text holds <|endoftext|>). Options: the
  Trainer's `train_sampling_strategy="group_by_length"` (transformers 5; `group_by_length=True` before)
  and gptforge's `data.group_by_length`, where that option exists.
- instructions: the alpaca prompt, loss on the response and its <|endoftext|> only (gptforge's
  `data.mask_prompt`; TRL's `completion_only_loss` over a `completion_mask`). TRL runs padded (its
  default), `padding_free=True`, and `packing=True` (best-fit decreasing, which implies padding-free);
  gptforge runs padded and with `data.packing` where that option exists. On a CPU there is no flash
  attention: transformers sees the restarting `position_ids` of a padding-free batch and builds a
  block-diagonal mask for SDPA over the whole flattened batch (checked below: the packed loss equals
  the padded one).

Measured per run: training seconds per epoch (from the first batch to the last optimizer step;
evaluation and saving are outside it), tokens/s over real tokens (a record's tokens with its
<|endoftext|>, no padding: the same count for every run), and the final validation accuracy / loss,
computed for every trained model by one evaluator (gptforge's definition: the response-token mean) so
the results compare. The runs alternate between the tools; gptforge's options run only where its
config has the field, so the benchmark works before and after those options exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import log, median, record

from gptforge.model.config import IGNORE_INDEX, GPTConfig
from gptforge.model.gpt import GPT

LABELS = {0: "ham", 1: "spam"}
ACC_TOL = 0.03  # validation accuracy: 149 messages, one message is 0.7 points; data orders differ
LOSS_TOL = 0.03  # validation loss: relative


# -- the recipe ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recipe:
    """One finetune, as both tools run it."""

    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    limit: int | None  # first N examples of each split (None: all)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # torch's AdamW default; gptforge does not change it
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1


def model_config(shape: dict) -> GPTConfig:
    shape = dict(shape)
    return GPTConfig.from_preset(shape.pop("preset"), **shape)


def gptforge_options() -> dict[str, bool]:
    """Which padding options this gptforge has: the config dataclass declares the field, or not."""
    from gptforge.pipeline.config import ClassifyDataConfig, InstructDataConfig

    def has(cls, name: str) -> bool:
        return name in {f.name for f in dataclasses.fields(cls)}

    return {
        "group_by_length": has(ClassifyDataConfig, "group_by_length"),
        "packing": has(InstructDataConfig, "packing"),
    }


def initial_checkpoint(shape: dict, classifier: bool, seed: int, out: Path) -> tuple[Path, GPT]:
    """A seeded model saved as a gptforge checkpoint (a classifier comes with its head, so both sides
    start from the same head too)."""
    from gptforge.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = GPT(model_config(shape))
    if classifier:
        model.add_classification_head(len(LABELS), dict(LABELS))
    save_checkpoint(model, out)
    return out, model.eval()


def to_hf_model(model: GPT):
    from gptforge.model.hf import to_hf

    hf = to_hf(model)
    hf.config._attn_implementation = "sdpa"  # transformers' default for training
    return hf.train()


# -- the same optimizer and schedule for the baselines -------------------------------------------------------
def hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """gptforge's AdamW groups (`pipeline.optim.param_groups`) for a transformers GPT-2: decay only the
    matrix weights (Linear and GPT-2's Conv1D); biases, LayerNorms and the (tied) embeddings never.

    The Trainer's own rule would also decay the embeddings; the point here is the same optimizer.
    """
    from transformers.pytorch_utils import Conv1D

    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix = isinstance(module, (nn.Linear, Conv1D)) and name == "weight"
            (decay if is_matrix and weight_decay > 0 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hf_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        hf_param_groups(model, r.weight_decay), lr=r.lr, betas=r.betas, eps=r.eps, fused=True
    )


def trainer_class(base: type, r: Recipe, counter: dict) -> type:
    """`base` (Trainer or SFTTrainer) with gptforge's optimizer groups and schedule, counting the tokens
    each training batch holds (padding included) in `counter`."""
    from gptforge.pipeline.optim import lr_lambda

    class Same(base):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = hf_optimizer(self.model if model is None else model, r)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                f = lr_lambda(r.schedule, r.warmup_steps, num_training_steps, r.min_lr_ratio)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, f)
                counter["total_steps"] = num_training_steps
            return self.lr_scheduler

        def training_step(self, model, inputs, *args, **kwargs):
            counter["processed"] = counter.get("processed", 0) + int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    Same.__name__ = f"{base.__name__}SameRecipe"
    return Same


def epoch_callback(marks: dict):
    """A TrainerCallback that records each epoch's start and end (evaluation and saving come after)."""
    from transformers import TrainerCallback

    class EpochClock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            marks.setdefault("start", []).append(time.perf_counter())

        def on_epoch_end(self, args, state, control, **kw):
            marks.setdefault("end", []).append(time.perf_counter())

    return EpochClock()


def training_args(cls, r: Recipe, out: str, seed: int, **extra):
    """TrainingArguments / SFTConfig for the recipe: fp32 on the CPU, no clipping, no checkpoints, no
    evaluation during training (both sides evaluate once at the end)."""
    kw = dict(
        output_dir=out,
        per_device_train_batch_size=r.batch_size,
        per_device_eval_batch_size=r.batch_size,
        num_train_epochs=r.epochs,
        learning_rate=r.lr,
        weight_decay=r.weight_decay,
        adam_beta1=r.betas[0],
        adam_beta2=r.betas[1],
        adam_epsilon=r.eps,
        max_grad_norm=0.0,
        warmup_steps=r.warmup_steps,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=False,
        dataloader_pin_memory=False,
    )
    kw.update(extra)
    return cls(**kw)


# -- gptforge's side -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def gptforge_clock(marks: dict):
    """Per-epoch training time of gptforge's Trainer: from an epoch's first batch fetch to its last
    optimizer step (what the Trainer callback measures on the other side), and the tokens processed."""
    from gptforge.pipeline.trainer import Trainer

    next_window, train_step = Trainer._next_window, Trainer._train_step

    def timed_next(self, it):
        marks.setdefault("start", {}).setdefault(self.state.epoch, time.perf_counter())
        return next_window(self, it)

    def timed_step(self, window, state):
        marks["processed"] = marks.get("processed", 0) + sum(int(b["input_ids"].numel()) for b in window)
        out = train_step(self, window, state)
        marks.setdefault("end", {})[state.epoch] = time.perf_counter()
        marks["steps"] = marks.get("steps", 0) + 1
        return out

    Trainer._next_window, Trainer._train_step = timed_next, timed_step
    try:
        yield marks
    finally:
        Trainer._next_window, Trainer._train_step = next_window, train_step


def run_gptforge(task: str, init: Path, r: Recipe, out: Path, seed: int, data: dict) -> dict:
    """One gptforge finetune through its Python API (`run_classify` / `run_instruct`), as a user runs it."""
    from gptforge.model.load import load_model
    from gptforge.pipeline.config import load_config
    from gptforge.pipeline.train import run_classify, run_instruct

    overrides = {
        "model.init": str(init),
        "train.out_dir": str(out),
        "train.epochs": r.epochs,
        "train.batch_size": r.batch_size,
        "train.lr": r.lr,
        "train.weight_decay": r.weight_decay,
        "train.betas": list(r.betas),
        "train.schedule": r.schedule,
        "train.warmup_steps": r.warmup_steps,
        "train.min_lr_ratio": r.min_lr_ratio,
        "train.grad_clip": None,
        "train.mixed_precision": "no",
        "train.drop_last": False,
        "train.seed": seed,
        "train.cpu": True,
        "train.eval_every": 10**9,  # no evaluation during training; the final one scores validation
        "train.eval_batches": None,
        "train.save_every": 10**9,  # one save, at the end
        "train.keep_last": 1,
        "train.progress": False,
        "train.plot": False,
        "data.limit": r.limit,
        **{f"data.{k}": v for k, v in data.items()},
    }
    if task == "classify":
        overrides["trainable"] = "all"
    cfg = load_config(task, **overrides)
    marks: dict = {}
    t0 = time.perf_counter()
    with gptforge_clock(marks):
        result = (run_classify if task == "classify" else run_instruct)(cfg)
    total = time.perf_counter() - t0
    epochs = sorted(marks.get("end", {}))
    return {
        "epoch_s": [marks["end"][e] - marks["start"][e] for e in epochs],
        "total_s": total,
        "steps": marks.get("steps"),
        "processed_tokens": marks.get("processed"),
        "model": to_hf_model(load_model(result.checkpoint)).eval(),
        "own_metrics": {
            k: v for k, v in result.metrics.items() if k.startswith("val_") and isinstance(v, float)
        },
    }


# -- data, shared --------------------------------------------------------------------------------------------
def classify_data(r: Recipe, seed: int) -> dict:
    """gptforge's SMS split and tokenization (what `run_classify` trains on), truncated as it truncates."""
    from gptforge.pipeline.config import ClassifyDataConfig
    from gptforge.tasks.classify import load_splits, longest_length, tokenize_classification

    dsd, _ = load_splits(ClassifyDataConfig(limit=r.limit), seed=seed)
    tok = tokenize_classification(dsd, max_length=None).select_columns(["input_ids", "label"])
    max_len = longest_length(tok["train"])
    tok = tokenize_classification(dsd, max_length=max_len).select_columns(["input_ids", "label"])
    return {"train": tok["train"], "validation": tok["validation"], "max_length": max_len}


def instruct_data(r: Recipe, seed: int, max_len: int) -> dict:
    """gptforge's instruction split and tokenization (alpaca prompts), with each record's prompt length."""
    from gptforge.pipeline.config import InstructDataConfig
    from gptforge.tasks.instruct import load_splits, tokenize_instruction

    dsd = load_splits(InstructDataConfig(limit=r.limit), seed=seed)
    tok = tokenize_instruction(dsd, "alpaca", max_length=max_len)
    return {
        "train": tok["train"].select_columns(["input_ids", "prompt_length"]),
        "validation": tok["validation"].select_columns(["input_ids", "prompt_length"]),
        "max_length": max_len,
    }


def real_tokens_instruct(ds, max_len: int) -> int:
    """A record's tokens with its <|endoftext|>, capped at max_length: what a padding-free step computes."""
    return sum(min(len(x) + 1, max_len) for x in ds["input_ids"])


def trl_dataset(ds, max_len: int):
    """The records as TRL's pre-tokenized form: `input_ids` (prompt + response + <|endoftext|>, cut at
    max_length) and `completion_mask` (1 on the response and the <|endoftext|>)."""
    from datasets import Dataset

    from gptforge.model.tokenizer import EOT_ID

    ids, masks = [], []
    for x, p in zip(ds["input_ids"], ds["prompt_length"]):
        seq = (list(x) + [EOT_ID])[:max_len]
        ids.append(seq)
        masks.append([0] * min(p, len(seq)) + [1] * max(len(seq) - p, 0))
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


# -- one evaluator for every trained model -------------------------------------------------------------------
@torch.no_grad()
def classify_accuracy(hf, ds, batch_size: int = 32) -> float:
    from gptforge.tasks.classify import ClassificationCollator

    hf.eval()
    collate = ClassificationCollator()
    correct = 0
    for i in range(0, len(ds), batch_size):
        b = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += int((logits.argmax(-1) == b["targets"]).sum())
    return correct / len(ds)


@torch.no_grad()
def instruct_val_loss(hf, ds, max_len: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over the response tokens and <|endoftext|> (gptforge's mask_prompt targets)."""
    from gptforge.tasks.instruct import InstructionCollator

    hf.eval()
    collate = InstructionCollator(allowed_max_length=max_len, mask_prompt=True)
    total, count = 0.0, 0
    for i in range(0, len(ds), batch_size):
        b = collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        # right padding comes after every scored position, so a causal model needs no mask for it
        logits = hf(input_ids=b["input_ids"]).logits.float()
        y = b["targets"]
        total += float(
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


# -- the baselines -------------------------------------------------------------------------------------------


def train_timed(trainer, marks: dict, counter: dict, hf) -> dict:
    """Run a Trainer / SFTTrainer built with `epoch_callback(marks)` and `trainer_class(..., counter)`:
    its epoch times, whole `train()` time, steps and processed tokens, and the trained model."""
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {
        "epoch_s": [e - s for s, e in zip(marks["start"], marks["end"])],
        "total_s": total,
        "steps": trainer.state.global_step,
        "processed_tokens": counter.get("processed"),
        "model": hf.eval(),
    }


def run_hf_classify(init: GPT, data: dict, r: Recipe, seed: int, group: bool, out: Path) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from gptforge.model.tokenizer import build_hf_tokenizer

    tok = build_hf_tokenizer()
    tok.padding_side = "right"
    hf = to_hf_model(init)
    assert hf.config.pad_token_id == tok.pad_token_id == 50256
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in fields:
        sampling = {"train_sampling_strategy": "group_by_length" if group else "random"}
    else:
        sampling = {"group_by_length": group}
    counter: dict = {}
    marks: dict = {}
    args = training_args(TrainingArguments, r, str(out), seed, **sampling)
    trainer = trainer_class(Trainer, r, counter)(
        model=hf,
        args=args,
        train_dataset=data["train"],
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
        callbacks=[epoch_callback(marks)],
    )
    return train_timed(trainer, marks, counter, hf)


TRL_MODES = {
    "padded": {},
    "padding_free": {"padding_free": True},
    "packing": {"packing": True, "packing_strategy": "bfd"},
}


def run_trl(init: GPT, data: dict, r: Recipe, seed: int, mode: str, out: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    from gptforge.model.tokenizer import build_hf_tokenizer

    tok = build_hf_tokenizer()
    hf = to_hf_model(init)
    max_len = data["max_length"]
    extra = dict(TRL_MODES[mode])
    # padding-free without packing refuses a max_length (it would not be enforced); the records are
    # cut to max_length already
    extra["max_length"] = None if mode == "padding_free" else max_len
    counter: dict = {}
    marks: dict = {}
    args = training_args(
        SFTConfig,
        r,
        str(out),
        seed,
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default is on: it trades compute for memory, gptforge does not
        logging_steps=10**9,
        **extra,
    )
    trainer = trainer_class(SFTTrainer, r, counter)(
        model=hf,
        args=args,
        train_dataset=trl_dataset(data["train"], max_len),
        processing_class=tok,
        callbacks=[epoch_callback(marks)],
    )
    return {**train_timed(trainer, marks, counter, hf), "rows": len(trainer.train_dataset)}


# -- sanity: the same computation on both sides ---------------------------------------------------------------
def first_steps_classify(init: GPT, data: dict, r: Recipe) -> dict:
    """Loss of one batch before and after one AdamW step, gptforge vs GPT2ForSequenceClassification."""
    from transformers import DataCollatorWithPadding

    from gptforge.model.tokenizer import build_hf_tokenizer
    from gptforge.pipeline.config import TrainConfig
    from gptforge.pipeline.optim import make_optimizer
    from gptforge.tasks.classify import ClassificationCollator

    items = [data["train"][i] for i in range(min(r.batch_size, len(data["train"])))]
    ours = GPT(dataclasses.replace(init.cfg))
    ours.load_state_dict(init.state_dict())
    ours.train()
    hf = to_hf_model(init)
    opt_ours = make_optimizer(ours, TrainConfig(lr=r.lr, weight_decay=r.weight_decay, betas=r.betas))
    opt_hf = hf_optimizer(hf, r)
    b = ClassificationCollator()(items)
    hb = DataCollatorWithPadding(build_hf_tokenizer())(
        [{"input_ids": x["input_ids"], "labels": x["label"]} for x in items]
    )
    losses: dict[str, list[float]] = {"gptforge": [], "transformers": []}
    for _ in range(2):
        loss = ours(b["input_ids"], attention_mask=b["attention_mask"], targets=b["targets"])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        losses["gptforge"].append(float(loss.detach()))
        out = hf(**hb)
        out.loss.backward()
        opt_hf.step()
        opt_hf.zero_grad()
        losses["transformers"].append(float(out.loss.detach()))
    return losses


def first_steps_instruct(init: GPT, data: dict, r: Recipe) -> dict:
    """Loss of one batch (prompt masked) before and after one AdamW step: gptforge, TRL's padded batch, and
    TRL's padding-free batch (one flattened row; SDPA with transformers' packed-sequence mask)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gptforge.pipeline.config import TrainConfig
    from gptforge.pipeline.optim import make_optimizer
    from gptforge.tasks.instruct import InstructionCollator

    max_len = data["max_length"]
    n = min(r.batch_size, len(data["train"]))
    items = [data["train"][i] for i in range(n)]
    trl_items = []
    for ex in trl_dataset(data["train"].select(range(n)), max_len):
        labels = [t if m else IGNORE_INDEX for t, m in zip(ex["input_ids"], ex["completion_mask"])]
        trl_items.append({"input_ids": ex["input_ids"], "labels": labels})
    ours = GPT(dataclasses.replace(init.cfg))
    ours.load_state_dict(init.state_dict())
    ours.train()
    b = InstructionCollator(allowed_max_length=max_len, mask_prompt=True)(items)
    opt_ours = make_optimizer(ours, TrainConfig(lr=r.lr, weight_decay=r.weight_decay, betas=r.betas))
    losses: dict[str, list[float]] = {"gptforge": []}
    for _ in range(2):
        loss = ours(b["input_ids"], targets=b["targets"])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        losses["gptforge"].append(float(loss.detach()))
    for name, free in (("trl padded", False), ("trl padding-free", True)):
        hf = to_hf_model(init)
        opt = hf_optimizer(hf, r)
        hb = DataCollatorForLanguageModeling(pad_token_id=50256, padding_free=free)(trl_items)
        keys = ("input_ids", "labels", "position_ids") if free else ("input_ids", "labels", "attention_mask")
        losses[name] = []
        for _ in range(2):
            # use_cache=False as TRL passes it: with a cache (GPT-2's config default) transformers skips the
            # packed-sequence mask and a padding-free row attends across its records
            out = hf(**{k: hb[k] for k in keys}, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(float(out.loss.detach()))
    return losses


def losses_equal(losses: dict, tol: float = 1e-4) -> bool:
    ref = losses["gptforge"]
    return all(all(abs(a - b) <= tol and math.isfinite(a) for a, b in zip(ref, v)) for v in losses.values())


# -- where gptforge's step spends its time ----------------------------------------------------------------------
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # where the profiler counts FLOPs
ONEDNN_LINEAR_OP = "mkldnn::_linear_pointwise"  # gptforge's Linear on a CPU; FLOPs from its shapes
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention")


def profile_gptforge_step(
    init: GPT, batches: list[dict], kind: str, r: Recipe, peak_gflops: float | None
) -> dict:
    """A few gptforge training steps (forward, backward, fused AdamW) under torch.profiler: the share of
    the step in matmuls, attention, the optimizer and the rest, and the matmuls' GFLOP/s against the peak."""
    from torch.profiler import ProfilerActivity, profile

    from gptforge.pipeline.config import TrainConfig
    from gptforge.pipeline.optim import make_optimizer

    model = GPT(dataclasses.replace(init.cfg))
    model.load_state_dict(init.state_dict())
    model.train()
    model.touched_rows_embedding = True  # what gptforge's Trainer sets for one CPU process
    opt = make_optimizer(model, TrainConfig(lr=r.lr, weight_decay=r.weight_decay, betas=r.betas))

    def step(b: dict) -> None:
        loss = model(
            b["input_ids"], attention_mask=b.get("attention_mask"), targets=b["targets"], reduction="sum"
        )
        n = b["targets"].numel() if kind == "classify" else (b["targets"] != IGNORE_INDEX).sum()
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from gptforge.machine import keep_freed_memory, release_freed_memory

    # the heap as gptforge's trainer sets it on CPU (freed memory kept: no page faults per step)
    tuned = keep_freed_memory()
    try:
        step(batches[0])  # warm-up: optimizer state, allocator
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
            for b in batches:
                step(b)
        wall = time.perf_counter() - t0
    finally:
        if tuned:
            release_freed_memory()
    cats = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    flops = 0.0
    total_self = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        us = ev.self_cpu_time_total
        total_self += us
        name = ev.key
        if name in MATMUL_OPS:
            cats["matmul"] += us
            flops += ev.flops or 0
        elif name == ONEDNN_LINEAR_OP:  # x (M, K) against a weight (N, K): 2 M N K per call
            cats["matmul"] += us
            (m, k), (n, _) = ev.input_shapes[0], ev.input_shapes[1]
            flops += 2 * m * n * k * ev.count
        elif any(a in name for a in ATTENTION_OPS):
            cats["attention"] += us
        elif "adam" in name.lower() or "optimizer" in name.lower():
            cats["optimizer"] += us
        else:
            cats["other"] += us
    top = sorted(((ev.key, ev.self_cpu_time_total) for ev in prof.key_averages()), key=lambda kv: -kv[1])[:8]
    share = {k: round(v / total_self, 3) for k, v in cats.items()} if total_self else {}
    mm_s = cats["matmul"] / 1e6
    gflops = flops / mm_s / 1e9 if mm_s else None
    return {
        "steps": len(batches),
        "wall_s_per_step": round(wall / len(batches), 4),
        "share": share,
        "matmul_gflops": round(gflops, 1) if gflops else None,
        "matmul_share_of_peak": round(gflops / peak_gflops, 3) if gflops and peak_gflops else None,
        "top_ops": [(k, round(v / total_self, 3)) for k, v in top] if total_self else [],
    }


# -- the benchmark ------------------------------------------------------------------------------------------------
def _summary(name: str, res: dict, real_tokens: int, result: float) -> dict:
    epoch = median(res["epoch_s"])
    return {
        "name": name,
        "epoch_s": [round(x, 2) for x in res["epoch_s"]],
        "epoch_s_median": round(epoch, 2),
        "tokens_per_s": real_tokens / epoch,
        "total_s": round(res["total_s"], 1),
        "steps": res["steps"],
        "padding_overhead": round(res["processed_tokens"] / (real_tokens * len(res["epoch_s"])), 3)
        if res.get("processed_tokens")
        else None,
        "result": result,
        **({"own_metrics": res["own_metrics"]} if "own_metrics" in res else {}),
        **({"rows": res["rows"]} if "rows" in res else {}),
    }


def _interleave(cases: list[tuple[str, Callable[[], dict]]], rounds: int = 1) -> dict[str, dict]:
    """Run every case `rounds` times, alternating the order (ABBA) so the machine's drifting load falls
    on both tools alike; each case keeps every epoch's seconds and its last run's model."""
    out: dict[str, dict] = {}
    for k in range(rounds):
        for name, fn in cases if k % 2 == 0 else cases[::-1]:
            log(f"finetune: {name} (round {k + 1}/{rounds}) ...")
            t0 = time.perf_counter()
            res = fn()
            log(
                f"finetune: {name}: {time.perf_counter() - t0:.0f} s, epochs "
                f"{[round(x, 1) for x in res['epoch_s']]}"
            )
            if name in out:
                res["epoch_s"] = out[name]["epoch_s"] + res["epoch_s"]
                res["processed_tokens"] = (out[name].get("processed_tokens") or 0) + (
                    res.get("processed_tokens") or 0
                )
                res["total_s_all"] = out[name].get("total_s_all", [out[name]["total_s"]]) + [res["total_s"]]
                res["total_s"] = median(res["total_s_all"])
                out[name].pop("model", None)
            out[name] = res
    return out


def _rows(
    task: str, label: str, runs: dict[str, dict], baseline_name: str, metric: str, tol_ok
) -> list[dict]:
    """Each gptforge configuration against the baseline's default and its best (fastest) option."""
    ours = {k: v for k, v in runs.items() if k.startswith("gptforge")}
    theirs = {k: v for k, v in runs.items() if not k.startswith("gptforge")}
    default = next(iter(theirs))
    best = max(theirs, key=lambda k: theirs[k]["tokens_per_s"])
    rows: list[dict] = []
    for name, s in ours.items():
        # the goal: 2x the baseline's default and 1.3x its best option (one row where they coincide)
        for which, target in [(default, 2.0)] + ([(best, 1.3)] if best != default else []):
            b = theirs[which]
            rows.append(
                record(
                    "finetune",
                    f"{label}: {name} vs {which}",
                    "real tokens/s",
                    s["tokens_per_s"],
                    b["tokens_per_s"],
                    baseline_name,
                    higher_is_better=True,
                    target=target,
                    samples={name: s["epoch_s"], which: b["epoch_s"]},
                    task=task,
                    epoch_s={name: s["epoch_s_median"], which: b["epoch_s_median"]},
                    result_metric=metric,
                    result={name: s["result"], which: b["result"]},
                    result_equal=tol_ok(s["result"], b["result"]),
                    vs="default" if which == default else "best option",
                )
            )
            # the goal is a speed-up at an equal result: a faster run that learned less does not meet it
            rows[-1]["met"] = bool(rows[-1]["met"] and rows[-1]["result_equal"])
    return rows


def _annotate(new: list[dict], summ, first, real, shape, recipe, prof, opts) -> list[dict]:
    """What every comparison row of one task carries; the first row prints the task's details."""
    for row in new:
        row.update(
            runs=summ,
            first_loss=first,
            first_loss_equal=losses_equal(first),
            real_tokens_per_epoch=real,
            model_shape=shape,
            recipe=dataclasses.asdict(recipe),
            profile=prof,
            options_present=opts,
        )
    new[0]["details"] = True
    return new


def run(sizes: dict, peaks: dict | None = None) -> list[dict]:
    """Classification and instruction finetunes, both tools, every option; one row per comparison.

    `sizes`: shape (preset + overrides), seed, classify / instruct recipes (Recipe fields), profile_steps,
    rounds (times each run is repeated, order alternating).
    """
    shape, seed = sizes["shape"], sizes["seed"]
    opts = gptforge_options()
    log(f"finetune: model {shape}; gptforge options present: {opts}")
    peak = (peaks or {}).get("fp32", {}).get("gflops")
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        if "classify" in sizes:
            r = Recipe(**sizes["classify"])
            data = classify_data(r, seed)
            real = sum(len(x) for x in data["train"]["input_ids"])
            init_dir, init = initial_checkpoint(shape, True, seed, tmp / "init-classify")
            first = first_steps_classify(init, data, r)
            log(f"finetune: classify first-step losses {first}")
            cases = [
                ("gptforge", lambda: run_gptforge("classify", init_dir, r, tmp / "gf-c", seed, {})),
                ("Trainer", lambda: run_hf_classify(init, data, r, seed, False, tmp / "hf-c")),
            ]
            if opts["group_by_length"]:
                cases.append(
                    (
                        "gptforge group_by_length",
                        lambda: run_gptforge(
                            "classify", init_dir, r, tmp / "gf-cg", seed, {"group_by_length": True}
                        ),
                    )
                )
            cases.append(
                ("Trainer group_by_length", lambda: run_hf_classify(init, data, r, seed, True, tmp / "hf-cg"))
            )
            runs = _interleave(cases, sizes.get("rounds", 1))
            summ = {
                k: _summary(k, v, real, classify_accuracy(v["model"], data["validation"]))
                for k, v in runs.items()
            }
            label = (
                f"SMS classification, {len(data['train'])} train / {len(data['validation'])} val, "
                f"{r.epochs} epochs, batch {r.batch_size}"
            )
            new = _rows(
                "classify",
                label,
                summ,
                "transformers Trainer, GPT2ForSequenceClassification (sdpa, fused AdamW)",
                "val accuracy",
                lambda a, b: abs(a - b) <= ACC_TOL,
            )
            sample = [
                ClassificationBatch(data, r.batch_size, i) for i in range(sizes.get("profile_steps", 6))
            ]
            prof = profile_gptforge_step(init, sample, "classify", r, peak)
            rows += _annotate(new, summ, first, real, shape, r, prof, opts)
            for v in runs.values():
                v.pop("model", None)
        if "instruct" in sizes:
            r = Recipe(**sizes["instruct"])
            max_len = model_config(shape).context_length
            data = instruct_data(r, seed, max_len)
            real = real_tokens_instruct(data["train"], max_len)
            init_dir, init = initial_checkpoint(shape, False, seed, tmp / "init-instruct")
            first = first_steps_instruct(init, data, r)
            log(f"finetune: instruct first-step losses {first}")
            base = {"mask_prompt": True, "prompt_style": "alpaca", "max_length": max_len}
            cases = [
                ("gptforge", lambda: run_gptforge("instruct", init_dir, r, tmp / "gf-i", seed, base)),
                ("TRL", lambda: run_trl(init, data, r, seed, "padded", tmp / "trl-i")),
            ]
            if opts["packing"]:
                cases.append(
                    (
                        "gptforge packing",
                        lambda: run_gptforge(
                            "instruct", init_dir, r, tmp / "gf-ip", seed, {**base, "packing": True}
                        ),
                    )
                )
            cases.append(
                ("TRL padding_free", lambda: run_trl(init, data, r, seed, "padding_free", tmp / "trl-if"))
            )
            cases.append(
                ("TRL packing (bfd)", lambda: run_trl(init, data, r, seed, "packing", tmp / "trl-ip"))
            )
            runs = _interleave(cases, sizes.get("rounds", 1))
            summ = {
                k: _summary(k, v, real, instruct_val_loss(v["model"], data["validation"], max_len))
                for k, v in runs.items()
            }
            label = (
                f"instructions (alpaca, loss on responses), {len(data['train'])} train / "
                f"{len(data['validation'])} val, {r.epochs} epochs, batch {r.batch_size}"
            )
            new = _rows(
                "instruct",
                label,
                summ,
                "TRL SFTTrainer (sdpa, fused AdamW, completion-only loss)",
                "val loss",
                lambda a, b: abs(a - b) <= LOSS_TOL * max(abs(b), 1e-9),
            )
            sample = [InstructionBatch(data, r.batch_size, i) for i in range(sizes.get("profile_steps", 6))]
            prof = profile_gptforge_step(init, sample, "lm", r, peak)
            rows += _annotate(new, summ, first, real, shape, r, prof, opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def ClassificationBatch(data: dict, batch_size: int, i: int) -> dict:  # noqa: N802 (reads as a type)
    from gptforge.tasks.classify import ClassificationCollator

    ds = data["train"]
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(i))[:batch_size].tolist()
    return ClassificationCollator()([ds[j] for j in idx])


def InstructionBatch(data: dict, batch_size: int, i: int) -> dict:  # noqa: N802
    from gptforge.tasks.instruct import InstructionCollator

    ds = data["train"]
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(i))[:batch_size].tolist()
    return InstructionCollator(allowed_max_length=data["max_length"], mask_prompt=True)([ds[j] for j in idx])
