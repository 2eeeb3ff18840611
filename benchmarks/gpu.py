"""gptforge on one CUDA GPU against transformers: `python benchmarks/gpu.py` (under 8 minutes on an A100/H100).

Measures, in one process:
- gpt2 124M (random weights) training tokens/s and MFU at T=1024: gptforge's model step (bf16 autocast,
  torch.compile, flash SDPA, fused AdamW) interleaved with transformers' GPT2LMHeadModel on the same batch
  and weights (sdpa, bf16, compiled where that works), first-step losses compared;
- gptforge's own `Trainer.fit` on the same model and batch size (Accelerate, `auto` precision and compile,
  pinned memory, no host sync between log steps): what a user's run gets;
- greedy generation tokens/s (KV cache, bf16 weights), gptforge vs transformers `generate`, batch 1 and 8.

MFU is achieved matmul FLOP/s (6 x params + attention per token, as bench_train) over the GPU's dense bf16
peak from a table of known GPUs (H100/H200 989 TFLOP/s, A100 312), or the matmul peak measured here.
For scale: the reference reports 142k tokens/s for gpt2 124M training on one A100.

Results are merged into benchmarks/results.json and RESULTS.md (a "GPU" section), like run.py. Without a
CUDA device it says so and exits 2; `--smoke` runs the same code on CPU with a tiny model and a few steps
(fp32, eager) to check the code path, writing results only where `--out-dir` says.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import interleaved, log, machine_info, median, record  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE_A100_TOKENS_PER_S = 142_000  # the reference's gpt2 124M training figure on one A100

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("A100", 312.0),
)


def table_peak_tflops(name: str | None) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if name and key.lower() in name.lower():
            return tflops
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, any device (checks the code)")
    p.add_argument(
        "--batch", type=int, default=None, help="sequences per training step (default 16; smoke 2)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per timed call (default 10)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per side, ABBA order (default 6)")
    p.add_argument("--no-compile", action="store_true", help="eager on both sides (compile is on for CUDA)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    p.add_argument(
        "--out-dir", default=None, help="where results.json and RESULTS.md go (default benchmarks/)"
    )
    return p.parse_args(argv)


def no_gpu_message() -> str:
    return (
        "benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False; torch "
        f"{torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''}). Run it on a "
        "machine with an NVIDIA GPU, or add --smoke to check the code path on this CPU."
    )


def sizes(args: argparse.Namespace, device: str) -> dict:
    if args.smoke:
        return dict(
            preset="cpu-tiny", T=64, B=args.batch or 2, steps=args.steps or 2, reps=args.reps or 2,
            trainer_steps=6, log_every=2, gen_batches=[1, 2], new_tokens=8, gen_reps=1, prompt_len=8,
        )  # fmt: skip
    return dict(
        preset="gpt2", T=1024, B=args.batch or 16, steps=args.steps or 10, reps=args.reps or 6,
        trainer_steps=60, log_every=10, gen_batches=[1, 8], new_tokens=256, gen_reps=3, prompt_len=32,
    )  # fmt: skip


def flash_context(device: str):
    """Flash attention only (an error, not a silent fallback, if a call cannot use it); nothing on CPU."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def training_sides(s: dict, device: str, precision: str, compile_model: bool) -> dict:
    """Step functions for both models (same weights, same batch); each call runs `steps` optimizer steps
    and leaves the losses on the device (read once at the end, as a real loop would)."""
    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT
    from gptforge.model.hf import to_hf

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(s["preset"], dropout=0.0)
    ours = GPT(cfg).to(device).train()
    hf = to_hf(ours).to(device).train()
    hf.config._attn_implementation = "sdpa"
    x = torch.randint(0, cfg.vocab_size, (s["B"], s["T"]), device=device)
    targets = torch.cat([x[:, 1:], torch.full((s["B"], 1), -100, device=device)], dim=1)
    dtype = torch.bfloat16 if precision == "bf16" else None
    info: dict = {"compiled": {}, "compile_error": {}}

    def amp():
        return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def make(name, model, loss_of, attention):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        fwd = torch.compile(model) if compile_model else model
        info["compiled"][name] = compile_model
        losses: list[torch.Tensor] = []

        def one(f):
            with attention(), amp():
                loss = loss_of(f)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        def steps(n=s["steps"]):
            nonlocal fwd
            for _ in range(n):
                try:
                    one(fwd)
                except Exception as e:  # compile did not work for this side: measure it eager, say so
                    if fwd is model:
                        raise
                    log(f"gpu: torch.compile failed for {name} ({type(e).__name__}: {str(e)[:200]}); eager")
                    info["compiled"][name], info["compile_error"][name] = (
                        False,
                        f"{type(e).__name__}: {e}"[:500],
                    )
                    fwd = model
                    one(fwd)
            return losses

        return steps

    # gptforge: flash attention only (an error if it cannot be used); transformers: its own sdpa dispatch,
    # which picks flash where its mask allows, so a mask it builds cannot fail the run
    ours_step = make("gptforge", ours, lambda f: f(x, targets=targets), lambda: flash_context(device))
    hf_step = make("transformers", hf, lambda f: f(input_ids=x, labels=x).loss, contextlib.nullcontext)
    return {"cfg": cfg, "gptforge": ours_step, "transformers": hf_step, "info": info}


