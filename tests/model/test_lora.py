"""LoRA: freezing, merge parity, adapter checkpoints, resume, and parity with peft on transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.cli import main as cli_main
from gptforge.errors import CheckpointError, ConfigError
from gptforge.export.peft import export_peft, verify_peft
from gptforge.model import GPT, GPTConfig
from gptforge.model import gpt as gpt_mod
from gptforge.model.checkpoint import load_checkpoint, save_checkpoint, state_dict_for_save
from gptforge.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    describe_trainable,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from gptforge.pipeline.lora_state import register_adapter_checkpointing

V, E, L, C, H = 128, 32, 2, 32, 4 * 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_labels: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=V, context_length=C, emb_dim=E, n_layers=L, n_heads=2, dropout=dropout,
        pad_token_id=V - 1, eos_token_id=V - 1,
    )  # fmt: skip
    model = GPT(cfg)
    if num_labels:
        model.add_classification_head(num_labels, {0: "ham", 1: "spam"} if num_labels == 2 else None)
    return model


def randomize_lora(model: GPT, seed: int = 1) -> None:
    """B starts at zero (adapter = identity); give it values so the parity tests test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def ids(b: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V - 1, (b, t), generator=g)  # no pad id: HF and we both pool the last token


def base_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith((".lora_A", ".lora_B")) and not k.startswith("score.")
    }


