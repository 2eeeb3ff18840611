"""Pretraining corpora -> packed token blocks, kept as Arrow on disk and cached by fingerprint.

Documents (text files, rows of a table or `datasets` data set) are tokenized with tiktoken inside
`Dataset.map`, joined by <|endoftext|>, and cut into blocks of `context_length + 1` tokens every `stride`
tokens (the reference's sliding window), so one block gives both inputs (block[:-1]) and targets
(block[1:]). Validation is the tail of one source, or drawn from every source in proportion.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.errors import DataError
from gptforge.io import record_read
from gptforge.model.config import IGNORE_INDEX
from gptforge.model.tokenizer import EOT_ID
from gptforge.tasks.sources import (
    REGISTRY,
    check_utf8,
    is_saved_dataset,
    load_any,
    not_text,
    quiet_datasets,
    resolve,
    row_place,
)

log = logging.getLogger(__name__)

TOKENIZE_VERSION = "pretrain-tokens-v1"
PACK_VERSION = "pretrain-pack-v1"
TEXT_FILE_GLOBS = ("*.txt", "*.md")


def _text_files(source: str) -> list[Path] | None:
    """The text files a source names (file, folder of .txt/.md, or glob); None if it is not one."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".pq"):
        return [p]
    if p.is_dir() and not is_saved_dataset(p):
        files = sorted({f for g in TEXT_FILE_GLOBS for f in p.rglob(g) if f.is_file()})
        if not files:
            raise DataError(
                f"{p}: no {' or '.join(TEXT_FILE_GLOBS)} files inside; add text files or fix the path"
            )
        return files
    if any(c in source for c in "*?["):
        files = sorted(
            Path(f) for f in glob.glob(os.path.expanduser(source), recursive=True) if Path(f).is_file()
        )
        if not files:
            raise DataError(f"{source}: the pattern matches no files; fix the glob")
        return files
    return None


def _sms_unlabeled():
    from gptforge.tasks.classify import unlabeled_sms_texts

    return unlabeled_sms_texts(split="book", exclude=("test",))


def _instruction_train():
    from datasets import Dataset

    from gptforge.tasks.instruct import get_prompt_style, load_instruction_data

    style = get_prompt_style("alpaca")
    train = load_instruction_data()["train"]
    return Dataset.from_dict({"text": [style.format_example(r) for r in train]})


# Corpora derived from the finetuning data sets, for in-domain pretraining that never sees held-out text:
# the SMS messages outside the book split's test set, and the instruction train split (alpaca-formatted).
DERIVED_SOURCES = {"sms_spam:unlabeled": _sms_unlabeled, "instruction:train": _instruction_train}


