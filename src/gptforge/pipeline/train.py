"""Task glue: build the model, the data and the collate for each task, then hand them to the Trainer.

`run_pretrain(cfg)`, `run_classify(cfg)`, `run_instruct(cfg)`, `run_dpo(cfg)` (or `train(task, cfg)`) are what the CLI
and the pipeline runner call; each returns `RunResult(checkpoint, metrics)`: the final gptforge
checkpoint dir (or, when stopped by a signal, the resumable checkpoint) and the final metrics.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import ConfigError
from gptforge.model.config import IGNORE_INDEX, GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.load import is_model_dir, load_model
from gptforge.model.lora import apply_lora, count_parameters
from gptforge.pipeline.config import (
    ClassifyConfig,
    DPOConfig,
    DPOLossConfig,
    InstructConfig,
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    parse_trainable,
    to_dict,
    validate,
)
from gptforge.pipeline.trainer import RunResult, Trainer

SIZE_FIELDS = ("context_length", "emb_dim", "n_layers", "n_heads", "dropout")


def build_model(mcfg: ModelConfig) -> GPT:
    """A fresh GPT (`init: scratch`), a gptforge checkpoint, or a converted Hugging Face GPT-2."""
    overrides = {k: getattr(mcfg, k) for k in SIZE_FIELDS if getattr(mcfg, k) is not None}
    if mcfg.init == "scratch":
        return GPT(GPTConfig.from_preset(mcfg.preset, **overrides)).train()
    if overrides:
        raise ConfigError(
            f"model.{next(iter(overrides))} applies to model.init=scratch only; "
            f"{mcfg.init} brings its own sizes (remove the override)"
        )
    p = Path(mcfg.init).expanduser()
    if is_model_dir(p):
        model = load_model(p)
    else:
        from gptforge.model.hf import from_hf

        model = from_hf(mcfg.init)
    return model.train()


def _check_context(name: str, length: int, model: GPT) -> int:
    if length > model.cfg.context_length:
        raise ConfigError(
            f"{name}={length} exceeds the model's context_length={model.cfg.context_length}; lower it"
        )
    return length


def _run_config(task: str, cfg: Any, model: GPT) -> dict:
    return {"task": task, **to_dict(cfg), "model_config": model.cfg.to_dict()}


# -- pretraining ------------------------------------------------------------------------------------


def run_pretrain(cfg: PretrainConfig) -> RunResult:
    """Next-token training on packed text; reports validation loss and perplexity."""
    from gptforge.tasks import pretrain

    validate(cfg)
    trainer = Trainer(cfg.train, kind="lm")
    model = build_model(cfg.model)
    if model.is_classifier:
        raise ConfigError(f"model.init={cfg.model.init} is a classifier; pretraining needs a language model")
    d = cfg.data
    ctx = _check_context("data.context_length", d.context_length or model.cfg.context_length, model)
    with trainer.main_process_first():
        dsd = pretrain.load_splits(d, context_length=ctx, seed=cfg.train.seed)
    return trainer.fit(
        model,
        dsd["train"],
        pretrain.PretrainCollator(target_fraction=d.target_fraction),
        dsd["validation"] if "validation" in dsd else None,
        run_config=_run_config("pretrain", cfg, model),
        eval_collate_fn=pretrain.PretrainCollator(),
    )


# -- classification ---------------------------------------------------------------------------------


def set_trainable(model: GPT, policy: str) -> int:
    """Freeze by policy; returns the number of trainable parameters.

    `all`: everything; `head`: the classification head only; `last_blocks:N`: the last N blocks, the
    final LayerNorm and the head (the reference recipe is last_blocks:1).
    """
    kind, n = parse_trainable(policy)
    if kind == "last_blocks" and n > len(model.blocks):
        raise ConfigError(f"trainable={policy}: the model has only {len(model.blocks)} blocks")
    for p in model.parameters():
        p.requires_grad = kind == "all"
    if kind != "all":
        trainable = [model.score]
        if kind == "last_blocks":
            trainable += [*model.blocks[len(model.blocks) - n :], model.ln_f]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_classify(cfg: ClassifyConfig) -> RunResult:
    """Add a classification head and finetune by the `trainable` policy; reports train/val/test accuracy."""
    from gptforge.tasks.classify import (
        ClassificationCollator,
        load_splits,
        longest_length,
        token_lengths,
        tokenize_classification,
    )

    validate(cfg)
    trainer = Trainer(cfg.train, kind="classify")
    model = build_model(cfg.model)
    with trainer.main_process_first():
        dsd, names = load_splits(cfg.data, seed=cfg.train.seed)
        limit = cfg.data.max_length or model.cfg.context_length
        _check_context("data.max_length", limit, model)
        tok = tokenize_classification(dsd, max_length=limit)
        tok = tok.select_columns(["input_ids", "label"])
    # The reference truncates every split to the longest training example.
    max_len = cfg.data.max_length or longest_length(tok["train"])
    id2label = dict(enumerate(names))
    if not (model.is_classifier and model.cfg.id2label == id2label):
        model.add_classification_head(len(names), id2label)
    if cfg.lora.enabled:
        n_train = count_parameters(apply_lora(model, cfg.lora))[0]  # base frozen; adapters + head train
    else:
        n_train = set_trainable(model, cfg.trainable)
    collate = ClassificationCollator(pad_token_id=model.cfg.pad_token_id, max_length=max_len)
    run_config = _run_config("classify", cfg, model)
    run_config.update(labels=names, max_length=max_len, trainable_parameters=n_train)
    lengths = None
    if cfg.data.group_by_length:
        lengths = [min(n, max_len) for n in token_lengths(tok["train"])]
        log_padding(lengths, cfg.train, trainer.is_main)
    return trainer.fit(
        model,
        tok["train"],
        collate,
        tok["validation"],
        final_eval={"train": tok["train"], "test": tok["test"]},
        run_config=run_config,
        train_lengths=lengths,
    )


def log_padding(lengths: list[int], train: TrainConfig, show: bool) -> None:
    """One stderr line: the padding share of the first epoch's batches, grouped and random, so the gain is seen."""
    import numpy as np

    from gptforge.pipeline.sampler import LengthGroupedSampler, padding_fraction

    size = train.batch_size
    grouped = LengthGroupedSampler(lengths, size, train.seed).batches(0)
    perm = np.random.default_rng(train.seed).permutation(len(lengths))
    shuffled = [perm[i : i + size] for i in range(0, len(perm), size)]
    if show:
        print(
            f"data.group_by_length: padding is {padding_fraction(lengths, grouped):.1%} of batch tokens "
            f"(random batches: {padding_fraction(lengths, shuffled):.1%})",
            file=sys.stderr,
        )


