"""`gptforge info` and `gptforge generate`. torch is imported inside the functions so the CLI starts fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptforge.errors import CheckpointError, ConfigError

GIB = 1024**3


# -- info --------------------------------------------------------------------------------------------
def describe_config(cfg) -> dict:
    """Parameter counts and training memory of a config, from a weightless (meta) model: exact, no RAM."""
    import torch

    from gptforge.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "emb_dim": cfg.emb_dim,
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "tie_embeddings": cfg.tie_embeddings,
        "num_labels": cfg.num_labels,
        "params": model.num_parameters(),
        "params_counting_tied_head": model.num_parameters(count_tied_head=True),
        # weights + gradients + AdamW's two moments, every tensor in the named dtype
        "train_memory_bytes": {
            "fp32": model.memory_footprint(torch.float32)["total"],
            "bf16": model.memory_footprint(torch.bfloat16)["total"],
        },
    }


def _checkpoint_info(path: Path) -> dict:
    """What a checkpoint dir holds; its tensors are checked against config.json from the file header only."""
    import torch

    from gptforge.model.checkpoint import CONFIG, WEIGHTS, open_safetensors, read_json, state_dict_for_save
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT

    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a gptforge checkpoint (needs {CONFIG} and {WEIGHTS})")
    cfg = GPTConfig.from_dict(read_json(path / CONFIG))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in state_dict_for_save(GPT(cfg)).items()}
    with open_safetensors(path / WEIGHTS) as f:  # a damaged or unreadable file: one line naming it
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
        dtypes = sorted({names.get(d, d) for d in (str(f.get_slice(k).get_dtype()) for k in f.keys())})
    if stored != expected:
        bad = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise CheckpointError(
            f"{path / WEIGHTS}: tensors do not match {path / CONFIG} (first differences: {bad[:3]}); "
            "the checkpoint is damaged or its config was edited"
        )
    info = {"path": str(path), **describe_config(cfg)}
    info["stored_dtypes"] = dtypes
    info["size_bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info["files"] = sorted(f.name for f in path.iterdir() if f.is_file())
    for name in ("labels.json", "prompt_style.json"):
        if (path / name).is_file():
            info[name.removesuffix(".json")] = read_json(path / name)
    return info


def _fmt_row(name: str, d: dict) -> str:
    mem = d["train_memory_bytes"]
    return (
        f"{name:<12} {d['n_layers']:>3} {d['n_heads']:>3} {d['emb_dim']:>5} {d['context_length']:>5} "
        f"{d['params']:>14,} {d['params_counting_tied_head']:>14,} "
        f"{mem['fp32'] / GIB:>9.2f} {mem['bf16'] / GIB:>9.2f}"
    )


HEADER = (
    f"{'model':<12} {'L':>3} {'H':>3} {'emb':>5} {'ctx':>5} {'params':>14} {'+tied head':>14} "
    f"{'fp32 GiB':>9} {'bf16 GiB':>9}"
)


def info(argv: list[str]) -> int:
    """Presets (or one preset, or a checkpoint dir): sizes and the memory training them needs."""
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("info", argv)
    if args is None:
        return 0

    from gptforge.model.config import PRESETS, GPTConfig

    if args.target is None:
        rows = {name: describe_config(GPTConfig.from_preset(name)) for name in PRESETS}
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(HEADER)
            for name, d in rows.items():
                print(_fmt_row(name, d))
            print("params: unique weights; +tied head: counting the tied LM head again (the book's 163M).")
            print("memory: weights + gradients + AdamW moments for training; activations come on top.")
        return 0

    path = Path(args.target)
    if path.is_dir():
        d = _checkpoint_info(path)
    elif args.target in PRESETS:
        d = {"preset": args.target, **describe_config(GPTConfig.from_preset(args.target))}
    else:
        import difflib

        close = difflib.get_close_matches(args.target, PRESETS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"presets: {', '.join(PRESETS)}"
        raise ConfigError(f"{args.target!r} is neither a checkpoint directory nor a model preset; {hint}")
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(HEADER)
    print(_fmt_row(d.get("preset", path.name), d))
    if "path" in d:
        print(
            f"path: {d['path']}  ({d['size_bytes'] / 2**20:.1f} MiB on disk, weights {', '.join(d['stored_dtypes'])})"
        )
        print(f"files: {', '.join(d['files'])}")
        if "labels" in d:
            print(f"classifier labels: {d['labels'].get('id2label')}")
        if "prompt_style" in d:
            print(f"prompt style: {d['prompt_style'].get('name', d['prompt_style'])}")
    return 0


# -- generate ----------------------------------------------------------------------------------------
def generate(argv: list[str]) -> int:
    """Continue one or more prompts with a gptforge checkpoint; prints the continuation of each."""
    from gptforge.pipeline.cli_args import cli_config

    args = cli_config("generate", argv)
    if args is None:
        return 0
    if not args.checkpoint or not args.prompts:
        raise ConfigError(
            "give a checkpoint directory and at least one prompt (see `gptforge generate --help`)"
        )

    import torch

    from gptforge.model.checkpoint import read_metadata
    from gptforge.model.generate import generate_text
    from gptforge.model.load import load_model
    from gptforge.model.tokenizer import Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N"
        ) from None
    model = load_model(args.checkpoint, device=device)
    if model.is_classifier:
        raise CheckpointError(
            f"{args.checkpoint} is a classifier (num_labels={model.cfg.num_labels}); generate needs a "
            "language-model checkpoint"
        )
    style = read_metadata(args.checkpoint, "prompt_style.json")
    if style is not None:
        print(
            f"note: {args.checkpoint} was instruction-tuned with prompt style {style.get('name', style)!r}; "
            "the prompt is used exactly as given",
            file=sys.stderr,
        )
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    tokenizer = Tokenizer()
    texts = generate_text(
        model,
        tokenizer,
        args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=model.cfg.eos_token_id if args.eos else None,
        stop_strings=args.stop,
        use_cache=args.cache,
        generator=generator,
        batch_size=args.batch_size,
    )
    for i, (prompt, text) in enumerate(zip(args.prompts, texts)):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
            continue
        if i:
            print()
        print(prompt + text if args.echo else text)
    return 0
