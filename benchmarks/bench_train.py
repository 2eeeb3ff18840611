"""Training step (forward, backward, AdamW) tokens/s: gptforge vs transformers GPT2LMHeadModel.

Both start from the same weights (gptforge's, copied with `to_hf`), see the same batch and use the
optimizer transformers' Trainer picks by default on torch >= 2.8 (`adamw_torch_fused`), so the ratio
measures the model and loss code alone. The first-step losses must agree, which checks that both
compute the same thing. FLOPs count the matmuls (6 x params + attention, the PaLM / nanoGPT
convention); MFU is achieved FLOP/s over the matmul peak measured in the same run.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from common import autocast_dtype, best_precision, interleaved, log, median, record

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT


def measure_matmul_peak(dtype: torch.dtype, device: str = "cpu", budget_s: float = 3.0) -> dict:
    """Best-of GFLOP/s of a square matmul, sized so one multiply takes at most about half a second.

    Slow dtypes (bf16 on a CPU without bf16 units) get a small matrix rather than minutes of waiting. On a
    CPU in float32 the faster of the two GEMMs torch has there counts: BLAS (`a @ b`) and oneDNN (what
    gptforge's Linear runs; about twice BLAS on an AMD CPU, whose MKL does not take its fast paths).
    """
    from gptforge.model.gpt import ONEDNN_LINEAR

    def onednn(a, b):  # a @ b as oneDNN's linear: x = a, weight = b.T
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")

    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize() if device == "cuda" else None
        dt = time.perf_counter() - t0
        if dt > 0.25 or n >= (8192 if device == "cuda" else 2048):
            break
        n *= 2
    kernels = {"blas": torch.matmul}
    if device == "cpu" and dtype == torch.float32 and ONEDNN_LINEAR:
        kernels["onednn"] = onednn
    per_kernel = {}
    for name, mm in kernels.items():
        best, runs, t_end = 0.0, 0, time.perf_counter() + budget_s
        while runs < 3 or (time.perf_counter() < t_end and runs < 50):
            t0 = time.perf_counter()
            mm(a, b)
            torch.cuda.synchronize() if device == "cuda" else None
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
            runs += 1
        per_kernel[name] = round(best / 1e9, 2)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "gflops": max(per_kernel.values()),
        "by_kernel": per_kernel,
    }


def train_flops_per_token(cfg: GPTConfig, T: int) -> float:
    """Matmul FLOPs of forward + backward per token: 6 x (block weights + LM head) + 12 x L x T x d."""
    d, L = cfg.emb_dim, cfg.n_layers
    block = L * (d * 3 * d + d * d + 2 * d * cfg.hidden_dim)
    head = cfg.vocab_size * d
    return 6 * (block + head) + 12 * L * T * d


def _hf_model(model: GPT):
    from gptforge.model.hf import to_hf

    hf = to_hf(model)
    hf.config._attn_implementation = "sdpa"  # transformers' default; to_hf may pick another
    return hf.train()


def _step_fns(preset: str, B: int, T: int, precision: str, device: str, compile_model: bool) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, dropout=0.0)
    if cfg.context_length < T:
        cfg = GPTConfig.from_preset(preset, dropout=0.0, context_length=T)
    ours = GPT(cfg).to(device).train()
    hf = _hf_model(ours).to(device)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    targets = torch.cat([x[:, 1:], torch.full((B, 1), -100, device=device)], dim=1)
    dtype = autocast_dtype(precision)
    fused = {"fused": True}
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, **fused)
    fwd = torch.compile(ours) if compile_model else ours
    dev_type = torch.device(device).type

    def amp():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=dtype)

    losses: dict[str, list[float]] = {"gptforge": [], "transformers": []}

    def step_ours() -> None:
        with amp():
            loss = fwd(x, targets=targets)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        losses["gptforge"].append(loss.item())

    def step_hf() -> None:
        with amp():
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        losses["transformers"].append(loss.item())

    return {"cfg": cfg, "gptforge": step_ours, "transformers": step_hf, "losses": losses}


def run(
    presets: list[str],
    precisions: list[str],
    B: int,
    T: int,
    reps: dict[str, int],
    device: str,
    compile_model: bool,
    peaks: dict,
    allocator: str = "default",
) -> list[dict]:
    """Rows per preset and precision; `allocator` names the glibc setting in force ("default" or "kept")."""
    rows = []
    for preset in presets:
        for precision in precisions:
            label = f"{preset} B{B} T{T} {'fp32' if precision == 'no' else precision}"
            label += ", freed memory kept" if allocator == "kept" else ""
            log(f"train: {label} (compile={compile_model}) ...")
            fns = _step_fns(preset, B, T, precision, device, compile_model)
            t0 = time.perf_counter()
            fns["gptforge"]()  # first call: compile, if any
            first_ours = time.perf_counter() - t0
            fns["transformers"]()
            # The first calls above were the warm-up (compile, optimizer state); one more round lets the
            # heap settle where freed memory is kept (--malloc kept takes a few steps to fit).
            usage: dict = {}
            times = interleaved(
                {"gptforge": fns["gptforge"], "transformers": fns["transformers"]},
                reps=reps[preset],
                warmup=1,
                device=device,
                usage=usage,
            )
            cfg, tokens = fns["cfg"], B * T
            tps = {k: tokens / median(v) for k, v in times.items()}
            flops = train_flops_per_token(cfg, T)
            peak = peaks.get("bf16" if precision == "bf16" else "fp32" if precision == "no" else precision)
            mfu = {k: (v * flops / (peak["gflops"] * 1e9) if peak else None) for k, v in tps.items()}
            l0 = {k: v[0] for k, v in fns["losses"].items()}
            loss_diff = abs(l0["gptforge"] - l0["transformers"])
            tol = 1e-4 if precision == "no" else 2e-2
            rows.append(
                record(
                    "train",
                    label,
                    "tokens/s",
                    tps["gptforge"],
                    tps["transformers"],
                    "transformers GPT2LMHeadModel (sdpa, fused AdamW)",
                    higher_is_better=True,
                    target=1.5 if preset == "gpt2" else None,
                    samples=times,
                    precision=precision,
                    compiled=compile_model,
                    first_step_s=round(first_ours, 2),
                    gflops_per_token=round(flops / 1e9, 4),
                    achieved_gflops={k: round(v * flops / 1e9, 2) for k, v in tps.items()},
                    mfu={k: (round(v, 4) if v is not None else None) for k, v in mfu.items()},
                    first_loss=l0,
                    first_loss_equal=bool(loss_diff <= tol and math.isfinite(loss_diff)),
                    allocator=allocator,
                    # CPU seconds the kernel spent per step (mostly zeroing freshly mapped pages) and
                    # minor page faults per step: memory churn that the tokens/s include.
                    kernel_s_per_step={k: round(median(u["kernel_s"]), 2) for k, u in usage.items()},
                    page_faults_per_step={k: int(median(u["minor_faults"])) for k, u in usage.items()},
                )
            )
            log(
                f"train: {label}: gptforge {tps['gptforge']:.0f} tok/s, transformers "
                f"{tps['transformers']:.0f} tok/s, ratio {tps['gptforge'] / tps['transformers']:.2f}; "
                f"first losses {l0}; kernel s/step {rows[-1]['kernel_s_per_step']}, "
                f"page faults/step {rows[-1]['page_faults_per_step']}"
            )
            del fns
    return rows


def precisions_for(device: str, fp32_only: bool = False) -> list[str]:
    """fp32 always; the machine's best mixed precision too, where that is not fp32."""
    best = best_precision(device)
    return ["no"] if fp32_only or best == "no" else ["no", best]
