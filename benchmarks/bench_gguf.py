"""GGUF export per type: file size, check result, and greedy tokens/s in llama.cpp against gptforge's own
generation on the same CPU, same thread count, measured in one run (the two sides interleaved, best of
`--repeats`). `python benchmarks/bench_gguf.py [--preset cpu-small] [--ckpt DIR] [--threads 2]`.

Prints a markdown table (the README's "GGUF, llama.cpp and Ollama" table comes from it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gptforge.export.gguf import QUANTS, export_gguf  # noqa: E402
from gptforge.model.config import PRESETS, GPTConfig  # noqa: E402
from gptforge.model.generate import generate  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402
from gptforge.model.tokenizer import Tokenizer  # noqa: E402

PROMPT = "The history of the printing press begins with"


def llama_tokens_per_s(path: Path, ids: list[int], n_new: int, n_ctx: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)
    llm.eval(ids)  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    dt = time.perf_counter() - t0
    llm.close()
    return n_new / dt


def gptforge_tokens_per_s(model: GPT, ids: list[int], n_new: int) -> float:
    generate(model, [ids], max_new_tokens=4, eos_token_id=None)  # warm-up
    t0 = time.perf_counter()
    generate(model, [ids], max_new_tokens=n_new, eos_token_id=None)
    return n_new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--ckpt", help="a trained checkpoint instead of a random preset model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quants", default=",".join(QUANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ckpt:
        from gptforge.model.load import load_model

        model, what = load_model(args.ckpt), args.ckpt
    else:
        torch.manual_seed(0)
        model, what = GPT(GPTConfig(**PRESETS[args.preset])).eval(), f"random {args.preset}"
    cfg = model.cfg
    ids = Tokenizer().encode(PROMPT)
    n_new = min(args.new_tokens, cfg.context_length - len(ids))
    print(
        f"{what}: emb {cfg.emb_dim}, {cfg.n_layers} layers, ctx {cfg.context_length}, "
        f"{model.num_parameters():,} parameters; {args.threads} threads, {n_new} greedy tokens"
    )
    rows = [
        "| type | file size | max logit diff | greedy tokens equal | llama.cpp tok/s | gptforge tok/s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as d:
        for q in args.quants.split(","):
            r = export_gguf(model, Path(d) / f"m-{q}.gguf", q)
            ll, ours = [], []
            for _ in range(args.repeats):  # interleaved: a busy machine slows both sides alike
                ll.append(llama_tokens_per_s(r.path, ids, n_new, cfg.context_length, args.threads))
                ours.append(gptforge_tokens_per_s(model, ids, n_new))
            c = r.check
            rows.append(
                f"| {q} | {r.size / 2**20:.1f} MiB | {c.max_logit_diff:.2g} (tol {c.tolerance:g}) | "
                f"{'yes' if c.greedy_equal else 'no'} | {max(ll):.0f} | {max(ours):.0f} |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
