"""gptforge speed and memory against transformers: `python benchmarks/run.py [--quick] [--only a,b]`.

Benchmarks: train (training step tokens/s and MFU), generate (KV-cache generation tokens/s), data
(tokenize + pack MB/s), convert (from_hf / export seconds and memory), memory (training step peak),
serve (`gptforge serve` vs `transformers serve --continuous-batching`: tokens/s, TTFT and latency at
concurrency 1, 4 and 16; `--only serve` runs just that), and,
only when asked for (`--only finetune`, about 12 minutes alone), finetune: whole finetunes against the
Hugging Face Trainer and TRL's SFTTrainer (real tokens/s per epoch at an equal validation result).
Results go to benchmarks/results.json (merged with the benchmarks not run this time) and a table in
benchmarks/RESULTS.md. Ratios are gptforge's advantage (> 1: gptforge is better), measured in one
process with the two sides interleaved, so they survive a busy machine better than absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import log, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("train", "generate", "data", "convert", "memory", "serve", "finetune")
DEFAULT = ("train", "generate", "data", "convert", "memory", "serve")  # finetune is long: run it with --only
SECTIONS = (*BENCHMARKS, "gpu")  # "gpu": rows that benchmarks/gpu.py merges into the same files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a few minutes)")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated subset of {BENCHMARKS} (default: {DEFAULT})",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (after warm-up)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile gptforge's model in the training benchmark (auto: on CUDA only; a cold "
        "inductor compile of gpt2 takes minutes on a small CPU)",
    )
    p.add_argument(
        "--malloc",
        choices=("default", "kept"),
        default="default",
        help="glibc allocator for the whole run, both sides: as is, or freed memory kept for reuse "
        "(gptforge.machine.keep_freed_memory, what gptforge's trainer sets on CPU); rows of each "
        "setting are kept apart in the results",
    )
    p.add_argument(
        "--data-path", default=None, help="tinyshakespeare.txt (default: $GPTFORGE_DATA_DIR/text/)"
    )
    p.add_argument(
        "--serve-seed",
        type=int,
        default=0,
        help="seed of the serve benchmark's random weights and prompts (change it if a request hits EOS)",
    )
    p.add_argument("--out-dir", default=str(HERE), help="where results.json and RESULTS.md go")
    args = p.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        p.error(f"--only: unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    return args


def plan(args: argparse.Namespace, device: str) -> dict:
    """Sizes per benchmark: the issue's full sizes, or a quick version for development."""
    cuda = device == "cuda"
    # Repetitions are few on a CPU: one gpt2 training step or one 256-token generation at batch 8
    # takes tens of seconds on 2 cores, and `make bench` should stay well under 15 minutes.
    if cuda:
        train = dict(presets=["gpt2"], B=32, T=1024, reps={"gpt2": args.reps or 5})
    elif args.quick:
        train = dict(presets=["cpu-small"], B=8, T=256, reps={"cpu-small": args.reps or 2})
    else:
        train = dict(
            presets=["cpu-small", "gpt2"],
            B=8,
            T=256,
            reps={"cpu-small": args.reps or 3, "gpt2": args.reps or 4},
        )
    gen = dict(
        preset="gpt2",
        batches=[1, 8],
        new_tokens=32 if args.quick else 256,
        prompt_len=32,
        reps={1: args.reps or 5, 8: args.reps or 3},
        no_cache_tokens=32 if args.quick else 256,
    )
    data = dict(
        target_mb=2.0 if args.quick else 10.0,
        context_length=256,
        num_proc=2,
        reps=args.reps or (1 if args.quick else 2),
    )
    convert = dict(reps=args.reps or (1 if args.quick else 2))
    memory = dict(presets=["cpu-small"] if args.quick else ["cpu-small", "gpt2"], B=8, T=256)
    # serve: two servers per model, rounds alternating between them. One request per client at c4 and
    # c16 keeps it to minutes: transformers' continuous batching runs a few tokens/s on this CPU.
    presets = ["cpu-tiny"] if args.quick else ["cpu-small", "gpt2"]
    serve = dict(
        presets=presets,
        concurrency=[1, 4, 16],
        prompt_len=32,
        max_tokens={p: 16 if args.quick else 32 for p in presets},
        requests={1: 2, 4: 4, 16: 16},
        reps=args.reps or 2,
    )
    # The default pipeline's model (configs/default.yaml: cpu-small at 192 wide, 3 blocks, context 128)
    # and its classify / instruct recipes, from a seeded initialisation; the whole SMS book split and the
    # 935 instruction records. --quick: the first examples of each split, one epoch.
    finetune = dict(
        shape=dict(preset="cpu-small", emb_dim=192, n_layers=3, n_heads=3, context_length=128),
        seed=123,
        classify=dict(
            epochs=1 if args.quick else 2,
            batch_size=8,
            lr=3e-4,
            warmup_steps=10,
            limit=160 if args.quick else None,
        ),
        instruct=dict(epochs=1, batch_size=8, lr=5e-4, warmup_steps=10, limit=120 if args.quick else None),
        profile_steps=3 if args.quick else 8,
        rounds=args.reps or 1,  # each finetune is minutes long: one round unless --reps asks for more
    )
    return {
        "train": train,
        "generate": gen,
        "data": data,
        "convert": convert,
        "memory": memory,
        "serve": serve,
        "finetune": finetune,
    }


