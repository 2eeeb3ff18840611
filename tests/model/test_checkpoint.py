"""gptforge's own checkpoint dir: exact save/load, strict tensor matching, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge.errors import CheckpointError
from gptforge.model.checkpoint import (
    atomic_dir,
    is_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    state_dict_for_save,
    write_json,
)
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("test-tiny", vocab_size=60, **kw)).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_embeddings=False, qkv_bias=False),
        dict(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}),
    ],
)
def test_save_load_is_bit_exact(tmp_path, kw):
    model = tiny(**kw)
    save_checkpoint(model, tmp_path / "ck", metadata={"prompt_style.json": {"name": "alpaca"}})
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == model.cfg and not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.cfg.tie_embeddings
    ids = torch.randint(0, 60, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert read_metadata(tmp_path / "ck", "prompt_style.json") == {"name": "alpaca"}
    assert read_metadata(tmp_path / "ck", "nothing.json") is None
    assert is_checkpoint(tmp_path / "ck")


def test_tied_head_is_stored_once_and_labels_written(tmp_path):
    model = tiny(num_labels=2)
    save_checkpoint(model, tmp_path / "ck")
    sd = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "lm_head.weight" not in sd and "tok_emb.weight" in sd and "score.weight" in sd
    assert json.loads((tmp_path / "ck" / "labels.json").read_text()) == {
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
    }
    assert json.loads((tmp_path / "ck" / "tokenizer.json").read_text()) == {"name": "gpt2"}
    untied = tiny(tie_embeddings=False)
    assert "lm_head.weight" in state_dict_for_save(untied)


def test_missing_or_unexpected_tensor_is_named(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "files.sha256.json").unlink()  # as a checkpoint from before integrity manifests
    weights = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(weights))
    save_file({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc.bias"}, str(weights))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.mlp\.fc\.bias'\]"):
        load_checkpoint(tmp_path / "ck")
    save_file({**sd, "blocks.0.extra": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.0\.extra'\]"):
        load_checkpoint(tmp_path / "ck")


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a gptforge checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        load_checkpoint(tmp_path / "bad")
    assert not is_checkpoint(tmp_path / "missing")


def test_atomic_dir_never_half_overwrites(tmp_path):
    out = tmp_path / "out"
    atomic_dir(out, lambda d: (d / "a.txt").write_text("old"))
    assert (out / "a.txt").read_text() == "old"

    def fails(d):
        (d / "a.txt").write_text("new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(out, fails)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old dirs left
    with pytest.raises(CheckpointError, match="overwrite=True"):
        atomic_dir(out, lambda d: None, overwrite=False)
    atomic_dir(out, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_checkpoint_refuses_existing_without_overwrite(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(model, tmp_path / "ck", overwrite=False)


def test_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1, "text": "héllo"})
    write_json(path, {"b": 2})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
