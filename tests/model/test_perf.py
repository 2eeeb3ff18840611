"""The fast paths equal the plain ones: chunked cross-entropy (values and gradients) and the Linear fast path."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from gptforge.model.config import IGNORE_INDEX, GPTConfig
from gptforge.model.gpt import GPT, lm_loss
from gptforge.model.perf import fused_linear_cross_entropy


def _plain(h, w, t, reduction="mean"):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), t.reshape(-1), reduction=reduction)


def _case(n_ignored: int = 7):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 29, 24, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(211, 24, generator=g)).requires_grad_()
    t = torch.randint(0, 211, (3, 29), generator=g)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:n_ignored]] = -100
    return h, w, t


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 10, 87, 1000])  # one row, uneven slices, exactly all, one slice
def test_fused_ce_equals_full_ce(reduction, chunk_rows):
    h, w, t = _case()
    ref = _plain(h, w, t, reduction)
    ref_gh, ref_gw = torch.autograd.grad(ref * 1.7, (h, w))
    out = fused_linear_cross_entropy(h, w, t, reduction, chunk_elements=chunk_rows * w.shape[0])
    gh, gw = torch.autograd.grad(out * 1.7, (h, w))
    scale = 1.0 if reduction == "mean" else t.numel()
    assert out.shape == ref.shape == ()
    torch.testing.assert_close(out, ref, atol=1e-6 * scale, rtol=1e-6)
    torch.testing.assert_close(gh, ref_gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-6, rtol=1e-5)
    assert (gh.view(-1, 24)[t.view(-1) == -100] == 0).all()  # ignored rows get no gradient


def test_fused_ce_frozen_weight_and_no_grad():
    h, w, t = _case()
    w = w.detach()  # a frozen head (LoRA): only h needs a gradient, and only h gets one
    ref = _plain(h, w, t)
    (ref_gh,) = torch.autograd.grad(ref, (h,))
    out = fused_linear_cross_entropy(h, w, t, chunk_elements=5 * w.shape[0])
    (gh,) = torch.autograd.grad(out, (h,))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, ref_gh, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: chunked, no gradients computed
        ev = fused_linear_cross_entropy(h, w, t, chunk_elements=5 * w.shape[0])
    assert not ev.requires_grad
    torch.testing.assert_close(ev, ref.detach(), atol=1e-6, rtol=1e-6)


def test_fused_ce_none_reduction_and_all_ignored():
    h, w, t = _case()
    per_token = fused_linear_cross_entropy(h, w, t, "none")
    torch.testing.assert_close(per_token, _plain(h, w, t, "none"))
    assert per_token.shape == (t.numel(),)
    t_all = torch.full_like(t, -100)
    assert torch.isnan(fused_linear_cross_entropy(h, w, t_all)) == torch.isnan(_plain(h, w, t_all))
    assert fused_linear_cross_entropy(h, w, t_all, "sum").item() == 0.0


def test_gpt_loss_and_grads_equal_plain_head():
    """The model's training loss (fused) equals logits -> cross-entropy, gradients included (tied head)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=97))
    x = torch.randint(0, 97, (2, 16))
    t = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = model(x, targets=t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = F.cross_entropy(model(x).view(-1, 97), t.view(-1))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    h = model.hidden_states(x)
    torch.testing.assert_close(
        lm_loss(h, model.lm_head.weight, t, "sum"), ref * (t != -100).sum(), rtol=1e-6, atol=1e-5
    )


def test_fused_ce_under_bf16_autocast_close_to_plain():
    h, w, t = _case(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(h, w, t)
        out = fused_linear_cross_entropy(h, w, t, chunk_elements=10 * w.shape[0])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    (gh,) = torch.autograd.grad(out, (h,))
    assert gh.dtype == h.dtype and torch.isfinite(gh).all()


def test_cached_one_token_steps_equal_full_forward():
    """Decoding with the cache (no mask built for a single new token) gives the full forward's logits."""
    from gptforge.model.gpt import KVCache

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=97)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, 12)
        steps = [model(x[:, :5], cache=cache)]
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_meta_model_skips_init_and_loads():
    """A model built on the meta device (as from_hf does) is not initialised, then takes loaded weights."""
    cfg = GPTConfig.from_preset("test-tiny", vocab_size=97)
    torch.manual_seed(0)
    ref = GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(ref.state_dict(), assign=True)
    model.lm_head.weight = model.tok_emb.weight
    x = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


