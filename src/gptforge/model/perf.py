"""A cross-entropy for the LM head that never holds the full logits.

The GPT-2 head maps every token to 50,257 logits; at batch 8 x 256 tokens that is 411 MB of fp32 logits,
another 411 MB for their softmax and another for the gradient. `fused_linear_cross_entropy` computes
the loss and both gradients a slice of tokens at a time, so only one slice of logits exists at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptforge.model.config import IGNORE_INDEX

# Most elements in one slice of logits (fp32): 2**25 is 128 MB (667 tokens of a 50k vocabulary): few
# slices, so the weight gradient is accumulated few times. Rows are split evenly: batch 8 x 256 makes
# four slices of 512 tokens (one 103 MB buffer, against 1.2 GB for full logits, softmax and gradient).
CHUNK_ELEMENTS = 1 << 25


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
