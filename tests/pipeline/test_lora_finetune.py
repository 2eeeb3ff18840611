"""LoRA through the real task glue and Trainer: `finetune classify --lora.*` on a tiny base checkpoint.

Checks the trainable count printed at start, adapter-only resumable and final checkpoints, a frozen base,
exact resume (LoRA dropout included), and that the final adapter merges to the trained model's logits.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from gptforge.errors import ConfigError
from gptforge.model.checkpoint import load_checkpoint, save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.model.load import is_model_dir, load_model
from gptforge.model.lora import is_adapter, load_adapter, lora_modules, merge_lora
from gptforge.pipeline.config import load_config
from gptforge.pipeline.runinfo import read_metrics
from gptforge.pipeline.train import run_classify

E, L, R = 32, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ft")
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset("test-tiny", context_length=64))
    save_checkpoint(base, root / "base")
    words = ["win", "free", "cash", "prize", "now", "hello", "see", "you", "at", "lunch", "ok", "thanks"]
    g = torch.Generator().manual_seed(1)
    with open(root / "texts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(60):
            spam = i % 2 == 0
            pick = torch.randint(0, 6, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            w.writerow(
                [" ".join(words[int(j) + (0 if spam else 6)] for j in pick), "spam" if spam else "ham"]
            )
    return root


def cfg_for(setup, out, max_steps: int, **extra):
    overrides = {
        "model.init": str(setup / "base"),
        "data.dataset": str(setup / "texts.csv"),
        "lora.r": R,
        "lora.alpha": 8,
        "lora.dropout": 0.1,
        "lora.targets": "all",
        "train.out_dir": str(out),
        "train.max_steps": max_steps,
        "train.batch_size": 4,
        "train.save_every": 2,
        "train.eval_every": 2,
        "train.eval_batches": 1,
        "train.lr": 1e-2,
        "train.progress": False,
        **extra,
    }
    return load_config("classify", **overrides)


def test_lora_classify_run_saves_adapters_and_resumes_exactly(setup, tmp_path, capsys):
    ref = run_classify(cfg_for(setup, tmp_path / "ref", 4))
    err = capsys.readouterr().err
    per_block = R * (E + 3 * E) + R * (E + E) + R * (E + 4 * E) + R * (4 * E + E)
    n_lora = L * per_block + R * (E + 2)  # the "all" preset puts an adapter on the 2-class head too
    assert f"trainable parameters: {n_lora:,} of " in err

    final = ref.checkpoint
    assert is_adapter(final) and not (final / "model.safetensors").exists()
    meta = json.loads((final / "adapter.json").read_text())
    assert meta["base"] == str((setup / "base").resolve()) and meta["lora"]["r"] == R
    saved = load_file(str(final / "adapter.safetensors"))
    assert all(k.endswith((".lora_A", ".lora_B")) or k == "score.weight" for k in saved)
    assert len(saved) == 2 * (4 * L + 1) + 1
    step2 = load_file(str(tmp_path / "ref" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert set(step2) == set(saved)  # resumable checkpoints hold the adapter too, not the base

    trained = load_adapter(final)  # base from the recorded path
    base = load_checkpoint(setup / "base")
    for k, v in base.state_dict().items():
        assert torch.equal(trained.state_dict()[k], v), k  # frozen base untouched by training
    assert any(torch.count_nonzero(m.lora_B) for m in lora_modules(trained).values())

    # Stop after 2 steps, then resume to 4: the same losses as the straight run, dropout included.
    run_classify(cfg_for(setup, tmp_path / "run", 2))
    run_classify(cfg_for(setup, tmp_path / "run", 4, **{"train.resume": "auto"}))
    assert "resuming from" in capsys.readouterr().err

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if "lr" in r}

    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 4
    resumed = load_file(str(tmp_path / "run" / "final" / "adapter.safetensors"))
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)

    x = torch.randint(0, 50000, (2, 10))
    with torch.no_grad():
        before = trained(x)
        after = merge_lora(trained)(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    # evaluate / generate / export / the runner load a LoRA run's final dir like any checkpoint: merged.
    assert is_model_dir(final)
    loaded = load_model(final)
    assert not lora_modules(loaded) and loaded.is_classifier
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, atol=1e-5, rtol=0)


def test_lora_needs_a_pretrained_base():
    with pytest.raises(ConfigError, match="needs a pretrained base"):
        load_config("instruct", **{"model.init": "scratch", "lora.r": 8})