@pytest.mark.slow
def test_compiled_training_loss_and_grads_equal_eager():
    """Under torch.compile the loss takes the plain form inductor fuses; values and gradients agree."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=97))
    x = torch.randint(0, 97, (2, 16))
    t = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = model(x, targets=t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    c_loss = torch.compile(model)(x, targets=t)
    c_grads = torch.autograd.grad(c_loss, list(model.parameters()))
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _ops(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (2, 3), (128, 1), (4, 32)])
def test_few_row_inference_linear_equals_f_linear(bias, shape, monkeypatch):
    """Without oneDNN (and without the decoding kernels), (W @ x.T).T for 2..SKINNY_ROWS rows in CPU
    inference: F.linear's values (fp32 rounding)."""
    import gptforge.model.gpt as gpt_module
    from gptforge.model import kernels
    from gptforge.model.gpt import SKINNY_ROWS, Linear

    monkeypatch.setattr(gpt_module, "ONEDNN_LINEAR", False)
    monkeypatch.setattr(kernels, "_available", False)

    lin = Linear(48, 96, bias=bias)
    x = torch.randn(*shape, 48)
    with torch.no_grad():
        out = lin(x)
        ops = _ops(lambda: lin(x))
    assert out.shape == (*shape, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    skinny = 1 < x.numel() // 48 <= SKINNY_ROWS  # one row: F.linear's GEMV is as fast, with fewer ops
    assert ("aten::linear" not in ops) == skinny, ops


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [False, True])  # a frozen weight (LoRA's base): dx only
def test_training_linear_runs_onednn_with_f_linear_values_and_gradients(bias, frozen, monkeypatch):
    """With autograd on, float32 CPU Linear runs `OneDNNLinear`: output and the gradients of the input,
    weight and bias equal F.linear's within 1e-5 (3-D input, uneven sizes)."""
    import gptforge.model.gpt as gpt_module
    from gptforge.model.gpt import Linear

    if not gpt_module.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear kernel")
    calls = []
    real = gpt_module.OneDNNLinear.apply
    monkeypatch.setattr(gpt_module.OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lin = Linear(37, 53, bias=bias)
    lin.weight.requires_grad_(not frozen)
    x = torch.randn(3, 11, 37, requires_grad=True)
    g = torch.randn(3, 11, 53)
    out = lin(x)
    params = [x] + [p for p in lin.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, params, g)
    want_out = F.linear(x, lin.weight, lin.bias)
    want = torch.autograd.grad(want_out, params, g)
    assert calls == [1]
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_linear_keeps_f_linear_for_training_many_rows_and_autocast(monkeypatch):
    import gptforge.model.gpt as gpt_module
    from gptforge.model.gpt import Linear

    monkeypatch.setattr(gpt_module, "ONEDNN_LINEAR", False)

    lin = Linear(16, 8)
    x = torch.randn(4, 16)
    y = lin(x)  # grad enabled: the training path, bit-identical to F.linear
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias)) and y.requires_grad
    with torch.no_grad():
        assert "aten::linear" in _ops(lambda: lin(torch.randn(129, 16)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "aten::linear" in _ops(lambda: lin(x))


def test_lm_loss_per_token_scores_only_target_positions_and_equals_the_plain_form():
    """reduction="none" with ignored positions (DPO's prompts and padding): the same values and gradients
    as the plain full-logits form, 0 where ignored, with logits computed for the scored positions only."""
    from gptforge.model.gpt import lm_loss

    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 7))
    t[0, :4] = IGNORE_INDEX
    t[2, 5:] = IGNORE_INDEX
    got = lm_loss(h, w, t, reduction="none")
    (got * torch.arange(21.0)).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(
        F.linear(h, w).view(-1, 50), t.view(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    (want * torch.arange(21.0)).sum().backward()
    torch.testing.assert_close(got, want)
    assert bool((got.view(3, 7)[t == IGNORE_INDEX] == 0).all())
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_inference_linear_runs_few_row_kernel_or_onednn_with_f_linear_values(bias, monkeypatch):
    """CPU float32 inference runs every Linear through `kernels.linear` up to `kernels.FEW_ROWS` rows and
    through oneDNN (`ONEDNN_LINEAR`) beyond, with F.linear's values; with oneDNN off the model's logits are
    the same within float32 rounding."""
    import gptforge.model.gpt as gpt_module
    from gptforge.model import kernels
    from gptforge.model.gpt import Linear

    if not gpt_module.ONEDNN_LINEAR or not kernels.available():
        pytest.skip("this torch has no oneDNN linear kernel, or numba is missing")
    calls, few = [], []
    real, real_few = torch.ops.mkldnn._linear_pointwise, kernels.linear
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    monkeypatch.setattr(kernels, "linear", lambda *a: few.append(a[0].shape) or real_few(*a))
    model = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=48, n_heads=2, n_layers=1, qkv_bias=bias))
    lin = model.blocks[0].attn.qkv
    for shape in [(1, 1), (3,), (2, 8), (3, 6), (4, 50)]:
        x = torch.randn(*shape, lin.in_features)
        with torch.no_grad():
            out = lin(x)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert out.shape == (*shape, lin.out_features)
    assert kernels.FEW_ROWS == 16
    assert few == [(1, 48), (3, 48), (16, 48)] and calls == [(18, 48), (200, 48)]
    calls.clear()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        on = model(ids)
        n = len(calls)
        monkeypatch.setattr(gpt_module, "ONEDNN_LINEAR", False)
        off = model(ids)
    assert n == 4 * 1 + 1 and len(calls) == n  # every Linear and the LM head, then none
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    assert isinstance(model.lm_head, Linear)


