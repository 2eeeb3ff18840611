"""What this machine can do and how its memory is handed out: bf16 units (CPU, GPU) and glibc's allocator.

These are facts about the process and the hardware, not about the model, so they sit at the bottom of
the package beside `io` and `errors`: the trainer and the benchmarks both use them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    """CPU feature flags from /proc/cpuinfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool | None:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), False where it does not,
    None where that cannot be told (no /proc/cpuinfo, or not an x86 CPU).

    Without those units oneDNN falls back to slow conversion paths: on an AVX2-only EPYC a bf16 matmul
    ran over 10x slower than fp32, so bf16 must be a measured choice, never a default. Callers decide what
    "unknown" means: the trainer warns only on a known False, the benchmarks try bf16 only on True.
    """
    if not torch.backends.mkldnn.is_available():
        return False  # no oneDNN: CPU bf16 matmuls take the slow reference kernels whatever the CPU has
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        if probe is not None:
            try:
                if probe():
                    return True
            except RuntimeError:
                pass
    flags = _cpu_flags()
    if flags is None or not _is_x86():
        return None
    return bool(flags & _BF16_FLAGS)


def cuda_has_native_bf16() -> bool:
    """True where this process's CUDA GPU has bf16 tensor cores (compute capability 8.0+: A100, H100, RTX 30xx
    and later). Older GPUs emulate bf16, which is slower than fp32. Asks the device this rank will use
    (LOCAL_RANK under torchrun), so no process opens a context on another rank's GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
        return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)
    except (RuntimeError, AssertionError, ValueError):
        return False


def auto_precision(cpu: bool = False) -> tuple[str, bool]:
    """(mixed_precision, compile) that `train.mixed_precision: auto` and `train.compile: auto` resolve to.

    bf16 autocast and torch.compile on a GPU with native bf16; fp32 and eager elsewhere: a CPU run stays
    fp32 even with bf16 units, so its numbers do not depend on which CPU ran it (bf16 ran ~150x slower
    than fp32 on an AVX2-only CPU), and a cold inductor compile costs minutes on a small CPU.
    """
    if not cpu and cuda_has_native_bf16():
        return "bf16", True
    return "no", False


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes a C int: the largest trim threshold it can set (2 GiB)
_allocator_tuned = False


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc on Linux (the only allocator these settings apply to), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def keep_freed_memory() -> bool:
    """Let freed CPU memory be reused in this process instead of handed back to the kernel (glibc only).

    By default glibc serves every allocation over 32 MB with its own mmap and unmaps it on free, and it
    trims the heap top once 64 MB or more is free: a training step then gets its big tensors (the vocabulary
    head's gradients, a slice of logits) as fresh pages, and the kernel zeroes each 4 KiB page on first
    touch. On a 2-core VM the default pipeline's pretraining spent 35 s of its 109 s that way (10.7 M page
    faults). This keeps every allocation on the heap and never trims it, as jemalloc/tcmalloc would: the
    resident size stays near the peak of a step. Process-wide and lasting; `$GPTFORGE_MALLOC=default`
    leaves the allocator alone. Returns whether the setting is in force.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("GPTFORGE_MALLOC", "").strip().lower() in ("default", "0", "off", "no"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    _allocator_tuned = (
        libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES) == 1
    )
    return _allocator_tuned


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (after training, where `keep_freed_memory` held them)."""
    if _allocator_tuned:  # only ever set where _glibc() found the library
        _glibc().malloc_trim(0)


def on_a_thread_that_ends(fn, *args, **kwargs):
    """fn(*args, **kwargs), run on a thread of its own that has ended when this returns.

    torch's CPU threads are GNU OpenMP's: a thread that has run a parallel region keeps a pool of OpenMP
    threads while it lives, and with more of them alive than cores GNU OpenMP lets none spin, so every
    parallel region waits for a wake-up. Work done before a long-lived worker thread takes over (loading
    the model a server then decodes with) runs here, so that the worker's pool is the only one (measured:
    gpt2 at 8 requests decoded 21% slower after a load on the main thread, 2 cores)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gptforge-setup") as pool:
        return pool.submit(fn, *args, **kwargs).result()
