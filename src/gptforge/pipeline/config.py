"""Typed training configs: dataclasses filled from YAML files and command-line overrides (jsonargparse).

One config per task (`PretrainConfig`, `ClassifyConfig`, `InstructConfig`), each with `model`, `data`
and `train` sections. The task defaults follow the reference recipes (rasbt/LLMs-from-scratch ch05-ch07),
so `gptforge finetune classify` with no options reproduces the book's run. `parse_config` turns any
parse problem (unknown key, wrong type, missing file) into one `ConfigError` line with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError
from gptforge.model.lora import LoRAConfig
from gptforge.pipeline.judge import JudgeConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
TRAIN_POLICIES = "all | head | last_blocks:N"


@dataclass
class ModelConfig:
    """Where the weights start."""

    init: str = "scratch"
    """`scratch`, a gptforge checkpoint dir, or a Hugging Face GPT-2 (local dir or hub id)."""
    preset: str = "cpu-tiny"
    """GPTConfig preset for `init: scratch` (gpt2, cpu-small, cpu-tiny, test-tiny, ...)."""
    context_length: int | None = None
    """Scratch only: overrides the preset's context length."""
    emb_dim: int | None = None
    """Scratch only: overrides the preset's embedding size."""
    n_layers: int | None = None
    """Scratch only: overrides the preset's number of blocks."""
    n_heads: int | None = None
    """Scratch only: overrides the preset's number of attention heads."""
    dropout: float | None = None
    """Scratch only: dropout rate (the preset default is 0)."""


@dataclass
class TrainConfig:
    """The optimisation loop, shared by every task. `batch_size` is per process and per micro-batch."""

    out_dir: str = "runs/train"
    """Run directory: checkpoints/, final/ (the gptforge checkpoint), metrics.jsonl, loss.png, run.json."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (also sets the schedule's length)."""
    batch_size: int = 8
    """Examples per micro-batch and process; the global batch is batch_size * grad_accum * processes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all target tokens of the window."""
    drop_last: bool = True
    """Drop the last incomplete optimizer step of each epoch (the reference recipes do)."""
    lr: float = 4e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to biases, LayerNorms or embeddings."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    mixed_precision: str = "no"
    """no, bf16 (autocast; also on CPU) or fp16 (CUDA only, with a loss scaler)."""
    compile: bool = False
    """torch.compile the model (Accelerate's dynamo backend, inductor)."""
    seed: int = 123
    """One seed for weights init, data order, dropout and splits."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: at the end of each epoch)."""
    eval_batches: int | None = None
    """Batches per evaluation (null: the whole validation set)."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: at the end of each epoch)."""
    keep_last: int = 2
    """Resumable checkpoints to keep (the best one by val_loss is kept as well)."""
    resume: str | None = None
    """`auto` (latest checkpoint in out_dir, if any) or a checkpoint dir."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimizer steps."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to (tensorboard, wandb, mlflow, ...), when installed."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""
    plot: bool = True
    """Write loss.png (training and validation loss curves) at the end."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "save_every", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 1 (or null for whole epochs)")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches={self.eval_batches} must be >= 1 (or null for all)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be > 0 (or null for no clipping)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("train.schedule", self.schedule, SCHEDULES)


@dataclass
class PretrainTrainConfig(TrainConfig):
    """Pretraining defaults: the book's ch05 run (AdamW 4e-4, wd 0.1, 10 epochs, batch 2) plus warmup+cosine."""

    out_dir: str = "runs/pretrain"
    epochs: int = 10
    batch_size: int = 2
    lr: float = 4e-4


@dataclass
class ClassifyTrainConfig(TrainConfig):
    """Classification defaults: the book's ch06 recipe (AdamW 5e-5, wd 0.1, 5 epochs, batch 8, eval every 50)."""

    out_dir: str = "runs/classify"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    schedule: str = "constant"
    grad_clip: float | None = None
    eval_every: int = 50
    eval_batches: int | None = 5


@dataclass
class InstructTrainConfig(TrainConfig):
    """Instruction defaults: the book's ch07 recipe (AdamW 5e-5, wd 0.1, 2 epochs, batch 8, eval every 5)."""

    out_dir: str = "runs/instruct"
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-5
    schedule: str = "constant"
    grad_clip: float | None = None
    eval_every: int = 5
    eval_batches: int | None = 5


