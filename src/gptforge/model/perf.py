"""Speed helpers: which precision pays off on this machine, and a cross-entropy that never holds full logits.

The GPT-2 head maps every token to 50,257 logits; at batch 8 x 256 tokens that is 411 MB of fp32 logits,
another 411 MB for their softmax and another for the gradient. `fused_linear_cross_entropy` computes
the loss and both gradients a slice of tokens at a time, so only one slice of logits exists at once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch
import torch.nn.functional as F

from gptforge.errors import ConfigError
from gptforge.model.config import IGNORE_INDEX

PRECISIONS = ("bf16", "fp16", "no")
# Most elements in one slice of logits (fp32): 2**25 is 128 MB (667 tokens of a 50k vocabulary): few
# slices, so the weight gradient is accumulated few times. Rows are split evenly: batch 8 x 256 makes
# four slices of 512 tokens (one 103 MB buffer, against 1.2 GB for full logits, softmax and gradient).
CHUNK_ELEMENTS = 1 << 25


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux x86); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so bf16 autocast is faster.

    Without those units oneDNN falls back to slow conversion paths: on an AVX2-only EPYC a bf16 matmul
    ran over 10x slower than fp32, so bf16 must be a measured choice, never a default.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    return platform.machine().lower() in ("x86_64", "amd64") and bool(
        _cpu_flags() & {"amx_bf16", "avx512_bf16"}
    )


def best_precision(device: str | torch.device | None = None) -> str:
    """Mixed precision that is fastest and safe on `device`: "bf16", "fp16" or "no" (Accelerate's names).

    CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16 (with loss scaling in Accelerate).
    CPU: bf16 only with native bf16 matrix units; otherwise fp32. `$GPTFORGE_PRECISION` overrides.
    """
    forced = os.environ.get("GPTFORGE_PRECISION")
    if forced:
        if forced not in PRECISIONS:
            raise ConfigError(
                f"GPTFORGE_PRECISION={forced!r}: use one of {', '.join(PRECISIONS)} or unset it"
            )
        return forced
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dev.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """torch dtype for an Accelerate precision name; None for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[precision]


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


def _chunk_rows(n_rows: int, vocab: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(1, vocab)))


def _fused_ce_chunks(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str,
    chunk_elements: int,
    cdt: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed or mean loss, d loss/d h and d loss/d weight (fp32), one slice of rows at a time.

    A slice's logits are computed transposed, (vocab, rows) = weight @ h.T: the faster form of that GEMM
    on CPU, and the softmax then reduces down columns of one contiguous block. In fp32 every slice reuses
    one buffer, so no slice pays for fresh pages. Slices are of equal size (no small last slice).
    """
    n, vocab = h.shape[0], weight.shape[0]
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    scale = 1.0 / count.clamp(min=1).to(torch.float32) if reduction == "mean" else None
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    w = weight.to(cdt)
    n_slices = -(-n // _chunk_rows(n, vocab, chunk_elements))
    rows = -(-n // n_slices) if n else 1
    buf = torch.empty(vocab * rows, dtype=torch.float32, device=h.device) if cdt == torch.float32 else None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        hc = h[start:end].to(cdt)
        ok = valid[start:end]
        # Per-row gradient scale: 1/count (mean) or 1 (sum) for real targets, 0 for ignored ones.
        row_scale = (ok.to(torch.float32) if scale is None else ok * scale)[None, :]
        safe_t = targets[start:end].clamp(min=0)[None, :]
        if buf is not None:
            z = buf[: vocab * (end - start)].view(vocab, end - start)
            torch.mm(w, hc.t(), out=z)
        else:
            z = (w @ hc.t()).float()
        z.sub_(z.amax(0, keepdim=True))
        picked = z.gather(0, safe_t)
        z.exp_()
        total = z.sum(0, keepdim=True)
        loss += ((total.log() - picked) * ok).sum()
        # d loss / d logits = row_scale * (softmax - onehot), built in place over the exponentials.
        z.mul_(row_scale / total)
        z.scatter_add_(0, safe_t, -row_scale)
        g = z.to(cdt)
        if grad_h is not None:
            if grad_h.dtype == cdt:
                torch.mm(g.t(), w, out=grad_h[start:end])
            else:
                grad_h[start:end] = g.t() @ w
        if grad_w is not None:
            if cdt != torch.float32:
                grad_w.add_(g @ hc) if start else grad_w.copy_(g @ hc)
            elif start:
                grad_w.addmm_(g, hc)
            else:
                torch.mm(g, hc, out=grad_w)
    if reduction == "mean":
        loss = loss / count.to(torch.float32)  # nan when every target is ignored, like F.cross_entropy
    return loss, grad_h, grad_w


class _FusedLinearCE(torch.autograd.Function):
    """Loss of `h @ weight.T` against targets, with both gradients computed slice by slice in forward.

    Computing the gradients during forward is what lets the logits of a slice be dropped at once;
    backward only scales them by the incoming gradient (a scalar, since reduction is sum or mean).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, reduction: str, chunk_elements: int):  # type: ignore[override]
        dev = h.device.type
        # Under autocast the three matmuls run in its dtype, like the plain path; the softmax in fp32.
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        with torch.autocast(dev, enabled=False):
            loss, grad_h, grad_w = _fused_ce_chunks(
                h, weight, targets, reduction, chunk_elements, cdt, h.requires_grad, weight.requires_grad
            )
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.need = (grad_h is not None, grad_w is not None, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w, w_dtype = ctx.need
        # The usual case, loss.backward() on this loss alone, needs no scaling pass over the gradients.
        one = grad_out.device.type == "cpu" and grad_out.item() == 1.0
        gh = (grad_h if one else grad_h * grad_out.to(grad_h.dtype)) if need_h else None
        gw = (grad_w if one else grad_w * grad_out).to(w_dtype) if need_w else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Cross-entropy of logits `h @ weight.T` (fp32 softmax; IGNORE_INDEX ignored) without materialising them all.

    Same value and gradients as `F.cross_entropy(F.linear(h, weight).float(), targets)` up to fp32 rounding.
    `reduction="none"` needs every per-token loss and falls back to that plain form.
    """
    h2 = h.reshape(-1, h.shape[-1])
    t2 = targets.reshape(-1)
    if reduction not in ("mean", "sum"):
        logits = F.linear(h2, weight).float()
        return F.cross_entropy(logits, t2, ignore_index=IGNORE_INDEX, reduction=reduction)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _FusedLinearCE.apply(h2, weight, t2, reduction, chunk_elements)
    with torch.no_grad():
        rows = _chunk_rows(h2.shape[0], weight.shape[0], chunk_elements)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h2.shape[0], rows):
            logits = F.linear(h2[start : start + rows], weight).float()
            total += F.cross_entropy(
                logits, t2[start : start + rows], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        if reduction == "mean":
            total = total / (t2 != IGNORE_INDEX).sum().to(torch.float32)
        return total
