"""Hugging Face interop: logits parity with transformers, bit-exact round trips, loading, refusals, export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from gptforge.cli import main
from gptforge.errors import ConversionError
from gptforge.export.hf import export
from gptforge.model import hf as hfmod
from gptforge.model.checkpoint import load_checkpoint, save_checkpoint, state_dict_for_save
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf,
)

ATOL = 1e-5


def hf_config(**kw) -> GPT2Config:
    """A tiny GPT-2 config whose special ids (pad = eos = bos) lie inside its small vocabulary."""
    base = dict(vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    base.update(kw)
    special = base["vocab_size"] - 1
    base.setdefault("eos_token_id", special)
    base.setdefault("bos_token_id", special)
    base.setdefault("pad_token_id", special)
    return GPT2Config(**base)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every tensor (LayerNorms and biases too), so a swapped mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(noise + (1.0 if ("ln" in name and name.endswith("weight")) else 0.0))
    return model.eval()


def make_hf(cls, seed: int = 0, **kw):
    return randomize(cls(hf_config(**kw)), seed)


def make_gpt(seed: int = 0, **kw) -> GPT:
    base = dict(
        vocab_size=97, context_length=16, emb_dim=16, n_layers=2, n_heads=2, pad_token_id=96, eos_token_id=96
    )
    base.update(kw)
    return randomize(GPT(GPTConfig(**base)), seed)


def right_padded(vocab: int, pad: int, lengths: list[int], T: int, seed: int = 0):
    """Random ids that never equal `pad`, right-padded with `pad` to T; and the matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (len(lengths), T), generator=g)
    ids[ids >= pad] += 1  # skip the pad id
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad
    return ids, mask


# -- logits parity over a matrix of configs ---------------------------------------------------------
LM_CONFIGS = [
    dict(),
    dict(n_layer=3, n_head=4, n_embd=32, vocab_size=128, n_positions=32, tie_word_embeddings=False),
    dict(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=8, activation_function="gelu"),
    dict(n_layer=2, n_head=3, n_embd=24, n_inner=40, layer_norm_epsilon=1e-6, n_positions=24),
]
CLS_CONFIGS = [
    dict(num_labels=3),
    dict(num_labels=2, n_head=4, n_embd=24, vocab_size=64, n_inner=40, tie_word_embeddings=False),
]


@pytest.mark.parametrize("kw", LM_CONFIGS)
def test_lm_logits_match_transformers(kw):
    hf = make_hf(GPT2LMHeadModel, **kw)
    model = from_hf(hf)
    cfg = model.cfg
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert cfg.hidden_dim == (kw.get("n_inner") or 4 * cfg.emb_dim)
    T = cfg.context_length
    ids, mask = right_padded(cfg.vocab_size, cfg.pad_token_id, [T, T - 3, 2], T)
    eager = AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager")
    eager.load_state_dict(hf.state_dict())
    eager.eval()
    with torch.no_grad():
        full_ours, full_theirs = model(ids), eager(ids).logits
        torch.testing.assert_close(full_ours, full_theirs, atol=ATOL, rtol=0)
        # Padded batch: every real (non-pad) position agrees.
        ours = model(ids, attention_mask=mask)
        theirs = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
    assert (full_ours.abs().max() > 0.1).item()  # not a trivially zero model


@pytest.mark.parametrize("kw", CLS_CONFIGS)
def test_classifier_logits_match_transformers_on_padded_batches(kw):
    hf = make_hf(GPT2ForSequenceClassification, attn_implementation="eager", **kw)
    model = from_hf(hf)
    assert model.cfg.num_labels == kw["num_labels"]
    assert model.cfg.id2label == {i: f"LABEL_{i}" for i in range(kw["num_labels"])}
    cfg = model.cfg
    ids, mask = right_padded(cfg.vocab_size, cfg.pad_token_id, [16, 9, 1, 5], 16)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (4, kw["num_labels"])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(qkv_bias=False),
        dict(tie_embeddings=False, mlp_dim=24),
        dict(activation="gelu", n_heads=4, emb_dim=32),
    ],
)
def test_gptforge_to_transformers_logits(kw):
    model = make_gpt(**kw)
    hf = to_hf(model)
    assert type(hf) is GPT2LMHeadModel
    hf.config._attn_implementation = "eager"
    ids, _ = right_padded(97, 96, [16, 16], 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)
    if not model.cfg.qkv_bias:
        assert torch.count_nonzero(hf.transformer.h[0].attn.c_attn.bias) == 0
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == model.cfg.tie_embeddings