@dataclass
class PretrainDataConfig:
    """Text corpora packed into blocks of context_length + 1 tokens."""

    sources: list[str] = field(default_factory=lambda: ["the-verdict"])
    """Corpus names (the-verdict, tinyshakespeare, sms_spam:unlabeled, instruction:train) or paths/globs."""
    context_length: int | None = None
    """Tokens per block (null: the model's context length)."""
    stride: int | None = None
    """Step between block starts (null: context_length, no overlap)."""
    val_fraction: float = 0.1
    """Share of the token stream held out (its tail) for validation."""
    target_fraction: float = 1.0
    """Train on a random share of next-token targets (validation scores all): cheaper steps for small models."""


@dataclass
class ClassifyDataConfig:
    """Labelled text: the SMS spam set or a CSV/TSV/JSON(L) file of your own."""

    dataset: str = "sms_spam"
    """`sms_spam` or a path to a labelled file."""
    split: str = "book"
    """sms_spam only: `book` (the reference's balanced 1045/149/300 split) or `stratified`."""
    text_column: str = "text"
    """Custom files: the column with the text."""
    label_column: str = "label"
    """Custom files: the column with the class name or id."""
    max_length: int | None = None
    """Truncate/pad to this many tokens (null: the longest training example, capped at the context)."""
    limit: int | None = None
    """Use only the first N examples of each split (quick runs, tests)."""


@dataclass
class InstructDataConfig:
    """Instruction/response records formatted with a prompt style."""

    dataset: str = "instruction"
    """`instruction` (the book's 1,100 records) or a path to a JSON/JSONL file."""
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    prompt_style: str = "alpaca"
    """How records become prompts (saved as prompt_style.json beside the model)."""
    max_length: int | None = None
    """Truncate each padded example to this many tokens (null: the model's context length, 1024 for GPT-2)."""
    mask_prompt: bool = False
    """Compute the loss on the response tokens only."""
    limit: int | None = None
    """Use only the first N examples of each split (quick runs, tests)."""


@dataclass
class PretrainConfig:
    """`gptforge pretrain`: next-token loss on packed text, from scratch or from a checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)


@dataclass
class ClassifyConfig:
    """`gptforge finetune classify`: a classification head on a (pre)trained GPT."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="gpt2"))
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)
    trainable: str = "last_blocks:1"
    """What is trained: all, head, or last_blocks:N (the last N blocks + final LayerNorm + head)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (lora.r > 0 turns them on and replaces `trainable`: base frozen, adapters + head train)."""


@dataclass
class InstructConfig:
    """`gptforge finetune instruct`: causal LM on formatted instruction prompts."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="gpt2"))
    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    train: InstructTrainConfig = field(default_factory=InstructTrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (lora.r > 0 turns them on: base frozen, only the adapters train)."""


@dataclass
class EvaluateDataConfig:
    """Which data an evaluation reads (null: what the checkpoint's run.json recorded, else the task's own)."""

    dataset: str | None = None
    """Data set name or file (classify: sms_spam or a labelled file; instruct: instruction or a JSON/JSONL)."""
    text_column: str | None = None
    """Classification files: the text column."""
    label_column: str | None = None
    """Classification files: the label column."""
    max_length: int | None = None
    """Classification: truncate texts to this many tokens."""
    test_sources: list[str] | None = None
    """Pretrain: held-out text file(s) scored as the `test` split."""
    prompt_style: str | None = None
    """Instruct: override the checkpoint's prompt style (alpaca, phi3)."""
    limit: int | None = None
    """Only the first N examples of each split (quick checks)."""


