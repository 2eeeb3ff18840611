"""What every benchmark shares: interleaved timing, machine description, peak memory, result records.

Speed on a shared machine drifts with everyone else's load, so gptforge and its alternative are timed
in one process, alternating (ABBA order) after warm-up, and compared by the ratio of their medians.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    """Progress on stderr, flushed, so long runs show where they are."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def interleaved(
    cases: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    device: str = "cpu",
    outputs: dict[str, Any] | None = None,
    usage: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each case: `warmup` untimed calls each, then `reps` rounds in ABBA order.

    With `outputs`, each case's last return value is stored there (to check both sides agree). With
    `usage`, each timed call's CPU seconds in the kernel and minor page faults (getrusage) go there.
    """
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
            sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            sync(device)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            out = cases[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
            if usage is not None:
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                u = usage.setdefault(n, {"kernel_s": [], "minor_faults": []})
                u["kernel_s"].append(round(r1.ru_stime - r0.ru_stime, 3))
                u["minor_faults"].append(r1.ru_minflt - r0.ru_minflt)
            if outputs is not None:
                outputs[n] = out
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def record(
    benchmark: str,
    case: str,
    metric: str,
    gptforge: float | None,
    baseline: float | None,
    baseline_name: str,
    *,
    higher_is_better: bool,
    target: float | None = None,
    samples: dict[str, list[float]] | None = None,
    **extra: Any,
) -> dict:
    """One result row. `ratio` is always gptforge's advantage: > 1 means gptforge is better."""
    ratio = None
    if gptforge and baseline:
        ratio = gptforge / baseline if higher_is_better else baseline / gptforge
    row = {
        "benchmark": benchmark,
        "case": case,
        "metric": metric,
        "gptforge": gptforge,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "higher_is_better": higher_is_better,
        "ratio": ratio,
        "target": target,
        "met": None if target is None or ratio is None else bool(ratio >= target),
    }
    if samples:
        row["samples"] = {k: [round(v, 6) for v in vs] for k, vs in samples.items()}
    row.update(extra)
    return row


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except Exception:
        return None


PRECISIONS = ("bf16", "fp16", "no")


def best_precision(device: str | torch.device | None = None) -> str:
    """Mixed precision that is fastest and safe on `device`: "bf16", "fp16" or "no" (Accelerate's names).

    CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16. CPU: bf16 only where the CPU is
    known to have bf16 matrix units (an unknown CPU stays fp32). `$GPTFORGE_PRECISION` overrides.
    """
    from gptforge.machine import cpu_has_native_bf16

    forced = os.environ.get("GPTFORGE_PRECISION")
    if forced:
        if forced not in PRECISIONS:
            print(
                f"GPTFORGE_PRECISION={forced!r}: use one of {', '.join(PRECISIONS)} or unset it",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return forced
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dev.type == "cpu":
        return "bf16" if cpu_has_native_bf16() is True else "no"
    return "no"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """torch dtype for an Accelerate precision name; None for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[precision]


def machine_info() -> dict:
    """CPU/GPU, threads, bf16 support and library versions: what a reader needs to weigh the numbers."""
    from gptforge.machine import cpu_has_native_bf16

    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "best_precision_cpu": best_precision("cpu"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "load_average_start": list(os.getloadavg()),
    }
    for mod in ("torch", "transformers", "datasets", "accelerate", "tokenizers", "tiktoken", "safetensors"):
        info[mod] = _version(mod)
    return info


# -- memory --------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next peak is this step's; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_probe(args: list[str], timeout: float = 900) -> dict:
    """Run `benchmarks/probe.py ARGS` in a fresh process (clean memory) and return its JSON answer."""
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("probe.py")), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe {args} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)