def run_benchmarks(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "kept":
        from gptforge.machine import keep_freed_memory

        if not keep_freed_memory():
            print(
                "run.py: --malloc kept needs glibc on Linux with GPTFORGE_MALLOC unset; "
                "unset it or drop --malloc kept",
                file=sys.stderr,
            )
            raise SystemExit(2)
    meta = machine_info()
    meta.update(
        device=device, quick=args.quick, allocator=args.malloc, started=time.strftime("%Y-%m-%d %H:%M:%S")
    )
    sizes = plan(args, device)
    meta["sizes"] = {k: v for k, v in sizes.items() if k in args.only}
    rows: list[dict] = []
    t_start = time.perf_counter()

    if "train" in args.only:
        import bench_train as bt

        s = sizes["train"]
        peaks = {"fp32": bt.measure_matmul_peak(torch.float32, device)}
        peaks["bf16"] = bt.measure_matmul_peak(torch.bfloat16, device, budget_s=1.0)
        meta["matmul_peak"] = peaks
        log(f"matmul peak: {peaks}")
        compile_model = args.compile == "on" or (args.compile == "auto" and device == "cuda")
        rows += bt.run(
            s["presets"],
            bt.precisions_for(device),
            s["B"],
            s["T"],
            s["reps"],
            device,
            compile_model,
            peaks,
            allocator=args.malloc,
        )
    if "generate" in args.only:
        import bench_generate as bg

        s = sizes["generate"]
        rows += bg.run(
            s["preset"],
            s["batches"],
            s["new_tokens"],
            s["prompt_len"],
            s["reps"],
            device,
            s["no_cache_tokens"],
        )
    if "data" in args.only:
        import bench_data as bd

        s = sizes["data"]
        rows += bd.run(args.data_path, s["target_mb"], s["context_length"], s["num_proc"], s["reps"])
    if "convert" in args.only:
        import bench_memory as bm

        rows += bm.run_convert(sizes["convert"]["reps"])
    if "memory" in args.only:
        import bench_memory as bm

        s = sizes["memory"]
        rows += bm.run_train_memory(s["presets"], s["B"], s["T"])
    if "serve" in args.only:
        import bench_serve as bs

        s = sizes["serve"]
        rows += bs.run(
            s["presets"],
            s["concurrency"],
            s["prompt_len"],
            s["max_tokens"],
            s["requests"],
            s["reps"],
            device,
            seed=args.serve_seed,
        )
    if "finetune" in args.only:
        import bench_finetune as bf

        if "matmul_peak" not in meta:
            import bench_train as bt

            meta["matmul_peak"] = {"fp32": bt.measure_matmul_peak(torch.float32, device)}
        rows += bf.run(sizes["finetune"], meta["matmul_peak"])

    meta["load_average_end"] = list(os.getloadavg())
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    stamp = meta["started"]
    for r in rows:
        r["run"] = stamp
    return meta, rows


def merge(out_dir: Path, meta: dict, rows: list[dict], ran: list[str]) -> dict:
    """Keep earlier results of benchmarks not run now, so `--only` refreshes just its own rows.

    A benchmark run under the other `--malloc` setting counts as another benchmark: both are kept.
    """
    path = out_dir / "results.json"
    runs, kept = {}, []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            alloc = meta.get("allocator", "default")
            kept = [
                r
                for r in old.get("results", [])
                if r.get("benchmark") not in ran or r.get("allocator", "default") != alloc
            ]
            runs = {k: v for k, v in old.get("runs", {}).items() if any(r.get("run") == k for r in kept)}
        except (json.JSONDecodeError, AttributeError):
            kept, runs = [], {}
    runs[meta["started"]] = meta
    order = {b: i for i, b in enumerate(BENCHMARKS)}
    results = sorted(kept + rows, key=lambda r: order.get(r["benchmark"], 99))
    return {"runs": runs, "results": results}


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        s = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    else:
        s = str(x)
    return s + unit


def markdown(doc: dict) -> str:
    lines = [
        "# gptforge benchmarks",
        "",
        "Written by `python benchmarks/run.py` (`make bench`); the raw numbers, every sample and the",
        "machine are in `results.json`. **Advantage** is gptforge's ratio over the baseline, measured in",
        "one process with both sides interleaved after warm-up (medians): above 1 means gptforge is",
        "faster or uses less memory. Absolute numbers move with the machine's load; the ratios are what",
        "to compare.",
        "",
    ]
    for stamp, meta in doc["runs"].items():
        lines += [
            f"## Machine (run {stamp}{', --quick' if meta.get('quick') else ''}"
            f"{', --malloc kept' if meta.get('allocator') == 'kept' else ''})",
            "",
            f"- CPU: {meta['cpu']} ({meta['cpu_count']} logical cores, torch threads {meta['torch_threads']}, "
            f"{meta['cpu_capability']}, native bf16: {meta['cpu_native_bf16']}); GPU: {meta['gpu'] or 'none'}; "
            f"device used: {meta['device']}",
            f"- load average at start / end: {meta['load_average_start'][0]:.1f} / "
            f"{meta.get('load_average_end', [float('nan')])[0]:.1f} (the machine is shared)",
            f"- torch {meta['torch']}, transformers {meta['transformers']}, datasets {meta['datasets']}, "
            f"accelerate {meta['accelerate']}, tokenizers {meta['tokenizers']}, tiktoken {meta['tiktoken']}, "
            f"safetensors {meta['safetensors']}, python {meta['python']}; gptforge commit {meta['git_commit']}",
        ]
        if meta.get("matmul_peak"):
            pk = meta["matmul_peak"]
            lines.append(
                "- measured matmul peak: "
                + ", ".join(
                    f"{v['dtype']} {v['gflops']:.1f} GFLOP/s (n={v['n']}"
                    + "".join(
                        f"; {k} {g:.1f}" for k, g in v.get("by_kernel", {}).items() if len(v["by_kernel"]) > 1
                    )
                    + ")"
                    for v in pk.values()
                )
            )
        if meta.get("gpu_peak"):
            lines.append(f"- MFU on the GPU is against its dense bf16 peak: {meta['gpu_peak']['source']}")
        for key in ("skipped", "failed"):
            if meta.get(key):
                lines.append(f"- {key}: {meta[key]}")
        lines.append(f"- wall time of this run: {meta.get('seconds', '-')} s")
        lines.append("")
    titles = {
        "train": "Training step (forward + backward + AdamW)",
        "generate": "Generation (greedy)",
        "data": "Data: tokenize and pack",
        "convert": "Conversion",
        "memory": "Training step peak memory",
        "serve": "Serving: `gptforge serve` vs `transformers serve --continuous-batching` (streamed /v1/completions, greedy)",
        "gpu": "GPU: gpt2 124M training and generation (benchmarks/gpu.py)",
        "finetune": "End-to-end finetunes (real tokens/s per training epoch, equal recipe and start)",
    }
    for bench in SECTIONS:
        rows = [r for r in doc["results"] if r["benchmark"] == bench]
        if not rows:
            continue
        note: list[str] = []
        if bench == "train":
            meta = doc["runs"].get(rows[0].get("run"), {})
            pk = meta.get("matmul_peak", {})
            if meta.get("device") == "cpu" and not meta.get("cpu_native_bf16") and "bf16" in pk:
                note = [
                    "Best precision on this CPU is fp32 for both sides (`benchmarks/common.py: best_precision`): "
                    f"it has no bf16 matrix units, and a bf16 matmul ran at {pk['bf16']['gflops']:.1f} GFLOP/s "
                    f"against {pk['fp32']['gflops']:.1f} in fp32, so bf16 autocast would slow both down; "
                    "the best-precision rows equal the fp32 rows and are not repeated.",
                    "",
                ]
        if bench == "serve":
            note = [
                "Both servers run as subprocesses on 127.0.0.1 with the same random weights (transformers serves "
                "gptforge's Hugging Face export of them); rounds alternate between them (ABBA) after warm-up. "
                "tokens/s is a round's generated tokens over its wall time (median of rounds); TTFT (first "
                "streamed text) and latency percentiles are over every request of the timed rounds. transformers "
                "is given its KV-cache size: by default it takes 60% of the machine's free memory on a CPU.",
                "",
            ]
        lines += [
            f"## {titles[bench]}",
            "",
            "| case | unit | gptforge | baseline | advantage | target | met |",
            "|---|---|---:|---:|---:|---:|:---:|",
        ]
        for r in rows:
            met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
            for key in ("met_seconds", "met_memory"):
                if key in r:
                    met = (met + " " if met else "") + f"{key[4:]}: {'yes' if r[key] else '**no**'}"
            tgt = f"{r['target']}x" if r.get("target") else ""
            if "target_seconds_after_read" in r:
                tgt = f"< {r['target_seconds_after_read']} s after read"
            if "peak_over_model" in r:
                tgt = "peak <= 2x model"
            lines.append(
                f"| {r['case']} | {r['metric']} | {_fmt(r['gptforge'])} | {_fmt(r['baseline'])} | "
                f"{_fmt(r['ratio'], 'x')} | {tgt} | {met} |"
            )
        lines.append("")
        lines.append("Baselines: " + "; ".join(sorted({r["baseline_name"] for r in rows})) + ".")
        lines.append("")
        lines += note
        for r in rows:
            lines += _details(r)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _details(r: dict) -> list[str]:
    out = []
    if r["benchmark"] == "train":
        mfu = r.get("mfu", {})
        ach = r.get("achieved_gflops", {})
        if r.get("target") and mfu.get("transformers") and r.get("met") is False:
            need = r["target"] * mfu["transformers"]
            out.append(
                f"- {r['case']}: {r['target']}x transformers would need {_pct(need)} of the measured matmul "
                f"peak for the whole step (gptforge reaches {_pct(mfu.get('gptforge'))})"
            )
        out.append(
            f"- {r['case']}: achieved {ach.get('gptforge')} / {ach.get('transformers')} GFLOP/s "
            f"(gptforge / transformers; {r['gflops_per_token']} GFLOP per token), MFU "
            f"{_pct(mfu.get('gptforge'))} / {_pct(mfu.get('transformers'))} of the measured peak; "
            f"torch.compile: {r['compiled']} (first step {r['first_step_s']} s); first-step losses equal: "
            f"{r['first_loss_equal']} ({r['first_loss']['gptforge']:.5f} vs {r['first_loss']['transformers']:.5f})"
        )
        ks, pf = r.get("kernel_s_per_step"), r.get("page_faults_per_step")
        if ks and pf:
            out.append(
                f"- {r['case']}: per step, CPU seconds in the kernel {ks.get('gptforge')} / {ks.get('transformers')} "
                f"and minor page faults {pf.get('gptforge'):,} / {pf.get('transformers'):,} (gptforge / "
                f"transformers; allocator: {'freed memory kept' if r.get('allocator') == 'kept' else 'glibc default'})"
            )
    elif r["benchmark"] == "gpu":
        parts = []
        mfu = r.get("mfu")
        if mfu:
            parts.append(
                f"MFU {_pct(mfu.get('gptforge'))} / {_pct(mfu.get('transformers'))} (gptforge / transformers)"
            )
        if "first_loss" in r:
            parts.append(
                f"torch.compile {r['compiled']}; flash attention only: {r['flash_only']}; "
                f"warm-up (compile) {r['warmup_s']} s; first-step losses equal: {r['first_loss_equal']} "
                f"({r['first_loss']['gptforge']:.4f} vs {r['first_loss']['transformers']:.4f})"
            )
        if "wall_s" in r:
            parts.append(
                f"median of the logged windows after the first (log_every={r['log_every']}), wall {r['wall_s']} s"
            )
        if "same_tokens" in r:
            parts.append(f"identical token ids: {r['same_tokens']}")
        out.append(f"- {r['case']}: " + "; ".join(parts))
        if r.get("compile_error"):
            out.append(f"- {r['case']}: compile fell back to eager: {r['compile_error']}")
    elif r["benchmark"] == "generate":
        out.append(f"- {r['case']}: identical token ids: {r['same_tokens']}")
        floor = r.get("matmul_floor_tokens_per_s")
        if floor:
            share = r.get("share_of_floor", {})
            out.append(
                f"- {r['case']}: the weight matmuls alone (every Linear and the LM head in the fastest of the "
                f"GEMM forms, no attention, no Python) run at {_fmt(floor)} tokens/s; gptforge reaches "
                f"{_pct(share.get('gptforge'))} of that, the baseline "
                f"{_pct(share.get('transformers', share.get('no_cache')))}"
            )
            if "engine_tokens_per_s" in r:
                dec = r.get("decode_share_of_floor", {})
                ok = {k: v >= r.get("floor_target", 0.85) for k, v in dec.items()}
                out.append(
                    f"- {r['case']}: the floor measured in the same rounds ({r.get('matmul_floor_form')} form); "
                    f"serve engine {_fmt(r['engine_tokens_per_s'])} tokens/s, {_pct(share.get('engine'))} of "
                    f"the floor (same tokens as generate: {r.get('engine_same_tokens')}); decoding alone "
                    f"(without the prefill: {_pct(r.get('prefill_share', {}).get('gptforge'))} / "
                    f"{_pct(r.get('prefill_share', {}).get('engine'))} of the run) generate "
                    f"{_pct(dec.get('gptforge'))} and engine {_pct(dec.get('engine'))} of the floor "
                    f"(goal {_pct(r.get('floor_target'))}: {ok.get('gptforge')} / {ok.get('engine')}); each "
                    f"against the floor timed in its own process, next to it in each round (the median of the "
                    f"rounds' ratios): the engine's child ran it at "
                    f"{_fmt(r.get('engine_matmul_floor_tokens_per_s'))} tokens/s (against this process's floor the "
                    f"engine's decoding is {_pct(r.get('engine_decode_share_of_this_process_floor'))})"
                )
                if r.get("kv_read_ms_per_step") is not None:
                    out.append(
                        f"- {r['case']}: reading every row's cached keys and values once a step (what attention "
                        f"cannot go below) takes {r['kv_read_ms_per_step']} ms a step; the floor plus that is "
                        f"{_pct(r.get('share_bound_with_kv_read'))} of the floor: the most any decoder reaches"
                    )
                own = r.get("decode_share_of_own_form_floor")
                if own and r.get("own_form") != r.get("matmul_floor_form"):
                    out.append(
                        f"- {r['case']}: gptforge's Linear runs the {r['own_form']} form at this batch; against "
                        f"the floor in that form, decoding alone reaches {_pct(own.get('gptforge'))} (generate) "
                        f"and {_pct(own.get('engine'))} (engine)"
                    )
            bd = r.get("decode_ms_per_step")
            if bd:
                forms = r.get("matmul_floor_ms_by_form", {})
                out.append(
                    f"- {r['case']}: one decoding step, profiled (ms): "
                    + ", ".join(f"{k} {v}" for k, v in bd.items())
                    + "; the weight matmuls alone by GEMM form (ms): "
                    + ", ".join(f"{k} {v}" for k, v in forms.items())
                )
            if r.get("target") and r.get("met") is False:
                need = r["target"] * r["baseline"]
                out.append(
                    f"- {r['case']}: {r['target']}x the baseline would need {_fmt(need)} tokens/s, "
                    f"{need / floor:.2f}x what the weight matmuls alone allow"
                )
    elif r["benchmark"] == "data":
        out.append(f"- tokens in blocks: {r['block_tokens']}")
    elif r["benchmark"] == "convert":
        if "seconds_after_read" in r:
            out.append(
                f"- {r['case']}: reading the files {r['read_seconds']} s, conversion after reading "
                f"{r['seconds_after_read']} s"
            )
        if "peak_over_model" in r:
            out.append(
                f"- {r['case']}: model {r['model_mib']} MiB; peak is {r['peak_over_model']}x the model"
            )
    elif r["benchmark"] == "serve" and r["metric"] == "tokens/s":
        rss = r.get("server_rss_mib", {})
        st = r.get("server_settings", {})
        out.append(
            f"- {r['case']}: {r['requests_per_round']} requests a round ({r['prompt_tokens']}-token prompts, "
            f"{r['max_tokens']} tokens each, every count checked in `usage`), {r['rounds']} rounds a side; "
            f"same text from both servers: {_pct(r.get('same_text_share'))}; server resident memory "
            f"{rss.get('gptforge')} / {rss.get('transformers')} MiB (gptforge --max-batch {st.get('gptforge_max_batch')}; "
            f"transformers --cb-num-blocks {st.get('cb_num_blocks')} --cb-max-batch-tokens "
            f"{st.get('cb_max_batch_tokens')})"
        )
    elif r["benchmark"] == "finetune":
        out += _finetune_details(r)
    elif r["benchmark"] == "memory":
        out.append(
            f"- {r['case']}: resident before the step (weights, optimizer state) {r['resident_before_mib']}"
        )
    return out


def _finetune_details(r: dict) -> list[str]:
    """Every run of the task (once per task), the sanity check and where gptforge's step spends its time."""
    res = r["result"]
    names = list(res)
    out = [
        f"- {r['case']}: {r['result_metric']} {res[names[0]]:.4g} / {res[names[1]]:.4g} "
        f"(equal within tolerance: {r['result_equal']})"
    ]
    if not r.get("details"):
        return out
    out.append(
        f"- {r['task']}: every run (training seconds per epoch are medians over epochs; padding = tokens "
        "computed / real tokens; whole call: gptforge's includes data preparation, the final evaluation of "
        "every split and the checkpoint, the baselines' only `train()`):"
    )
    out.append("")
    out.append(
        "  | run | s / epoch | real tokens/s | padding | steps | " + r["result_metric"] + " | whole call s |"
    )
    out.append("  |---|---:|---:|---:|---:|---:|---:|")
    for name, s in r["runs"].items():
        out.append(
            f"  | {name} | {s['epoch_s_median']} | {_fmt(s['tokens_per_s'])} | {s['padding_overhead']}x | "
            f"{s['steps']} | {s['result']:.4f} | {s['total_s']} |"
        )
    out.append("")
    first = r["first_loss"]
    out.append(
        f"- {r['task']}: same start, same computation: losses of one batch before and after one AdamW step equal "
        f"within 1e-4: {r['first_loss_equal']} ("
        + "; ".join(f"{k} {', '.join(f'{x:.6f}' for x in v)}" for k, v in first.items())
        + ")"
    )
    p = r.get("profile") or {}
    if p:
        share = ", ".join(f"{k} {_pct(v)}" for k, v in p["share"].items())
        out.append(
            f"- {r['task']}: gptforge's step alone (torch.profiler, {p['steps']} steps, {p['wall_s_per_step']} s "
            f"each): {share} of CPU time; the matmuls run at {p['matmul_gflops']} GFLOP/s, "
            f"{_pct(p['matmul_share_of_peak'])} of the measured peak; top ops: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in p["top_ops"][:5])
        )
    opts = r.get("options_present", {})
    missing = [k for k, v in opts.items() if not v]
    if missing:
        out.append(f"- gptforge options not in this build (their rows are absent): {', '.join(missing)}")
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> int:
    from gptforge.io import write_json

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, rows = run_benchmarks(args)
    doc = merge(out_dir, meta, rows, args.only)
    write_json(out_dir / "results.json", doc)
    md = out_dir / "RESULTS.md"
    tmp = md.with_name(f".{md.name}.tmp-{os.getpid()}")
    tmp.write_text(markdown(doc), encoding="utf-8")
    os.replace(tmp, md)
    log(f"wrote {out_dir / 'results.json'} and {md} in {meta['seconds']} s")
    print(markdown({"runs": {meta["started"]: meta}, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