# -- instruction tuning -----------------------------------------------------------------------------


def run_instruct(cfg: InstructConfig) -> RunResult:
    """Causal LM on prompts formatted by a prompt style; saves prompt_style.json beside the model."""
    from gptforge.tasks.instruct import (
        InstructionCollator,
        PackedInstructionCollator,
        PackedRows,
        get_prompt_style,
        load_splits,
        tokenize_instruction,
    )

    validate(cfg)
    d = cfg.data
    style = get_prompt_style(d.prompt_style)
    trainer = Trainer(cfg.train, kind="lm")
    model = build_model(cfg.model)
    if model.is_classifier:
        raise ConfigError(
            f"model.init={cfg.model.init} is a classifier; instruction tuning needs a language model"
        )
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    max_len = _check_context("data.max_length", d.max_length or model.cfg.context_length, model)
    with trainer.main_process_first():
        dsd = load_splits(d, seed=cfg.train.seed)
        tok = tokenize_instruction(dsd, style, max_length=max_len)
        tok = tok.select_columns(["input_ids", "prompt_length"])
    collate = InstructionCollator(
        pad_token_id=model.cfg.eos_token_id,
        ignore_index=IGNORE_INDEX,
        allowed_max_length=max_len,
        mask_prompt=d.mask_prompt,
    )
    train_ds, train_collate = tok["train"], collate
    run_config = _run_config("instruct", cfg, model)
    if d.packing:  # training rows only; evaluation keeps one record a row (its losses are the same)
        train_ds = PackedRows(train_ds, capacity=max_len, seed=cfg.train.seed)
        train_collate = PackedInstructionCollator(
            pad_token_id=model.cfg.eos_token_id, ignore_index=IGNORE_INDEX, mask_prompt=d.mask_prompt
        )
        run_config["packed_rows"] = len(train_ds)
        if trainer.is_main:
            print(
                f"packing: {len(tok['train'])} records into {len(train_ds)} rows of <= {max_len} tokens "
                f"({train_ds.fill():.1%} filled)",
                file=sys.stderr,
            )
    return trainer.fit(
        model,
        train_ds,
        train_collate,
        tok["validation"] if len(tok["validation"]) else None,
        final_eval={"test": tok["test"]} if len(tok["test"]) else None,
        run_config=run_config,
        metadata={"prompt_style.json": style.to_dict()},
        eval_collate_fn=collate,
    )