def bench_training(
    s: dict, device: str, precision: str, compile_model: bool, peak_flops: float | None
) -> list[dict]:
    from bench_train import train_flops_per_token

    label = f"{s['preset']} B{s['B']} T{s['T']} {'bf16' if precision == 'bf16' else 'fp32'}"
    label += ", compiled" if compile_model else ", eager"
    log(f"gpu: training {label}: warm-up (compiles) ...")
    sides = training_sides(s, device, precision, compile_model)
    warm = {}
    for name in ("gptforge", "transformers"):
        t0 = time.perf_counter()
        losses = sides[name](2)
        first = float(losses[0])  # one read, after the warm-up
        warm[name] = (round(time.perf_counter() - t0, 1), first)
        log(f"gpu: {name} warm-up {warm[name][0]} s, first loss {first:.4f}")
    times = interleaved(
        {"gptforge": sides["gptforge"], "transformers": sides["transformers"]},
        reps=s["reps"], warmup=0, device=device,
    )  # fmt: skip
    tokens = s["B"] * s["T"] * s["steps"]
    tps = {k: tokens / median(v) for k, v in times.items()}
    flops = train_flops_per_token(sides["cfg"], s["T"])
    mfu = {k: (v * flops / peak_flops if peak_flops else None) for k, v in tps.items()}
    l0 = {k: v[1] for k, v in warm.items()}
    tol = 1e-4 if precision == "no" else 3e-2
    row = record(
        "gpu", f"train step: {label}", "tokens/s", tps["gptforge"], tps["transformers"],
        "transformers GPT2LMHeadModel (sdpa, fused AdamW, same precision and compile)",
        higher_is_better=True, samples=times, precision=precision,
        compiled=sides["info"]["compiled"], compile_error=sides["info"]["compile_error"] or None,
        flash_only={"gptforge": device == "cuda", "transformers": False}, warmup_s={k: v[0] for k, v in warm.items()},
        gflops_per_token=round(flops / 1e9, 4), mfu={k: _r(v) for k, v in mfu.items()}, first_loss=l0,
        first_loss_equal=abs(l0["gptforge"] - l0["transformers"]) <= tol,
        reference_a100_tokens_per_s=REFERENCE_A100_TOKENS_PER_S,
    )  # fmt: skip
    log(
        f"gpu: {label}: gptforge {tps['gptforge']:,.0f} tok/s, transformers {tps['transformers']:,.0f} tok/s, MFU {mfu}"
    )
    return [row]


def bench_trainer(s: dict, device: str, peak_flops: float | None, baseline: float | None) -> list[dict]:
    """gptforge's Trainer.fit on random tokens: the whole loop a user runs (Accelerate, auto precision and
    compile, pinned memory, non-blocking copies, host reads only every `log_every` steps)."""
    import json

    from bench_train import train_flops_per_token

    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT
    from gptforge.pipeline.config import TrainConfig
    from gptforge.pipeline.trainer import Trainer

    B, T, n = s["B"], s["T"], s["trainer_steps"]
    g = torch.Generator().manual_seed(0)
    rows = [{"ids": torch.randint(0, 50257, (T + 1,), generator=g)} for _ in range(B * n)]

    def collate(batch):
        ids = torch.stack([r["ids"] for r in batch])
        return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}

    with tempfile.TemporaryDirectory(prefix="gptforge-gpu-") as tmp:
        cfg = TrainConfig(
            out_dir=tmp, epochs=1, max_steps=n, batch_size=B, lr=1e-4, log_every=s["log_every"],
            progress=False, plot=False, seed=0, keep_last=1,
        )  # fmt: skip
        trainer = Trainer(cfg)
        model = GPT(GPTConfig.from_preset(s["preset"], dropout=0.0))
        log(f"gpu: Trainer.fit, {n} steps (mixed_precision={cfg.mixed_precision}, compile={cfg.compile}) ...")
        t0 = time.perf_counter()
        with flash_context(device):
            trainer.fit(model, rows, collate, run_config={"task": "gpu-bench"})
        wall = time.perf_counter() - t0
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        run = json.loads((Path(tmp) / "run.json").read_text())
    logged = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    steady = logged[1:] or logged  # the first window holds the compile
    tps = median(steady)
    flops = train_flops_per_token(GPTConfig.from_preset(s["preset"]), T)
    label = f"Trainer.fit: {s['preset']} B{B} T{T}, {run['mixed_precision']}, compile {cfg.compile}"
    row = record(
        "gpu", label, "tokens/s", tps, baseline,
        "transformers GPT2LMHeadModel step (the row above)", higher_is_better=True,
        logged_tokens_per_s=steady, mfu={"gptforge": _r(tps * flops / peak_flops) if peak_flops else None},
        wall_s=round(wall, 1), log_every=s["log_every"], mixed_precision=run["mixed_precision"],
        compiled={"gptforge": cfg.compile}, reference_a100_tokens_per_s=REFERENCE_A100_TOKENS_PER_S,
    )  # fmt: skip
    log(f"gpu: {label}: {tps:,.0f} tok/s (logged windows {logged}), wall {wall:.1f} s")
    return [row]


