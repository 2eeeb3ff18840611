"""`gptforge convert` and `gptforge export`: weights to and from the Hugging Face GPT-2 format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptforge.errors import CheckpointError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are GPTForgeErrors, so the CLI prints one line and exits 2."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def read_metrics(ckpt: str | Path) -> dict | None:
    """A checkpoint's metrics for the model card: metrics.json, else the latest value of each key in metrics.jsonl."""
    p = Path(ckpt)
    if (p / "metrics.json").is_file():
        try:
            data = json.loads((p / "metrics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p / 'metrics.json'}: not valid JSON ({e}); fix or remove it") from None
        return data if isinstance(data, dict) else None
    if (p / "metrics.jsonl").is_file():
        latest: dict = {}
        for n, line in enumerate((p / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p / 'metrics.jsonl'} line {n}: not valid JSON ({e})") from None
            if isinstance(record, dict):
                latest.update({k: v for k, v in record.items() if isinstance(v, (int, float, str))})
        return latest or None
    return None


def export_checkpoint(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export a gptforge checkpoint dir, carrying its prompt style and metrics into the HF dir."""
    from gptforge.export.hf import export
    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.load import load_model

    model = load_model(ckpt)
    return export(
        model,
        out,
        metrics=read_metrics(ckpt),
        prompt_style=read_metadata(ckpt, "prompt_style.json"),
        overwrite=overwrite,
    )


def _report(model, out: Path, what: str) -> None:
    kind = f"classifier ({model.cfg.num_labels} labels)" if model.cfg.num_labels else "language model"
    print(f"{what} {out}  [{kind}, {model.num_parameters():,} parameters]")


def convert(argv: list[str]) -> int:
    p = _Parser(
        prog="gptforge convert",
        description="Convert a Hugging Face GPT-2 (hub id or local dir) into a gptforge checkpoint, or a "
        "gptforge checkpoint into a verified Hugging Face dir (same as `gptforge export`).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="SOURCE", help="hub id (e.g. gpt2) or local Hugging Face model dir")
    src.add_argument("--to-hf", metavar="CKPT", help="gptforge checkpoint dir to export")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    if args.to_hf:
        out = export_checkpoint(args.to_hf, args.out, overwrite=args.overwrite)
        print(f"exported {args.to_hf} -> {out} (verified with transformers)")
        return 0
    from gptforge.export.hf import is_nonempty_dir
    from gptforge.model.checkpoint import save_checkpoint
    from gptforge.model.hf import from_hf

    out = Path(args.out)
    if is_nonempty_dir(out) and not args.overwrite:
        raise CheckpointError(
            f"{out} already exists and is not empty; pass --overwrite or choose another --out"
        )
    model = from_hf(args.from_hf)
    save_checkpoint(model, out, overwrite=True)
    _report(model, out, f"converted {args.from_hf} ->")
    return 0


def export(argv: list[str]) -> int:
    p = _Parser(
        prog="gptforge export",
        description="Export a gptforge checkpoint as a Hugging Face dir (config, safetensors, tokenizer, "
        "model card), verified by reloading it in transformers and comparing logits.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="gptforge checkpoint dir")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {out} (verified with transformers)")
    return 0