def test_to_hf_classifier_is_a_copy():
    model = make_gpt(num_labels=4, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    hf = to_hf(model)
    assert type(hf) is GPT2ForSequenceClassification
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"} and hf.config.label2id["c"] == 2
    with torch.no_grad():
        hf.score.weight.add_(1.0)  # must not reach the gptforge model
    assert not torch.equal(hf.score.weight, model.score.weight)


def test_from_hf_of_a_model_object_shares_no_storage_with_it():
    hf = make_hf(GPT2LMHeadModel)
    model = from_hf(hf)
    theirs = {t.untyped_storage().data_ptr() for t in hf.state_dict().values()}
    assert not theirs & {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert model.lm_head.weight is model.tok_emb.weight  # re-tied after the tensors were assigned
    before = model(torch.tensor([[1, 2, 3]]))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1.0)
    torch.testing.assert_close(model(torch.tensor([[1, 2, 3]])), before, atol=0, rtol=0)


def test_from_dir_half_precision_becomes_fp32_and_trainable(tmp_path):
    hf = make_hf(GPT2LMHeadModel)
    hf.half().save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.tok_emb.weight
    _assert_same_logits(model, hf.float())


_PEAK_PROBE = """
import json, sys, torch
from gptforge.model import hf
from gptforge.export.hf import export
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
hf.from_hf(sys.argv[2])  # imports and lazy set-up paid before measuring
out = {}
base = rss()
try:
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
model = hf.from_hf(sys.argv[1])
out['from_hf'] = hwm() - base
out['model'] = sum(p.numel() * 4 for p in model.parameters())
base = rss()
try:
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
export(model, sys.argv[3], verify=False)
out['export'] = hwm() - base
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from Linux /proc")
def test_from_hf_and_export_peak_memory_stay_under_two_models(tmp_path):
    """The converted tensors become the parameters and each source tensor is read, converted and freed
    in turn: loading peaks near one model's size (a copy-then-load_state_dict path needs ~2.7)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    big = GPT2LMHeadModel(hf_config(vocab_size=50257, n_positions=64, n_embd=512, n_layer=2, n_head=8))
    big.save_pretrained(tmp_path / "big")
    make_hf(GPT2LMHeadModel).save_pretrained(tmp_path / "tiny")
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_PROBE,
            str(tmp_path / "big"),
            str(tmp_path / "tiny"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["model"] > 100e6
    assert m["from_hf"] <= 1.5 * m["model"], m
    assert m["export"] <= 2.0 * m["model"], m


# -- bit-exact round trips --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(qkv_bias=False),
        dict(tie_embeddings=False, mlp_dim=20),
        dict(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}),
        dict(n_layers=12, n_heads=4),  # two-digit layer indices
    ],
)
def test_round_trip_gptforge_hf_gptforge_is_bit_exact(kw):
    model = make_gpt(**kw)
    cfg = model.cfg
    hf_cfg = config_to_hf(cfg)
    assert config_from_hf(hf_cfg) == cfg
    assert config_from_hf(json.loads(hf_cfg.to_json_string())) == cfg  # as read from config.json
    hf_sd = state_dict_to_hf(model.state_dict(), cfg)
    back = state_dict_from_hf(hf_sd, cfg)
    ref = state_dict_for_save(model)
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    # and through a real transformers model object
    again = from_hf(to_hf(model))
    assert again.cfg == cfg
    sd = state_dict_for_save(again)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (GPT2LMHeadModel, {}),
        (GPT2LMHeadModel, dict(tie_word_embeddings=False)),
        (GPT2ForSequenceClassification, dict(num_labels=2)),
    ],
)
def test_round_trip_hf_gptforge_hf_is_bit_exact(cls, kw):
    hf = make_hf(cls, **kw)
    hf_sd = hf.state_dict()
    model = from_hf(hf)
    back = state_dict_to_hf(model.state_dict(), model.cfg)
    if hf.config.tie_word_embeddings and cls is GPT2LMHeadModel:
        hf_sd.pop("lm_head.weight")  # tied: transformers saves it once, as wte
    assert set(back) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k
    hf2 = to_hf(model)
    for k, v in hf2.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k