# -- a classifier's last block works on the pooled position only ------------------------------------------
def _full_classifier_loss(model: GPT, ids, mask, targets):
    """The plain classifier: every position through every block, then pool the last real token."""
    h = model.hidden_states(ids, mask)
    return F.cross_entropy(model.score(model.pool(h, mask)).float(), targets, reduction="sum")


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_classifier_pooled_last_block_equals_the_full_forward(padding, n_layers):
    """Logits, loss and every parameter's gradient equal the full forward's (within 1e-5): the last block
    computes the attention output and MLP of the pooled position only (`GPT.forward`, `at`)."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("test-tiny", vocab_size=60, n_layers=n_layers, num_labels=3)
    model = GPT(cfg).train()  # dropout 0 in test-tiny: training and evaluation compute the same
    ids = torch.randint(0, 60, (4, 11))
    lengths = [11, 7, 3, 1]
    if padding == "none":
        mask = None
    elif padding == "right":
        mask = torch.tensor([[1] * n + [0] * (11 - n) for n in lengths])
    else:
        mask = torch.tensor([[0] * (11 - n) + [1] * n for n in lengths])
    targets = torch.tensor([0, 2, 1, 2])
    ref = _full_classifier_loss(model, ids, mask, targets)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    out = model(ids, attention_mask=mask, targets=targets, reduction="sum")
    grads = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        if rg is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        full = model.score(model.pool(model.hidden_states(ids, mask), mask))
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_classifier_last_block_skips_the_unpooled_positions():
    """The point of the pooled path: the last block's MLP sees one row per sequence, not every position."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=60, n_layers=2, num_labels=2)).eval()
    seen = []
    model.blocks[-1].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model.blocks[0].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        model(torch.randint(0, 60, (3, 9)))
    assert seen == [(3, 9, 32), (3, 1, 32)]


