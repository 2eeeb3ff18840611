"""Greedy generation tokens/s: gptforge's KV-cache loop vs transformers `generate` and vs no cache.

Same weights (copied with `to_hf`), same random prompt, EOS disabled so every run makes exactly
`new_tokens` tokens; the token ids of both must be equal (recorded as `same_tokens`).
"""

from __future__ import annotations

import torch
from common import interleaved, log, median, record

from gptforge.model.config import GPTConfig
from gptforge.model.generate import generate
from gptforge.model.gpt import GPT
from gptforge.model.hf import to_hf


def matmul_floor_seconds(model: GPT, B: int, device: str, reps: int = 7) -> float:
    """Median time of just the weight matmuls of one decoding step (every block's four Linear layers and
    the LM head, batch B, one token per row), in the fastest of three forms of the same product:
    F.linear(x, W), (W @ x.T).T, and x @ W.T with W.T copied contiguous beforehand (a second copy of
    every weight, which neither side keeps). No greedy decoder with these weights can beat it."""
    import torch.nn.functional as F

    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(B, m.in_features, device=device) for m in mods}
    weights = [m.weight.detach() for m in mods]
    transposed = [w.t().contiguous() for w in weights]

    def linear():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    def w_xt():
        for w in weights:
            (w @ xs[w.shape[1]].t()).t()

    def x_wt():
        for wt in transposed:
            xs[wt.shape[0]] @ wt

    with torch.inference_mode():
        times = interleaved(
            {"linear": linear, "w_xt": w_xt, "x_wt": x_wt}, reps=reps, warmup=1, device=device
        )
    return min(median(t) for t in times.values())


def run(
    preset: str,
    batches: list[int],
    new_tokens: int,
    prompt_len: int,
    reps: dict[int, int],
    device: str,
    no_cache_tokens: int | None,
) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).to(device).eval()
    hf = to_hf(model).to(device).eval()
    hf.generation_config.eos_token_id = None
    rows = []

    def ours(plist, n, use_cache=True):
        return generate(model, plist, max_new_tokens=n, eos_token_id=None, use_cache=use_cache)

    def theirs(prompt, n):
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=model.cfg.pad_token_id,
            )
        return out[:, prompt.shape[1] :].tolist()

    for B in batches:
        prompt = torch.randint(0, model.cfg.vocab_size, (B, prompt_len), device=device)
        plist = prompt.tolist()
        label = f"{preset} batch {B}, {new_tokens} new tokens"
        log(f"generate: {label} ...")
        ours(plist, 4), theirs(prompt, 4)  # warm-up: same shapes, a few steps
        outs: dict = {}
        times = interleaved(
            {
                "gptforge": lambda p=plist: ours(p, new_tokens),
                "transformers": lambda p=prompt: theirs(p, new_tokens),
            },
            reps=reps[B],
            warmup=0,
            device=device,
            outputs=outs,
        )
        tps = {k: B * new_tokens / median(v) for k, v in times.items()}
        floor_tps = B / matmul_floor_seconds(model, B, device)
        target = {1: 2.0, 8: 1.3}.get(B) if preset == "gpt2" else None
        rows.append(
            record(
                "generate",
                label,
                "tokens/s",
                tps["gptforge"],
                tps["transformers"],
                "transformers generate (greedy, DynamicCache, sdpa)",
                higher_is_better=True,
                target=target,
                samples=times,
                same_tokens=outs["gptforge"] == outs["transformers"],
                prompt_tokens=prompt_len,
                matmul_floor_tokens_per_s=round(floor_tps, 2),
                share_of_floor={k: round(v / floor_tps, 3) for k, v in tps.items()},
            )
        )
        log(
            f"generate: {label}: gptforge {tps['gptforge']:.1f} tok/s, transformers {tps['transformers']:.1f}, "
            f"weight matmuls alone {floor_tps:.1f}"
        )

    if no_cache_tokens:
        # The no-cache loop recomputes the whole window for every token: minutes at 256 tokens on a
        # CPU, so one run of each, back to back.
        n = no_cache_tokens
        plist = torch.randint(0, model.cfg.vocab_size, (1, prompt_len)).tolist()
        label = f"{preset} batch 1, {n} new tokens"
        log(f"generate: KV cache vs no cache, {label} ...")
        outs = {}
        times = interleaved(
            {"gptforge": lambda: ours(plist, n), "no_cache": lambda: ours(plist, n, use_cache=False)},
            reps=1,
            warmup=0,
            device=device,
            outputs=outs,
        )
        tps = {k: n / median(v) for k, v in times.items()}
        rows.append(
            record(
                "generate",
                f"KV cache vs no cache: {label}",
                "tokens/s",
                tps["gptforge"],
                tps["no_cache"],
                "gptforge generate(use_cache=False) (reference loop)",
                higher_is_better=True,
                target=5.0 if n >= 256 else None,
                samples=times,
                same_tokens=outs["gptforge"] == outs["no_cache"],
                prompt_tokens=prompt_len,
            )
        )
        log(f"generate: cache {tps['gptforge']:.1f} tok/s vs no cache {tps['no_cache']:.1f}")
    return rows
