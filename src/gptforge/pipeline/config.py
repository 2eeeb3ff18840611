"""Typed configs for every verb and pipeline stage, filled from YAML files and command-line flags.

One config per task (`PretrainConfig`, `ClassifyConfig`, `InstructConfig`, each with `model`, `data` and
`train` sections) and one per verb (`EvaluateConfig`, `ExportConfig`, `GenerateConfig`, ...). The task
defaults follow the reference recipes (rasbt/LLMs-from-scratch ch05-ch07), so `gptforge finetune classify`
with no options reproduces the book's run. A pipeline stage section is the verb's config less what the
runner fills (`RUNNER_FILLED`), plus `models`.

Every source (a `--config` file, flags, a stage section, `--set`, `quick:`) becomes a mapping that
`config_from_mapping` validates through `gptforge.schema.from_dict`: one error path, one line, exact keys.
Field docstrings are the `--help` text; the command line itself (flags, `--help`, `--print-config`) is
`pipeline.cli_args`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError
from gptforge.model.lora import LoRAConfig
from gptforge.pipeline.judge import JudgeConfig
from gptforge.schema import (
    from_dict,
    known_keys,
    leaf_keys,
    load_yaml_mapping,
    set_dotted,
    suggest,
    type_at,
)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
DISTRIBUTED = ("auto", "ddp", "fsdp")
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
    mixed_precision: str = "auto"
    """auto, no, bf16 (autocast; also on CPU) or fp16 (CUDA only, with a loss scaler). auto: bf16 on a GPU
    with native bf16 (compute capability 8.0+), else no; run.json and the stage key record the result."""
    compile: bool | str = "auto"
    """true, false or auto: torch.compile the model (Accelerate's dynamo backend, inductor). auto: on a GPU
    with native bf16, off on CPU (a cold compile costs minutes there); recorded resolved like mixed_precision."""
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
    """Write a metrics.jsonl line every N optimizer steps: loss, grad_norm and step stats are the means over
    those N steps, kept on the device in between (on a GPU, 10 or more lets steps run without waiting)."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to (tensorboard, wandb, mlflow, ...), when installed."""
    num_workers: int = 0
    """DataLoader worker processes."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    distributed: str = "auto"
    """Several processes: ddp (each holds the whole model), fsdp (FSDP2: weights, gradients and optimizer
    state sharded across processes) or auto (fsdp under `accelerate launch` with an FSDP config, else ddp)."""
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
        if isinstance(self.compile, str) and self.compile != "auto":
            raise ConfigError(f"train.compile={self.compile!r} is not valid; use true, false or auto")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.distributed", self.distributed, DISTRIBUTED)

    def resolve(self) -> None:
        """Replace `auto` in mixed_precision and compile by what this machine gets, so that run.json and
        the pipeline's stage key say what actually ran (a GPU run and a CPU run are different runs)."""
        if self.mixed_precision != "auto" and self.compile != "auto":
            return
        from gptforge.machine import auto_precision

        precision, compile_ = auto_precision(cpu=self.cpu)
        if self.mixed_precision == "auto":
            self.mixed_precision = precision
        if self.compile == "auto":
            self.compile = compile_


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
class DPOTrainConfig(TrainConfig):
    """DPO defaults: the book's ch07 DPO notebook (AdamW 5e-6, 1 epoch, batch 8), evaluated every 10 steps."""

    out_dir: str = "runs/dpo"
    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-6
    weight_decay: float = 0.01
    schedule: str = "constant"
    grad_clip: float | None = None
    eval_every: int = 10
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
    group_by_length: bool = False
    """Train on batches of similar length (sorted within seeded groups of 50 batches, batch order shuffled):
    less padding per batch. Off keeps the reference's random batches."""


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
    packing: bool = False
    """Pack several training records into each row of up to max_length tokens (best-fit decreasing), with
    attention blocked between records and positions restarting at each: no compute spent on padding, the
    same loss per record. train.batch_size then counts packed rows, and steps per epoch follow the rows."""
    limit: int | None = None
    """Use only the first N examples of each split (quick runs, tests)."""


@dataclass
class DPODataConfig:
    """Preference pairs: a prompt (instruction + input, or one prompt column), a chosen and a rejected response."""

    dataset: str = "instruction-preference"
    """`instruction-preference` (the book's 1,100 records with chosen/rejected) or a JSON/JSONL file."""
    prompt_column: str | None = None
    """A column holding the whole prompt (replaces instruction + input; null: use those)."""
    instruction_column: str = "instruction"
    input_column: str = "input"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    prompt_style: str | None = None
    """How prompts are formatted (null: the init checkpoint's prompt_style.json, else alpaca)."""
    max_length: int | None = None
    """Tokens of prompt + response; longer responses are cut (null: the model's context length)."""
    drop_identical: bool | None = None
    """Drop pairs whose chosen and rejected are equal (null: only for instruction-preference, 6 such pairs)."""
    limit: int | None = None
    """Use only the first N pairs of each split (quick runs, tests)."""


@dataclass
class DPOLossConfig:
    """The preference loss."""

    beta: float = 0.1
    """Strength of the pull towards the reference model (the implicit reward's scale)."""
    loss: str = "sigmoid"
    """sigmoid (the DPO paper's), robust (unbiased under label noise, rDPO) or ipo."""
    label_smoothing: float = 0.0
    """sigmoid (cDPO) and robust: the assumed share of flipped preferences, in [0, 0.5)."""
    disable_dropout: bool = True
    """Turn the policy's dropout off, so its log-probs start equal to the reference's (as TRL does)."""


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
class DPOConfig:
    """`gptforge finetune dpo`: preference tuning of an instruction model (direct preference optimisation)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="gpt2"))
    data: DPODataConfig = field(default_factory=DPODataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (lora.r > 0: only the adapters train; the reference is the base with adapters off)."""


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
    """pretrain, classify, instruct or dpo (null: from the checkpoint: classifier, DPO run, prompt style, else LM)."""
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


@dataclass
class ClassifyTextsConfig:
    """`gptforge classify`: label texts with a classifier checkpoint (label, probability and text per line)."""

    checkpoint: str | None = None
    """gptforge classifier checkpoint directory."""
    texts: list[str] = field(default_factory=list, metadata={"split": False})
    """Texts to classify (positional arguments after the checkpoint)."""
    file: str | None = None
    """One text per line, or a .csv/.tsv/.json/.jsonl file read by `column`."""
    column: str | None = None
    """The text column of `file` (null: text)."""
    json: bool = False
    """Print one JSON object per text, with every class's probability."""
    out: str | None = None
    """Also write the results as JSONL to this file."""
    max_length: int | None = None
    """Truncate texts to this many tokens (null: the model's context)."""
    batch_size: int = 16
    """Texts per forward pass."""
    device: str | None = None
    """cpu, cuda, cuda:1, mps (null: the best available)."""


@dataclass
class GGUFConfig:
    """A GGUF export's type and Modelfile."""

    quant: str = "f16"
    """f32, f16, bf16, q8_0 or q4_0 (norms, biases and the position embedding stay f32)."""
    ollama: bool = False
    """Also write an Ollama Modelfile beside the file (`ollama create NAME -f Modelfile`)."""

    def __post_init__(self) -> None:  # checked when the config is read: a pipeline fails before training
        _choice("gguf.quant", self.quant, GGUF_QUANTS)


GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")  # = gptforge.export.gguf.QUANTS (a test checks)


@dataclass
class ExportConfig:
    """`gptforge export`: a model as a Hugging Face dir (config, safetensors, tokenizer, card) or a GGUF file.

    Verified before it is moved into place: the HF dir reloaded in transformers, the GGUF run in llama.cpp
    (llama-cpp-python; else transformers' GGUF reader), logits compared. The pipeline's export stage shares it.
    """

    checkpoint: str | None = None
    """Model to export: a gptforge checkpoint dir, a LoRA run dir (merged first) or, for gguf, an HF GPT-2 dir."""
    out: str | None = None
    """Output directory (hf) or .gguf file (gguf)."""
    overwrite: bool = False
    """Replace an existing output."""
    verify: bool = True
    """Run the export (transformers / llama.cpp) and compare logits with the gptforge model."""
    formats: list[str] = field(default_factory=lambda: ["hf"])
    """hf (a Hugging Face dir) and/or gguf (one file for llama.cpp, Ollama, LM Studio); `--format` sets one."""
    gguf: GGUFConfig = field(default_factory=GGUFConfig)
    """The GGUF file (when formats lists gguf); `--quant` and `--ollama` set its keys."""
    license: str | None = None
    """License written into a GGUF file's general.license (e.g. mit); unset: none."""

    def __post_init__(self) -> None:
        for f in self.formats:
            _choice("format", f, EXPORT_FORMATS)


EXPORT_FORMATS = ("hf", "gguf")


@dataclass
class ConvertConfig:
    """`gptforge convert`: a Hugging Face GPT-2 (hub id or dir) into a gptforge checkpoint, or back.

    `to_hf` does what `gptforge export` does.
    """

    from_hf: str | None = None
    """Hub id (e.g. gpt2) or local Hugging Face model dir to convert into a gptforge checkpoint."""
    to_hf: str | None = None
    """gptforge checkpoint dir to export as a Hugging Face dir."""
    out: str | None = None
    """Output directory."""
    overwrite: bool = False
    """Replace a non-empty output directory."""


@dataclass
class GenerateConfig:
    """`gptforge generate`: continue prompts with a gptforge checkpoint. Greedy unless temperature > 0."""

    checkpoint: str | None = None
    """gptforge checkpoint directory (config.json + model.safetensors)."""
    prompts: list[str] = field(default_factory=list, metadata={"split": False})
    """Prompt texts (positional arguments after the checkpoint); several prompts run as one batch."""
    max_new_tokens: int = 50
    """Tokens generated per prompt."""
    temperature: float = 0.0
    """Sampling temperature (0: greedy)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches p."""
    seed: int | None = None
    """Seed for sampling (reproducible output)."""
    stop: list[str] | None = field(default=None, metadata={"split": False})
    """Stop strings (repeat --stop for several)."""
    eos: bool = True
    """Stop at <|endoftext|> (--no-eos: keep going)."""
    cache: bool = True
    """Use the KV cache (--no-cache: recompute the whole window each step; slow)."""
    batch_size: int | None = None
    """Prompts per batch (null: all at once)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (null: cuda if available)."""
    echo: bool = False
    """Print the prompt before its continuation."""
    json: bool = False
    """One JSON line per prompt: prompt, completion."""


@dataclass
class MergeConfig:
    """`gptforge merge`: fold a LoRA adapter into its base, or export it unmerged as a PEFT adapter."""

    adapter: str | None = None
    """Adapter checkpoint dir (adapter.json + adapter.safetensors)."""
    base: str | None = None
    """Base model dir (null: the base recorded in the adapter)."""
    out: str | None = None
    """Write the merged model as a gptforge checkpoint dir."""
    hf_out: str | None = None
    """Write the merged model as a Hugging Face dir (verified)."""
    peft_out: str | None = None
    """Write the unmerged adapter as a PEFT adapter dir."""
    peft_base: str | None = None
    """base_model_name_or_path recorded in the PEFT adapter: a transformers GPT-2 dir or hub id (null: `base`
    when it is a Hugging Face dir); a local dir is used to verify the logits."""


@dataclass
class ServeConfig:
    """`gptforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over a batching engine."""

    model: str | None = None
    """gptforge checkpoint dir, LoRA run's adapter dir, or Hugging Face GPT-2 dir."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port (0: any free port; uvicorn logs which)."""
    max_batch: int = 8
    """Requests decoded together in one forward pass."""
    max_queue: int = 32
    """Requests that may wait for a slot; beyond it the server answers 429 with Retry-After."""
    api_key: str | None = None
    """Bearer key clients must send (null: $GPTFORGE_API_KEY if set, else no key)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (null: cuda if available)."""
    name: str | None = None
    """Model id in /v1/models and responses (null: the model dir's name)."""


@dataclass
class InfoConfig:
    """`gptforge info`: presets, or one preset or checkpoint dir, with parameter counts and training memory.

    Memory is weights + gradients + AdamW's two moments, all in fp32 or all in bf16; activations come on top.
    """

    target: str | None = None
    """A preset name or a checkpoint directory (null: every preset)."""
    json: bool = False
    """Print JSON instead of a table."""


# -- the pipeline's stages: a verb's config, less what the runner fills, plus `models` --------------------


@dataclass
class EvaluateStageConfig(EvaluateConfig):
    """The pipeline's evaluate stage: `gptforge evaluate` for each trained model of the pipeline."""

    models: list[str] | None = None
    """Training stages to evaluate (null: every finetuned stage, else every trained one)."""


@dataclass
class ExportStageConfig(ExportConfig):
    """The pipeline's export stage: `gptforge export` for each trained model of the pipeline."""

    models: list[str] | None = None
    """Training stages to export (null: every finetuned stage, else every trained one)."""


TASK_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "classify": ClassifyConfig,
    "instruct": InstructConfig,
    "dpo": DPOConfig,
}