# -- decoding steps without module calls --------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_decoding_steps_without_module_calls_equal_the_module_path(rows, ragged, activation, monkeypatch):
    """`decode_block` (CPU float32 inference: oneDNN called directly, no module calls, attention and the
    cache write in one kernel, the GELU inside the GEMM from 2 rows) gives the module path's logits within
    1e-5 over several steps, rows of one length or of different lengths, either GELU, and leaves the same
    keys and values in the cache; a hook or a LoRA layer leaves no plan, so steps take the module path."""
    import gptforge.model.gpt as gpt_module
    from gptforge.model.generate import decode_step, prefill
    from gptforge.model.gpt import KVCache
    from gptforge.model.lora import LoRAConfig, apply_lora

    if not gpt_module.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear kernel")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=80, n_layers=3, activation=activation)).eval()
    prompts = [list(range(3 + (i if ragged else 0), 9 + (2 * i if ragged else 0))) for i in range(rows)]
    used, allow = [], [True]
    real_block, real_plan = gpt_module.decode_block, GPT.decode_plan
    monkeypatch.setattr(gpt_module, "decode_block", lambda *a: used.append(1) or real_block(*a))
    monkeypatch.setattr(GPT, "decode_plan", lambda self: real_plan(self) if allow[0] else None)

    def run() -> tuple[list[torch.Tensor], KVCache]:
        cache = KVCache(model.cfg, rows, 40)
        with torch.inference_mode():
            tok = prefill(model, cache, 0, prompts).argmax(-1)
            out = []
            for _ in range(6):
                out.append(decode_step(model, cache, tok).clone())
                tok = out[-1].argmax(-1)
        return out, cache

    fast, fast_cache = run()
    assert len(used) == 6 * 3  # every step, every block
    allow[0] = False
    plain, plain_cache = run()
    assert len(used) == 6 * 3
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fast_cache.lengths == plain_cache.lengths == [len(p) + 6 for p in prompts]
    torch.testing.assert_close(fast_cache.k, plain_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_cache.v, plain_cache.v, atol=1e-5, rtol=1e-5)
    assert real_plan(model) is not None
    for module in (model.blocks[1].mlp.fc, model.blocks[2].ln_2, model.ln_f, model.tok_emb):
        handle = module.register_forward_hook(lambda m, i, o: None)
        assert real_plan(model) is None
        handle.remove()
    assert real_plan(model) is not None
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    assert real_plan(model) is None