# -- preference tuning ------------------------------------------------------------------------------


class DPOTrainer(Trainer):
    """The Trainer with the DPO loss: the loss is a mean over pairs, and every step and evaluation also
    reports the implicit rewards (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `rewards/accuracy`: the share of pairs whose chosen reward is higher)."""

    def __init__(self, cfg, loss: DPOLossConfig, lora: bool = False) -> None:
        super().__init__(cfg, kind="dpo")
        self.loss_cfg, self.lora = loss, lora

    def _pairs(self, model, batch):
        from gptforge.model.lora import adapters_disabled
        from gptforge.tasks.dpo import batch_loss

        c = self.loss_cfg
        ref = (lambda: adapters_disabled(model)) if self.lora else None
        return batch_loss(
            model, batch, beta=c.beta, loss=c.loss, label_smoothing=c.label_smoothing, reference=ref
        )

    @staticmethod
    def _reward_stats(chosen, rejected) -> dict:
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracy": (chosen > rejected).float(),
        }

    def compute_loss(self, model, batch):
        losses, chosen, rejected = self._pairs(model, batch)
        for k, v in self._reward_stats(chosen, rejected).items():
            self.step_stats[k] = self.step_stats.get(k, 0.0) + v.sum()
        return losses.sum()

    def count_targets(self, batch):
        return batch["input_ids"].shape[0] // 2  # pairs

    def example_stats(self, model, batch):
        losses, chosen, rejected = self._pairs(model, batch)
        return {
            "loss": losses.float(),
            "count": torch.ones_like(losses),
            **self._reward_stats(chosen, rejected),
        }


def run_dpo(cfg: DPOConfig) -> RunResult:
    """Preference tuning (DPO) of an instruction model; the reference is the model it starts from."""
    from gptforge.model.checkpoint import read_metadata
    from gptforge.tasks.dpo import (
        PreferenceCollator,
        add_reference_logps,
        disable_dropout,
        load_splits,
        tokenize_preference,
    )
    from gptforge.tasks.instruct import get_prompt_style

    validate(cfg)
    d = cfg.data
    trainer = DPOTrainer(cfg.train, cfg.dpo, lora=cfg.lora.enabled)
    model = build_model(cfg.model)
    if model.is_classifier:
        raise ConfigError(
            f"model.init={cfg.model.init} is a classifier; DPO needs a language model "
            "(an instruction model, e.g. the instruct stage's)"
        )
    init = Path(cfg.model.init).expanduser()
    saved = read_metadata(init, "prompt_style.json") if init.is_dir() else None
    style = get_prompt_style(d.prompt_style or saved or "alpaca")
    if cfg.dpo.disable_dropout:
        disable_dropout(model)
    max_len = _check_context("data.max_length", d.max_length or model.cfg.context_length, model)
    with trainer.main_process_first():
        dsd = load_splits(d, seed=cfg.train.seed)
        tok = tokenize_preference(dsd, style, max_length=max_len)
        tok = tok.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        if not cfg.lora.enabled:  # the frozen reference, once; LoRA: the base, adapters off, per batch
            model.to(trainer.accelerator.device)
            tok = add_reference_logps(tok, model, cfg.train.batch_size, trainer.accelerator.device)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    run_config = _run_config("dpo", cfg, model)
    run_config.update(
        prompt_style=style.name, reference="base, adapters off" if cfg.lora.enabled else "precomputed"
    )
    return trainer.fit(
        model,
        tok["train"],
        PreferenceCollator(pad_token_id=model.cfg.eos_token_id),
        tok["validation"] if len(tok["validation"]) else None,
        final_eval={k: tok[k] for k in ("train", "test") if len(tok[k])},
        run_config=run_config,
        metadata={"prompt_style.json": style.to_dict()},
    )


TASKS = {"pretrain": run_pretrain, "classify": run_classify, "instruct": run_instruct, "dpo": run_dpo}


def train(task: str, cfg: Any) -> RunResult:
    """Run one task by name (the pipeline runner's entry point)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return TASKS[task](copy.deepcopy(cfg))
