"""Classification training steps on length-grouped vs random batches, interleaved in one process.

One epoch of the default pipeline's classify stage (SMS spam, reference split, batch 8): the batches
`data.group_by_length` makes and the random batches it replaces. Every round times a full optimizer
step (forward, backward, AdamW) of each batch, alternating the side that goes first, so a loaded
machine slows both alike; the per-round epoch totals are reported as medians, with the padding share
and padded tokens of each side (those two do not depend on the load).

    PYTHONPATH=src python benchmarks/bench_group_by_length.py [--init runs/default/pretrain/final] [--rounds 3]

Without `--init` (or when it is missing) the model is the default pipeline's size from scratch
(3 blocks, 192 wide, as configs/default.yaml); step time depends on the shapes, not the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="runs/default/pretrain/final")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--batches", type=int, default=None, help="time only the first N batches of each side")
    args = ap.parse_args()

    from gptforge.model.gpt import GPT
    from gptforge.pipeline.config import ModelConfig
    from gptforge.pipeline.sampler import LengthGroupedSampler, padding_fraction
    from gptforge.pipeline.train import build_model
    from gptforge.tasks.classify import (
        ClassificationCollator,
        load_sms_spam,
        token_lengths,
        tokenize_classification,
    )

    torch.manual_seed(args.seed)
    init = args.init if Path(args.init, "config.json").is_file() else "scratch"
    sizes = dict(preset="cpu-small", emb_dim=192, n_layers=3, n_heads=3, context_length=128)
    model: GPT = build_model(ModelConfig(init=init, **(sizes if init == "scratch" else {})))
    model.add_classification_head(2, {0: "ham", 1: "spam"})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tok = tokenize_classification(load_sms_spam("book", seed=args.seed), max_length=None)["train"]
    lengths = token_lengths(tok)
    rows = [tok[i] for i in range(len(tok))]
    collate = ClassificationCollator(pad_token_id=model.cfg.pad_token_id)
    size = args.batch_size
    n_full = len(lengths) // size  # drop_last, as the default recipe trains
    grouped = LengthGroupedSampler(lengths, size, args.seed).batches(0)[:n_full]
    n_full = min(n_full, args.batches or n_full)
    grouped = grouped[:n_full]
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed)).numpy()
    shuffled = [perm[i * size : (i + 1) * size] for i in range(n_full)]
    sides = {"random": [collate([rows[i] for i in b]) for b in shuffled]}
    sides["grouped"] = [collate([rows[i] for i in b]) for b in grouped]

    def step(batch) -> float:
        t = time.perf_counter()
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], targets=batch["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name in sides:  # warm-up
        for b in sides[name][:3]:
            step(b)
    totals: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        acc = dict.fromkeys(sides, 0.0)
        for i in range(n_full):
            order = ("random", "grouped") if (i + r) % 2 == 0 else ("grouped", "random")
            for name in order:
                acc[name] += step(sides[name][i])
        for k, v in acc.items():
            totals[k].append(v)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in acc.items()), flush=True)
    out = {"batches_per_epoch": n_full, "batch_size": size, "init": init}
    for name, batches in (("random", shuffled), ("grouped", grouped)):
        out[name] = {
            "epoch_s_median": round(statistics.median(totals[name]), 3),
            "padding_fraction": round(padding_fraction(lengths, batches), 4),
            "padded_tokens": int(sum(int(np.max(np.asarray(lengths)[b])) * len(b) for b in batches)),
        }
    out["speedup"] = round(out["random"]["epoch_s_median"] / out["grouped"]["epoch_s_median"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
