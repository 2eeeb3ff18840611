"""Greedy generation tokens/s: gptforge's KV-cache loop and serving engine vs transformers `generate`,
vs no cache, and vs the weight-matmul floor of a decoding step.

Same weights (copied with `to_hf`), same random prompts, EOS disabled so every run makes exactly
`new_tokens` tokens; the token ids of every side must be equal (recorded as `same_tokens`). The floor
runs in the same interleaved rounds as the generators, so each share of it is measured under the same
load; a profile of gptforge's decoding steps says where the time above the floor goes.
"""

from __future__ import annotations

import collections
import time

import torch
import torch.nn.functional as F
from common import interleaved, log, median, record, sync

from gptforge.model.config import GPTConfig
from gptforge.model.generate import decode_step, generate, prefill
from gptforge.model.gpt import GPT, ONEDNN_LINEAR, KVCache
from gptforge.model.hf import to_hf


def _floor_forms(model: GPT, B: int, device: str) -> dict:
    """The weight matmuls of one decoding step (every block's four Linear layers and the LM head, batch
    B, one token per row) in every form of the same float32 product at hand: F.linear(x, W) (BLAS sgemm),
    (W @ x.T).T, x @ W.T with W.T copied contiguous beforehand (a second copy of every weight), on a CPU
    with oneDNN its GEMM (`torch.ops.mkldnn._linear_pointwise`, what gptforge's Linear runs there beyond
    a few rows), and for up to `kernels.FEW_ROWS` rows gptforge's own few-row kernel (`kernels.linear`,
    what its decoding steps run there)."""
    from gptforge.model import kernels

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

    forms = {"linear": linear, "w_xt": w_xt, "x_wt": x_wt}
    if device == "cpu" and ONEDNN_LINEAR:

        def onednn():
            for w in weights:
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "")

        forms["onednn"] = onednn
    if device == "cpu" and B <= kernels.FEW_ROWS and kernels.available():

        def few_rows():
            for w in weights:
                kernels.linear(xs[w.shape[1]], w, None)

        forms["few_rows"] = few_rows
    return forms


def matmul_floor_seconds(model: GPT, B: int, device: str, reps: int = 7) -> tuple[float, str, dict]:
    """Median seconds of one decoding step's weight matmuls in the fastest of the forms, its name,
    and every form's median. No greedy decoder with these weights can beat the fastest."""
    with torch.inference_mode():
        times = interleaved(_floor_forms(model, B, device), reps=reps, warmup=1, device=device)
    forms = {k: median(v) for k, v in times.items()}
    best = min(forms, key=forms.get)
    return forms[best], best, forms


# Where a decoding step's time goes: aten ops by what they do; the rest of the wall time is Python and
# dispatch (the interpreter, module calls, argument parsing).
CATEGORIES = {
    "weight matmuls": (
        "aten::addmm",
        "aten::mm",
        "aten::addmv",
        "aten::mv",
        "aten::matmul",
        "aten::linear",
        "mkldnn::_linear_pointwise",
    ),  # (+ the time in gptforge.model.kernels.linear, the few-row products, timed apart)
    # (+ the time in gptforge.model.kernels.attend, the CPU decoding step's attention, timed apart)
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_efficient_attention_forward",
        "aten::_flash_attention_forward",
        "aten::bmm",
        "aten::_softmax",
        "aten::softmax",
    ),
    "copies (cache writes, Linear output layout)": ("aten::copy_", "aten::index_copy_", "aten::index_put_"),
    # (+ the time in gptforge.model.kernels.add_layer_norm, timed apart)
    "layer norm, gelu, residual adds": ("aten::native_layer_norm", "aten::gelu", "aten::add", "aten::add_"),
    "sampling": ("aten::argmax", "aten::max", "aten::topk", "aten::sort", "aten::multinomial"),
}


def _seeded_model(preset: str, device: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset)).to(device).eval()


def _floor_steps(fn, n: int) -> None:
    """n decoding steps' weight matmuls, one form of them (`_floor_forms`)."""
    with torch.inference_mode():
        for _ in range(n):
            fn()