def _documents(source: Any, text_column: str, cache_dir: str | None):
    """One source as a `Dataset` with a single `text` column, one row per document."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        ds, where = source, "the given data set"
    elif isinstance(source, str) and source in DERIVED_SOURCES and not Path(source).exists():
        return DERIVED_SOURCES[source]()
    elif isinstance(source, str) and source in REGISTRY and not Path(source).exists():
        return _documents(str(resolve(source)), text_column, cache_dir)
    elif (files := _text_files(str(source))) is not None:
        src = Path(str(source)).expanduser()
        for f in [src] if src.is_dir() else files:  # a folder as a whole: an added file counts too
            record_read(f, "data file")
        for f in files:
            check_utf8(f)
            if f.stat().st_size == 0:
                log.warning("%s is empty; it adds no text", f)
        with quiet_datasets():
            try:
                ds = datasets.load_dataset(
                    "text", data_files=[str(f) for f in files], sample_by="document", cache_dir=cache_dir
                )["train"]
            except Exception as e:  # one line naming the files
                raise DataError(f"{source}: cannot read as text: {e}") from None
        return ds
    else:
        ds, where = load_any(source, cache_dir=cache_dir), str(source)
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError(f"{where}: no splits; the data set is empty")
        split = "train" if "train" in ds else next(iter(ds))
        if len(ds) > 1:
            log.info("%s: using split %r of %s", where, split, list(ds))
        ds = ds[split]
    # The CLI reads a table's `text` column (there is no data.text_column for pretraining).
    hint = (
        "rename the column that holds the text to 'text' (a table in data.sources is read by its 'text' column)"
        if text_column == "text"
        else "set text_column to the column that holds the text"
    )
    if text_column not in ds.column_names:
        raise DataError(f"{where}: no column {text_column!r} (columns: {ds.column_names}); {hint}")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    holds = not_text(ds.features["text"])
    if holds and not holds.startswith("null"):
        raise DataError(
            f"{where}: column {text_column!r} holds {holds}, not text; {hint}, or store the texts as strings"
        )
    col = ds.with_format("arrow")[:]["text"] if ds._indices is not None else ds.data.column("text")
    if col.null_count:
        import pyarrow.compute as pc

        first = pc.index(pc.is_null(col), True).as_py()
        at = row_place(source, first) if isinstance(source, str) else f"row {first + 1}"
        raise DataError(f"{where}: {at} has no text in {text_column!r}; fill it or remove the row")
    return ds


def _tokenize_docs(batch: dict, indices: list[int], n_docs: int) -> dict:
    """tiktoken batch encoding; every document but the last gets a trailing <|endoftext|>."""
    from gptforge.model.tokenizer import Tokenizer

    ids = Tokenizer().encode_batch(batch["text"])
    return {"input_ids": [x + [EOT_ID] if i < n_docs - 1 else x for i, x in zip(indices, ids)]}


def _pack(batch: dict, indices: list[int], *, tokens, offsets, block: int, stride: int, n_total: int) -> dict:
    """Blocks starting in this batch's token range; a block may reach into the following documents."""
    i0, i1 = indices[0], indices[-1] + 1
    lo, hi = int(offsets[i0]), int(offsets[i1])
    first = -(-lo // stride) * stride
    starts = range(first, min(hi - 1, n_total - block) + 1, stride)
    if len(starts) == 0:
        return {"input_ids": []}
    end = starts[-1] + block
    j1 = int(np.searchsorted(offsets, end, side="left"))
    parts = [np.asarray(x, dtype=np.int32) for x in batch["input_ids"]]
    if j1 > i1:
        parts += [np.asarray(x, dtype=np.int32) for x in tokens[i1:j1]["input_ids"]]
    flat = np.concatenate(parts)
    return {"input_ids": [flat[s - lo : s - lo + block] for s in starts]}


def load_corpus(
    sources: Sequence[Any] | str,
    text_column: str = "text",
    context_length: int = 256,
    stride: int | None = None,
    val_fraction: float = 0.1,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 123,
):
    """Train/validation `DatasetDict` of packed blocks (`input_ids`, context_length + 1 tokens each).

    `sources`: text files, globs, folders of .txt/.md, known names ("the-verdict", "tinyshakespeare"),
    tables (CSV/JSON/JSONL/Parquet) or `datasets` data sets (saved folder or hub id) with `text_column`.
    Each file or row is one document. `stride` defaults to `context_length` (blocks share one token).
    Tokens and blocks are cached under `cache_dir` (default: the `datasets` cache) by a fingerprint of
    the sources and settings, so a second call reuses them.

    Validation: one source gives the reference's split, the last `val_fraction` of blocks. Several
    sources each give validation blocks in proportion to their tokens (at least one each), drawn at
    seeded random positions (`seed`) among the blocks that lie wholly inside that source, so the
    validation loss covers every source instead of the tail of the last; its `source` column (a
    ClassLabel of the source names) lets the trainer report the loss per source. Either way a train
    block that would overlap validation by more than the one shared token is left out (and logged).
    """
    import datasets
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Sequence as Seq
    from datasets.fingerprint import Hasher

    if context_length < 1:
        raise DataError(f"context_length={context_length}: must be at least 1")
    stride = context_length if stride is None else stride
    if stride < 1:
        raise DataError(f"stride={stride}: must be at least 1")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")
    srcs = [sources] if isinstance(sources, (str, os.PathLike, Dataset, DatasetDict)) else list(sources)
    if not srcs:
        raise DataError("load_corpus: no sources given; pass text files, folders, globs or data sets")
    base = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "gptforge"
    base.mkdir(parents=True, exist_ok=True)
    cache = str(base)

    docs = [_documents(s if not isinstance(s, os.PathLike) else str(s), text_column, cache) for s in srcs]
    fp_docs = Hasher.hash([d._fingerprint for d in docs])
    doc_bounds = np.cumsum([0] + [len(d) for d in docs])  # documents of source i: [b[i], b[i + 1])
    docs = docs[0] if len(docs) == 1 else datasets.concatenate_datasets(docs)
    if len(docs) == 0:
        raise DataError(f"{srcs}: no documents; the corpus is empty")

    fp_tok = Hasher.hash([fp_docs, TOKENIZE_VERSION, "gpt2", EOT_ID, len(docs)])
    tokens = docs.map(
        _tokenize_docs,
        batched=True,
        with_indices=True,
        fn_kwargs={"n_docs": len(docs)},
        remove_columns=docs.column_names,
        features=Features({"input_ids": Seq(Value("int32"))}),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(base / f"tokens-{fp_tok}.arrow"),
        new_fingerprint=fp_tok,
        desc="tokenize",
    )
    import pyarrow.compute as pc

    lengths = pc.list_value_length(tokens.data.column("input_ids")).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    n_total, block = int(offsets[-1]), context_length + 1
    if n_total < block:
        raise DataError(
            f"{srcs}: {n_total} tokens, fewer than one block of context_length + 1 = {block}; "
            "add text or lower context_length"
        )
    n_blocks = (n_total - block) // stride + 1

    fp_pack = Hasher.hash([fp_tok, PACK_VERSION, block, stride])
    blocks = tokens.map(
        _pack,
        batched=True,
        with_indices=True,
        fn_kwargs={
            "tokens": tokens,
            "offsets": offsets,
            "block": block,
            "stride": stride,
            "n_total": n_total,
        },
        remove_columns=tokens.column_names,
        features=Features({"input_ids": Seq(Value("int32"), length=block)}),
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(base / f"blocks-{fp_pack}.arrow"),
        new_fingerprint=fp_pack,
        desc="pack",
    )
    assert len(blocks) == n_blocks, (len(blocks), n_blocks)

    n_val = 0
    if val_fraction > 0:
        if n_blocks < 2:
            raise DataError(
                f"{srcs}: {n_total} tokens make {n_blocks} block; need 2 or more for a validation split "
                "(add text, lower context_length, or set val_fraction=0)"
            )
        n_val = max(1, int(n_blocks * val_fraction))
    if len(srcs) > 1 and n_val:
        return _split_by_source(
            blocks, srcs, offsets[doc_bounds], n_val, context_length, stride, seed, len(docs), n_total
        )
    v0 = (n_blocks - n_val) * stride  # first validation token
    # Train blocks [s, s + context_length] may share their last token with validation, no more.
    n_train = n_blocks - n_val
    if n_val:
        n_train = min(n_train, (v0 - context_length) // stride + 1)
    if n_train < 1:
        raise DataError(
            f"{srcs}: {n_blocks} blocks leave no train block that does not overlap validation; "
            "add text, raise stride or lower val_fraction"
        )
    left_out = n_blocks - n_val - n_train
    tail = n_total - ((n_blocks - 1) * stride + block)
    log.info(
        "corpus: %d documents, %d tokens -> %d blocks of %d (stride %d): %d train, %d validation; "
        "%d tokens after the last block unused%s",
        len(docs),
        n_total,
        n_blocks,
        block,
        stride,
        n_train,
        n_val,
        tail,
        f"; {left_out} train blocks overlapping validation left out" if left_out else "",
    )
    if left_out:
        log.warning("%d train blocks that overlap the validation blocks were left out", left_out)
    out = {"train": blocks.select(range(n_train))}
    if val_fraction > 0:
        out["validation"] = blocks.select(range(n_blocks - n_val, n_blocks))
    return DatasetDict(out)


def load_splits(data: Any, context_length: int, test_sources: Sequence[Any] | None = None, seed: int = 123):
    """train/validation blocks of `data.sources` (and a `test` split packed from held-out
    `test_sources`): the one way training and evaluation read a pretraining corpus.

    `data` has the fields of `pipeline.config.PretrainDataConfig` (sources, stride, val_fraction); `seed`
    (the run's train.seed) draws the validation blocks of several sources, so evaluation scores exactly
    the blocks training held out.
    """
    from datasets import DatasetDict

    dsd = load_corpus(
        data.sources,
        context_length=context_length,
        stride=data.stride,
        val_fraction=data.val_fraction,
        seed=seed,
    )
    if test_sources:
        test = load_corpus(list(test_sources), context_length=context_length, val_fraction=0.0)["train"]
        dsd = DatasetDict({**dsd, "test": test})
    return dsd


def source_names(sources: Sequence[Any]) -> list[str]:
    """A unique, readable name per source (what per-source validation losses are keyed by)."""
    names: list[str] = []
    for i, s in enumerate(sources):
        name = str(s) if isinstance(s, (str, os.PathLike)) else f"dataset {i}"
        names.append(name if name not in names else f"{name}#{i}")
    return names


def validation_quota(tokens: Sequence[int], n_val: int, available: Sequence[int]) -> list[int]:
    """Validation blocks per source: `n_val` shared in proportion to the tokens (largest remainder,
    ties to the earlier source), at least one for every source that has a block, at most what it has."""
    total = float(sum(tokens))
    exact = [n_val * t / total for t in tokens]
    quota = [int(e) for e in exact]
    for i in sorted(range(len(tokens)), key=lambda i: (-(exact[i] - quota[i]), i))[: n_val - sum(quota)]:
        quota[i] += 1
    return [min(max(q, 1 if a else 0), a) for q, a in zip(quota, available)]


def _split_by_source(blocks, srcs, token_bounds, n_val, context_length, stride, seed, n_docs, n_total):
    """Validation drawn from every source in proportion (see `load_corpus`); train is the rest."""
    from datasets import ClassLabel, DatasetDict

    names = source_names(srcs)
    n_blocks, block = len(blocks), context_length + 1
    starts = np.arange(n_blocks, dtype=np.int64) * stride
    lo, hi = np.asarray(token_bounds[:-1]), np.asarray(token_bounds[1:])
    # a block belongs to source i when all its tokens are that source's (boundary blocks only train)
    owner = np.searchsorted(hi, starts, side="right")
    inside = (owner < len(names)) & (starts + block <= hi[np.minimum(owner, len(names) - 1)])
    cands = [np.flatnonzero(inside & (owner == i)) for i in range(len(names))]
    quota = validation_quota((hi - lo).tolist(), n_val, [len(c) for c in cands])
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.choice(c, q, replace=False)) if q else c[:0] for c, q in zip(cands, quota)]
    for name, c in zip(names, cands):
        if not len(c):
            log.warning(
                "%s has fewer tokens than one block of %d; it gives no validation blocks", name, block
            )
    # Interleave: any prefix of the validation set (train.eval_batches) holds every source in proportion.
    key = np.concatenate([(np.arange(len(c)) + 0.5) / max(len(c), 1) for c in chosen])
    src_id = np.concatenate([np.full(len(c), i) for i, c in enumerate(chosen)])
    val_idx = np.concatenate(chosen)
    order = np.lexsort((src_id, key))
    val_idx, src_id = val_idx[order], src_id[order]
    # Train: every other block that shares at most one token with a validation block.
    vs = np.sort(starts[val_idx])
    rest = np.setdiff1d(np.arange(n_blocks), val_idx)
    pos = np.searchsorted(vs, starts[rest])
    gap = np.full(len(rest), np.iinfo(np.int64).max)
    for j in (pos - 1, pos):
        ok = (j >= 0) & (j < len(vs))
        gap[ok] = np.minimum(gap[ok], np.abs(starts[rest][ok] - vs[j[ok]]))
    train_idx = rest[gap >= context_length]
    if not len(train_idx):
        raise DataError(
            f"{srcs}: {n_blocks} blocks leave no train block that does not overlap validation; "
            "add text, raise stride or lower val_fraction"
        )
    left_out = len(rest) - len(train_idx)
    per = ", ".join(f"{n} {int((src_id == i).sum())}" for i, n in enumerate(names))
    log.info(
        "corpus: %d documents from %d sources, %d tokens -> %d blocks of %d (stride %d): %d train, "
        "%d validation (%s; seed %d)%s",
        n_docs,
        len(names),
        n_total,
        n_blocks,
        block,
        stride,
        len(train_idx),
        len(val_idx),
        per,
        seed,
        f"; {left_out} train blocks overlapping validation left out" if left_out else "",
    )
    if left_out:
        log.warning("%d train blocks that overlap the validation blocks were left out", left_out)
    val = blocks.select(val_idx.tolist()).flatten_indices()
    val = val.add_column("source", src_id.tolist(), feature=ClassLabel(names=names))
    return DatasetDict({"train": blocks.select(train_idx.tolist()), "validation": val})