@dataclass
class EvaluateConfig:
    """`gptforge evaluate`: score a checkpoint on its task's data, or a responses file without a model.

    Shared by the verb and the pipeline's evaluate stage (which fills `checkpoint` and `out` itself).
    """

    checkpoint: str | None = None
    """gptforge checkpoint directory (or give `responses`)."""
    responses: str | None = None
    """Score this JSON list of records with `output` and a response field, without a model."""
    response_key: str = "model_response"
    """The response field of a responses file."""
    task: str | None = None
    """pretrain, classify or instruct (null: from the checkpoint: classifier, prompt style, else LM)."""
    data: EvaluateDataConfig = field(default_factory=EvaluateDataConfig)
    splits: list[str] | None = None
    """Splits to score (null: validation,test for pretrain; train,validation,test for classify; test for instruct)."""
    out: str | None = None
    """Output directory (null: eval/<checkpoint or responses file name>)."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_new_tokens: int = 256
    """Instruct: tokens generated per response."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps (null: the best available)."""
    use_stemmer: bool = False
    """ROUGE with the Porter stemmer."""
    progress: bool = True
    """Show progress bars."""
    judge: JudgeConfig | None = None
    """An LLM judge for instruction responses (null: no judge)."""


TASK_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "classify": ClassifyConfig,
    "instruct": InstructConfig,
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(choices)}"
        raise ConfigError(f"{name}={value!r} is not valid; {hint}")


def parse_trainable(policy: str) -> tuple[str, int]:
    """`all` -> ("all", 0); `head` -> ("head", 0); `last_blocks:N` -> ("last_blocks", N)."""
    if policy in ("all", "head"):
        return policy, 0
    m = re.fullmatch(r"last_blocks:(\d+)", policy)
    if m and int(m.group(1)) >= 1:
        return "last_blocks", int(m.group(1))
    raise ConfigError(f"trainable={policy!r} is not valid; use {TRAIN_POLICIES} (e.g. last_blocks:1)")


def validate(cfg: Any) -> Any:
    """Check cross-field rules the types cannot express; returns `cfg`."""
    cfg.train.validate()
    m = cfg.model
    for name in ("context_length", "emb_dim", "n_layers", "n_heads"):
        v = getattr(m, name)
        if v is not None and v < 1:
            raise ConfigError(f"model.{name}={v} must be >= 1")
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        lora.validate()
        if lora.enabled and m.init == "scratch":
            raise ConfigError(
                "lora.r > 0 needs a pretrained base: set model.init (e.g. gpt2 or a checkpoint dir)"
            )
    if isinstance(cfg, ClassifyConfig):
        parse_trainable(cfg.trainable)
        if cfg.data.limit is not None and cfg.data.limit < 1:
            raise ConfigError(f"data.limit={cfg.data.limit} must be >= 1")
    if isinstance(cfg, PretrainConfig):
        if not 0.0 < cfg.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
        if not cfg.data.sources:
            raise ConfigError("data.sources is empty; give at least one corpus name or path")
        if not 0.0 < cfg.data.target_fraction <= 1.0:
            raise ConfigError(f"data.target_fraction={cfg.data.target_fraction} must be in (0, 1]")
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict of a config (what run.json records)."""
    return dataclasses.asdict(cfg)


# -- parsing ------------------------------------------------------------------------------------------


def build_parser(task: str, prog: str | None = None):
    """The jsonargparse parser of a task: `--config FILE.yaml`, then `--section.field value` overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help text
    cls = TASK_CONFIGS[task]
    parser = ArgumentParser(
        prog=prog or f"gptforge {task}",
        description=(cls.__doc__ or "").strip(),
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with model/data/train sections")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    task_defaults = cls()  # e.g. classify starts from model.init=gpt2, not ModelConfig's own scratch
    for f in dataclasses.fields(cls):
        sub = _field_type(cls, f.name)
        if dataclasses.is_dataclass(sub):
            parser.add_class_arguments(sub, f.name, default=None)
            own = dataclasses.asdict(getattr(task_defaults, f.name))
            parser.set_defaults({f"{f.name}.{k}": v for k, v in own.items()})
        else:
            parser.add_argument(f"--{f.name}", type=sub, default=f.default, help=_attr_doc(cls, f.name))
    return parser


def _field_type(cls: type, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


def _attr_doc(cls: type, name: str) -> str | None:
    # Field docstrings are parsed by jsonargparse for the nested dataclasses; top-level ones are few.
    return {"trainable": f"what is trained: {TRAIN_POLICIES}"}.get(name)


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f.name)
        if dataclasses.is_dataclass(t):
            keys += _known_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _friendly(task: str, err: Exception, argv: list[str] | None = None) -> ConfigError:
    """One line naming the bad key or value (and the YAML file it came from), with the closest known key."""
    msg = " ".join(str(err).split())
    argv = argv or []
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]

    def where(key: str) -> str:
        # a key that is not on the command line came from a --config file
        on_cli = any(a.lstrip("-").split("=", 1)[0].replace("-", "_") == key for a in argv)
        return f"{', '.join(files)}: " if files and not on_cli else ""

    known = _known_keys(TASK_CONFIGS[task])
    bad = None
    m = re.search(r"unrecognized arguments: (--?[\w.\-]+)", msg)
    if m:
        bad = m.group(1).lstrip("-").replace("-", "_")
    m = m or re.search(r"Group '([\w.]+)' does not accept (?:option|nested key) '([\w.\-]+)'", msg)
    if m and bad is None:
        bad = f"{m.group(1)}.{m.group(2)}"
    m2 = re.search(r"[Kk]ey ['\"]([\w.\-]+)['\"] is not expected", msg)
    if m2 and bad is None:
        bad = m2.group(1)
    if bad is not None:
        close = difflib.get_close_matches(bad, known, n=1, cutoff=0.5)
        if not close:  # a misspelt section: compare the last part only
            tail = bad.rsplit(".", 1)[-1]
            close = [k for k in known if k.rsplit(".", 1)[-1] == tail][:1]
        hint = f"did you mean {close[0]!r}?" if close else "see --help for the known keys"
        return ConfigError(f"{where(bad)}unknown config key {bad!r}; {hint}")
    m = re.search(r'[Pp]arser key "([\w.]+)": (.*)', msg)
    if m:
        detail = re.sub(r"<class '(\w+)'>", r"\1", m.group(2))
        return ConfigError(f"{where(m.group(1))}{m.group(1)}: {detail}")
    return ConfigError(msg)