STAGE_CONFIGS: dict[str, type] = {
    **TASK_CONFIGS,
    "evaluate": EvaluateStageConfig,
    "export": ExportStageConfig,
}

# Keys of a stage's config that the runner sets itself; a pipeline file may not set them.
RUNNER_FILLED: dict[str, tuple[str, ...]] = {
    "pretrain": ("train.out_dir",),
    "classify": ("train.out_dir",),
    "instruct": ("train.out_dir",),
    "dpo": ("train.out_dir",),
    # per trained model: its checkpoint, its task and its output dir; a stage scores models, not files
    "evaluate": ("checkpoint", "out", "responses", "response_key", "task"),
    "export": ("checkpoint", "out", "overwrite"),
}


def stage_keys(stage: str) -> list[str]:
    """The dotted keys a pipeline stage section accepts (the verb's keys less RUNNER_FILLED, plus models)."""
    filled = RUNNER_FILLED[stage]
    return [k for k in known_keys(STAGE_CONFIGS[stage]) if k not in filled]


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


def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict of a config (what run.json records)."""
    return dataclasses.asdict(cfg)


def check_not_run_dir(name: str, value: str | None) -> None:
    """A run dir (`final/` or `checkpoints/` inside, no config.json) given where a checkpoint is expected."""
    if not value or value in ("scratch",):
        return
    p = Path(value)
    if p.is_dir() and not (p / "config.json").is_file():
        if (p / "final").is_dir() or (p / "checkpoints").is_dir():
            raise ConfigError(
                f"{name}={value}: a run directory, not a checkpoint; use its final checkpoint: {p / 'final'}"
            )


def validate(cfg: Any) -> Any:
    """Check cross-field rules the types cannot express; returns `cfg`."""
    if isinstance(cfg, EvaluateConfig):
        for name in ("batch_size", "max_new_tokens"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
        if cfg.data.limit is not None and cfg.data.limit < 1:
            raise ConfigError(f"data.limit={cfg.data.limit} must be >= 1")
        if cfg.task is not None:
            _choice("task", cfg.task, tuple(TASK_CONFIGS))
        check_not_run_dir("checkpoint", cfg.checkpoint)
        return cfg
    if isinstance(cfg, ServeConfig):
        check_not_run_dir("model", cfg.model)
        for name in ("max_batch", "max_queue", "port"):
            if getattr(cfg, name) < (1 if name == "max_batch" else 0):
                raise ConfigError(f"{name}={getattr(cfg, name)} must be >= {1 if name == 'max_batch' else 0}")
        return cfg
    if isinstance(cfg, (ClassifyTextsConfig, GenerateConfig, ExportConfig)):
        check_not_run_dir("checkpoint", cfg.checkpoint)
        if isinstance(getattr(cfg, "batch_size", None), int) and cfg.batch_size < 1:
            raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
        return cfg
    if not isinstance(cfg, tuple(TASK_CONFIGS.values())):
        return cfg
    cfg.train.validate()
    cfg.train.resolve()
    m = cfg.model
    check_not_run_dir("model.init", m.init)
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
    if isinstance(cfg, DPOConfig):
        _choice("dpo.loss", cfg.dpo.loss, ("sigmoid", "robust", "ipo"))
        if cfg.dpo.beta <= 0:
            raise ConfigError(f"dpo.beta={cfg.dpo.beta} must be > 0")
        if not 0.0 <= cfg.dpo.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={cfg.dpo.label_smoothing} must be in [0, 0.5)")
        if cfg.dpo.label_smoothing and cfg.dpo.loss == "ipo":
            raise ConfigError(
                "dpo.label_smoothing applies to dpo.loss sigmoid and robust, not ipo; set it to 0"
            )
        for name, low in (("limit", 1), ("max_length", 2)):
            v = getattr(cfg.data, name)
            if v is not None and v < low:
                raise ConfigError(f"data.{name}={v} must be >= {low}")
    if isinstance(cfg, PretrainConfig):
        if not 0.0 < cfg.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
        if not cfg.data.sources:
            raise ConfigError("data.sources is empty; give at least one corpus name or path")
        if not 0.0 < cfg.data.target_fraction <= 1.0:
            raise ConfigError(f"data.target_fraction={cfg.data.target_fraction} must be in (0, 1]")
    return cfg


def config_from_mapping(
    cls: type,
    mapping: dict,
    *,
    where: str | Callable[[str], str] | None = None,
    exclude: tuple[str, ...] = (),
) -> Any:
    """The one way a mapping (YAML file, stage section, --set/quick overrides, flags) becomes a config."""
    cfg = from_dict(cls, mapping, where=where, exclude=exclude)
    try:
        return validate(cfg)
    except ConfigError as e:  # cross-field rules name no source of their own: the config's is used
        prefix = where("") if callable(where) else (where or "")
        raise ConfigError(f"{prefix}{e}") from None


# -- mappings: where keys came from -----------------------------------------------------------------


def origin_lookup(origins: dict[str, str]) -> Callable[[str], str]:
    """Where a dotted key came from (`FILE: ` or '' for a flag), for error messages; a key's parents count."""

    def where(key: str) -> str:
        k = key.split("[", 1)[0]
        while k:
            if k in origins:
                return origins[k]
            k = k.rpartition(".")[0]
        return ""

    return where


def set_key(data: dict, key: str, value: Any) -> None:
    """`set_dotted`, replacing a section given a plain value earlier (e.g. `judge: null` in a file)."""
    try:
        set_dotted(data, key, value)
    except ConfigError:
        parent = key.rpartition(".")[0]
        set_dotted(data, parent, {})
        set_dotted(data, key, value)


def load_config(task: str, path: str | Path | None = None, **overrides: Any) -> Any:
    """Build a task config in Python: optional YAML file, then dotted overrides, through the one path.

    `load_config("classify", "c.yaml", **{"train.lr": 1e-4})`.
    """
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        data = load_yaml_mapping(path)
        origins = {k: f"{path}: " for k in leaf_keys(data)}
    for k, v in overrides.items():
        if type_at(TASK_CONFIGS[task], k) is None:
            raise ConfigError(f"unknown config key {k!r}; {suggest(k, known_keys(TASK_CONFIGS[task]))}")
        set_key(data, k, v)
        origins[k] = ""
    return config_from_mapping(TASK_CONFIGS[task], data, where=origin_lookup(origins))
