"""A Hugging Face GPT-2 dir (weights, config, tokenizer, model card), written then verified.

`export` converts with `model.hf.to_hf`, saves what `transformers.AutoModelFor*.from_pretrained` and
`AutoTokenizer` expect, reloads the dir in `transformers` and compares logits and token ids before the
dir is renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from gptforge.errors import ConversionError
from gptforge.export.card import model_card
from gptforge.export.chat_template import chat_template_for
from gptforge.io import atomic_dir, write_json
from gptforge.model.checkpoint import state_dict_for_save, tensor_bytes
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.hf import to_hf
from gptforge.model.tokenizer import N_VOCAB, Tokenizer, save_hf_tokenizer

# Export check: |ours - theirs| <= atol + rtol * |theirs| (torch.allclose). The rtol term matters only for
# large logits: trained GPT-2s have logits near -100, where one fp32 rounding step is already ~1e-5.
VERIFY_ATOL = 1e-5
VERIFY_RTOL = 1e-5


def _verify_inputs(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed token ids (never the pad id) and a mask; the second row is right-padded for classifiers."""
    T = min(cfg.context_length, 12)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    if 0 <= cfg.pad_token_id < cfg.vocab_size and cfg.vocab_size > 1:
        ids[ids == cfg.pad_token_id] = (cfg.pad_token_id + 1) % cfg.vocab_size
    mask = torch.ones_like(ids)
    if cfg.num_labels and T > 1:
        n_pad = max(1, T // 3)
        ids[1, T - n_pad :] = cfg.pad_token_id
        mask[1, T - n_pad :] = 0
    return ids, mask


def verify_export(
    path: str | os.PathLike, model: GPT, atol: float = VERIFY_ATOL, rtol: float = VERIFY_RTOL
) -> float:
    """Reload an export with transformers (eager, fp32) and compare logits and token ids with gptforge.

    Returns the largest absolute logit difference; a mismatch raises ConversionError.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = model.cfg
    auto = AutoModelForSequenceClassification if cfg.num_labels else AutoModelForCausalLM
    try:
        hf = auto.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", dtype=torch.float32
        ).eval()
    except Exception as e:
        raise ConversionError(
            f"{path}: transformers cannot load the export ({type(e).__name__}: {e})"
        ) from None
    ids, mask = _verify_inputs(cfg)
    ref = _fp32_cpu(model)
    with torch.no_grad():
        ours = ref(ids, attention_mask=mask if cfg.num_labels else None)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    if ours.shape != theirs.shape:
        raise ConversionError(f"{path}: logits shape {tuple(theirs.shape)} != gptforge's {tuple(ours.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not torch.allclose(ours, theirs, atol=atol, rtol=rtol):
        raise ConversionError(
            f"{path}: exported logits differ from gptforge's by up to {diff:.3g} (tolerance {atol} + "
            f"{rtol} * |logit|); the export is not exact"
        )
    if (Path(path) / "tokenizer.json").is_file():
        text = "Hello, world! GPT-2 exports stay exact.<|endoftext|> 12345"
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if tok(text)["input_ids"] != Tokenizer().encode(text):
            raise ConversionError(f"{path}: the exported tokenizer's ids differ from gptforge's tokenizer")
    return diff


def _fp32_cpu(model: GPT) -> GPT:
    """The model itself when already CPU fp32 in eval mode, else a CPU fp32 eval copy (user's model untouched)."""
    params = list(model.parameters())
    if not model.training and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    with torch.device("meta"):
        ref = GPT(model.cfg)
    ref.to_empty(device="cpu")
    if model.cfg.tie_embeddings:
        ref.lm_head.weight = ref.tok_emb.weight
    ref.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    return ref.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> tuple[tuple[str, bytes], ...]:
    """The HF tokenizer files, built once per process (building them takes about a second)."""
    with tempfile.TemporaryDirectory() as d:
        save_hf_tokenizer(d)
        return tuple((f.name, f.read_bytes()) for f in sorted(Path(d).iterdir()) if f.is_file())


def write_tokenizer(out_dir: Path, context_length: int, chat_template: str | None = None) -> None:
    """GPT-2 tokenizer files, with the model's context length as the limit pipelines truncate to, and a
    language model's chat template (`export.chat_template`), so runtimes chat in its prompt style."""
    for name, data in _tokenizer_files():
        if name == "tokenizer_config.json":
            tok_cfg = json.loads(data)
            tok_cfg["model_max_length"] = context_length
            if chat_template is not None:
                tok_cfg["chat_template"] = chat_template
            data = (json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        (out_dir / name).write_bytes(data)


def is_nonempty_dir(p: Path) -> bool:
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


def export(
    model: GPT,
    out_dir: str | os.PathLike,
    *,
    metrics: dict | None = None,
    prompt_style: dict | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a Hugging Face model dir (weights, config, tokenizer, card), verified by reloading it.

    The dir is built and checked in a sibling temp dir and renamed into place only when it passed,
    so a failed export leaves no trace and an existing dir is never half-overwritten.
    """
    out = Path(out_dir)
    if is_nonempty_dir(out) and not overwrite:
        raise ConversionError(
            f"{out} already exists and is not empty; pass overwrite=True (CLI: --overwrite)"
        )
    cfg = model.cfg
    if cfg.num_labels and not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise ConversionError(
            f"model.pad_token_id={cfg.pad_token_id} is outside vocab_size={cfg.vocab_size}; a classifier "
            "pads with it, so set pad_token_id to a token id of the vocabulary"
        )
    if cfg.vocab_size < N_VOCAB:
        warnings.warn(
            f"vocab_size={cfg.vocab_size} is smaller than the GPT-2 tokenizer's {N_VOCAB} tokens; "
            "the exported tokenizer can produce ids the model does not have",
            stacklevel=2,
        )
    template = None if cfg.num_labels else chat_template_for(prompt_style)
    hf = to_hf(model, copy=False)

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))
        write_tokenizer(tmp, cfg.context_length, template)
        if prompt_style:
            write_json(tmp / "prompt_style.json", prompt_style)
        diff = verify_export(tmp, model) if verify else None
        card = model_card(model, metrics, prompt_style, diff, tolerance=(VERIFY_ATOL, VERIFY_RTOL))
        (tmp / "README.md").write_text(card, encoding="utf-8")

    need = tensor_bytes(state_dict_for_save(model)) + 4 * 2**20  # weights + tokenizer files and card
    return atomic_dir(out, write, overwrite=True, need_bytes=need)