def save_hf_base(model: GPT, out: Path) -> Path:
    """Our base weights as a transformers GPT2LMHeadModel dir (Conv1D = transpose of our Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    hf_cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.emb_dim, n_layer=c.n_layers,
        n_head=c.n_heads, n_inner=c.hidden_dim, activation_function="gelu_new",
        layer_norm_epsilon=c.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=c.eos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    ours = model.state_dict()
    names = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight"}
    names |= {f"ln_f.{p}": f"ln_f.{p}" for p in ("weight", "bias")}
    conv = {
        "attn.qkv": "attn.c_attn",
        "attn.proj": "attn.c_proj",
        "mlp.fc": "mlp.c_fc",
        "mlp.proj": "mlp.c_proj",
    }
    sd = {}
    for i in range(c.n_layers):
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ln}.{p}"] = f"h.{i}.{ln}.{p}"
        for o, h in conv.items():
            sd[f"transformer.h.{i}.{h}.weight"] = ours[f"blocks.{i}.{o}.weight"].t().contiguous()
            sd[f"transformer.h.{i}.{h}.bias"] = ours[f"blocks.{i}.{o}.bias"]
    for o, h in names.items():
        sd[f"transformer.{h}"] = ours[o]
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") for k in missing), missing
    hf.save_pretrained(out)
    return out


# -- config --------------------------------------------------------------------------------------------
def test_config_validation_and_presets():
    assert LoRAConfig().enabled is False
    book = LoRAConfig.from_preset("book")
    assert (book.r, book.alpha, book.scaling) == (16, 16.0, 1.0)
    assert book.resolved_targets(classifier=False) == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    assert book.resolved_targets(classifier=True)[-1] == "score"
    assert LoRAConfig(r=4, targets="c_attn, mlp.c_proj").resolved_targets(False) == ["attn.qkv", "mlp.proj"]
    with pytest.raises(ConfigError, match="did you mean 'attn.qkv'"):
        LoRAConfig(r=4, targets=["attn.qvk"])
    with pytest.raises(ConfigError, match="lora.r"):
        LoRAConfig(r=-1)
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRAConfig(r=2, dropout=1.0)
    with pytest.raises(ConfigError, match="no classification head"):
        apply_lora(tiny(), LoRAConfig(r=2, targets=["score"]))
    with pytest.raises(ConfigError, match="LoRA is off"):
        apply_lora(tiny(), LoRAConfig(r=0))


# -- model level ---------------------------------------------------------------------------------------
def test_apply_freezes_base_and_counts_trainable():
    model = tiny()
    total_before = model.num_parameters()
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    r = 4
    per_block = r * (E + 3 * E) + r * (E + E) + r * (E + H) + r * (H + E)
    n_train, n_all = count_parameters(model)
    assert n_train == L * per_block
    assert n_all == total_before + L * per_block
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{t}.lora_{ab}" for i in range(L) for t in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        for ab in "AB"
    }  # fmt: skip
    assert describe_trainable(model) == f"trainable parameters: {n_train:,} of {n_all:,} (" + (
        f"{100 * n_train / n_all:.2f}%)"
    )
    # names of base weights are unchanged, so base checkpoints and converters still apply
    assert set(state_dict_for_save(tiny())) <= set(model.state_dict())
    m = model.blocks[0].attn.qkv
    assert isinstance(m, LoRALinear) and m.lora_A.dtype == torch.float32 and m.scaling == 2.0
    assert torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().max() <= 1 / E**0.5  # kaiming(a=sqrt 5)


def test_classifier_head_trained_in_full_or_by_lora():
    model = apply_lora(tiny(num_labels=2), LoRAConfig(r=2))
    assert model.score.weight.requires_grad and not isinstance(model.score, LoRALinear)
    book = apply_lora(tiny(num_labels=2), LoRAConfig.from_preset("book"))
    assert isinstance(book.score, LoRALinear) and not book.score.weight.requires_grad
    assert book.score.lora_A.shape == (16, E) and book.score.lora_B.shape == (2, 16)


def test_fresh_adapter_is_identity_and_merge_matches_unmerged():
    base = tiny()
    x = ids()
    with torch.no_grad():
        ref = base(x)
    model = apply_lora(base, LoRAConfig(r=4, alpha=16, targets=["all"]))
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B = 0: the adapter changes nothing before training
        randomize_lora(model)
        unmerged = model(x)
        assert (unmerged - ref).abs().max() > 1e-2  # the adapter now matters
        merge_lora(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not lora_modules(model) and not hasattr(model, "lora_cfg")
    assert set(model.state_dict()) == set(tiny().state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.tok_emb.weight  # tying survives


def test_merge_classifier_with_lora_head():
    model = apply_lora(tiny(num_labels=3), LoRAConfig(r=2, alpha=4, targets=["all"]))
    randomize_lora(model)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    assert merged.shape == (2, 3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def train_steps(model: GPT, opt: torch.optim.Optimizer, n: int, start: int = 0) -> list[float]:
    losses = []
    model.train()
    for step in range(start, start + n):
        x = ids(4, 16, seed=100 + step)
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_base_frozen_after_optimizer_steps():
    model = apply_lora(tiny(), LoRAConfig(r=4, alpha=8, dropout=0.1))
    frozen = base_tensors(model)
    a0 = model.blocks[0].mlp.fc.lora_A.detach().clone()
    params = trainable_parameters(model)
    assert len(params) == 4 * L * 2
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    losses = train_steps(model, opt, 5)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert not torch.equal(model.blocks[0].mlp.fc.lora_A, a0)
    assert torch.count_nonzero(model.blocks[0].mlp.fc.lora_B) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert losses[-1] < losses[0]


def test_adapter_checkpoint_holds_only_adapter_and_head(tmp_path):
    base = tiny()
    save_checkpoint(base, tmp_path / "base")
    model = apply_lora(tiny(num_labels=2), LoRAConfig(r=2, alpha=4))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad", base=tmp_path / "base", metadata={"run.json": {"seed": 0}})
    sd = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    expected = {f"blocks.{i}.{t}.lora_{ab}" for i in range(L) for t in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
                for ab in "AB"} | {"score.weight"}  # fmt: skip
    assert set(sd) == expected
    assert sum(v.numel() for v in sd.values()) == count_parameters(model)[0]
    full = (tmp_path / "base" / "model.safetensors").stat().st_size
    assert (tmp_path / "ad" / "adapter.safetensors").stat().st_size < full / 4
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["base"] == str((tmp_path / "base").resolve()) and meta["lora"]["r"] == 2
    assert json.loads((tmp_path / "ad" / "labels.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind

    loaded = load_adapter(tmp_path / "ad")  # the base comes from the recorded path
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert count_parameters(loaded) == count_parameters(model)
    assert loaded.cfg.id2label == {0: "ham", 1: "spam"}


def test_adapter_refuses_wrong_base(tmp_path):
    save_checkpoint(tiny(), tmp_path / "base")
    model = apply_lora(tiny(), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "ad", base=tmp_path / "base")
    other = tiny()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1.0)
    save_checkpoint(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="other weights"):
        load_adapter(tmp_path / "ad", base=tmp_path / "other")
    torch.manual_seed(0)
    wide = GPT(GPTConfig.from_preset("test-tiny", vocab_size=V, context_length=C, emb_dim=64))
    save_checkpoint(wide, tmp_path / "wide")
    with pytest.raises(CheckpointError, match="emb_dim=64"):
        load_adapter(tmp_path / "ad", base=tmp_path / "wide")
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        load_adapter(tmp_path / "base")


def test_resume_from_adapter_checkpoint_matches_uninterrupted(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8)
    full = apply_lora(tiny(), cfg)  # tiny() seeds, so both runs start from the same A
    randomize_lora(full, seed=3)
    straight = train_steps(full, torch.optim.SGD(trainable_parameters(full), lr=0.5), 4)

    first = apply_lora(tiny(), cfg)
    randomize_lora(first, seed=3)
    part1 = train_steps(first, torch.optim.SGD(trainable_parameters(first), lr=0.5), 2)
    save_checkpoint(tiny(), tmp_path / "base")
    save_adapter(first, tmp_path / "step2", base=tmp_path / "base")

    resumed = load_adapter(tmp_path / "step2")
    part2 = train_steps(resumed, torch.optim.SGD(trainable_parameters(resumed), lr=0.5), 2, start=2)
    assert part1 + part2 == straight


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_run(steps: int, start: int, save_to: Path | None = None, load_from: Path | None = None):
    """Train a LoRA model with dropout through Accelerate; optionally save or restore its state."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    register_adapter_checkpointing(acc)
    torch.manual_seed(5)
    model = apply_lora(tiny(dropout=0.1), LoRAConfig(r=4, alpha=8, dropout=0.1))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    model, opt = acc.prepare(model, opt)
    if load_from is not None:
        acc.load_state(str(load_from))  # adapter tensors, AdamW moments and the RNG (dropout) come back
    losses = train_steps(model, opt, steps, start=start)
    if save_to is not None:
        acc.save_state(str(save_to))
    return acc.unwrap_model(model), losses