def test_conv1d_weights_are_transposed_exactly():
    hf = make_hf(GPT2LMHeadModel, n_embd=16, n_inner=24)
    sd = state_dict_from_hf(hf.state_dict(), from_hf(hf).cfg)
    h0 = hf.transformer.h[0]
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], h0.attn.c_attn.weight.T)  # (48, 16) from (16, 48)
    assert torch.equal(sd["blocks.0.attn.proj.weight"], h0.attn.c_proj.weight.T)
    assert torch.equal(sd["blocks.0.mlp.fc.weight"], h0.mlp.c_fc.weight.T)
    assert sd["blocks.0.mlp.fc.weight"].shape == (24, 16)
    assert torch.equal(sd["blocks.0.mlp.proj.weight"], h0.mlp.c_proj.weight.T)
    assert torch.equal(sd["tok_emb.weight"], hf.transformer.wte.weight)  # not transposed


# -- loading from directories -----------------------------------------------------------------------
def _assert_same_logits(model: GPT, hf):
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_from_dir_single_safetensors(tmp_path):
    hf = make_hf(GPT2LMHeadModel)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    _assert_same_logits(from_hf(tmp_path), hf)
    _assert_same_logits(from_hf(str(tmp_path)), hf)


def test_from_dir_sharded_safetensors(tmp_path):
    hf = make_hf(GPT2LMHeadModel, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = from_hf(tmp_path)
    assert not model.cfg.tie_embeddings
    _assert_same_logits(model, hf)


def test_from_dir_pytorch_bin_with_legacy_buffers(tmp_path):
    """transformers 5 no longer writes .bin files, so write one as old checkpoints were: plain tensors."""
    hf = make_hf(GPT2LMHeadModel, n_layer=3)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    T = hf.config.n_positions
    for i in range(3):  # the causal-mask buffers old GPT-2 files carry
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _assert_same_logits(from_hf(tmp_path), hf)


def test_from_dir_gpt2model_without_prefix_or_head(tmp_path):
    base = make_hf(GPT2Model, tie_word_embeddings=False)
    base.save_pretrained(tmp_path)
    assert "wte.weight" in load_file(str(tmp_path / "model.safetensors"))  # no `transformer.` prefix
    model = from_hf(tmp_path)
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    ids = torch.arange(10)[None]
    with torch.no_grad():
        h = base(ids).last_hidden_state
        torch.testing.assert_close(model(ids), h @ base.wte.weight.T, atol=ATOL, rtol=0)


def test_from_dir_sequence_classifier_with_labels(tmp_path):
    hf = make_hf(GPT2ForSequenceClassification, num_labels=2, id2label={0: "ham", 1: "spam"})
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.cfg.num_labels == 2 and model.cfg.id2label == {0: "ham", 1: "spam"}
    ids, mask = right_padded(97, 96, [12, 7], 12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0
        )


def test_from_hf_missing_dir_and_unreachable_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="no such model directory"):
        from_hf(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="could not be fetched"):
        from_hf("gptforge-test/definitely-not-cached-model")
    with pytest.raises(ConversionError, match="no config.json"):
        from_hf(tmp_path)


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting,value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("add_cross_attention", True),
        ("scale_attn_weights", False),
        ("activation_function", "relu"),
        ("activation_function", "gelu_fast"),
    ],
)
def test_refused_settings_name_the_setting(setting, value, tmp_path):
    cfg = hf_config(**{setting: value})
    with pytest.raises(ConversionError, match=setting):
        config_from_hf(cfg)
    # also through a directory, as users meet it
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match=setting):
        config_from_hf(json.loads((tmp_path / "config.json").read_text()))


def test_refused_model_type_and_regression_head():
    with pytest.raises(ConversionError, match="model_type"):
        config_from_hf({"model_type": "gpt_neo", "n_embd": 16})
    with pytest.raises(ConversionError, match="num_labels=1"):
        config_from_hf(hf_config(num_labels=1), classifier=True)


def test_gelu_variants_map_exactly():
    assert config_from_hf(hf_config(activation_function="gelu")).activation == "gelu"
    assert config_from_hf(hf_config(activation_function="gelu_new")).activation == "gelu_new"
    # transformers' gelu_pytorch_tanh is the very F.gelu(approximate="tanh") gptforge computes
    hf = make_hf(GPT2LMHeadModel, activation_function="gelu_pytorch_tanh")
    _assert_same_logits(from_hf(hf), hf)