def parse_config(task: str, argv: list[str]) -> tuple[Any, bool]:
    """Parse `argv` into the task's config dataclass; returns (config, print_config_requested)."""
    import argparse
    import warnings

    from jsonargparse import Namespace

    parser = build_parser(task)
    # `--resume auto|PATH` is short for `--train.resume auto|PATH`
    argv = [
        "--train.resume" if a == "--resume" else "--train.resume=" + a[9:] if a.startswith("--resume=") else a
        for a in argv
    ]
    for i, a in enumerate(argv):  # a missing --config file gets its path in the message
        if a == "--config" and i + 1 < len(argv) and not Path(argv[i + 1]).is_file():
            raise ConfigError(f"--config {argv[i + 1]}: file not found")
        if a.startswith("--config=") and not Path(a.split("=", 1)[1]).is_file():
            raise ConfigError(f"--config {a.split('=', 1)[1]}: file not found")
    try:
        ns = parser.parse_args(argv)
    except (argparse.ArgumentError, ValueError, TypeError) as e:
        raise _friendly(task, e, argv) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            init = (
                parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
            )
    except (ValueError, TypeError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    cls = TASK_CONFIGS[task]
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = init[f.name] if isinstance(init, Namespace) else getattr(init, f.name)
        kwargs[f.name] = v
    cfg = cls(**kwargs)
    return validate(cfg), bool(ns.get("print_config"))


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML (what `--print-config` shows and `--config` accepts)."""
    import yaml

    return yaml.safe_dump(_yaml_safe(to_dict(cfg)), sort_keys=False)


def _yaml_safe(obj):
    if isinstance(obj, dict):
        return {k: _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_safe(v) for v in obj]
    return obj


def load_config(task: str, path: str | Path | None = None, **overrides: Any) -> Any:
    """Build a task config in Python (the runner's way): optional YAML file, then dotted overrides.

    `load_config("classify", "c.yaml", **{"train.lr": 1e-4})`.
    """
    argv: list[str] = []
    if path is not None:
        argv += ["--config", str(path)]
    for k, v in overrides.items():
        import json

        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    cfg, _ = parse_config(task, argv)
    return cfg
