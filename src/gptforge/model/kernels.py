"""The CPU decoding step's attention as one compiled kernel (numba), loaded at the first decoding step.

A decoding step's attention reads every row's cached keys and values: at batch 8 that read is most of
the time a step spends outside its weight matmuls. torch runs it as a batched matrix-vector product, a
softmax and another batched product (about 2x the time of just reading the cache on a 2-core AVX-512
host, gpt2, 160 cached positions); `attend` reads the keys and the values once per (row, head), about
1.2x that read, writes the new token's key and value into the cache itself, and takes every row's own
length, so rows of different lengths need no mask.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

_attend = None  # the compiled kernel, built at the first call
_build_lock = threading.Lock()
_available: bool | None = None


def available() -> bool:
    """Whether numba imports here (else decoding steps take the module path)."""
    global _available
    if _available is None:
        try:
            import numba  # noqa: F401

            _available = True
        except ImportError:
            _available = False
    return _available


def _build():
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # torch's CPU ops run on OpenMP: the same pool for the kernel (a second one would make the two
        # spin against each other on few cores; numba's default prefers TBB where it is installed)
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

    def attend_kernel(qkv, keys, values, lengths, scale, out):
        rows, heads, dim = qkv.shape[0], keys.shape[1], keys.shape[3]
        width = heads * dim
        for job in numba.prange(rows * heads):
            b = job // heads
            h = job - b * heads
            n = lengths[b]
            k = keys[b, h]
            v = values[b, h]
            q = qkv[b, h * dim : (h + 1) * dim]
            k[n, :] = qkv[b, width + h * dim : width + (h + 1) * dim]
            v[n, :] = qkv[b, 2 * width + h * dim : 2 * width + (h + 1) * dim]
            n += 1
            scores = np.empty(n, np.float32)
            top = np.float32(-np.inf)
            for t in range(n):
                s = np.float32(0.0)
                for d in range(dim):
                    s += q[d] * k[t, d]
                s *= scale
                scores[t] = s
                top = max(top, s)
            total = np.float32(0.0)
            for t in range(n):
                e = np.exp(scores[t] - top)
                scores[t] = e
                total += e
            acc = np.zeros(dim, np.float32)
            for t in range(n):
                p = scores[t]
                for d in range(dim):
                    acc[d] += p * v[t, d]
            for d in range(dim):
                out[b, h * dim + d] = acc[d] / total

    options = dict(parallel=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
    try:  # compiled once, then loaded from numba's on-disk cache
        return numba, numba.njit(cache=True, **options)(attend_kernel)
    except RuntimeError:  # no writable cache dir (numba raises when it finds none): compile per process
        return numba, numba.njit(**options)(attend_kernel)


def attend(
    qkv: torch.Tensor, keys: np.ndarray, values: np.ndarray, lengths: np.ndarray, scale: float
) -> torch.Tensor:
    """One decoding step's attention for one layer on a CPU, float32.

    qkv (B, 3C): the block's query, key and value projections of each row's new token; keys, values
    (B, heads, max_len, head_dim): that layer's cache rows (numpy views of them), `lengths` (B,) int64:
    each row's cached positions before this token. Writes the new key and value at position
    `lengths[b]` of row b and returns softmax(q k^T * scale) v over positions 0..lengths[b], (B, C).
    """
    global _attend
    if _attend is None:
        with _build_lock:
            if _attend is None:
                _attend = _build()
    numba, kernel = _attend
    # the kernel's threads: torch's count (a user's torch.set_num_threads holds for it too)
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    out = torch.empty(qkv.shape[0], qkv.shape[1] // 3)
    kernel(qkv.numpy(), keys, values, lengths, np.float32(scale), out.numpy())
    return out
