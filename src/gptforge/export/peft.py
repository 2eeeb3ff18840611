"""A PEFT adapter dir (adapter_config.json + adapter_model.safetensors), written and checked in `peft`.

The tensors and config come from `model.lora.to_peft`; `verify_peft` loads the dir with `peft` onto the
transformers base and compares logits with gptforge's adapted model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptforge.errors import ConversionError
from gptforge.io import atomic_dir, write_json
from gptforge.model.gpt import GPT
from gptforge.model.lora import to_peft


def export_peft(model: GPT, out_dir: str | os.PathLike, base_model_name_or_path: str | None) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors) atomically."""
    from safetensors.torch import save_file

    sd, adapter_config = to_peft(model)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", adapter_config)

    return atomic_dir(out_dir, write)


@torch.no_grad()
def verify_peft(
    model: GPT,
    peft_dir: str | os.PathLike,
    base_hf_dir: str | os.PathLike,
    atol: float = 1e-5,
    seq_len: int = 16,
) -> float:
    """Load `peft_dir` with peft onto the transformers model in `base_hf_dir`; compare logits with `model`.

    Returns the largest absolute difference; raises ConversionError when it exceeds `atol`.
    """
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    kw: dict = {"attn_implementation": "eager", "dtype": torch.float32}
    if model.is_classifier:
        hf = GPT2ForSequenceClassification.from_pretrained(
            str(base_hf_dir), num_labels=model.cfg.num_labels, pad_token_id=model.cfg.pad_token_id, **kw
        )
    else:
        hf = GPT2LMHeadModel.from_pretrained(str(base_hf_dir), **kw)
    peft_model = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    g = torch.Generator().manual_seed(0)
    T = min(seq_len, model.cfg.context_length)
    ids = torch.randint(0, model.cfg.vocab_size, (2, T), generator=g)
    ids[ids == model.cfg.pad_token_id] = 0  # no padding: both sides pool the last token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ours = model(ids.to(device)).float().cpu()
    model.train(was_training)
    theirs = peft_model(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > atol:
        raise ConversionError(f"{peft_dir}: peft logits differ from gptforge's by {diff:.3g} > {atol}")
    return diff