# -- a classifier's embedding gradient: touched rows only ---------------------------------------------------
def test_classifier_training_with_touched_rows_embedding_equals_the_dense_gradient():
    """Five AdamW steps of a classifier (two micro-batches each, gradient clipping, zero_grad to None) with
    the embedding gradient kept in one buffer (`TouchedRowsEmbedding`: only the rows the last step wrote
    are zeroed) end at the parameters of the dense-gradient run within 1e-6; the buffer is reused."""

    def train(rows_path: bool) -> tuple[GPT, list]:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=300, num_labels=3)).train()
        model.touched_rows_embedding = rows_path
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        grads = []
        for _ in range(5):
            for _ in range(2):
                ids = torch.randint(0, 300, (4, 9), generator=g)
                mask = (torch.arange(9)[None, :] < torch.randint(2, 10, (4, 1), generator=g)).long()
                y = torch.randint(0, 3, (4,), generator=g)
                model(ids, attention_mask=mask, targets=y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            grads.append(model.tok_emb.weight.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, grads

    fast, fast_grads = train(True)
    # one buffer, made at the first step, is the gradient of every step
    assert all(gr is fast._emb_grad for gr in fast_grads)
    dense, _ = train(False)
    for (name, a), b in zip(fast.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


# -- the decoding step's attention kernel -------------------------------------------------------------------
def _assert_attends_like_sdpa(out, qkv, keys, values, lengths) -> None:
    """Row b of `kernels.attend`'s output equals SDPA of its query over keys/values 0..lengths[b] (the
    cache after the kernel wrote the new key and value at lengths[b]) within 1e-5."""
    B, heads, _, head_dim = keys.shape
    q = qkv.view(B, 3, heads, head_dim)[:, 0]
    for b, n in enumerate(lengths):
        ref = F.scaled_dot_product_attention(q[b, :, None], keys[b, :, : n + 1], values[b, :, : n + 1])
        torch.testing.assert_close(out[b], ref.reshape(heads * head_dim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "heads,head_dim,max_len,lengths,peak",
    [
        (3, 8, 12, [0, 5, 11, 2], 3.0),
        (2, 64, 12, [0, 5, 11, 2], 3.0),
        # rows longer than the prefetch distance (24 positions at width 64, 192 at width 8), and queries
        # large enough that scores fall more than 87 below a row's top (exp's underflow end)
        (2, 64, 320, [0, 23, 24, 319], 30.0),
        (3, 8, 320, [191, 5, 319, 200], 30.0),
    ],
)
def test_attend_kernel_equals_sdpa_and_writes_the_new_key_and_value(
    threads, heads, head_dim, max_len, lengths, peak
):
    """`kernels.attend`: each row's new key and value land at its own length (nothing else in the cache
    changes) and its output equals SDPA over that row's keys 0..length within 1e-5, for rows of different
    lengths (0 cached positions included, and rows past the prefetch distance), peaked and flat
    softmaxes, the compiled width 64 and another, and 1 or 2 threads."""
    import numpy as np

    from gptforge.model import kernels

    if not kernels.available():
        pytest.skip("no CPU attention kernel here (numba missing)")
    g = torch.Generator().manual_seed(0)
    B, C = len(lengths), heads * head_dim
    keys = torch.randn(B, heads, max_len, head_dim, generator=g)
    values = torch.randn(B, heads, max_len, head_dim, generator=g)
    qkv = torch.randn(B, 3 * C, generator=g) * peak
    lengths = np.array(lengths, dtype=np.int64)
    before_k, before_v = keys.clone(), values.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.attend(qkv, keys.numpy(), values.numpy(), lengths, head_dim**-0.5)
    finally:
        torch.set_num_threads(old)
    _, k, v = qkv.view(B, 3, heads, head_dim).unbind(1)
    for b, n in enumerate(lengths):
        assert torch.equal(keys[b, :, n], k[b]) and torch.equal(values[b, :, n], v[b])
        before_k[b, :, n], before_v[b, :, n] = k[b], v[b]
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)  # no other position written
    _assert_attends_like_sdpa(out, qkv, keys, values, lengths)
    if peak > 10:  # the case reaches exp's underflow end
        q = qkv.view(B, 3, heads, head_dim)[:, 0]
        scores = torch.einsum("bhd,bhtd->bht", q, keys[:, :, : int(lengths.max()) + 1]) * head_dim**-0.5
        assert (scores.amax(-1, keepdim=True) - scores).max() > 87


def test_softmax_weights_exp_is_within_4e_7_of_exp():
    """The kernel's vectorizable exp: within 4e-7 of exp (float64, relative; numpy's float32 exp: 2e-7)
    wherever exp(x) is a normal float (x >= -87), a positive value under 1.7e-38 below, exactly 1 at the
    top score, NaN for NaN; it returns the weights' sum."""
    import numpy as np

    from gptforge.model import kernels

    if not kernels.available():
        pytest.skip("no CPU attention kernel here (numba missing)")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -rng.random(200_000) * 87,
            -rng.random(200_000) * 2,
            [0.0, -1e-30, -1e-7, -0.3465736, -0.3465737, -87.0, -86.99],
        ]
    ).astype(np.float32)
    top = np.float32(5.0)
    scores = x + top  # the kernel's inputs: scores, and the top score subtracted from them
    x = scores - top  # the differences as float32 computes them
    total = kernels.softmax_weights(scores, np.empty(len(scores), np.int32), len(scores), top)
    exact = np.exp(x.astype(np.float64))
    assert np.abs(scores / exact - 1).max() < 4e-7
    assert total == pytest.approx(scores.astype(np.float64).sum(), rel=1e-5)
    assert scores[len(scores) - 7] == 1.0
    tail = np.array([-87.5, -100.0, -1e30, -np.inf, np.nan], np.float32)
    out = tail.copy()
    kernels.softmax_weights(out, np.empty(5, np.int32), 5, np.float32(0.0))
    assert (out[:4] > 0).all() and (out[:4] < 1.7e-38).all() and np.isnan(out[4])


@pytest.mark.parametrize("width", [768, 40])
def test_add_layer_norm_is_torchs_add_then_layer_norm(width):
    """`kernels.add_layer_norm`: the residual stream becomes x + y exactly (torch's float32 add), and the
    LayerNorm of it is within 1e-6 of the float64 LayerNorm of that sum (so within 2e-6 of F.layer_norm)
    for rows of one or several, an eps that matters (tiny variance) and a few outlier channels of 1e3 (as
    GPT-2's residual stream has); rows far from zero with a tiny spread, where float32 cannot hold the
    deviations, come out no further from the float64 result than F.layer_norm's."""
    import numpy as np

    from gptforge.model import kernels

    if not kernels.available():
        pytest.skip("no CPU decoding kernels here (numba missing)")
    g = torch.Generator().manual_seed(0)
    cases = [(5, 0.0, 1.0, False), (1, 0.0, 1.0, False), (2, 0.0, 1e-4, False), (3, 0.0, 1.0, True)]
    cases.append((3, 1e3, 1e-2, False))  # ill-conditioned: compared with F.layer_norm's own error
    for rows, offset, spread, outliers in cases:
        x = torch.randn(rows, width, generator=g) * spread + offset
        if outliers:
            x[:, :3] = torch.tensor([1500.0, -800.0, 2900.0])
        y = torch.randn(rows, width, generator=g) * spread
        weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)
        summed = x + y
        exact = F.layer_norm(summed.double(), (width,), weight.double(), bias.double(), 1e-5)
        theirs = F.layer_norm(summed, (width,), weight, bias, 1e-5)
        out = kernels.add_layer_norm(x, y, (weight.numpy(), bias.numpy(), np.float32(1e-5)))
        assert torch.equal(x, summed)
        err = (out.double() - exact).abs().max().item()
        if offset:
            assert err <= (theirs.double() - exact).abs().max().item() * 1.1
        else:
            assert err < 1e-6 * max(1.0, exact.abs().max().item())
            torch.testing.assert_close(out, theirs, atol=2e-6, rtol=1e-5)


