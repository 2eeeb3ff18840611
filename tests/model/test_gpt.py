"""Model-level unit tests: sizes, memory, init statistics, the tied head, classifier pooling."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT


def meta_model(preset: str, **overrides) -> GPT:
    """A full-size model without allocating memory (parameter counting needs shapes only)."""
    with torch.device("meta"):
        return GPT(GPTConfig.from_preset(preset, **overrides))


# -- sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,unique",
    [
        ("gpt2", 124_439_808),  # = transformers' GPT2LMHeadModel(GPT2Config()).num_parameters()
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_num_parameters_match_gpt2_sizes(preset, unique):
    model = meta_model(preset)
    assert model.num_parameters() == unique
    assert model.num_parameters(count_tied_head=True) == unique + 50257 * model.cfg.emb_dim


def test_num_parameters_match_transformers_and_the_book():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
    assert meta_model("gpt2").num_parameters() == hf.num_parameters() == 124_439_808
    # The book's GPT-2 small has no qkv bias: 163,009,536 counting the output head, 124,412,160 tied.
    book = meta_model("gpt2", qkv_bias=False)
    assert book.num_parameters(count_tied_head=True) == 163_009_536
    assert book.num_parameters() == 124_412_160
    untied = meta_model("gpt2", qkv_bias=False, tie_embeddings=False)
    assert untied.num_parameters() == 163_009_536
    assert untied.num_parameters(count_tied_head=True) == 163_009_536  # nothing tied to count twice


def test_num_parameters_trainable_only_and_classifier_head():
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=100))
    total = model.num_parameters()
    model.tok_emb.weight.requires_grad_(False)  # also the tied head
    assert model.num_parameters(trainable_only=True) == total - 100 * 32
    model.add_classification_head(3)
    assert model.num_parameters() == total + 3 * 32


def test_memory_footprint_counts_weights_gradients_and_adam_moments():
    model = meta_model("gpt2")
    n = 124_439_808
    fp32 = model.memory_footprint()
    assert fp32 == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "total": 16 * n}
    bf16 = model.memory_footprint(dtype=torch.bfloat16)
    assert bf16["weights"] == 2 * n and bf16["total"] == 8 * n
    sgd = model.memory_footprint(optimizer="sgd")
    assert sgd["optimizer"] == 0 and sgd["total"] == 8 * n
    assert round(fp32["weights"] / 2**20) == 475  # GPT-2 small is ~475 MiB in fp32


# -- init ------------------------------------------------------------------------------------------
def test_init_statistics_follow_gpt2():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, context_length=128, emb_dim=256, n_layers=4, n_heads=4)
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for block in model.blocks:
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert block.attn.proj.weight.std().item() == pytest.approx(resid_std, rel=0.03)
        assert block.mlp.proj.weight.std().item() == pytest.approx(resid_std, rel=0.03)
        for bias in (block.attn.qkv.bias, block.attn.proj.bias, block.mlp.fc.bias, block.mlp.proj.bias):
            assert torch.count_nonzero(bias) == 0
        for ln in (block.ln_1, block.ln_2):
            assert torch.equal(ln.weight, torch.ones(256)) and torch.count_nonzero(ln.bias) == 0
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert abs(model.tok_emb.weight.mean().item()) < 1e-3
    # An untrained LM predicts nearly uniformly: loss close to ln(vocab).
    ids = torch.randint(0, 1000, (4, 64))
    with torch.no_grad():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).item()
    assert loss == pytest.approx(math.log(1000), abs=0.1)


# -- tied head -------------------------------------------------------------------------------------
def test_tied_head_is_one_parameter_and_stays_tied_through_training():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=50))
    assert model.lm_head.weight is model.tok_emb.weight
    assert sum(p is model.tok_emb.weight for p in model.parameters()) == 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (2, 9))
    before = model.tok_emb.weight.detach().clone()
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    opt.step()
    assert model.lm_head.weight is model.tok_emb.weight
    assert not torch.equal(model.tok_emb.weight, before)

    untied = GPT(GPTConfig.from_preset("test-tiny", vocab_size=50, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() == model.num_parameters() + 50 * 32


# -- classifier pooling ----------------------------------------------------------------------------
def test_pool_picks_the_last_non_padding_position():
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=50, num_labels=2))
    h = torch.arange(3 * 5, dtype=torch.float32).view(3, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert model.pool(h, mask).flatten().tolist() == [4.0, 6.0, 10.0]
    assert model.pool(h, None).flatten().tolist() == [4.0, 9.0, 14.0]


def test_classifier_logits_ignore_right_padding():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-tiny", vocab_size=50, num_labels=3, pad_token_id=49)).eval()
    a, b = torch.randint(0, 49, (1, 7)), torch.randint(0, 49, (1, 3))
    batch = torch.cat([a, torch.cat([b, torch.full((1, 4), 49)], dim=1)])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        logits = model(batch, attention_mask=mask)
        alone = torch.cat([model(a), model(b)])
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, alone, atol=1e-6, rtol=0)
    targets = torch.tensor([0, 2])
    loss = model(batch, attention_mask=mask, targets=targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets), atol=1e-6, rtol=0)


def test_lm_loss_skips_ignored_positions_exactly(monkeypatch):
    """Rows without a target never reach the vocab head, yet loss and gradients equal the plain form."""
    import torch.nn.functional as F

    from gptforge.model.gpt import lm_loss

    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 7))
    t[0, 2:] = -100
    t[2, :5] = -100
    for reduction in ("mean", "sum"):
        ref = F.cross_entropy((h @ w.T).view(-1, 50), t.view(-1), ignore_index=-100, reduction=reduction)
        gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
        got = lm_loss(h, w, t, reduction=reduction)
        gh, gw = torch.autograd.grad(got, (h, w))
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gw, gw_ref, atol=1e-6, rtol=1e-6)
        assert gh[0, 2:].abs().max() == 0  # ignored positions get no gradient

    import gptforge.model.gpt as gpt_module

    rows = []
    real = gpt_module.fused_linear_cross_entropy
    monkeypatch.setattr(
        gpt_module,
        "fused_linear_cross_entropy",
        lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k),
    )
    lm_loss(h, w, t)
    assert rows == [int((t != -100).sum())] == [11]  # only the 11 positions with a target reach the head
