"""The GPT-2 network, written from scratch: embeddings, attention, blocks, heads and a KV cache.

Numerics follow transformers' GPT2 exactly (pre-LN, LayerNorm eps 1e-5, tanh-GELU, fused qkv), so
weights convert both ways without loss (see `hf.py`). Parameter names are our own.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model import kernels
from gptforge.model.config import IGNORE_INDEX, GPTConfig
from gptforge.model.perf import fused_linear_cross_entropy

# Without oneDNN (`ONEDNN_LINEAR`), up to this many rows CPU inference computes x @ W.T as (W @ x.T).T:
# measured on a 2-core AVX2 EPYC with gpt2's shapes, that form of the same sgemm is 1.4x (blocks) to 1.8x
# (50k LM head) faster at 8 rows and never slower from 1 to 128 rows.
SKINNY_ROWS = 128


def varlen_kernel():
    """torch's variable-length (flash) attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch
        return None
    return varlen_attn


def varlen_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Packed rows take the varlen kernel: on CUDA, in half precision (the flash kernel's dtypes)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None


class Varlen:
    """Packed rows for `varlen_kernel`: the (n + 1,) int32 starts of the n segments of the flattened batch
    (`cu_seqlens`, made by the collator on the host, so no step waits for the device to count them) and a
    bound on their length (the row width: the kernel needs a bound, not the exact longest)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int) -> None:
        self.cu_seqlens, self.max_len = cu_seqlens, max_len


def cu_seqlens_of(segment_ids: torch.Tensor) -> torch.Tensor:
    """(n + 1,) int32 start of each segment of the flattened (B, T) batch, then B * T: a segment is a run of
    one id within a row (each row starts a new one). What a collator hands `GPT.forward(cu_seqlens=...)`."""
    B, T = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = starts.reshape(-1).nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)


def _onednn_linear_available() -> bool:
    """torch's oneDNN linear kernel is here (CPU builds with mkldnn) and not switched off."""
    if os.environ.get("GPTFORGE_ONEDNN", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# CPU inference in float32 runs every Linear through oneDNN's GEMM (`torch.ops.mkldnn._linear_pointwise`,
# the kernel torch.compile's CPU backend uses for Linear) instead of F.linear's BLAS sgemm: the same
# float32 arithmetic (IEEE, no reduced-precision dot products; within 2e-6 of float64 like sgemm), and on
# this project's AMD EPYC 2.0x faster for gpt2's decoding step at 16 rows, 2.0x at 1 row, 1.96x for a
# 480-token prefill (benchmarks/bench_generate.py measures it). GPTFORGE_ONEDNN=0 turns it off.
ONEDNN_LINEAR = _onednn_linear_available()


class OneDNNLinear(torch.autograd.Function):
    """y = x @ W.T + b in float32 through oneDNN's GEMM, forward and backward (x: 2-D rows).

    Backward: dx = dy @ W and dW = dy.T @ x as the same GEMM over transposed views (oneDNN reads the
    strides; a contiguous copy of W.T was measured slower), db = the column sums of dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        pointwise = torch.ops.mkldnn._linear_pointwise
        dx = pointwise(dy, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        dw = pointwise(dy.t(), x.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class TouchedRowsEmbedding(torch.autograd.Function):
    """The token embedding of a classifier's training step, its weight gradient kept in one buffer that is
    never zero-filled whole.

    A dense embedding gradient is zero-filled every step (vocabulary x width: 38.6 MB for the default
    pipeline's model, a third of its classification step) to receive the few rows the batch touched.
    Here the gradient lives in `owner._emb_grad`, reused while `weight.grad` is None (an optimizer's
    zero_grad): only the rows the previous step wrote are zeroed, then this batch's rows are added, and
    the buffer becomes `weight.grad` (equal to the dense gradient: zero in every other row). The gradient
    is written here, not returned through autograd, so this is only for a weight the step uses nowhere
    else (a classifier's embedding; its tied LM head is unused), one process (no DDP/FSDP hooks) and
    steps through loss.backward() (`GPT.touched_rows_embedding`, which the Trainer sets on a CPU)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, owner: GPT) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.owner, ctx.weight = owner, weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        owner, weight = ctx.owner, ctx.weight
        rows = ids.reshape(-1)
        buf = owner._emb_grad
        if weight.grad is None:
            if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype:
                buf = owner._emb_grad = torch.zeros_like(weight)
            elif owner._emb_dirty is not None:
                buf.index_fill_(0, owner._emb_dirty, 0)
            owner._emb_dirty = None
            weight.grad = buf
        if weight.grad is buf:  # remember what to zero next time (accumulation steps add up)
            owner._emb_dirty = rows if owner._emb_dirty is None else torch.cat([owner._emb_dirty, rows])
        weight.grad.index_add_(0, rows, grad.reshape(-1, grad.shape[-1]).to(weight.grad.dtype))
        return None, None, None


class Linear(nn.Linear):
    """nn.Linear with a faster kernel on CPU; same parameters, same math.

    On a CPU with oneDNN (`ONEDNN_LINEAR`), float32 runs through oneDNN's GEMM: inference directly,
    training through `OneDNNLinear` (forward and backward). Float32 inference of 1 to `kernels.FEW_ROWS`
    rows (a decoding step's LM head) takes `kernels.linear` where the kernels are built. Autocast, other
    devices, torch.compile (which picks its own kernels) and sharded (DTensor) weights take F.linear.
    Without oneDNN, CPU inference of up to SKINNY_ROWS rows takes the (W @ x.T).T form of the same
    product.
    """

    def forward(self, x: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
        """`contiguous=False`: the few-row form may return its (rows, out) result as a transposed view
        instead of copying it (decoding's LM head: only an argmax or a sampler reads the logits)."""
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            if (
                ONEDNN_LINEAR
                and x.dtype == self.weight.dtype == torch.float32
                and type(self.weight.data) is torch.Tensor  # not a DTensor (FSDP's shards)
                and not torch.compiler.is_compiling()
            ):
                x2 = x.reshape(-1, self.in_features)
                return OneDNNLinear.apply(x2, self.weight, self.bias).reshape(
                    *x.shape[:-1], self.out_features
                )
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // max(1, x.shape[-1])
        if (
            0 < rows <= kernels.FEW_ROWS
            and x.dtype == self.weight.dtype == torch.float32
            and type(self.weight.data) is torch.Tensor  # not a DTensor
            # the kernel reads the weight as a numpy array, which leaves its storage unresizable for good;
            # FSDP frees unsharded parameters by resizing theirs
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
            and kernels.available()
        ):
            x2 = x.reshape(rows, self.in_features).contiguous()
            out = kernels.linear(x2, *_detached(self))
            return out.reshape(*x.shape[:-1], self.out_features)
        if ONEDNN_LINEAR and x.dtype == self.weight.dtype == torch.float32:
            x2 = x.reshape(rows, self.in_features).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(x2, self.weight, self.bias, "none", [], "")
            return out.reshape(*x.shape[:-1], self.out_features)
        if 1 < rows <= SKINNY_ROWS and x.dtype == self.weight.dtype:  # one row: F.linear is as fast
            x2 = x.reshape(rows, x.shape[-1]).t()
            if self.bias is None:
                out = torch.mm(self.weight, x2)
            else:
                out = torch.addmm(self.bias[:, None], self.weight, x2)
            out = out.t()
            return (out.contiguous() if contiguous else out).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class KVCache:
    """Preallocated keys and values, written in place: (n_layers, rows, heads, max_len, head_dim) each.

    Every row keeps its own length, so one cache can hold sequences of different lengths (a serving
    engine's slots, prompts of different lengths). A forward pass works on the rows selected with `use`
    (all by default) and appends its tokens to each at that row's own length. Rows of different lengths
    take one token each (a decoding step) and attend to their own prefix through a key mask, reading the
    cache in place: nothing is gathered, grown or allocated per layer. Each head's keys are contiguous,
    which SDPA reads fastest (a (position, head) layout, whose new token is one block, measured 2x slower
    attention at batch 8 on this CPU, one thread).
    """

    def __init__(
        self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32
    ) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, cfg.head_dim)
        # zeros, not empty: a masked key still has its value multiplied by weight 0, and 0 * NaN is NaN
        self._store(*(torch.zeros(shape, device=device, dtype=dtype) for _ in "kv"))
        self.lengths = [0] * batch_size  # positions filled, per row
        self._past = 0  # aligned pass: the selected rows' common length
        self._flat: torch.Tensor | None = None  # ragged pass: flat (row, head, position) index of new keys
        self._width = 0  # ragged pass: keys read per row (longest row + 1)
        self.key_mask: torch.Tensor | None = None  # ragged pass: additive (B, 1, 1, width) mask
        self.plan: DecodePlan | None = None  # GPT.decode_plan: made at the first step after each prefill
        self._rows = (0, 0)  # rows [start, stop) of the next forward pass
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: those rows' keys, values
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None  # the same as numpy arrays
        self.use()

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold k, v (layers, rows, heads, max_len, head_dim) as the keys and values."""
        self.k, self.v, self.max_len = k, v, k.shape[3]
        self._flat_views = [(k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])) for k, v in zip(k, v)]

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions per row (no change if there is already): every row's keys and
        values so far move into new zeroed tensors; lengths and the selected rows stay."""
        if max_len <= self.max_len:
            return
        shape = (*self.k.shape[:3], max_len, self.k.shape[4])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, : self.max_len] = self.k
        v[:, :, :, : self.max_len] = self.v
        self._store(k, v)
        rows, self._rows = self._rows, (0, 0)
        self.use(*rows)  # views of the new tensors

    def use(self, start: int = 0, stop: int | None = None) -> KVCache:
        """Select rows [start, stop) as the batch of the next forward pass (all rows by default)."""
        rows = (start, self.k.shape[1] if stop is None else stop)
        if rows != self._rows:  # decoding keeps its rows: the views are made once, not per step
            self._rows = rows
            self._views = [(k[rows[0] : rows[1]], v[rows[0] : rows[1]]) for k, v in zip(self.k, self.v)]
            self._arrays = None
        return self

    def decode_views(self, batch: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """A CPU decoding step's view of the selected rows (`decode_block`): per layer their keys and values
        as numpy arrays (the cache's memory), and each row's length (int64). The step writes each row's new
        key and value at that length; `advance(1)` then counts them."""
        lengths = np.array(self._selected_lengths(batch, 1), dtype=np.int64)
        if self._arrays is None:
            self._arrays = [(k.numpy(), v.numpy()) for k, v in self._views]
        return self._arrays, lengths

    def _selected_lengths(self, batch: int, new: int) -> list[int]:
        """The selected rows' lengths, checked to be `batch` rows with room for `new` more tokens each."""
        start, stop = self._rows
        if stop - start != batch:
            raise ValueError(f"KV cache: a batch of {batch} rows, but rows [{start}, {stop}) are selected")
        lens = self.lengths[start:stop]
        if max(lens) + new > self.max_len:
            raise ValueError(f"KV cache overflow: {max(lens) + new} > {self.max_len}")
        return lens

    @property
    def pos(self) -> int:
        """Length of the longest selected row."""
        start, stop = self._rows
        return max(self.lengths[start:stop])

    def begin(self, batch: int, new: int) -> torch.Tensor | None:
        """Plan a forward pass of `new` tokens per selected row; called by `GPT.hidden_states`.

        Returns None when the rows have one common length (positions and mask are the usual ones), else
        each row's position (B, 1) for its one new token, with `key_mask` hiding keys past each row.
        """
        start, stop = self._rows
        lens = self._selected_lengths(batch, new)
        longest = max(lens)
        if min(lens) == longest:
            self._past, self._flat, self.key_mask = longest, None, None
            return None
        if new != 1:
            raise ValueError("KV cache: rows of different lengths take one new token each")
        dev = self.k.device
        at = torch.tensor(lens, device=dev)
        heads = self.k.shape[2]
        row_head = torch.arange(start * heads, stop * heads, device=dev).view(batch, heads)
        self._flat = (row_head * self.max_len + at[:, None]).view(-1)
        self._width = longest + 1
        hidden = torch.arange(self._width, device=dev)[None, :] > at[:, None]
        mask = torch.zeros(batch, 1, 1, self._width, device=dev, dtype=self.k.dtype)
        self.key_mask = mask.masked_fill_(hidden[:, None, None, :], float("-inf"))
        return at[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (B, heads, T, head_dim) of layer `layer`; every key so far, (B, heads, S, head_dim)."""
        keys, values = self._views[layer]
        if self._flat is None:
            end = self._past + k.shape[2]
            keys[:, :, self._past : end] = k
            values[:, :, self._past : end] = v
            return keys[:, :, :end], values[:, :, :end]
        flat_k, flat_v = self._flat_views[layer]
        flat_k.index_copy_(0, self._flat, k.reshape(-1, flat_k.shape[1]))
        flat_v.index_copy_(0, self._flat, v.reshape(-1, flat_v.shape[1]))
        return keys[:, :, : self._width], values[:, :, : self._width]

    def advance(self, new: int) -> None:
        """The forward pass is done: each selected row is `new` tokens longer."""
        start, stop = self._rows
        for r in range(start, stop):
            self.lengths[r] += new

    def move(self, src: int, dst: int) -> None:
        """Copy row `src`'s sequence into row `dst` (compacts the batch when a sequence leaves)."""
        n = self.lengths[src]
        if src != dst:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, C) outputs; with `at` (B,) only the query at position `at[b]` of each row: (B, 1, C)."""
        B, T, C = x.shape
        # (B, heads, T, head_dim) views of the fused projection (3 ops, not 7: decoding runs this per layer)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(mask, Varlen):  # packed rows on CUDA: flash attention over each segment, causal
            flat = [t.transpose(1, 2).reshape(B * T, self.n_heads, self.head_dim) for t in (q, k, v)]
            y = varlen_kernel()(
                *flat, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len, window_size=(-1, 0)
            )
            return self.resid_drop(self.proj(y.reshape(B, T, C)))
        if at is not None:  # one query a row; its row of the mask (causal: keys up to `at`)
            q = q.gather(2, at.view(B, 1, 1, 1).expand(B, self.n_heads, 1, self.head_dim))
            if mask is None:
                mask = (torch.arange(T, device=x.device)[None, :] <= at[:, None])[:, None, None, :]
            else:
                mask = mask.expand(B, 1, T, mask.shape[-1]).gather(
                    2, at.view(B, 1, 1, 1).expand(B, 1, 1, mask.shape[-1])
                )
            T = 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self.proj(y)
        return self.resid_drop(y) if self.training else y  # (eval: skip the no-op call)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(cfg.emb_dim, cfg.hidden_dim)
        self.proj = Linear(cfg.hidden_dim, cfg.emb_dim)
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(F.gelu(self.fc(x), approximate=self.approximate))
        return self.drop(y) if self.training else y


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None, layer=0, at=None):
        """(B, T, C); with `at` (B,) the output at position `at[b]` of each row only, (B, 1, C): the keys
        and values of every position are still computed, the rest (projection, MLP) for that row alone."""
        if at is None:
            x = x + self.attn(self.ln_1(x), mask, cache, layer)
        else:
            picked = x.gather(1, at.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
            x = picked + self.attn(self.ln_1(x), mask, cache, layer, at=at)
        return x + self.mlp(self.ln_2(x))


class BlockWeights(NamedTuple):
    """One block's tensors and sizes as `decode_block` reads them (`GPT.decode_plan`). A LayerNorm is
    (weight, bias, eps) as numpy arrays (the parameters' memory) and a float32 (`kernels.add_layer_norm`);
    `norm_out` is the one that follows the block: the next block's first, or the model's final one."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    proj_w: torch.Tensor
    proj_b: torch.Tensor | None
    ln2: tuple[np.ndarray, np.ndarray, np.float32]
    fc_w: torch.Tensor
    fc_b: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    norm_out: tuple[np.ndarray, np.ndarray, np.float32]
    heads: int
    head_dim: int
    approximate: str


class DecodePlan(NamedTuple):
    """What a CPU decoding step reads (`GPT.decode_plan`): the first block's first LayerNorm (as in
    `BlockWeights`) and every block's `BlockWeights`."""

    norm_in: tuple[np.ndarray, np.ndarray, np.float32]
    blocks: list[BlockWeights]


def decode_block(
    x: torch.Tensor,
    h: torch.Tensor,
    w: BlockWeights,
    keys: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
) -> torch.Tensor:
    """`Block.forward` for one new token per row in CPU float32 inference: x (B, C) the residual stream
    (updated in place to the block's output), h its first LayerNorm, `w` the block's entry of
    `GPT.decode_plan`, `keys`/`values` the block's cache rows and `lengths` each row's cached positions
    (`KVCache.decode_views`); returns `w.norm_out` of the block's output. The same ops on 2-D rows,
    the weight products called directly (`_dense`), no module calls; attention, with the cache write, is
    one kernel (`kernels.attend`), and each residual add with the LayerNorm after it another
    (`kernels.add_layer_norm`); oneDNN's residual-add post-op was no faster."""
    qkv = _dense(h, w.qkv_w, w.qkv_b)
    y = kernels.attend(qkv, keys, values, lengths, w.head_dim**-0.5)
    h = kernels.add_layer_norm(x, _dense(y, w.proj_w, w.proj_b), w.ln2)
    h = _dense(h, w.fc_w, w.fc_b, gelu=w.approximate)
    return kernels.add_layer_norm(x, _dense(h, w.out_w, w.out_b), w.norm_out)


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None):
    """A decoding step's x W^T + b (then GELU with that `approximate`, if given), x (rows, in) float32 on a
    CPU: up to `kernels.FEW_ROWS` rows through `kernels.linear`, more through oneDNN's GEMM with the GELU
    as its post-op (measured at gpt2, 8 rows: 0.2 ms a step faster than F.gelu after it)."""
    if x.shape[0] <= kernels.FEW_ROWS:
        y = kernels.linear(x, weight, bias)
        return y if gelu is None else F.gelu(y, approximate=gelu)
    post = "none" if gelu is None else "gelu"
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], gelu or "")


def _detached(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's weight and bias without autograd (the decoding kernels read them as numpy arrays)."""
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


class GPT(nn.Module):
    """GPT-2. `forward` returns LM logits (B, T, V), or class logits (B, num_labels) for a classifier."""

    # FSDP (pipeline.fsdp; other sharding tools read this attribute) shards one Block at a time.
    _no_split_modules = ["Block"]
    # Set by a training loop whose steps call loss.backward() in one process (the Trainer on a CPU): a
    # classifier's embedding gradient then lives in `TouchedRowsEmbedding`'s buffer. Off by default, as
    # that gradient is written to `.grad` directly, which torch.autograd.grad callers would not expect.
    touched_rows_embedding: bool = False

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.lm_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one shared Parameter
        self.score = Linear(cfg.emb_dim, cfg.num_labels, bias=False) if cfg.num_labels else None
        self._emb_grad: torch.Tensor | None = None  # TouchedRowsEmbedding's gradient buffer
        self._emb_dirty: torch.Tensor | None = None  # the rows of it the last step wrote
        if self.tok_emb.weight.device.type != "meta":  # meta models get real weights loaded (from_hf)
            self.reset_parameters()

    # -- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layers)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        """Token embedding (tied to the LM head when cfg.tie_embeddings): what sharding tools keep whole."""
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def is_classifier(self) -> bool:
        return self.score is not None

    def add_classification_head(self, num_labels: int, id2label: dict[int, str] | None = None) -> None:
        """Turn a language model into a classifier (the LM head stays, tied, unused)."""
        cfg = self.cfg
        cfg.num_labels = num_labels
        cfg.id2label = id2label
        cfg.validate()
        p = self.tok_emb.weight
        self.score = Linear(cfg.emb_dim, num_labels, bias=False, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    # -- sizes ---------------------------------------------------------------------------------
    def num_parameters(self, count_tied_head: bool = False, trainable_only: bool = False) -> int:
        """Unique parameters; with `count_tied_head` the tied LM head counts again (the book's 163M)."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        if count_tied_head and self.cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return n

    def memory_footprint(self, dtype: torch.dtype = torch.float32, optimizer: str = "adamw") -> dict:
        """Bytes for weights, gradients and optimizer state (AdamW: two moments per trainable weight)."""
        bytes_per = torch.empty((), dtype=dtype).element_size()
        n = self.num_parameters()
        n_train = self.num_parameters(trainable_only=True)
        states = {"adamw": 2, "sgd": 0}.get(optimizer, 2)
        out = {
            "weights": n * bytes_per,
            "gradients": n_train * bytes_per,
            "optimizer": states * n_train * bytes_per,
        }
        out["total"] = sum(out.values())
        return out

    # -- forward -------------------------------------------------------------------------------
    def _attention_mask(
        self, attention_mask: torch.Tensor | None, T: int, past: int, device
    ) -> torch.Tensor | None:
        """Boolean (B, 1, T, past+T) mask, or None where `is_causal` alone is right.

        Padded keys are hidden; each query may always see itself, so rows of padding stay finite.
        """
        if attention_mask is None and (past == 0 or T == 1):
            return None  # causal from the start, or one new token that may see every cached one
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(1, S, dtype=torch.bool, device=device)
        key_ok = attention_mask[:, None, None, :S].bool()
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        causal = k_pos <= q_pos
        return (causal & key_ok) | (k_pos == q_pos)

    def decode_plan(self) -> DecodePlan | None:
        """What `decode_block` reads, per block, where decoding steps can take it: oneDNN present, the
        decoding kernels built (`kernels.available`), the token embedding, every block and the final
        LayerNorm the plain modules in float32 (no LoRA layers, no hooks); else None. Made at the first
        CPU decoding step after each prefill and kept on its cache (`KVCache.plan`), so the steps after it
        do not walk the modules again."""
        from torch.nn.modules import module as nn_module

        if (
            not ONEDNN_LINEAR
            or not kernels.available()
            or nn_module._global_forward_hooks
            or nn_module._global_forward_pre_hooks
        ):
            return None

        def norm(ln: nn.Module) -> tuple[np.ndarray, np.ndarray, np.float32] | None:
            if (
                type(ln) is not nn.LayerNorm
                or ln._forward_hooks
                or ln._forward_pre_hooks
                or ln.weight is None
                or ln.bias is None
                or ln.weight.device.type != "cpu"
                or ln.weight.dtype != torch.float32
                or ln.bias.dtype != torch.float32
            ):
                return None
            return ln.weight.detach().numpy(), ln.bias.detach().numpy(), np.float32(ln.eps)

        emb = self.tok_emb  # its output becomes the residual stream, which the step adds to in place
        if type(emb) is not nn.Embedding or emb._forward_hooks or emb._forward_pre_hooks:
            return None
        norms = [norm(m) for b in self.blocks for m in (b.ln_1, b.ln_2)] + [norm(self.ln_f)]
        if any(n is None for n in norms):
            return None
        blocks = []
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            mods = (block, attn, mlp, attn.qkv, attn.proj, mlp.fc, mlp.proj)
            if any(m._forward_hooks or m._forward_pre_hooks for m in mods) or type(block) is not Block:
                return None
            if any(type(m) is not Linear or m.weight.dtype != torch.float32 for m in mods[3:]):
                return None
            blocks.append(
                BlockWeights(
                    *_detached(attn.qkv),
                    *_detached(attn.proj),
                    norms[2 * i + 1],
                    *_detached(mlp.fc),
                    *_detached(mlp.proj),
                    norms[2 * i + 2],
                    attn.n_heads,
                    attn.head_dim,
                    mlp.approximate,
                )  # fmt: skip
            )
        return DecodePlan(norms[0], blocks)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        embedding_only_use: bool = False,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, emb_dim).

        `segment_ids` (B, T) packs several sequences into one row: a token attends only to earlier tokens
        of its own segment, and (unless `position_ids` are given) positions restart at each segment. With
        `cu_seqlens` (`cu_seqlens_of(segment_ids)`) attention runs torch's varlen flash kernel where it
        applies (`varlen_applies`: CUDA, half precision, no attention dropout), else the block-diagonal
        mask through SDPA; both compute the same.
        `at` (B,): only the hidden state at position `at[b]` of each row is wanted, (B, 1, emb_dim); the
        last block then computes the rest of its work (attention output, MLP) for those positions alone.
        `embedding_only_use`: the caller uses the token embedding's weight nowhere else in this step (a
        classifier's forward), so a CPU training step may keep its gradient in `TouchedRowsEmbedding`.
        """
        B, T = input_ids.shape
        if (
            T == 1
            and cache is not None
            and attention_mask is None
            and segment_ids is None
            and cu_seqlens is None
            and at is None
            and not self.training
            and input_ids.device.type == "cpu"
            and cache.k.device.type == "cpu"
            and cache.k.dtype == torch.float32
            and self.tok_emb.weight.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        ):
            if cache.plan is None:
                cache.plan = self.decode_plan()
            if cache.plan is not None:
                return self._decode_step(input_ids, position_ids, cache)
        ragged = cache.begin(B, T) if cache is not None else None
        past = cache.pos if cache is not None else 0
        self._check_length(past + T)
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids (packed rows) take no cache and no attention_mask")
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
            dtype = self.tok_emb.weight.dtype
            if torch.is_autocast_enabled(input_ids.device.type):
                dtype = torch.get_autocast_dtype(input_ids.device.type)
            attn_dropout = self.training and self.cfg.dropout > 0
            if cu_seqlens is not None and not attn_dropout and varlen_applies(input_ids.device, dtype):
                mask = Varlen(cu_seqlens.to(input_ids.device, torch.int32, non_blocking=True), T)
            else:
                mask = segment_mask(segment_ids)
        elif cu_seqlens is not None:
            raise ValueError("cu_seqlens describes packed rows: give their segment_ids too")
        elif ragged is not None:  # cached rows of different lengths, one new token each
            if attention_mask is not None:
                raise ValueError("rows of different cached lengths take no attention_mask (the cache masks)")
            mask = cache.key_mask
            if position_ids is None:
                position_ids = ragged
        else:
            mask = self._attention_mask(attention_mask, T, past, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None, :]
        x = self._token_embeddings(input_ids, embedding_only_use) + self.pos_emb(position_ids)
        if self.training:
            x = self.drop(x)
        if cache is not None and T > 1:
            cache.plan = None  # weights or modules may have changed since: made anew at the next step
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i) if at is None or i < last else block(x, mask, cache, i, at=at)
        if at is not None and not len(self.blocks):
            x = x.gather(1, at.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def _check_length(self, n: int) -> None:
        if n > self.cfg.context_length:
            raise ValueError(f"sequence of {n} tokens exceeds context_length={self.cfg.context_length}")

    def _decode_step(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """`hidden_states` of one new token per selected cache row, CPU float32 inference with a decode
        plan: no module calls (`decode_block`), rows of any lengths, no mask."""
        B = input_ids.shape[0]
        views, lengths = cache.decode_views(B)
        self._check_length(int(lengths.max()) + 1)
        if position_ids is None:
            position_ids = torch.from_numpy(lengths).view(B, 1)
        plan = cache.plan
        x = self.tok_emb(input_ids).view(B, -1)  # gathered rows: a tensor of its own, added to in place
        h = kernels.add_layer_norm(x, self.pos_emb(position_ids).view(B, -1), plan.norm_in)
        for w, (keys, values) in zip(plan.blocks, views):
            h = decode_block(x, h, w, keys, values, lengths)
        cache.advance(1)
        return h.view(B, 1, -1)

    def _token_embeddings(self, input_ids: torch.Tensor, only_use: bool) -> torch.Tensor:
        """tok_emb(input_ids); in a CPU training step that uses the weight nowhere else (`only_use`), with
        `touched_rows_embedding` set, through `TouchedRowsEmbedding` (its gradient is not zero-filled whole)."""
        w = self.tok_emb.weight
        if (
            only_use
            and self.touched_rows_embedding
            and torch.is_grad_enabled()
            and w.requires_grad
            and w.device.type == "cpu"
            and type(w.data) is torch.Tensor  # not a DTensor
            and type(self.tok_emb) is nn.Embedding
            and not (self.tok_emb._forward_hooks or self.tok_emb._forward_pre_hooks)
            and not torch.compiler.is_compiling()
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        ):
            return TouchedRowsEmbedding.apply(input_ids, w, self)
        return self.tok_emb(input_ids)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden state of the last non-padding token (rightmost position whose mask is 1)."""
        return h[
            torch.arange(h.shape[0], device=h.device), self.pooled_positions(h.shape[:2], attention_mask)
        ]

    @staticmethod
    def pooled_positions(shape: tuple[int, int], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) position a classifier pools in each row: the rightmost whose mask is 1 (the last token)."""
        B, T = shape
        if attention_mask is None:
            return torch.full((B,), T - 1, dtype=torch.long)
        return T - 1 - attention_mask.flip(-1).to(torch.long).argmax(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        segment_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits; with `targets` (already shifted; IGNORE_INDEX ignored) the cross-entropy loss instead.

        Packed rows: `segment_ids` (and, for the varlen kernel on CUDA, `cu_seqlens`; see `hidden_states`)."""
        if self.score is not None:
            if segment_ids is not None or cu_seqlens is not None:
                raise ValueError(
                    "a classifier pools one sequence a row; packed rows (segment_ids) are for LMs"
                )
            # only the pooled token's hidden state is used: the last block computes its attention output
            # and MLP for that position alone (a quarter of its work; same logits, see `pool`)
            at = None
            if cache is None:
                at = self.pooled_positions(input_ids.shape, attention_mask).to(input_ids.device)
            h = self.hidden_states(
                input_ids, attention_mask, position_ids, cache, at=at, embedding_only_use=True
            )
            logits = self.score(h[:, 0] if at is not None else self.pool(h, attention_mask))
            if targets is None:
                return logits
            return F.cross_entropy(logits.float(), targets, reduction=reduction)
        h = self.hidden_states(
            input_ids, attention_mask, position_ids, cache, segment_ids, cu_seqlens=cu_seqlens
        )
        if targets is None:
            return self.lm_head(h)
        return lm_loss(h, self.lm_head.weight, targets, reduction=reduction)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) block-diagonal causal mask: query i sees key j <= i of the same segment.

    Every query sees at least itself, so no row of the softmax is empty.
    """
    T = segment_ids.shape[1]
    pos = torch.arange(T, device=segment_ids.device)
    causal = pos[None, :] <= pos[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the segment id changes (B, T)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def lm_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy of hidden states `h` against `targets` (IGNORE_INDEX ignored).

    Computed a slice of tokens at a time (`perf.fused_linear_cross_entropy`): the full fp32 logits of a
    50k vocabulary never exist, which saves memory and time; values and gradients equal the plain form.
    """
    if torch.compiler.is_compiling():
        # Under torch.compile, inductor fuses the plain form's softmax and its gradient into single
        # passes, which beats tracing the sliced loop; the fused path is for eager mode.
        logits = F.linear(h, weight).float()
        return F.cross_entropy(
            logits.view(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
    # Positions without a target (padding, masked prompts, sampled-out targets) skip the vocab head. Not
    # on CUDA: the check and the masked select would make the host wait for the GPU every step, and the
    # fused loss ignores those targets by itself.
    keep = targets.reshape(-1) != IGNORE_INDEX
    if h.device.type != "cuda" and not bool(keep.all()):
        h_kept, t_kept = h.reshape(-1, h.shape[-1])[keep], targets.reshape(-1)[keep]
        if reduction != "none":
            return fused_linear_cross_entropy(h_kept, weight, t_kept, reduction=reduction)
        # per token (DPO's per-sequence sums, evaluation): logits for the scored positions only, 0 elsewhere
        per_token = fused_linear_cross_entropy(h_kept, weight, t_kept, reduction="none")
        return per_token.new_zeros(keep.shape[0]).masked_scatter(keep, per_token)
    return fused_linear_cross_entropy(h, weight, targets, reduction=reduction)