def test_few_row_linear_kernel_values_and_rows_independent_of_their_neighbours():
    """`kernels.linear`: within float32 rounding of the float64 product (with and without a bias), for
    output counts that are and are not multiples of its 4-output blocks and input widths of any length; and
    every row's result is bit for bit the same computed alone, among 1..FEW_ROWS rows, or at another place
    in the batch (a request's greedy tokens cannot depend on who else is decoding)."""
    from gptforge.model import kernels

    if not kernels.available():
        pytest.skip("no CPU decoding kernels here (numba missing)")
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in [(1, 5), (7, 33), (96, 48), (2305, 768), (64, 3072), (5, 1000)]:
        w = torch.randn(out_f, in_f, generator=g)
        b = torch.randn(out_f, generator=g)
        x = torch.randn(kernels.FEW_ROWS, in_f, generator=g)
        for bias in (b, None):
            got = kernels.linear(x, w, bias)
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            scale = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
            assert ((got.double() - exact).abs() / scale).max() < 1e-6
            alone = torch.cat([kernels.linear(x[r : r + 1], w, bias) for r in range(len(x))])
            assert torch.equal(got, alone)
            for n in range(2, kernels.FEW_ROWS):
                assert torch.equal(kernels.linear(x[:n].flip(0).contiguous(), w, bias), got[:n].flip(0))
        assert kernels.linear(x[:0], w, b).shape == (0, out_f)
        with pytest.raises(ValueError, match="bias of shape"):
            kernels.linear(x, w, b[:-1])


