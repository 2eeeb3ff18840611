"""The model card (README.md) of an exported model: what it is, how big, how well it did, how to load it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gptforge import __version__
from gptforge.model.gpt import GPT


def _flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def model_card(
    model: GPT,
    metrics: Mapping | None = None,
    prompt_style: Mapping | None = None,
    max_diff: float | None = None,
    tolerance: tuple[float, float] | None = None,
) -> str:
    """README.md for the export: what it is, how big, how well it did, how to load it.

    `max_diff` is the largest logit difference the export's verification found (None: not verified),
    `tolerance` the (atol, rtol) it was held to, where given.
    """
    cfg = model.cfg
    tol = f"; tolerance {tolerance[0]} + {tolerance[1]} * |logit|" if tolerance else ""
    task = "text-classification" if cfg.num_labels else "text-generation"
    auto = "AutoModelForSequenceClassification" if cfg.num_labels else "AutoModelForCausalLM"
    rows = [
        ("architecture", "GPT2ForSequenceClassification" if cfg.num_labels else "GPT2LMHeadModel"),
        ("layers / heads / width", f"{cfg.n_layers} / {cfg.n_heads} / {cfg.emb_dim}"),
        ("MLP width", str(cfg.hidden_dim)),
        ("context length", str(cfg.context_length)),
        ("vocabulary", str(cfg.vocab_size)),
        ("activation", cfg.activation),
        ("tied embeddings", str(cfg.tie_embeddings)),
        ("qkv bias", str(cfg.qkv_bias)),
        ("parameters", f"{model.num_parameters():,}"),
    ]
    if cfg.num_labels:
        labels = cfg.labels()
        rows.append(("labels", ", ".join(f"{i}={labels[i]}" for i in sorted(labels))))
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {task}",
        "tags: [gpt2, gptforge]",
        "---",
        "",
        f"# GPT-2 {'classifier' if cfg.num_labels else 'language model'} (exported by gptforge {__version__})",
        "",
        "A GPT-2 trained with gptforge and exported to the standard `transformers` GPT-2 format. "
        + (
            f"The export was reloaded with `transformers` (eager attention, fp32) and its logits matched "
            f"gptforge's (largest difference {max_diff:.2g}{tol})."
            if max_diff is not None
            else "The export was not verified against gptforge."
        ),
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        for k, v in _flatten(metrics).items():
            shown = f"{v:.4g}" if isinstance(v, float) else str(v)
            lines.append(f"| {k} | {shown} |")
    if prompt_style:
        lines += [
            "",
            "## Prompt style",
            "",
            f"Prompts follow `prompt_style.json` ({prompt_style.get('name', '?')}).",
        ]
    example = (
        'print(pipe("This is a test message"))'
        if cfg.num_labels
        else 'print(pipe("Every effort moves you", max_new_tokens=20, do_sample=False))'
    )
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}, pipeline",
        "",
        'path = "."  # this directory',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        f"model = {auto}.from_pretrained(path)",
        f'pipe = pipeline("{task}", model=model, tokenizer=tokenizer)',
        example,
        "```",
        "",
    ]
    return "\n".join(lines)
