"""The default pipeline's instruction stage with and without `data.packing`, interleaved in one process.

    python benchmarks/bench_packing.py [--repeats 3] [--runs-dir /tmp/gptforge-bench-packing]
        [--variant NAME=KEY=VALUE[,KEY=VALUE...]] [--set KEY=VALUE]

First the pipeline's pretrain stage (once, reused when done), then the instruct stage as the pipeline
runs it, once per variant per round, in ABBA order. Per variant, medians of: the stage's wall time
(data, training and the final validation/test evaluation), the training loop's time (from the
trainer's own tokens/s log), real (non-padding) training tokens/s, the padding fraction of the
training batches, the validation loss, and validation-loss reduction per minute of wall time from the
starting model's validation loss. The default for `data.packing` is chosen on validation loss per
minute, never on test loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, log

DEFAULT_VARIANTS = {"unpacked": {"data.packing": False}, "packed": {"data.packing": True}}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    sets = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        sets[k] = json.loads(v) if v not in ("",) else v
    return name, sets


def apply(cfg, sets: dict):
    cfg = copy.deepcopy(cfg)
    for key, value in sets.items():
        obj = cfg
        *parents, last = key.split(".")
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, last):
            raise SystemExit(f"unknown key {key}")
        setattr(obj, last, value)
    return cfg


def padding_fraction(cfg, rounds: int = 5) -> tuple[float, int]:
    """Padding share of the training inputs over `rounds` shuffled epochs, and real tokens an epoch."""
    from gptforge.pipeline.train import build_model
    from gptforge.tasks.instruct import PackedRows, load_splits, tokenize_instruction

    d = cfg.data
    ctx = d.max_length or build_model(cfg.model).cfg.context_length
    tok = tokenize_instruction(load_splits(d, seed=cfg.train.seed), d.prompt_style, max_length=ctx)
    lengths = [len(x) for x in tok["train"]["input_ids"]]
    if d.packing:
        rows = PackedRows(tok["train"], capacity=ctx, seed=cfg.train.seed)
        items = [sum(lengths[j] for j in row) for row in rows.rows]
    else:
        items = lengths
    bs = cfg.train.batch_size * cfg.train.grad_accum
    pads = []
    for r in range(rounds):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(r)).tolist()
        real = total = 0
        for i in range(0, len(order) - (bs - 1 if cfg.train.drop_last else 0), cfg.train.batch_size):
            batch = [items[j] for j in order[i : i + cfg.train.batch_size]]
            real += sum(batch)
            total += max(batch) * len(batch)
        pads.append(1 - real / max(total, 1))
    return statistics.mean(pads), sum(lengths)


def loop_seconds(out_dir: Path) -> tuple[float, int]:
    """Training-step seconds and input tokens (padding included), from the trainer's per-log tokens/s."""
    from gptforge.pipeline.runinfo import read_metrics

    recs = [r for r in read_metrics(out_dir / "metrics.jsonl") if "tokens_per_s" in r]
    secs, last = 0.0, 0
    for r in recs:
        secs += (r["tokens"] - last) / max(r["tokens_per_s"], 1e-9)
        last = r["tokens"]
    return secs, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--runs-dir", default="/tmp/gptforge-bench-packing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--set", action="append", default=[], help="pipeline override, e.g. instruct.train.epochs=2"
    )
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=json[,key=json]")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from gptforge.errors import GPTForgeError
    from gptforge.pipeline.runner import run_pipeline
    from gptforge.pipeline.stages import load_pipeline, stage_config
    from gptforge.pipeline.train import run_instruct

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    pipe = load_pipeline(args.config, overrides=args.set, runs_dir=args.runs_dir)
    try:  # a finished pretrain stage is reused as it is (the runner would redo it after a code change)
        base = stage_config(pipe, "instruct")
        log(f"reusing the pretrain stage in {pipe.root}")
    except GPTForgeError:
        log(f"pretrain stage in {pipe.root}")
        run_pipeline(pipe, only="pretrain", log=lambda *a, **k: None)
        base = stage_config(pipe, "instruct")
    base.train.progress, base.train.plot = False, False
    variants = dict(parse_variant(v) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    cfgs = {n: apply(base, s) for n, s in variants.items()}

    from gptforge.pipeline.train import build_model
    from gptforge.tasks.instruct import InstructionCollator, load_splits, tokenize_instruction

    # the starting model's validation loss, for loss reduction per minute
    model = build_model(base.model).eval()
    d = base.data
    ctx = d.max_length or model.cfg.context_length
    val = tokenize_instruction(load_splits(d, seed=base.train.seed), d.prompt_style, max_length=ctx)[
        "validation"
    ]
    coll = InstructionCollator(
        pad_token_id=model.cfg.eos_token_id, allowed_max_length=ctx, mask_prompt=d.mask_prompt
    )
    s = n = 0.0
    with torch.no_grad():
        for i in range(0, len(val), 16):
            b = coll([val[j] for j in range(i, min(i + 16, len(val)))])
            s += float(model(b["input_ids"], targets=b["targets"], reduction="sum"))
            n += float((b["targets"] != -100).sum())
    val0 = s / n
    log(f"starting validation loss {val0:.4f}")

    stats = {name: padding_fraction(c) for name, c in cfgs.items()}
    res: dict[str, dict[str, list]] = {n: {} for n in cfgs}
    names = list(cfgs)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            cfg = copy.deepcopy(cfgs[name])
            out = Path(args.runs_dir) / "bench" / f"{name}-{r}"
            cfg.train.out_dir = str(out)
            t0 = time.perf_counter()
            m = run_instruct(cfg).metrics
            wall = time.perf_counter() - t0
            loop, padded_tokens = loop_seconds(out)
            pad, real_epoch = stats[name]
            real = padded_tokens * (1 - pad)
            rec = {
                "wall_s": wall,
                "train_loop_s": loop,
                "steps": m["step"],
                "real_tokens_per_s": real / max(loop, 1e-9),
                "val_loss": m["val_loss"],
                "val_loss_drop_per_min": (val0 - m["val_loss"]) / (wall / 60),
            }
            for k, v in rec.items():
                res[name].setdefault(k, []).append(v)
            log(f"{name} round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.items()))

    load = os.getloadavg()
    print(
        f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; {args.repeats} rounds"
    )
    print(f"starting val_loss {val0:.4f}; medians:")
    cols = ["wall_s", "train_loop_s", "steps", "real_tokens_per_s", "val_loss", "val_loss_drop_per_min"]
    print("| variant | padding | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    summary = {}
    for name in names:
        med = {k: statistics.median(v) for k, v in res[name].items()}
        summary[name] = {"padding_fraction": stats[name][0], **med, "all": res[name], "sets": variants[name]}
        print(f"| {name} | {stats[name][0]:.1%} | " + " | ".join(f"{med[k]:.4g}" for k in cols) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"load": load, "val0": val0, "results": summary}, indent=1))


if __name__ == "__main__":
    main()