def bench_generation(s: dict, device: str, precision: str) -> list[dict]:
    from gptforge.model.config import GPTConfig
    from gptforge.model.generate import generate
    from gptforge.model.gpt import GPT
    from gptforge.model.hf import to_hf

    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = GPT(GPTConfig.from_preset(s["preset"])).to(device).eval()
    hf = to_hf(model).to(device=device, dtype=dtype).eval()
    model = model.to(dtype)
    hf.generation_config.eos_token_id = None
    n = s["new_tokens"]
    rows = []

    def ours(plist):
        return generate(model, plist, max_new_tokens=n, eos_token_id=None)

    def theirs(prompt):
        with torch.inference_mode():
            out = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=model.cfg.pad_token_id,
            )  # fmt: skip
        return out[:, prompt.shape[1] :].tolist()

    for B in s["gen_batches"]:
        prompt = torch.randint(0, model.cfg.vocab_size, (B, s["prompt_len"]), device=device)
        plist = prompt.tolist()
        label = (
            f"greedy generation: {s['preset']} batch {B}, {n} new tokens, {str(dtype).replace('torch.', '')}"
        )
        log(f"gpu: {label} ...")
        outs: dict = {}
        times = interleaved(
            {"gptforge": lambda p=plist: ours(p), "transformers": lambda p=prompt: theirs(p)},
            reps=s["gen_reps"], warmup=1, device=device, outputs=outs,
        )  # fmt: skip
        tps = {k: B * n / median(v) for k, v in times.items()}
        rows.append(
            record(
                "gpu",
                label,
                "tokens/s",
                tps["gptforge"],
                tps["transformers"],
                "transformers generate (greedy, DynamicCache, sdpa)",
                higher_is_better=True,
                samples=times,
                same_tokens=outs["gptforge"] == outs["transformers"],
            )  # fmt: skip
        )
        log(f"gpu: {label}: gptforge {tps['gptforge']:,.1f} tok/s, transformers {tps['transformers']:,.1f}")
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(no_gpu_message(), file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    from gptforge.machine import auto_precision

    precision, compile_default = auto_precision(cpu=not cuda)
    compile_model = compile_default and not args.no_compile
    s = sizes(args, device)
    meta = machine_info()
    meta.update(device=device, quick=args.smoke, started=time.strftime("%Y-%m-%d %H:%M:%S"), sizes={"gpu": s})
    peak_flops, peak_source = None, None
    if cuda:
        import bench_train as bt

        measured = bt.measure_matmul_peak(torch.bfloat16, device, budget_s=2.0)
        meta["matmul_peak"] = {"bf16": measured}
        table = table_peak_tflops(meta["gpu"])
        peak_flops = table * 1e12 if table else measured["gflops"] * 1e9
        peak_source = (
            f"data sheet {table} TFLOP/s" if table else f"measured bf16 matmul {measured['gflops']} GFLOP/s"
        )
        meta["gpu_peak"] = {
            "flops": peak_flops,
            "source": peak_source,
            "measured_bf16_gflops": measured["gflops"],
        }
        log(f"gpu: {meta['gpu']}, MFU against {peak_source}")
    t_start = time.perf_counter()
    rows: list[dict] = []
    parts = [
        ("training", lambda: bench_training(s, device, precision, compile_model, peak_flops)),
        ("trainer", lambda: bench_trainer(s, device, peak_flops, rows[0]["baseline"] if rows else None)),
        ("generation", lambda: bench_generation(s, device, precision)),
    ]
    for name, part in parts:
        spent = time.perf_counter() - t_start
        if spent > args.budget_s:
            log(f"gpu: {spent:.0f} s spent (budget {args.budget_s:.0f} s): {name} skipped")
            meta.setdefault("skipped", []).append(name)
            continue
        try:
            rows += part()
        except Exception as e:  # one part failing must not lose the others' numbers
            log(f"gpu: {name} failed: {type(e).__name__}: {e}")
            meta.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"[:1000]
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    meta["load_average_end"] = list(os.getloadavg())
    for r in rows:
        r["run"] = meta["started"]
        r["peak_source"] = peak_source

    import run as run_mod

    out_dir = Path(args.out_dir) if args.out_dir else (None if args.smoke else HERE)
    if out_dir is not None:
        from gptforge.io import write_json, write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        doc = run_mod.merge(out_dir, meta, rows, ["gpu"])
        write_json(out_dir / "results.json", doc)
        write_text(out_dir / "RESULTS.md", run_mod.markdown(doc))
        log(f"gpu: wrote {out_dir / 'results.json'} and {out_dir / 'RESULTS.md'} in {meta['seconds']} s")
    print(run_mod.markdown({"runs": {meta["started"]: meta}, "results": rows}))
    return 1 if meta.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
