"""`gptforge convert` and `gptforge export`: weights to and from the Hugging Face GPT-2 format."""

from __future__ import annotations

import json
from pathlib import Path

from gptforge.errors import CheckpointError, ConfigError


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


def export_checkpoint(
    ckpt: str | Path, out: str | Path, overwrite: bool = False, verify: bool = True
) -> Path:
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
        verify=verify,
    )


def _report(model, out: Path, what: str) -> None:
    kind = f"classifier ({model.cfg.num_labels} labels)" if model.cfg.num_labels else "language model"
    print(f"{what} {out}  [{kind}, {model.num_parameters():,} parameters]")


def convert(argv: list[str]) -> int:
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("convert", argv)
    if args is None:
        return 0
    if bool(args.from_hf) == bool(args.to_hf):
        raise ConfigError("give one of --from-hf SOURCE or --to-hf CKPT (see `gptforge convert --help`)")
    if not args.out:
        raise ConfigError("--out DIR is required (see `gptforge convert --help`)")
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
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("export", argv)
    if args is None:
        return 0
    if not args.checkpoint or not args.out:
        raise ConfigError("give a checkpoint dir and --out DIR (see `gptforge export --help`)")
    if len(args.formats) != 1:
        raise ConfigError(f"--format: give one of hf, gguf (got {', '.join(args.formats) or 'none'})")
    if args.formats == ["gguf"]:
        return _export_gguf(args)
    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, verify=args.verify)
    verified = "verified with transformers" if args.verify else "not verified: --no-verify"
    print(f"exported {args.checkpoint} -> {out} ({verified})")
    return 0


def load_any_model(path: str | Path):
    """A gptforge checkpoint, a LoRA run (merged) or a Hugging Face GPT-2 dir, as a gptforge GPT."""
    from gptforge.model.hf import from_hf
    from gptforge.model.load import is_model_dir, load_model

    if is_model_dir(path):
        return load_model(path)
    if (Path(path) / "config.json").is_file():
        return from_hf(path)
    raise CheckpointError(
        f"{path}: not a gptforge checkpoint, LoRA run or Hugging Face model dir; pass one of those"
    )


def export_gguf_from(
    ckpt: str | Path,
    out: str | Path,
    quant: str,
    *,
    overwrite: bool = False,
    verify: bool = True,
    ollama: bool = False,
    license: str | None = None,
    metrics: dict | None = None,
    model=None,
):
    """Export a model dir as GGUF, carrying its prompt style (chat template) and metrics (description)."""
    from gptforge.export.gguf import check_quant, export_gguf
    from gptforge.model.checkpoint import read_metadata

    check_quant(quant)  # refused before the model is loaded
    from gptforge.tasks.instruct import get_prompt_style

    model = model if model is not None else load_any_model(ckpt)
    saved = read_metadata(ckpt, "prompt_style.json")
    prompt_style = get_prompt_style(saved) if saved else None
    return export_gguf(
        model,
        out,
        quant,
        metrics=metrics if metrics is not None else read_metrics(ckpt),
        prompt_style=prompt_style,
        license=license,
        overwrite=overwrite,
        verify=verify,
        ollama=ollama,
    )


def _export_gguf(args) -> int:
    r = export_gguf_from(
        args.checkpoint,
        args.out,
        args.gguf.quant,
        overwrite=args.overwrite,
        verify=args.verify,
        ollama=args.gguf.ollama,
        license=args.license,
    )
    size = f"{r.size / 2**20:.1f} MiB"
    checked = r.check.line() if r.check else "not verified: --no-verify"
    print(f"exported {args.checkpoint} -> {r.path} (gguf {r.quant}, {size}; {checked})")
    if r.modelfile:
        print(f"wrote {r.modelfile}: `ollama create NAME -f {r.modelfile}`")
    return 0