class PretrainCollator:
    """Stack blocks of context_length + 1 tokens into `input_ids` = block[:-1] and `targets` = block[1:].

    `target_fraction` < 1 keeps each target with that probability (the rest become IGNORE_INDEX, drawn from
    torch's seeded RNG). Every position still reads its whole context, but only the kept ones pay for the
    vocabulary head, which dominates a small GPT-2's cost: the loss stays an unbiased estimate of the full
    next-token loss at a fraction of the compute. Evaluate with the default collator (all targets).
    """

    def __init__(self, target_fraction: float = 1.0) -> None:
        if not 0.0 < target_fraction <= 1.0:
            raise DataError(f"data.target_fraction={target_fraction}: must be in (0, 1]")
        self.target_fraction = target_fraction

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = [it["input_ids"] if isinstance(it, dict) else it for it in items]
        rows = [r if isinstance(r, torch.Tensor) else torch.as_tensor(np.asarray(r)) for r in rows]
        if len({r.shape[0] for r in rows}) != 1:
            raise DataError(
                f"blocks of different lengths {sorted({r.shape[0] for r in rows})}; use load_corpus"
            )
        batch = torch.stack(rows).long()
        targets = batch[:, 1:].contiguous()
        if self.target_fraction < 1.0:
            targets = targets.masked_fill(torch.rand(targets.shape) >= self.target_fraction, IGNORE_INDEX)
        out = {"input_ids": batch[:, :-1].contiguous(), "targets": targets}
        if items and isinstance(items[0], dict) and "source" in items[0]:  # per-source validation loss
            out["source"] = torch.as_tensor([int(it["source"]) for it in items])
        return out
