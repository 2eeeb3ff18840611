"""`gptforge merge`: fold a LoRA adapter into its base, or export it unmerged for PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.errors import ConfigError

# Files a merged checkpoint writes itself; other JSON metadata of the adapter dir is carried over.
_OWN_FILES = {"config.json", "adapter.json", "tokenizer.json", "labels.json"}


def _is_hf_dir(path: str | None) -> bool:
    if not path:
        return False
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "gpt2"
    except (OSError, json.JSONDecodeError):
        return False


def _probe_ids(vocab_size: int, context_length: int, pad_id: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, min(16, context_length)), generator=g)
    ids[ids == pad_id] = 0
    return ids


def merge(argv: list[str]) -> int:
    from gptforge.export.peft import export_peft, verify_peft
    from gptforge.model.checkpoint import save_checkpoint
    from gptforge.model.lora import describe_trainable, load_adapter, lora_config, merge_lora
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("merge", argv)
    if args is None:
        return 0
    if not args.adapter:
        raise ConfigError("give the adapter checkpoint dir (see `gptforge merge --help`)")
    if not (args.out or args.hf_out or args.peft_out):
        raise ConfigError("nothing to write: give --out DIR, --hf-out DIR and/or --peft-out DIR")
    model = load_adapter(args.adapter, base=args.base)
    cfg = lora_config(model)
    print(
        f"adapter {args.adapter}: r={cfg.r} alpha={cfg.alpha} targets={cfg.targets}; {describe_trainable(model)}"
    )

    if args.peft_out:
        peft_base = args.peft_base or (args.base if _is_hf_dir(args.base) else None)
        if peft_base is None:
            raise ConfigError(
                "--peft-base is needed: a PEFT adapter names a transformers base model; export the base with "
                "`gptforge export BASE --out HFDIR` and pass --peft-base HFDIR (or a hub id such as gpt2)"
            )
        export_peft(model, args.peft_out, base_model_name_or_path=peft_base)
        if _is_hf_dir(peft_base):
            diff = verify_peft(model, args.peft_out, peft_base)
            print(f"wrote PEFT adapter {args.peft_out}; peft logits match (max abs diff {diff:.2e})")
        else:
            print(f"wrote PEFT adapter {args.peft_out} (base {peft_base!r} is not a local dir: not verified)")

    if args.out or args.hf_out:
        ids = _probe_ids(model.cfg.vocab_size, model.cfg.context_length, model.cfg.pad_token_id)
        with torch.no_grad():
            before = model(ids)
            merge_lora(model)
            after = model(ids)
        diff = (before - after).abs().max().item()
        if not torch.allclose(before, after, atol=1e-5, rtol=1e-4):
            raise ConfigError(
                f"merged logits differ from the adapter's by {diff:.3g}; the adapter may be corrupt"
            )
        print(f"merged: logits match the unmerged model (max abs diff {diff:.2e})")
        extra = {
            f.name: json.loads(f.read_text(encoding="utf-8"))
            for f in sorted(Path(args.adapter).glob("*.json"))
            if f.name not in _OWN_FILES
        }
        if args.out:
            save_checkpoint(model, args.out, metadata=extra)
            print(f"wrote merged checkpoint {args.out}")
        if args.hf_out:
            try:
                from gptforge.export.hf import export
            except ImportError:
                raise ConfigError("Hugging Face export is not available in this build; use --out") from None
            export(model, args.hf_out, prompt_style=extra.get("prompt_style.json"))
            print(f"wrote Hugging Face dir {args.hf_out}")
    return 0
