"""The CPU decoding step's attention, its residual adds with the LayerNorm after each, and its weight
products for a few rows, as compiled kernels (numba), loaded at the first decoding step.

A decoding step's attention reads every row's cached keys and values: at batch 8 that read is most of
the time a step spends outside its weight matmuls. torch runs it as a batched matrix-vector product, a
softmax and another batched product (about 2x the time of just reading the cache on a 2-core AVX-512
host, gpt2, 160 cached positions); `attend` reads the keys and the values once per (row, head), writes
the new token's key and value into the cache itself, and takes every row's own length, so rows of
different lengths need no mask. Inside a real decoding step (gpt2, 8 rows, 160 positions, between the
layers' weight matmuls, which evict the cache) three things bring it from 3.16 to 2.36 ms a step (the
same process, interleaved), 1.1x to 1.2x a plain parallel read of the same rows: it prefetches the keys
and values it reads PREFETCH_BYTES ahead (each (row, head) is a short stream of its own, which the
hardware prefetcher alone picks up late), its softmax runs a vectorizable exp (`softmax_weights`; a
scalar libm exp per score cost 0.25 ms a step), and the head width of every GPT-2 size, 64, is compiled
as a constant (0.2 ms).

`add_layer_norm` adds a sublayer's output to the residual stream and returns the LayerNorm of the sum in
one call: two per block instead of four torch ops (add, layer_norm), 0.45 ms a step less at gpt2, 8 rows
(0.3 at one row).

`linear` is a decoding step's weight products for up to FEW_ROWS rows: each block of four weight rows is
read from memory once and every row of x passes over it from L1, while the next blocks load. oneDNN's
GEMM (what gptforge's Linear runs beyond that) takes 1.2x to 1.4x its time there; at one row the kernel
streams the weights at up to 68 GB/s, about what this host's memory gives one process.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

# how far ahead of the position being read its keys and values are prefetched (6 KB: 24 positions of
# a 64-wide head; 4-8 KB measured alike, 12 KB slower, on the 2-core EPYC)
PREFETCH_BYTES = 6144

# the most rows `linear` is for: gpt2's decoding-step weight products, all of them, ms, its kernel vs
# oneDNN's GEMM in one process (the 2-core EPYC; fresh processes run both up to 30% faster or slower):
# 9.0 vs 12.8 at 1 row, 12.9 vs 16.9 at 2, 14.5 vs 17.0 at 4, 15.2 vs 19.0 at 8, 16.8 vs 21.1 at 12,
# 19.3 vs 22.7 at 16, 24.6 vs 26.4 at 24, 30.3 vs 31.4 at 32 (not measured beyond). 16 covers the serve
# engine's batches (8 by default); past it the margin shrinks (7% at 24, 4% at 32).
FEW_ROWS = 16
LINEAR_AHEAD = 2  # how many blocks of four weight rows ahead `linear` loads from 2 rows (1 and 4 alike)
# how many inputs `linear` sums at a time: gpt2's 3072-wide MLP output products at 8 rows 2.9 ms a step
# in slices of 768 against 3.8 whole (16 rows: 3.9 against 6.1; 512 and 1024 measured alike or slower)
LINEAR_CHUNK = 768

_built = None  # (numba, the attention, add + LayerNorm and few-row linear kernels): the first `available()`
_prefetch = softmax_weights = _head = _dot = None  # the kernels' parts (`_kernels`)
_build_lock = threading.Lock()
_available: bool | None = None


def _kernels(cache: bool):
    """The attention, add + LayerNorm and few-row linear kernels, compiled (or loaded from numba's on-disk
    cache) at their first call; their parts become module globals (`softmax_weights` among them)."""
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    # module globals, not closure variables: numba's cache keys a closure on its variables, which for
    # compiled functions differ in every process (so nothing would ever load from the cache)
    global _prefetch, softmax_weights, _head, _dot
    fastmath = {"reassoc", "contract", "nsz"}
    jit = dict(nogil=True, fastmath=fastmath, cache=cache)

    @intrinsic
    def _prefetch(typingctx, array, index):
        """Hint the CPU to load the cache line holding array.flat[index] (LLVM's prefetch: a read, kept
        in every cache level)."""

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            name = "llvm.prefetch." + ptr.type.intrinsic_name  # p0i8, or p0 where pointers are opaque
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(array, types.intp), codegen

    @numba.njit(inline="always", **jit)
    def softmax_weights(scores, bits, n, top):
        """scores[t] = exp(scores[t] - top) for t < n (every score <= top); returns their sum.

        exp as Cephes' expf computes it (x = k ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r, 2^k
        put together from its bits in `bits`), written so the loop vectorizes: within 3e-7 (5 ulp) of the
        exact value where exp(x) is a normal float (x >= -87), a tiny positive value below (< 1.7e-38,
        against a sum >= 1); NaN stays NaN."""
        for t in range(n):
            x = scores[t] - top
            x = np.float32(-87.0) if x < np.float32(-87.0) else x
            k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            r = x - k * np.float32(0.6931471805599453)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            scores[t] = p * r * r + r + np.float32(1.0)
            bits[t] = (np.int32(k) + np.int32(127)) << 23  # the float 2^k
        two_k = bits[:n].view(np.float32)
        total = np.float32(0.0)
        for t in range(n):
            e = scores[t] * two_k[t]
            scores[t] = e
            total += e
        return total

    @numba.njit(inline="always", **jit)
    def _head(q, k, v, n, scale, out, dim, scores, bits, acc):
        """out = softmax(q k[:n]^T * scale) v[:n] for one (row, head); `dim` a constant where inlined so.
        scores, bits (>= n) and acc (dim): scratch."""
        ahead = PREFETCH_BYTES // (4 * dim)
        k_flat, v_flat = k.reshape(-1), v.reshape(-1)
        top = np.float32(-np.inf)
        for t in range(n):
            if t + ahead < n:
                for d in range(0, dim, 16):  # 16 floats: one 64-byte line
                    _prefetch(k_flat, (t + ahead) * dim + d)
            s = np.float32(0.0)
            for d in range(dim):
                s += q[d] * k[t, d]
            s *= scale
            scores[t] = s
            top = max(top, s)
        for t in range(min(n, ahead)):  # the values' first lines load during the softmax
            for d in range(0, dim, 16):
                _prefetch(v_flat, t * dim + d)
        total = softmax_weights(scores, bits, n, top)
        acc[:] = 0.0
        for t in range(n):
            if t + ahead < n:
                for d in range(0, dim, 16):
                    _prefetch(v_flat, (t + ahead) * dim + d)
            p = scores[t]
            for d in range(dim):
                acc[d] += p * v[t, d]
        inv = np.float32(1.0) / total
        for d in range(dim):
            out[d] = acc[d] * inv

    @numba.njit(parallel=True, **jit)
    def attend_kernel(qkv, keys, values, lengths, scale, out):
        rows, heads, dim = qkv.shape[0], keys.shape[1], keys.shape[3]
        width = heads * dim
        # every job's scratch in three allocations, not three per job inside the parallel loop (0.15 ms a
        # step less at gpt2, 8 rows)
        longest = 1
        for b in range(rows):
            longest = max(longest, lengths[b] + 1)
        scores = np.empty((rows * heads, longest), np.float32)
        bits = np.empty((rows * heads, longest), np.int32)
        acc = np.empty((rows * heads, dim), np.float32)
        for job in numba.prange(rows * heads):
            b = job // heads
            h = job - b * heads
            n = lengths[b]
            k = keys[b, h]
            v = values[b, h]
            k[n, :] = qkv[b, width + h * dim : width + (h + 1) * dim]
            v[n, :] = qkv[b, 2 * width + h * dim : 2 * width + (h + 1) * dim]
            q = qkv[b, h * dim : (h + 1) * dim]
            o = out[b, h * dim : (h + 1) * dim]
            if dim == 64:  # every GPT-2 size: the loops compiled for this width
                _head(q, k, v, n + 1, scale, o, 64, scores[job], bits[job], acc[job])
            else:
                _head(q, k, v, n + 1, scale, o, dim, scores[job], bits[job], acc[job])

    @numba.njit(**jit)
    def add_norm_kernel(x, y, weight, bias, eps, out):
        """x += y; out = LayerNorm(x), row by row: mean and variance summed in float64 over two passes (a
        float32 sum loses the mean of GPT-2's residual stream, whose few outlier channels run to 1e3)."""
        rows, width = x.shape
        for r in range(rows):
            total = 0.0
            for i in range(width):
                s = x[r, i] + y[r, i]
                x[r, i] = s
                total += np.float64(s)
            mean = total / width
            var = 0.0
            for i in range(width):
                d = np.float64(x[r, i]) - mean
                var += d * d
            m = np.float32(mean)
            inv = np.float32(1.0 / np.sqrt(var / width + np.float64(eps)))
            for i in range(width):
                out[r, i] = (x[r, i] - m) * inv * weight[i] + bias[i]

    @numba.njit(inline="always", **jit)
    def _dot(x, w, width):
        s = np.float32(0.0)
        for k in range(width):
            s += x[k] * w[k]
        return s

    @numba.njit(parallel=True, **jit)
    def linear_kernel(x, weight, bias, out):
        """out = x weight^T (+ bias where it has out's width): x (rows, in), weight (out, in), both
        C-contiguous. Four outputs at a time, over LINEAR_CHUNK inputs at a time: that slice of their
        weight rows is read from memory once and stays in L1 while every row of x passes over it (and so
        does x's slice: a 3072-wide x of 8 rows is 96 KB, twice L1). Each out[r, j] is the same sums in the
        same order whatever the row count, so a row's result does not depend on the rows beside it."""
        rows, width = x.shape
        n = weight.shape[0]
        blocks = n // 4
        flat = weight.reshape(-1)
        lines = (4 * width + 15) // 16  # 64-byte lines in a block of four weight rows
        chunks = (width + LINEAR_CHUNK - 1) // LINEAR_CHUNK
        per_pass = (lines + rows * chunks - 1) // max(rows * chunks, 1)
        for jb in numba.prange(blocks):
            j = np.uintp(jb * 4)  # unsigned: no negative-index wraparound code in the loops below
            # From 2 rows, the passes over this block's weights (from L1) alternate with loading the
            # block LINEAR_AHEAD blocks on, a share of its lines before each pass: the loads overlap the
            # arithmetic (gpt2, 8 rows: 14.2 against 16.9 ms a step). One row streams without it (the
            # hardware prefetcher keeps up: 7.3 ms without, 8.5 with).
            ahead = (jb + LINEAR_AHEAD) * 4 * width
            prefetch = rows > 1 and jb + LINEAR_AHEAD < blocks
            for c in range(chunks):
                start = np.uintp(c * LINEAR_CHUNK)
                stop = min(np.uintp(width), start + LINEAR_CHUNK)
                w0, w1 = weight[j, start:stop], weight[j + 1, start:stop]
                w2, w3 = weight[j + 2, start:stop], weight[j + 3, start:stop]
                for r in range(rows):
                    if prefetch:
                        p = c * rows + r
                        for line in range(p * per_pass, min(lines, (p + 1) * per_pass)):
                            _prefetch(flat, ahead + line * 16)
                    xr = x[r, start:stop]
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    s2 = np.float32(0.0)
                    s3 = np.float32(0.0)
                    for k in range(stop - start):
                        v = xr[k]
                        s0 += v * w0[k]
                        s1 += v * w1[k]
                        s2 += v * w2[k]
                        s3 += v * w3[k]
                    if c == 0:
                        out[r, j] = s0
                        out[r, j + 1] = s1
                        out[r, j + 2] = s2
                        out[r, j + 3] = s3
                    else:
                        out[r, j] += s0
                        out[r, j + 1] += s1
                        out[r, j + 2] += s2
                        out[r, j + 3] += s3
        for j in range(blocks * 4, n):
            for r in range(rows):
                out[r, j] = _dot(x[r], weight[j], width)
        if bias.shape[0] == n:
            for r in range(rows):
                for j in range(n):
                    out[r, j] += bias[j]

    return attend_kernel, add_norm_kernel, linear_kernel


def _build():
    """numba and the three kernels, compiled (or loaded from numba's on-disk cache) by a first call on
    tiny arrays of the types a decoding step passes; without a writable numba cache dir, compiled for
    this process."""
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # OpenMP first, whose threads wait spinning for the next call (numba's default prefers TBB where
        # it is installed; its own workqueue layer made a gpt2 step 15% slower). numba's OpenMP layer links
        # the system's libgomp, but its calls bind to the libgomp torch has already put in the global
        # symbol scope: the kernel runs on torch's OpenMP threads (a step keeps 2 threads busy, not 3).
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    try:
        kernel, add_norm, linear_kernel = _kernels(cache=True)
    except RuntimeError:  # numba raises where it finds no writable cache dir
        kernel, add_norm, linear_kernel = _kernels(cache=False)
    keys = np.zeros((1, 1, 2, 64), np.float32)
    row = np.zeros((1, 64), np.float32)
    kernel(np.zeros((1, 192), np.float32), keys, keys.copy(), np.zeros(1, np.int64), np.float32(1.0), row)
    add_norm(row, row.copy(), row[0].copy(), row[0].copy(), np.float32(1e-5), row.copy())
    linear_kernel(row, np.zeros((5, 64), np.float32), np.zeros(5, np.float32), np.zeros((1, 5), np.float32))
    return numba, kernel, add_norm, linear_kernel


def available() -> bool:
    """Whether the kernels are here: numba imports and they build (at the first call; else decoding steps
    take the module path, and the reason is logged once)."""
    global _available, _built
    if _available is None:
        with _build_lock:
            if _available is None:
                # numba's OpenMP layer starts its threads by setting the OpenMP thread count, which is
                # torch's too (one libgomp): without this a process run with OMP_NUM_THREADS=1 would train
                # on 2 threads after its first decoding step (different sums, so different weights)
                threads = torch.get_num_threads()
                try:
                    _built = _build()
                    _available = True
                except ImportError:
                    _available = False
                except Exception as e:  # e.g. an llvmlite whose LLVM lacks an intrinsic the kernel uses
                    log.warning("CPU decoding kernels unavailable, decoding takes the module path: %s: %s",
                                type(e).__name__, e)  # fmt: skip
                    _available = False
                finally:
                    torch.set_num_threads(threads)
    return _available


def attend(
    qkv: torch.Tensor, keys: np.ndarray, values: np.ndarray, lengths: np.ndarray, scale: float
) -> torch.Tensor:
    """One decoding step's attention for one layer on a CPU, float32.

    qkv (B, 3C): the block's query, key and value projections of each row's new token; keys, values
    (B, heads, max_len, head_dim): that layer's cache rows (numpy views of them), `lengths` (B,) int64:
    each row's cached positions before this token. Writes the new key and value at position
    `lengths[b]` of row b and returns softmax(q k^T * scale) v over positions 0..lengths[b], (B, C).
    """
    _, kernel, _, _ = _ready(parallel=True)
    out = torch.empty(qkv.shape[0], qkv.shape[1] // 3)
    kernel(qkv.numpy(), keys, values, lengths, np.float32(scale), out.numpy())
    return out


def _ready(parallel: bool) -> tuple:
    """`_built`, or RuntimeError where the kernels are not available; for a `parallel` kernel, numba's
    thread count set to torch's first (a user's torch.set_num_threads holds for the kernels too)."""
    if not available():
        raise RuntimeError("the CPU decoding kernels are not available here (see kernels.available)")
    if parallel:
        numba = _built[0]
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return _built


def add_layer_norm(
    x: torch.Tensor, y: torch.Tensor, norm: tuple[np.ndarray, np.ndarray, np.float32]
) -> torch.Tensor:
    """A decoding step's residual add and the LayerNorm after it, on a CPU, float32: adds y (B, C) to the
    residual stream x (B, C, contiguous) in place and returns LayerNorm(x) with `norm` = (weight, bias,
    eps) as numpy arrays and a float32. The sum is torch's add exactly; the LayerNorm is within 1e-6 of
    the float64 one of that sum (rows far from zero with a tiny spread: no further from it than
    F.layer_norm)."""
    _, _, kernel, _ = _ready(parallel=False)
    out = torch.empty_like(x)
    kernel(x.numpy(), y.numpy(), *norm, out.numpy())
    return out


_NO_BIAS = np.zeros(0, np.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x weight^T + bias for a few rows (up to FEW_ROWS) on a CPU, float32, no autograd: x (rows, in) and
    weight (out, in) C-contiguous. Within float32 rounding of F.linear; each row's result is the same
    whatever rows are beside it."""
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} for a weight of {weight.shape[0]} outputs")
    _, _, _, kernel = _ready(parallel=True)
    out = torch.empty(x.shape[0], weight.shape[0])
    b = _NO_BIAS if bias is None else bias.numpy()
    kernel(x.numpy(), weight.numpy(), b, out.numpy())
    return out