def test_building_the_kernels_keeps_torchs_thread_count():
    """numba's OpenMP threads start by setting the OpenMP thread count, which torch shares: a process run
    with OMP_NUM_THREADS=1 must still train on one thread after its first decoding step (and the kernels
    run on one too), or its sums, and so its weights, change."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch, numba\n"
        "from gptforge.model import kernels\n"
        "assert torch.get_num_threads() == 1 and kernels.available()\n"
        "keys = np.zeros((1, 1, 4, 8), np.float32)\n"
        "kernels.attend(torch.randn(1, 24), keys, keys.copy(), np.zeros(1, np.int64), 1.0)\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]


def test_without_the_kernel_decoding_takes_the_module_path(monkeypatch, caplog):
    """Where the kernel cannot be built (say, an llvmlite without an intrinsic it uses), `available()`
    is False with the reason logged once, no decode plan is made, and decoding gives the same tokens on the
    module path."""
    import logging

    from gptforge.model import kernels
    from gptforge.model.generate import generate

    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=64)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    with_kernel = generate(model, prompts, max_new_tokens=6, eos_token_id=None)

    def broken():
        raise ValueError("no intrinsic llvm.prefetch here")

    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setattr(kernels, "_built", None)
    with caplog.at_level(logging.WARNING, logger="gptforge.model.kernels"):
        assert not kernels.available() and not kernels.available()
    assert [r.getMessage() for r in caplog.records] == [
        "CPU decoding kernels unavailable, decoding takes the module path: ValueError: no intrinsic "
        "llvm.prefetch here"
    ]
    assert model.decode_plan() is None
    assert generate(model, prompts, max_new_tokens=6, eos_token_id=None) == with_kernel


def test_attend_kernel_compiles_without_a_writable_cache(monkeypatch):
    """Where numba finds no writable cache dir (it raises at `cache=True`), the kernel is compiled for the
    process instead, and computes the same."""
    import numba
    import numpy as np

    from gptforge.model import kernels

    if not kernels.available():
        pytest.skip("no CPU attention kernel here (numba missing)")
    real_njit = numba.njit

    def no_cache_dir(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'attend_kernel': no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache_dir)
    monkeypatch.setattr(kernels, "_built", None)
    monkeypatch.setattr(kernels, "_available", None)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    qkv = torch.randn(2, 48, generator=g)
    lengths = np.array([3, 0])
    out = kernels.attend(qkv, keys.numpy(), values.numpy(), lengths, 8**-0.5)
    _assert_attends_like_sdpa(out, qkv, keys, values, lengths)


@pytest.mark.parametrize("planned", [True, False])
def test_a_decoding_step_past_the_context_window_is_refused(planned, monkeypatch):
    """A decoding step refuses a token past `context_length` (the cache may be longer) and one past the
    cache's end, with the decode plan (CPU kernel) and on the module path alike, and writes nothing."""
    from gptforge.model.generate import decode_step, prefill
    from gptforge.model.gpt import KVCache

    if not planned:
        monkeypatch.setattr(GPT, "decode_plan", lambda self: None)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=50, context_length=8)).eval()
    with torch.inference_mode():
        cache = KVCache(model.cfg, 2, 12)
        tok = prefill(model, cache, 0, [list(range(8)), list(range(5))]).argmax(-1)
        if planned and model.decode_plan() is None:
            pytest.skip("no decode plan here (no oneDNN or no numba)")
        before = cache.k.clone()
        with pytest.raises(ValueError, match="sequence of 9 tokens exceeds context_length=8"):
            decode_step(model, cache, tok)
        assert cache.lengths == [8, 5] and torch.equal(cache.k, before)
        short = KVCache(model.cfg, 1, 6)
        tok = prefill(model, short, 0, [list(range(6))]).argmax(-1)
        with pytest.raises(ValueError, match="KV cache overflow: 7 > 6"):
            decode_step(model, short, tok)
