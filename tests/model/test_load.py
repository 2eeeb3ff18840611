"""One loader for every model dir: a full checkpoint as saved, a LoRA adapter dir merged onto its base."""

from __future__ import annotations

import pytest
import torch

from gptforge.errors import CheckpointError
from gptforge.model.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.load import is_model_dir, load_model
from gptforge.model.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter


def tiny(num_labels: int = 0) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2))
    if num_labels:
        model.add_classification_head(num_labels)
    return model.eval()


def adapted(base: GPT, seed: int) -> GPT:
    model = apply_lora(base, LoRAConfig(r=2, alpha=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model.eval()


X = torch.randint(0, 63, (2, 10), generator=torch.Generator().manual_seed(3))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_model_opens_checkpoints_and_merges_adapters(tmp_path):
    save_checkpoint(tiny(2), tmp_path / "base")
    model = adapted(load_checkpoint(tmp_path / "base"), seed=1)
    with torch.no_grad():
        expected = model(X)
    save_adapter(model, tmp_path / "ad", base=tmp_path / "base")

    assert is_checkpoint(tmp_path / "base") and is_model_dir(tmp_path / "base")
    assert is_model_dir(tmp_path / "ad") and not is_checkpoint(tmp_path / "ad")
    assert not is_model_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"ad: a LoRA adapter dir.*gptforge\.model\.load\.load_model"):
        load_checkpoint(tmp_path / "ad")

    plain = load_model(tmp_path / "base")
    ref = load_checkpoint(tmp_path / "base")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in plain.state_dict().items())
    merged = load_model(tmp_path / "ad")
    assert not lora_modules(merged) and not merged.training and merged.is_classifier
    with torch.no_grad():
        torch.testing.assert_close(merged(X), expected, atol=1e-5, rtol=0)


def test_an_adapter_on_an_adapter_loads_through_its_merged_base(tmp_path):
    save_checkpoint(tiny(), tmp_path / "base")
    save_adapter(
        adapted(load_checkpoint(tmp_path / "base"), seed=1), tmp_path / "ad1", base=tmp_path / "base"
    )
    second = adapted(load_model(tmp_path / "ad1"), seed=2)
    with torch.no_grad():
        expected = second(X)
    save_adapter(second, tmp_path / "ad2", base=tmp_path / "ad1")
    for model in (load_model(tmp_path / "ad2"), merge_lora(load_adapter(tmp_path / "ad2"))):
        with torch.no_grad():
            torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