def _engine_worker(conn, preset: str, device: str, max_batch: int) -> None:
    """The serve engine in a process of its own, as `gptforge serve` runs it: the model made on a thread
    that has ended (see `gptforge.serve.app.load_served`), the engine's thread the only one with OpenMP
    threads. A message (prompts, n) runs the prompts to n tokens each and answers with their tokens; a
    message (form, B, n) times n steps of the weight-matmul floor in that form (`_floor_forms`) in this
    process and answers with the seconds: the engine stops first (its thread, and that thread's OpenMP
    pool, end), the floor runs on a thread of its own that ends with it, and a new engine starts, its
    cache grown to the longest rows a run has needed."""
    from gptforge.machine import on_a_thread_that_ends
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.serve.engine import Engine, SamplingParams, wait_all

    def run(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
        reqs = [engine.submit(p, SamplingParams(max_tokens=n, eos_ids=())) for p in prompts]
        if not wait_all(reqs, 3600):
            raise RuntimeError("engine: requests did not finish")
        return [r.tokens for r in reqs]

    def floor(form: str, B: int, n: int) -> float:
        fn = _floor_forms(model, B, device)[form]
        _floor_steps(fn, 1)  # warm-up: this thread's OpenMP pool, oneDNN's primitives
        t0 = time.perf_counter()
        _floor_steps(fn, n)
        sync(device)
        return time.perf_counter() - t0

    def start(need: int) -> Engine:
        engine = Engine(model, Tokenizer(), max_batch=max_batch, max_queue=0).start()
        # its OpenMP pool made, and its cache as long as the longest run so far needs, before any timing
        run(engine, [[0] * (need - 1)], 1)
        return engine

    model = on_a_thread_that_ends(_seeded_model, preset, device)
    need = 2  # the longest row a run has needed (prompt + new tokens; at first one token and one more)
    engine = start(need)
    try:
        while (msg := conn.recv()) is not None:
            if len(msg) == 3:
                engine.stop()
                seconds = on_a_thread_that_ends(floor, *msg)
                engine = start(need)
                conn.send(seconds)
            else:
                prompts, n = msg
                need = max(need, n + max(map(len, prompts)))
                conn.send(run(engine, prompts, n))
    finally:
        engine.stop()


class EngineProcess:
    """The engine's runs, timed from here: a child process (the same seeded weights) runs each one.

    Not in this process: a thread that has run OpenMP work keeps a pool of OpenMP threads while it lives,
    and with more of them alive than cores GNU OpenMP lets none spin, so every parallel region waits for
    a wake-up (measured: an idle engine thread made generate() 20% slower at batch 8, and this process's
    pool the engine 21% slower). A server process has one such pool, the engine's. Fresh processes run
    the same GEMMs up to 12% apart on this VM, so the engine's share of the floor is taken against the
    floor timed in its own process (`floor`)."""

    def __init__(self, preset: str, device: str, max_batch: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_worker, args=(child, preset, device, max_batch), daemon=True)
        self.proc.start()

    def __call__(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        self.conn.send((prompts, n))
        return self.conn.recv()

    def floor(self, form: str, B: int, n: int) -> float:
        """Seconds of n steps of the weight-matmul floor in `form`, timed in the engine's process."""
        self.conn.send((form, B, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(60)


def decode_breakdown(model: GPT, prompts: list[list[int]], steps: int, floor_s: float) -> dict:
    """Profile `steps` decoding steps (forward, LM head, argmax) after a prefill: milliseconds per step
    in each category of aten ops (self time), Python and dispatch (wall minus all aten ops), and the
    weight-matmul floor for comparison. The profiler adds a little to the Python share."""
    from torch.profiler import ProfilerActivity, profile

    from gptforge.model import kernels

    # the decoding kernels (numba) are no aten ops: their calls are timed here, attention's as attention,
    # the few-row products' with the weight matmuls, the residual add + LayerNorm's with the layer norms
    real = {"attend": kernels.attend, "linear": kernels.linear, "add_layer_norm": kernels.add_layer_norm}
    kernel_s = {name: 0.0 for name in real}

    def timed(name):
        def call(*args):
            t0 = time.perf_counter()
            out = real[name](*args)
            kernel_s[name] += time.perf_counter() - t0
            return out

        return call

    p = next(model.parameters())
    B = len(prompts)
    with torch.inference_mode():
        cache = KVCache(model.cfg, B, max(map(len, prompts)) + steps + 1, device=p.device, dtype=p.dtype)
        tok = prefill(model, cache, 0, prompts).argmax(-1)
        for _ in range(3):  # warm the profiler's own first-call costs on a throwaway cache
            decode_step(model, cache, tok)
        cache = KVCache(model.cfg, B, max(map(len, prompts)) + steps + 1, device=p.device, dtype=p.dtype)
        tok = prefill(model, cache, 0, prompts).argmax(-1)
        for name in real:
            setattr(kernels, name, timed(name))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    tok = decode_step(model, cache, tok).argmax(-1)
                wall = time.perf_counter() - t0
        finally:
            for name, fn in real.items():
                setattr(kernels, name, fn)
    self_us: collections.Counter[str] = collections.Counter()
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    per_step = {}
    used = 0.0
    for cat, names in CATEGORIES.items():
        us = sum(self_us[n] for n in names)
        used += us
        per_step[cat] = us / 1e3 / steps
    all_ops = sum(self_us.values())
    per_step["attention"] += kernel_s["attend"] * 1e3 / steps
    per_step["weight matmuls"] += kernel_s["linear"] * 1e3 / steps
    per_step["layer norm, gelu, residual adds"] += kernel_s["add_layer_norm"] * 1e3 / steps
    per_step["other aten ops"] = (all_ops - used) / 1e3 / steps
    in_kernels = sum(kernel_s.values())
    per_step["python and dispatch"] = max(0.0, wall - all_ops / 1e6 - in_kernels) * 1e3 / steps
    out = {k: round(v, 3) for k, v in per_step.items()}
    out["total (profiled)"] = round(wall * 1e3 / steps, 3)
    out["weight-matmul floor"] = round(floor_s * 1e3, 3)
    return out


def run(
    preset: str,
    batches: list[int],
    new_tokens: int,
    prompt_len: int,
    reps: dict[int, int],
    device: str,
    no_cache_tokens: int | None,
) -> list[dict]:
    model = _seeded_model(preset, device)
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
        floor_s, form, forms = matmul_floor_seconds(model, B, device)
        # the form gptforge's decoding steps run here (`kernels.linear` up to FEW_ROWS rows, then `Linear`)
        fallback = "linear" if B == 1 or device != "cpu" else "w_xt"
        own_form = next((f for f in ("few_rows", "onednn") if f in forms), fallback)
        floor_fn = _floor_forms(model, B, device)[form]

        served = EngineProcess(preset, device, B)

        def floor(n=new_tokens, fn=floor_fn):
            _floor_steps(fn, n)

        # What attention cannot go below: each decoding step reads every row's cached keys and values once
        # (no arithmetic, just a sum over them), at the lengths the steps of this run have.
        kv = KVCache(
            model.cfg, B, prompt_len + new_tokens, device=device, dtype=next(model.parameters()).dtype
        )

        def kv_read(kv=kv):
            with torch.inference_mode():
                for length in range(prompt_len + 1, prompt_len + new_tokens):  # every layer in one call
                    kv.k[:, :, :, :length].sum()
                    kv.v[:, :, :, :length].sum()

        engine_floor_s: list[float] = []  # the floor timed in the engine's process, each round

        def engine_floor(n=new_tokens, s=served, form=form, B=B, out=engine_floor_s):
            out.append(s.floor(form, B, n))

        try:
            # warm-up: same shapes (the engine's cache grows to the run's rows once, here)
            ours(plist, 4), theirs(prompt, 4), served(plist, new_tokens), floor(4)
            outs: dict = {}
            times = interleaved(
                {  # each side's runs next to its floor (see decode_share below)
                    "gptforge": lambda p=plist: ours(p, new_tokens),
                    # prefill and first token only: the difference to the full runs is decoding alone
                    "gptforge_first": lambda p=plist: ours(p, 1),
                    "floor": floor,
                    "engine_floor": engine_floor,
                    "engine_first": lambda p=plist, s=served: s(p, 1),
                    "engine": lambda p=plist, s=served: s(p, new_tokens),
                    "transformers": lambda p=prompt: theirs(p, new_tokens),
                    "kv_read": kv_read,
                },
                reps=reps[B],
                warmup=0,
                device=device,
                outputs=outs,
            )
        finally:
            served.close()
        times["engine_floor"] = engine_floor_s  # as timed in the engine's process, not the round trip
        med = {k: median(v) for k, v in times.items()}
        tps = {
            k: B * new_tokens / med[k]
            for k in ("gptforge", "engine", "transformers", "floor", "engine_floor")
        }
        floor_tps = tps["floor"]
        # Decoding alone: tokens 2..n, without the prefill (which the floor of a decoding step leaves out).
        decode_tps = {
            k: B * (new_tokens - 1) / max(1e-9, med[k] - med[f"{k}_first"]) for k in ("gptforge", "engine")
        }
        # Decoding's share of the floor round by round, the median of those ratios: this host's memory
        # bandwidth drifts by 10% and more over seconds to minutes (other guests), so a side and its floor
        # are compared as timed next to each other, not as medians of runs minutes apart.
        decode_share = {
            k: median(
                [
                    (fl / new_tokens) / max(1e-9, (run - first) / (new_tokens - 1))
                    for run, first, fl in zip(times[k], times[f"{k}_first"], times[floor_key])
                ]
            )
            for k, floor_key in (("gptforge", "floor"), ("engine", "engine_floor"))
        }
        breakdown = decode_breakdown(model, plist, new_tokens - 1, med["floor"] / new_tokens)
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
                engine_same_tokens=outs["engine"] == outs["gptforge"],
                prompt_tokens=prompt_len,
                engine_tokens_per_s=round(tps["engine"], 2),
                matmul_floor_tokens_per_s=round(floor_tps, 2),
                # the same floor timed in the engine's process (its child), in the same rounds
                engine_matmul_floor_tokens_per_s=round(tps["engine_floor"], 2),
                matmul_floor_form=form,
                matmul_floor_alone_tokens_per_s=round(B / floor_s, 2),
                # gptforge's decoding runs few_rows up to kernels.FEW_ROWS rows, beyond that oneDNN on a CPU
                # that has it (else F.linear for one row, w_xt for 2..128)
                matmul_floor_ms_by_form={k: round(v * 1e3, 3) for k, v in forms.items()},
                share_of_floor={k: round(v / floor_tps, 3) for k, v in tps.items() if "floor" not in k},
                # decoding alone against the floor timed in its own process (generate() here, the engine
                # in its child); the engine against this process's floor too, as earlier runs reported it
                decode_share_of_floor={k: round(v, 3) for k, v in decode_share.items()},
                engine_decode_share_of_this_process_floor=round(decode_tps["engine"] / floor_tps, 3),
                # reading the KV cache once per step on top of the floor: the share no decoder can pass
                kv_read_ms_per_step=round(med["kv_read"] / (new_tokens - 1) * 1e3, 3),
                share_bound_with_kv_read=round(med["floor"] / (med["floor"] + med["kv_read"]), 3),
                # the same against the floor in the GEMM form gptforge's Linear uses at this batch (scaled
                # by the forms' ratio measured just before the rounds): what is left is not the kernel
                decode_share_of_own_form_floor={
                    k: round(v * forms[own_form] / forms[form], 3) for k, v in decode_share.items()
                },
                own_form=own_form,
                prefill_share={k: round(med[f"{k}_first"] / med[k], 3) for k in ("gptforge", "engine")},
                floor_target=0.85,
                decode_ms_per_step=breakdown,
            )
        )
        log(
            f"generate: {label}: floor {floor_tps:.1f} tok/s ({form}); gptforge {tps['gptforge']:.1f} "
            f"({tps['gptforge'] / floor_tps:.0%}, decoding alone {decode_share['gptforge']:.0%}), "
            f"engine {tps['engine']:.1f} ({tps['engine'] / floor_tps:.0%}, decoding alone "
            f"{decode_share['engine']:.0%} of the floor in its process, "
            f"{tps['engine_floor']:.1f} tok/s), transformers {tps['transformers']:.1f} "
            f"({tps['transformers'] / floor_tps:.0%}); reading the KV cache once a step "
            f"{med['kv_read'] / (new_tokens - 1) * 1e3:.2f} ms (floor + that: "
            f"{med['floor'] / (med['floor'] + med['kv_read']):.0%} of the floor at best); "
            f"per decoding step (ms): {breakdown}"
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