def test_extra_missing_and_misshapen_tensors_are_named():
    hf = make_hf(GPT2LMHeadModel)
    cfg = from_hf(hf).cfg
    sd = dict(hf.state_dict())
    with pytest.raises(ConversionError, match=r"transformer\.h\.0\.attn\.q_attn\.weight"):
        state_dict_from_hf({**sd, "transformer.h.0.attn.q_attn.weight": torch.zeros(16, 16)}, cfg)
    with pytest.raises(ConversionError, match=r"multiple_choice_head\.summary\.weight"):
        state_dict_from_hf({**sd, "multiple_choice_head.summary.weight": torch.zeros(1, 16)}, cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ConversionError, match=r"missing tensor.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        state_dict_from_hf(missing, cfg)
    bad = {**sd, "transformer.h.0.ln_2.weight": torch.ones(17)}
    with pytest.raises(ConversionError, match=r"transformer\.h\.0\.ln_2\.weight.*shape"):
        state_dict_from_hf(bad, cfg)
    untied = {**sd, "lm_head.weight": sd["lm_head.weight"] + 1}
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        state_dict_from_hf(untied, cfg)
    # gptforge side: an unknown tensor of ours is named too
    model = make_gpt()
    with pytest.raises(ConversionError, match="blocks.0.attn.rotary"):
        state_dict_to_hf({**model.state_dict(), "blocks.0.attn.rotary": torch.zeros(1)}, model.cfg)


def test_nonzero_qkv_bias_with_qkv_bias_false_is_refused():
    model = make_gpt(qkv_bias=False)
    hf_sd = state_dict_to_hf(model.state_dict(), model.cfg)
    hf_sd["transformer.h.1.attn.c_attn.bias"] = torch.full((48,), 0.5)
    with pytest.raises(ConversionError, match=r"h\.1\.attn\.c_attn\.bias.*qkv_bias"):
        state_dict_from_hf(hf_sd, model.cfg)


# -- export -----------------------------------------------------------------------------------------
def small_vocab_export(model, out, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="vocab_size=")
        return export(model, out, **kw)


def test_export_writes_a_complete_loadable_dir(tmp_path):
    model = make_gpt(num_labels=2, id2label={0: "ham", 1: "spam"})
    out = small_vocab_export(
        model,
        tmp_path / "exp",
        metrics={"test": {"accuracy": 0.9567, "f1": 0.8123}, "step": 120},
        prompt_style={"name": "alpaca"},
    )
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= files
    assert {"vocab.json", "merges.txt", "prompt_style.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["pad_token_id"] == 96 and config["eos_token_id"] == 96 and config["bos_token_id"] == 96
    assert json.loads((out / "prompt_style.json").read_text()) == {"name": "alpaca"}
    card = (out / "README.md").read_text()
    assert f"{model.num_parameters():,}" in card
    assert "| test.accuracy | 0.9567 |" in card and "| step | 120 |" in card
    assert "AutoModelForSequenceClassification" in card and "0=ham, 1=spam" in card
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16
    assert not list(tmp_path.glob(".exp*"))  # no temp dir left


def test_export_default_ids_and_generation_config(tmp_path):
    model = make_gpt(vocab_size=50257, pad_token_id=50256, eos_token_id=50256, emb_dim=8, n_layers=1)
    out = export(model, tmp_path / "exp")
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["bos_token_id"]) == (50256, 50256, 50256)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["pad_token_id"], gen["eos_token_id"], gen["bos_token_id"]) == (50256, 50256, 50256)
    sd = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in sd and sd["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)


def test_export_refuses_nonempty_dir_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    model = make_gpt()
    with pytest.raises(ConversionError, match="overwrite"):
        small_vocab_export(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    got = small_vocab_export(model, str(out), overwrite=True, verify=False)  # str accepted, Path returned
    assert got == out and isinstance(got, Path)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "not verified" in (out / "README.md").read_text()


def test_failed_verification_raises_and_leaves_nothing(tmp_path, monkeypatch):
    real = hfmod.state_dict_to_hf

    def corrupt(sd, cfg):
        out = real(sd, cfg)
        out["transformer.h.1.mlp.c_fc.bias"] = out["transformer.h.1.mlp.c_fc.bias"] + 0.05
        return out

    monkeypatch.setattr(hfmod, "state_dict_to_hf", corrupt)
    model = make_gpt()
    with pytest.raises(ConversionError, match="logits differ"):
        small_vocab_export(model, tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir
    # an existing export survives a failed overwrite
    monkeypatch.setattr(hfmod, "state_dict_to_hf", real)
    small_vocab_export(model, tmp_path / "exp", verify=False)
    before = (tmp_path / "exp" / "model.safetensors").read_bytes()
    monkeypatch.setattr(hfmod, "state_dict_to_hf", corrupt)
    with pytest.raises(ConversionError):
        small_vocab_export(model, tmp_path / "exp", overwrite=True)
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


def test_export_refuses_classifier_whose_pad_id_is_outside_vocab(tmp_path):
    model = make_gpt(num_labels=2, pad_token_id=50256)
    with pytest.raises(ConversionError, match="pad_token_id=50256"):
        export(model, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


# -- exported dirs in transformers pipelines --------------------------------------------------------
def _gpt2_vocab_model(seed: int, **kw) -> GPT:
    base = dict(vocab_size=50257, context_length=64, emb_dim=16, n_layers=2, n_heads=2)
    return randomize(GPT(GPTConfig(**base, **kw)), seed)


def test_text_generation_pipeline_matches_gptforge_greedy(tmp_path):
    from transformers import pipeline

    from gptforge.model.tokenizer import Tokenizer

    model = _gpt2_vocab_model(1)
    out = export(model, tmp_path / "lm")
    pipe = pipeline(
        "text-generation",
        model=AutoModelForCausalLM.from_pretrained(out, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(out, local_files_only=True),
    )
    prompt = "Every effort moves you"
    res = pipe(prompt, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = Tokenizer().encode(prompt)
    with torch.no_grad():
        for _ in range(8):  # gptforge greedy decoding, by hand
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == 50256:
                break
    assert list(res) == ids


def test_text_classification_pipeline_matches_gptforge_labels(tmp_path):
    from transformers import pipeline

    from gptforge.model.tokenizer import Tokenizer

    model = _gpt2_vocab_model(2, num_labels=2, id2label={0: "ham", 1: "spam"})
    with torch.no_grad():
        model.score.weight.mul_(30)  # spread the random classifier's decisions
    out = export(model, tmp_path / "cls")
    texts = [
        "Free entry in 2 a wkly comp to win FA Cup final tkts",
        "Ok lar... Joking wif u oni...",
        "WINNER!! As a valued network customer you have been selected",
        "I'm gonna be home soon",
        "URGENT! You have won a 1 week FREE membership",
        "Hi",
    ]
    pipe = pipeline(
        "text-classification",
        model=AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(out, local_files_only=True),
    )
    got = pipe(texts, batch_size=3)  # batches are right-padded with <|endoftext|>
    tok = Tokenizer()
    expected = []
    with torch.no_grad():
        for text in texts:
            probs = model(torch.tensor([tok.encode(text)])).softmax(-1)[0]
            expected.append((model.cfg.id2label[int(probs.argmax())], float(probs.max())))
    assert [g["label"] for g in got] == [label for label, _ in expected]
    assert {label for label, _ in expected} == {"ham", "spam"}  # both classes occur: the check can fail
    for g, (_, p) in zip(got, expected):
        assert g["score"] == pytest.approx(p, abs=1e-5)


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_convert_both_ways_and_export(tmp_path, capsys):
    hf = make_hf(GPT2ForSequenceClassification, num_labels=2, id2label={0: "ham", 1: "spam"})
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    model = load_checkpoint(tmp_path / "ckpt")
    assert model.cfg.id2label == {0: "ham", 1: "spam"}
    ids, mask = right_padded(97, 96, [10, 4], 10)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0
        )

    ckpt = tmp_path / "ckpt"
    (ckpt / "metrics.jsonl").write_text('{"step": 10, "val_loss": 1.5}\n{"step": 20, "val_loss": 1.25}\n')
    (ckpt / "prompt_style.json").write_text('{"name": "phi3"}')
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="vocab_size=")
        assert main(["export", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
        card = (tmp_path / "exp" / "README.md").read_text()
        assert "| val_loss | 1.25 |" in card and "| step | 20 |" in card
        assert json.loads((tmp_path / "exp" / "prompt_style.json").read_text()) == {"name": "phi3"}
        assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "exp2")]) == 0
    exported = from_hf(tmp_path / "exp2")
    sd, ref = state_dict_for_save(exported), state_dict_for_save(model)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert "exported" in capsys.readouterr().out


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    model = make_gpt()
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    cases = [
        (["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "missing"),
        (["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "busy")], "--overwrite"),
        (["convert", "--from-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "busy")], "--overwrite"),
        (["convert", "--from-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "no such model"),
        (["convert", "--out", str(tmp_path / "o")], "--from-hf"),
        (["export", str(tmp_path / "ckpt")], "--out"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert (tmp_path / "busy" / "x").read_text() == "x" and not (tmp_path / "o").exists()
    # convert --from-hf on a gptforge checkpoint (not an HF dir) is refused, not misread
    assert main(["convert", "--from-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o2")]) == 2
    assert "model_type" in capsys.readouterr().err