def test_accelerate_checkpoint_holds_only_adapter_and_resumes_exactly(tmp_path, fresh_accelerate_state):
    _, straight = accelerate_run(4, 0)
    first, part1 = accelerate_run(2, 0, save_to=tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(saved) == set(adapter_state_dict(first))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved) and len(saved) == 4 * L * 2
    resumed, part2 = accelerate_run(2, 2, load_from=tmp_path / "ckpt")
    assert part1 + part2 == straight
    assert len(set(straight)) == 4  # the steps really trained


def test_mixed_precision_keeps_lora_in_fp32():
    model = apply_lora(tiny(), LoRAConfig(r=4))
    randomize_lora(model)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    m = model.blocks[1].mlp.proj
    assert m.lora_A.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    assert torch.isfinite(m.lora_B.grad).all() and m.lora_B.grad.abs().sum() > 0
    # a bf16 base without autocast: the adapter path runs in fp32 and the output keeps the base dtype
    bf = tiny().to(torch.bfloat16)
    apply_lora(bf, LoRAConfig(r=2))
    assert bf.blocks[0].attn.qkv.lora_A.dtype == torch.float32
    assert bf(x).dtype == torch.bfloat16


# -- PEFT parity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return save_hf_base(tiny(), tmp_path_factory.mktemp("hf") / "base")


def test_peft_export_matches_peft_lm(tmp_path, hf_base):
    peft = pytest.importorskip("peft")
    model = apply_lora(tiny(), LoRAConfig(r=4, alpha=8, targets=["all"]))
    randomize_lora(model)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(hf_base))
    diff = verify_peft(model, tmp_path / "peft", hf_base, atol=1e-5)
    assert diff <= 1e-5
    # the keys are those peft itself writes for the same config on GPT2LMHeadModel
    from transformers import GPT2LMHeadModel

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] == str(hf_base)
    ref = peft.get_peft_model(
        GPT2LMHeadModel.from_pretrained(hf_base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=cfg["target_modules"], fan_in_fan_out=True),
    )
    ref_keys = set(peft.get_peft_model_state_dict(ref))
    ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(ours) == ref_keys
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in ours
    assert ours["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, H)


@pytest.mark.parametrize("targets", [["attn.qkv", "mlp.proj"], ["all"]], ids=["head-full", "head-lora"])
def test_peft_export_matches_peft_classifier(tmp_path, hf_base, targets):
    pytest.importorskip("peft")
    model = apply_lora(tiny(num_labels=2), LoRAConfig(r=2, alpha=4, targets=targets))
    randomize_lora(model)
    with torch.no_grad():
        model.score.weight.mul_(3.0)  # a trained head differs from the random one transformers makes
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(hf_base))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"] and cfg["task_type"] == "SEQ_CLS"
    assert "score" not in cfg["target_modules"]
    assert verify_peft(model, tmp_path / "peft", hf_base, atol=1e-5) <= 1e-5


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_merge_writes_checkpoint_and_peft(tmp_path, hf_base, capsys):
    pytest.importorskip("peft")
    save_checkpoint(tiny(), tmp_path / "base")
    model = apply_lora(tiny(num_labels=2), LoRAConfig(r=2, alpha=4, targets=["all"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad", base=tmp_path / "base", metadata={"run.json": {"seed": 3}})
    argv = ["merge", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]
    argv += ["--peft-out", str(tmp_path / "peft"), "--peft-base", str(hf_base)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "peft logits match" in out and "merged: logits match" in out
    merged = load_checkpoint(tmp_path / "merged")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.eval()(x), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "merged" / "run.json").read_text()) == {"seed": 3}
    assert merged.cfg.id2label == {0: "ham", 1: "spam"}
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(
        type(m) is gpt_mod.Linear for n, m in merged.named_modules() if n.endswith(("qkv", "fc", "score"))
    )


def test_cli_merge_user_errors(tmp_path, capsys):
    save_checkpoint(tiny(), tmp_path / "base")
    save_adapter(apply_lora(tiny(), LoRAConfig(r=2)), tmp_path / "ad", base=tmp_path / "base")
    assert cli_main(["merge", str(tmp_path / "ad")]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "ad"), "--peft-out", str(tmp_path / "p")]) == 2
    assert "--peft-base is needed" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "base"), "--out", str(tmp_path / "m")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()
