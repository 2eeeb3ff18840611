"""Pretraining corpora: packing, splits, document joins, cache reuse by fingerprint, bad input."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.errors import DataError
from gptforge.model.tokenizer import EOT_ID, Tokenizer
from gptforge.tasks.pretrain import PretrainCollator, load_corpus


def _blocks(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")[:]["input_ids"])


@pytest.fixture(scope="module")
def verdict_ids(shared_data_dir) -> list[int]:
    return Tokenizer().encode((shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8"))


def test_the_verdict_packs_like_the_reference(data_env, tmp_path, verdict_ids):
    assert len(verdict_ids) == 5145
    dsd = load_corpus("the-verdict", context_length=256, cache_dir=tmp_path)
    # (5145 - 257) // 256 + 1 = 20 blocks of 257 tokens: the reference's 9 + 1 batches of 2.
    assert {k: len(v) for k, v in dsd.items()} == {"train": 18, "validation": 2}
    blocks = np.concatenate([_blocks(dsd["train"]), _blocks(dsd["validation"])])
    assert blocks.shape == (20, 257)
    for k in range(20):
        assert blocks[k].tolist() == verdict_ids[k * 256 : k * 256 + 257]
    assert all(f["filename"].startswith(str(tmp_path)) for f in dsd["train"].cache_files)  # Arrow on disk


def test_stride_overlap_and_train_blocks_touching_validation(data_env, tmp_path, verdict_ids, caplog):
    with caplog.at_level(logging.INFO, logger="gptforge.tasks.pretrain"):
        dsd = load_corpus(
            data_env / "text" / "the-verdict.txt", context_length=64, stride=32, cache_dir=tmp_path
        )
    n_blocks = (5145 - 65) // 32 + 1  # 159
    n_val = int(n_blocks * 0.1)  # 15, starting at token (159 - 15) * 32 = 4608
    # Train blocks may end at token 4608 (shared with validation) -> starts up to 4544 -> 143 blocks.
    assert {k: len(v) for k, v in dsd.items()} == {"train": 143, "validation": n_val}
    assert "1 train blocks overlapping validation left out" in caplog.text
    val = _blocks(dsd["validation"])
    assert val[0].tolist() == verdict_ids[4608 : 4608 + 65]
    assert _blocks(dsd["train"])[-1].tolist() == verdict_ids[4544 : 4544 + 65]


def test_documents_are_joined_by_endoftext(tmp_path):
    tok = Tokenizer()
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = {"a.txt": "First document here.", "sub/b.md": "Second one!", "c.txt": "Third and last."}
    for name, text in texts.items():
        (docs / name).write_text(text, encoding="utf-8")
    (docs / "skip.csv").write_text("not,text\n")
    dsd = load_corpus(str(docs), context_length=4, stride=1, val_fraction=0.0, cache_dir=tmp_path / "c")
    order = ["a.txt", "c.txt", "sub/b.md"]  # sorted paths
    stream = []
    for i, name in enumerate(order):
        stream += tok.encode(texts[name]) + ([EOT_ID] if i < len(order) - 1 else [])
    blocks = _blocks(dsd["train"])
    assert list(dsd) == ["train"] and len(blocks) == len(stream) - 4
    assert [b.tolist() for b in blocks] == [stream[s : s + 5] for s in range(len(stream) - 4)]
    # A glob and a list of sources give the same stream.
    same = load_corpus(
        [str(docs / "a.txt"), str(docs / "c.txt"), str(docs / "s*" / "*.md")],
        context_length=4,
        stride=1,
        val_fraction=0.0,
        cache_dir=tmp_path / "c",
    )
    assert (_blocks(same["train"]) == blocks).all()


def test_second_call_reuses_the_cache(shared_data_dir, tmp_path, monkeypatch):
    src = shared_data_dir / "text" / "the-verdict.txt"
    first = load_corpus(src, context_length=32, cache_dir=tmp_path)
    files = sorted(p.name for p in Path(tmp_path).glob("*.arrow"))
    assert any(n.startswith("tokens-") for n in files) and any(n.startswith("blocks-") for n in files)

    def boom(self, texts, num_threads=8):
        raise AssertionError("tokenized again: the cache was not reused")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    second = load_corpus(src, context_length=32, cache_dir=tmp_path)
    assert second["train"].cache_files == first["train"].cache_files
    assert second["train"]._fingerprint == first["train"]._fingerprint
    assert sorted(p.name for p in Path(tmp_path).glob("*.arrow")) == files
    assert (_blocks(second["validation"]) == _blocks(first["validation"])).all()
    with pytest.raises(AssertionError, match="tokenized again"):
        load_corpus(src, context_length=32, cache_dir=tmp_path / "fresh")  # a new cache must tokenize


def test_table_source_with_text_column_and_collator(tmp_path):
    tok = Tokenizer()
    recs = [{"body": f"Record number {i} says hello.", "id": i} for i in range(6)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    dsd = load_corpus(f, text_column="body", context_length=8, val_fraction=0.25, cache_dir=tmp_path / "c")
    stream = []
    for i, r in enumerate(recs):
        stream += tok.encode(r["body"]) + ([EOT_ID] if i < 5 else [])
    n_blocks = (len(stream) - 9) // 8 + 1
    assert len(dsd["train"]) + len(dsd["validation"]) == n_blocks and len(dsd["validation"]) == n_blocks // 4
    batch = PretrainCollator()([dsd["train"][0], dsd["train"][1]])
    assert batch["input_ids"].shape == batch["targets"].shape == (2, 8)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == stream[0:8] and batch["targets"][0].tolist() == stream[1:9]
    assert batch["input_ids"][1].tolist() == stream[8:16]
    torch_rows = dsd["train"].with_format("torch")
    assert torch.equal(PretrainCollator()([torch_rows[0]])["targets"][0], batch["targets"][0])


def test_bad_corpora(tmp_path, data_env):
    (tmp_path / "tiny.txt").write_text("Too short.", encoding="utf-8")
    with pytest.raises(DataError, match=r"tokens, fewer than one block of context_length \+ 1 = 257"):
        load_corpus(tmp_path / "tiny.txt", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="the pattern matches no files"):
        load_corpus(str(tmp_path / "*.nothing"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_corpus(tmp_path / "missing.jsonl", cache_dir=tmp_path / "c")
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: line 2 \(byte 6\) is not valid UTF-8"):
        load_corpus(tmp_path / "latin.txt", cache_dir=tmp_path / "c")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl: line 2 has no text in 'text'"):
        load_corpus(tmp_path / "t.jsonl", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"no column 'content' \(columns: \['text'\]\)"):
        load_corpus(tmp_path / "t.jsonl", text_column="content", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \*\.txt or \*\.md files inside"):
        load_corpus(tmp_path / "empty", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no sources given"):
        load_corpus([], cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="need 2 or more for a validation split"):
        load_corpus("the-verdict", context_length=5000, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="stride=0"):
        load_corpus("the-verdict", stride=0)
    with pytest.raises(DataError, match="blocks of different lengths"):
        PretrainCollator()([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])


def test_num_proc_gives_the_same_blocks(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"{i}.txt").write_text(f"Document {i}. " * (20 + i), encoding="utf-8")
    one = load_corpus(docs, context_length=16, stride=8, cache_dir=tmp_path / "a")
    two = load_corpus(docs, context_length=16, stride=8, num_proc=2, cache_dir=tmp_path / "b")
    for split in ("train", "validation"):
        assert (_blocks(one[split]) == _blocks(two[split])).all()


def test_target_fraction_keeps_a_seeded_share_of_targets():
    blocks = [{"input_ids": list(range(i, i + 65))} for i in range(0, 6400, 64)]
    full = PretrainCollator()(blocks)
    torch.manual_seed(3)
    a = PretrainCollator(target_fraction=0.25)(blocks)
    torch.manual_seed(3)
    b = PretrainCollator(target_fraction=0.25)(blocks)
    assert torch.equal(a["targets"], b["targets"])  # drawn from torch's seeded RNG: resumable
    assert torch.equal(a["input_ids"], full["input_ids"])
    kept = a["targets"] != -100
    assert torch.equal(a["targets"][kept], full["targets"][kept])
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # 6,400 targets
    with pytest.raises(DataError, match="target_fraction"):
        PretrainCollator(target_fraction=0.0)


def test_derived_corpora_hold_no_test_text(shared_data_dir, monkeypatch):
    from gptforge.tasks.classify import load_sms_spam
    from gptforge.tasks.pretrain import _documents

    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(shared_data_dir))
    sms = _documents("sms_spam:unlabeled", "text", None)
    test = set(load_sms_spam(split="book")["test"]["text"])
    assert len(sms) == 5195 and not test & set(sms["text"])
    ins = _documents("instruction:train", "text", None)
    assert len(ins) == 935
    assert ins[0]["text"].startswith("Below is an instruction that describes a task.")
    assert "\n\n### Response:\n" in ins[0]["text"]


def _two_sources(tmp_path):
    """Two text files of different sizes, every stretch of tokens unique (numbered words)."""
    a, b = tmp_path / "big.txt", tmp_path / "small.txt"
    a.write_text(" ".join(f"alpha{i}" for i in range(900)), encoding="utf-8")
    b.write_text(" ".join(f"beta{i}" for i in range(300)), encoding="utf-8")
    tok = Tokenizer()
    ta, tb = tok.encode(a.read_text()), tok.encode(b.read_text())
    return a, b, ta + [EOT_ID], tb


def test_validation_comes_from_every_source_in_proportion(tmp_path):
    from gptforge.tasks.pretrain import validation_quota

    a, b, ta, tb = _two_sources(tmp_path)
    stream = ta + tb
    ctx = 16
    dsd = load_corpus([a, b], context_length=ctx, val_fraction=0.1, seed=7, cache_dir=tmp_path / "c")
    n_blocks = (len(stream) - ctx - 1) // ctx + 1
    n_val = int(n_blocks * 0.1)
    assert (len(ta), len(tb), n_blocks, n_val) == (1921, 600, 157, 15)
    # 15 blocks shared by tokens: 15 * 1921 / 2521 = 11.43 and 3.57 -> 11 + 3, the last to the larger
    # remainder; 120 and 36 blocks lie wholly inside each source (the one across the boundary only trains)
    assert validation_quota([len(ta), len(tb)], n_val, [120, 36]) == [11, 4]
    assert validation_quota([1000, 10], 5, [60, 1]) == [5, 1]  # every source with a block gets one
    assert validation_quota([1000, 10], 5, [60, 0]) == [5, 0]
    val = dsd["validation"]
    names = val.features["source"].names
    assert names == [str(a), str(b)]
    src = val["source"][:]
    assert (src.count(0), src.count(1)) == (11, 4) and len(val) == 15
    # every block where the stream says it is, inside its own source; train and validation disjoint
    where = {tuple(stream[s : s + ctx + 1]): s for s in range(0, len(stream) - ctx, ctx)}
    vstarts = [where[tuple(x)] for x in _blocks(val).tolist()]
    tstarts = [where[tuple(x)] for x in _blocks(dsd["train"]).tolist()]
    for s, g in zip(vstarts, src):
        assert (s + ctx + 1 <= len(ta)) if g == 0 else (s >= len(ta))
    assert not set(vstarts) & set(tstarts)
    assert len(tstarts) == n_blocks - n_val  # stride = context: neighbours share one token, none left out
    assert min(abs(t - v) for t in tstarts for v in vstarts) >= ctx
    # drawn at random positions (not the tail), interleaved so any prefix holds both sources
    a_starts = [s for s, g in zip(vstarts, src) if g == 0]
    assert max(a_starts) - min(a_starts) > len(ta) // 2
    assert set(src[:5]) == {0, 1}
    # seeded: the same seed gives the same blocks, another seed others (same counts)
    again = load_corpus([a, b], context_length=ctx, val_fraction=0.1, seed=7, cache_dir=tmp_path / "c")
    assert (_blocks(again["validation"]) == _blocks(val)).all()
    other = load_corpus([a, b], context_length=ctx, val_fraction=0.1, seed=8, cache_dir=tmp_path / "c")
    assert other["validation"]["source"][:].count(0) == 11
    assert not (_blocks(other["validation"]) == _blocks(val)).all()


def test_overlapping_blocks_never_straddle_train_and_validation(tmp_path):
    a, b, ta, tb = _two_sources(tmp_path)
    stream, ctx, stride = ta + tb, 16, 8
    dsd = load_corpus([a, b], context_length=ctx, stride=stride, val_fraction=0.1, cache_dir=tmp_path / "c")
    where = {tuple(stream[s : s + ctx + 1]): s for s in range(0, len(stream) - ctx, stride)}
    vstarts = [where[tuple(x)] for x in _blocks(dsd["validation"]).tolist()]
    tstarts = [where[tuple(x)] for x in _blocks(dsd["train"]).tolist()]
    assert min(abs(t - v) for t in tstarts for v in vstarts) >= ctx  # at most the one shared token
    n_blocks = (len(stream) - ctx - 1) // stride + 1
    assert len(vstarts) == int(n_blocks * 0.1) and len(tstarts) < n_blocks - len(vstarts)
    assert set(dsd["validation"]["source"][:]) == {0, 1}
