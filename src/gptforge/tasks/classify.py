"""Text classification data: the SMS spam set (the reference split or a stratified one), any labeled
table, tokenization and the padding collate.

Every split is a `datasets.DatasetDict` with `train`/`validation`/`test` and columns `text` and `label`
(a `ClassLabel`), so label names travel with the data into the checkpoint's labels.json.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from gptforge.errors import DataError
from gptforge.model.tokenizer import EOT_ID
from gptforge.tasks.sources import (
    check_utf8,
    column_values,
    load_any,
    map_fingerprint,
    not_text,
    resolve,
    row_place,
)
from gptforge.tasks.splits import first_n

log = logging.getLogger(__name__)

SMS_LABELS = ["ham", "spam"]
SPLITS = ("train", "validation", "test")


def _features(label_names: list[str]):
    from datasets import ClassLabel, Features, Value

    return Features({"text": Value("string"), "label": ClassLabel(names=list(label_names))})


def _fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, validation, test); a pair means the test part is the rest."""
    fr = [float(f) for f in fractions]
    if len(fr) == 2:
        fr.append(1.0 - fr[0] - fr[1])
    if len(fr) != 3 or any(f < 0 or f > 1 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise DataError(
            f"fractions={tuple(fractions)}: need (train, validation[, test]) in [0, 1] summing to 1 with train > 0"
        )
    return fr[0], fr[1], fr[2]


# ---------------------------------------------------------------------------------------------- SMS spam


def _read_sms(path: Path, quoting: int) -> tuple[list[str], list[int]]:
    """Read the tab-separated SMS file with pandas; `quoting=0` is pandas' default (the reference's read)."""
    import pandas as pd

    check_utf8(path)
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"], quoting=quoting)
    except Exception as e:  # pandas parser errors become one line naming the file
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: cannot read as label<TAB>text: {msg}; fix that line") from None
    texts, labels = [], []
    for i, (lab, text) in enumerate(zip(df["Label"], df["Text"]), 1):
        if lab not in ("ham", "spam"):
            raise DataError(f"{path}: row {i} has label {lab!r}; the SMS file's labels are 'ham' or 'spam'")
        if not isinstance(text, str) or not text:
            raise DataError(f"{path}: row {i} has no text after the tab; fix or remove that line")
        texts.append(text)
        labels.append(SMS_LABELS.index(lab))
    return texts, labels


def load_sms_spam(
    split: str = "book",
    path: str | os.PathLike | None = None,
    seed: int = 123,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    balance: bool = True,
):
    """The SMS Spam Collection as train/validation/test.

    `split="book"` reproduces rasbt/LLMs-from-scratch ch06 exactly (pandas' default quoting, which merges
    a few messages into 5,572 rows; ham downsampled to the 747 spam; shuffled with random_state=123;
    70/10/rest -> 1,045/149/300). `split="stratified"` reads all 5,574 messages (no quote handling),
    optionally balances, and splits through `datasets` stratified by label.
    """
    from datasets import Dataset, DatasetDict

    file = resolve("sms_spam", path)
    if split == "book":
        import pandas as pd

        texts, labels = _read_sms(file, quoting=0)
        tr, va, _ = _fractions(fractions)
        df = pd.DataFrame({"Text": texts, "Label": labels})
        if balance:
            n_spam = int((df["Label"] == 1).sum())
            ham = df[df["Label"] == 0].sample(n_spam, random_state=seed)
            df = pd.concat([ham, df[df["Label"] == 1]])
        df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
        train_end = int(len(df) * tr)
        val_end = train_end + int(len(df) * va)
        parts = {"train": df[:train_end], "validation": df[train_end:val_end], "test": df[val_end:]}
        feats = _features(SMS_LABELS)
        return DatasetDict(
            {
                k: Dataset.from_dict(
                    {"text": list(v["Text"]), "label": [int(x) for x in v["Label"]]}, features=feats
                )
                for k, v in parts.items()
            }
        )
    if split == "stratified":
        texts, labels = _read_sms(file, quoting=3)
        ds = Dataset.from_dict({"text": texts, "label": labels}, features=_features(SMS_LABELS))
        if balance:
            ds = balance_classes(ds, seed=seed)
        return split_stratified(ds, fractions, seed=seed)
    raise DataError(f"split={split!r}: use 'book' (the reference 1,045/149/300 split) or 'stratified'")


def unlabeled_sms_texts(
    path: str | os.PathLike | None = None,
    split: str = "book",
    exclude: Sequence[str] = ("test",),
    **kwargs: Any,
):
    """SMS messages (one `text` column) with every message of the `exclude` splits removed.

    For pretraining on in-domain text without seeing the held-out messages; exclusion is by text, so
    duplicates of a test message are removed too. Uses the same read as `split` so merged rows match.
    """
    from datasets import Dataset

    file = resolve("sms_spam", path)
    dsd = load_sms_spam(split=split, path=file, **kwargs)
    held_out = {t for name in exclude for t in dsd[name]["text"]}
    texts, _ = _read_sms(file, quoting=0 if split == "book" else 3)
    kept = [t for t in texts if t not in held_out]
    log.info("unlabeled SMS texts: %d kept, %d removed as in %s", len(kept), len(texts) - len(kept), exclude)
    return Dataset.from_dict({"text": kept})


# ---------------------------------------------------------------------------------- balancing and splits


def balance_classes(ds, seed: int = 123, column: str = "label"):
    """Downsample every class to the size of the rarest one (seeded); logs how many rows were left out."""
    import numpy as np

    labels = np.asarray(column_values(ds, column))
    classes, counts = np.unique(labels, return_counts=True)
    m = int(counts.min())
    rng = np.random.default_rng(seed)
    keep = np.sort(
        np.concatenate([rng.choice(np.flatnonzero(labels == c), m, replace=False) for c in classes])
    )
    if len(keep) < len(ds):
        log.info("balance: kept %d rows per class, left out %d of %d", m, len(ds) - len(keep), len(ds))
    return ds.select(keep.tolist())


def split_stratified(
    ds, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 123, column: str = "label"
):
    """train/validation/test, stratified by `column`, seeded; sizes are rounded row counts.

    The indices come from scikit-learn's stratified `train_test_split`: `datasets`' own
    `train_test_split(stratify_by_column=...)` reads the column row by row in datasets 5 (13 s for
    the 5,574 SMS rows on this machine), the same split logic in milliseconds here.
    """
    import numpy as np
    from datasets import DatasetDict
    from sklearn.model_selection import train_test_split

    tr, va, te = _fractions(fractions)
    n = len(ds)
    n_test, n_val = round(te * n), round(va * n)
    labels = np.asarray(column_values(ds, column))
    idx = np.arange(n)
    try:
        rest, test = (idx, idx[:0])
        if n_test:
            rest, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
        train, val = (rest, idx[:0])
        if n_val:
            train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    except ValueError as e:
        raise DataError(
            f"cannot split {n} rows {tuple(fractions)} stratified by {column!r}: {e}; add rows or change the fractions"
        ) from None
    return DatasetDict(
        {k: ds.select(v.tolist()) for k, v in (("train", train), ("validation", val), ("test", test))}
    )


# --------------------------------------------------------------------------------- any labeled data set


def _rows(i: int) -> str:
    return f"row {i + 1}"


COLUMN_HINT = {
    "text": "set --data.text_column (data.text_column in YAML) to the column that holds the text",
    "label": "set --data.label_column (data.label_column in YAML) to the column that holds the class",
}


def _label_ids(
    values: list, where: str, labels: Sequence[str] | None, place: Callable[[int], str] = _rows
) -> tuple[list[int], list[str]]:
    """Map raw label values (strings or integers) to class ids and names; `place(i)` names row i."""
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise DataError(f"{where}: {place(i)} has no label; fill it in or remove the row")
    as_int = all(isinstance(v, int) and not isinstance(v, bool) for v in values) or all(
        isinstance(v, float) and v.is_integer() for v in values
    )
    if as_int:
        values = [int(v) for v in values]
    elif any(isinstance(v, float) for v in values):
        bad = next(i for i, v in enumerate(values) if isinstance(v, float) and not v.is_integer())
        raise DataError(
            f"{where}: {place(bad)} label {values[bad]!r} is not a class; use strings or integers"
        )
    else:
        values = [str(v) for v in values]
    if labels is not None:
        names = [str(x) for x in labels]
        if as_int:
            for i, v in enumerate(values):
                if not 0 <= v < len(names):
                    raise DataError(f"{where}: {place(i)} label {v} is not an index into labels={names}")
            ids = list(values)
        else:
            index = {n: k for k, n in enumerate(names)}
            for i, v in enumerate(values):
                if v not in index:
                    raise DataError(f"{where}: {place(i)} label {v!r} is not one of labels={names}; add it")
            ids = [index[v] for v in values]
    else:
        uniq = sorted(set(values))
        names = [str(u) for u in uniq]
        index = {u: k for k, u in enumerate(uniq)}
        ids = [index[v] for v in values]
    return ids, names


def _missing_column(where: str, col: str, role: str, columns: list[str]) -> DataError:
    return DataError(f"{where}: no column {col!r} (columns: {columns}); {COLUMN_HINT[role]}")


def check_text_column(ds, where: str, column: str, hint: str, place: Callable[[int], str] = _rows) -> list:
    """The column's values, refused unless every row holds non-empty text.

    A column of another type (integers in a Parquet file, numbers pandas inferred in a CSV) is named
    as such: it is most often the wrong column, and "empty or missing" would send the user looking for
    blank cells that are not there.
    """
    texts = column_values(ds, column)
    holds = not_text(ds.features[column])
    first = next((t for t in texts if t is not None), None) if holds else None
    if first is not None:
        raise DataError(
            f"{where}: column {column!r} holds {holds}, e.g. {first!r}, not text; {hint}, "
            "or store the texts as strings"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(
                f"{where}: {place(i)} has an empty or missing {column!r}; fill it or remove the row"
            )
    return texts


def _to_classification(
    ds, where: str, text_column: str, label_column: str, labels, place: Callable[[int], str] = _rows
):
    """A `Dataset` with exactly `text` and `label` (ClassLabel), checked row by row; `place(i)` says
    where row i is in the user's file (its line, record or row)."""
    from datasets import ClassLabel, Dataset

    for col, role in ((text_column, "text"), (label_column, "label")):
        if col not in ds.column_names:
            raise _missing_column(where, col, role, ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{where}: no rows; the data set is empty")
    texts = check_text_column(ds, where, text_column, COLUMN_HINT["text"], place)
    feat = ds.features[label_column]
    if isinstance(feat, ClassLabel) and labels is None:
        ids, names = column_values(ds, label_column), list(feat.names)
    else:
        raw = column_values(ds, label_column)
        if isinstance(feat, ClassLabel):
            raw = [feat.int2str(x) for x in raw]
        ids, names = _label_ids(raw, where, labels, place)
    present = sorted(set(ids))
    if len(present) < 2:
        raise DataError(
            f"{where}: column {label_column!r} has only one class ({names[present[0]]!r}); "
            "a classifier needs rows of two or more classes"
        )
    return Dataset.from_dict({"text": texts, "label": ids}, features=_features(names)), names


def load_classification_data(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 123,
    labels: Sequence[str] | None = None,
    balance: bool = False,
    column_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Any labeled table as (train/validation/test `DatasetDict`, label names).

    `path`: CSV, TSV, JSON, JSONL or Parquet file, a `save_to_disk` folder or a hub id. Labels may be
    strings or integers; names are sorted unless `labels` fixes their order. A source with one split is
    split seeded and stratified by `fractions`; a source with train and test keeps them and takes the
    validation part from train. `column_names` names the columns of a header-less CSV/TSV.
    """
    from datasets import DatasetDict, concatenate_datasets

    src = load_any(path, column_names=list(column_names) if column_names else None, cache_dir=cache_dir)
    if isinstance(src, DatasetDict):
        present = [s for s in SPLITS if s in src] or list(src)[:1]
        if not present:
            raise DataError(f"{path}: no splits; the data set is empty")
        if present != list(src):
            log.info("%s: using splits %s of %s", path, present, list(src))
        # One label vocabulary across splits: convert them together, then cut them apart again.
        cols = [text_column, label_column]
        for s in present:
            for col, role in zip(cols, ("text", "label")):
                if col not in src[s].column_names:
                    raise _missing_column(f"{path} [{s}]", col, role, src[s].column_names)
        try:
            joined = concatenate_datasets([src[s].select_columns(cols) for s in present])
        except ValueError as e:
            raise DataError(f"{path}: splits {present} have different column types: {e}") from None
        bounds = list(itertools.accumulate(len(src[s]) for s in present))

        def place(i: int) -> str:
            k = bisect.bisect_right(bounds, i)
            return f"split {present[k]!r} row {i - (bounds[k - 1] if k else 0) + 1}"

        ds, names = _to_classification(joined, str(path), text_column, label_column, labels, place)
        parts, start = {}, 0
        for s in present:
            parts[s] = ds.select(range(start, start + len(src[s])))
            start += len(src[s])
        dsd = _complete_splits(parts, fractions, seed, balance)
    else:
        names_given = list(column_names) if column_names else None
        ds, names = _to_classification(
            src,
            str(path),
            text_column,
            label_column,
            labels,
            lambda i: row_place(path, i, column_names=names_given),
        )
        if balance:
            ds = balance_classes(ds, seed=seed)
        dsd = split_stratified(ds, fractions, seed=seed)
    log.info("%s: %s rows, labels %s", path, {k: len(v) for k, v in dsd.items()}, names)
    return dsd, names


class ClassifyData(Protocol):
    """The data fields `load_splits` reads (`pipeline.config.ClassifyDataConfig` has them)."""

    dataset: str
    split: str
    text_column: str
    label_column: str
    limit: int | None


def load_splits(data: ClassifyData, seed: int, labels: Sequence[str] | None = None):
    """(train/validation/test `DatasetDict`, label names): the one way training and evaluation read a
    classification data set, so an evaluation scores exactly the examples training held out.

    `labels` (a trained model's class names) fixes the label ids of a custom file; the SMS set must
    have as many classes. `data.limit` keeps the first N examples of each split.
    """
    if data.dataset == "sms_spam":
        dsd = load_sms_spam(split=data.split, seed=seed)
        names = list(dsd["train"].features["label"].names)
        if labels is not None and len(labels) != len(names):
            raise DataError(
                f"sms_spam has labels {names} but the model has {list(labels)}; evaluate it on its own "
                "data with --data FILE"
            )
    else:
        dsd, names = load_classification_data(
            data.dataset,
            text_column=data.text_column,
            label_column=data.label_column,
            labels=labels,
            seed=seed,
        )
    return first_n(dsd, data.limit), list(labels) if labels is not None else names


def _complete_splits(parts: dict, fractions, seed: int, balance: bool):
    """Keep the source's train/validation/test; split what is missing out of train (stratified)."""
    from datasets import DatasetDict

    tr, va, _ = _fractions(fractions)
    train = parts["train"] if "train" in parts else next(iter(parts.values()))
    if balance:
        train = balance_classes(train, seed=seed)
    if "test" not in parts and "validation" not in parts:
        return split_stratified(train, fractions, seed=seed)
    out = {"train": train}
    if "validation" in parts:
        out["validation"] = parts["validation"]
    else:
        out = dict(split_stratified(train, (tr / (tr + va), va / (tr + va), 0.0), seed=seed))
    out["test"] = parts["test"] if "test" in parts else out["validation"].select([])
    return DatasetDict({k: out[k] for k in SPLITS})


# ------------------------------------------------------------------------------------- tokenize and collate


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def _default_tokenizer(tokenizer):
    if tokenizer is not None:
        return tokenizer
    from gptforge.model.tokenizer import Tokenizer

    return Tokenizer()


def tokenize_classification(dsd, max_length: int | None, tokenizer=None, return_truncated: bool = False):
    """Add `input_ids` to every split, keeping the first `max_length` tokens of longer texts.

    Truncation is logged per split (never silent); with `return_truncated=True` the counts are returned
    as `(dsd, {split: n_truncated})`. The reference truncates validation/test to the longest training
    example: pass `max_length=longest_length(tokenized_train)` for that.
    """
    from datasets import DatasetDict, Sequence, Value

    if max_length is not None and max_length < 1:
        raise DataError(f"max_length={max_length}: must be a positive number of tokens or None")
    tok = _default_tokenizer(tokenizer)

    def encode(batch, indices, split):
        ids = _encode_batch(tok, batch["text"])
        for i, x in zip(indices, ids):
            if not x:
                raise DataError(f"[{split}] row {i + 1}: the text encodes to no tokens; fill it or remove it")
        cut = [max_length is not None and len(x) > max_length for x in ids]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
        return {"input_ids": ids, "_truncated": cut}

    out, counts = {}, {}
    for split, ds in dsd.items():
        feats = ds.features.copy()
        feats["input_ids"] = Sequence(Value("int32"))
        feats["_truncated"] = Value("bool")
        mapped = ds.map(
            encode,
            batched=True,
            with_indices=True,
            fn_kwargs={"split": split},
            features=feats,
            new_fingerprint=map_fingerprint(ds, "classify-tokens-v1", max_length, tok),
            desc=f"tokenize {split}",
        )
        counts[split] = int(sum(column_values(mapped, "_truncated")))
        out[split] = mapped.remove_columns("_truncated")
        if counts[split]:
            log.warning(
                "%s: %d of %d examples longer than max_length=%d tokens were truncated",
                split,
                counts[split],
                len(ds),
                max_length,
            )
    dsd = DatasetDict(out)
    return (dsd, counts) if return_truncated else dsd


def _length_column(ds):
    import pyarrow.compute as pc

    col = ds.with_format("arrow")[:]["input_ids"] if ds._indices is not None else ds.data.column("input_ids")
    return pc.list_value_length(col)


def longest_length(ds) -> int:
    """The longest `input_ids` in a tokenized split: what the reference pads every batch to."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        raise DataError("longest_length: the split is empty")
    return int(pc.max(_length_column(ds)).as_py())


def token_lengths(ds) -> list[int]:
    """Every example's number of `input_ids` in a tokenized split (what length-grouped batching sorts by)."""
    return [int(n) for n in _length_column(ds).to_pylist()] if len(ds) else []


class ClassificationCollator:
    """Right-pad `input_ids` with `pad_token_id`, build `attention_mask`, and take `label` as `targets`.

    `pad_to` pads every batch to one length (the reference pads to the longest training example);
    `max_length` truncates first. The model pools the last position whose mask is 1.
    """

    def __init__(
        self,
        pad_token_id: int = EOT_ID,
        max_length: int | None = None,
        pad_to: int | None = None,
        label_key: str = "label",
    ) -> None:
        if pad_to is not None and max_length is not None and pad_to < max_length:
            raise DataError(f"pad_to={pad_to} is shorter than max_length={max_length}; raise pad_to")
        self.pad_token_id, self.max_length, self.pad_to, self.label_key = (
            pad_token_id,
            max_length,
            pad_to,
            label_key,
        )

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [_as_list(it["input_ids"]) for it in items]
        if self.max_length is not None:
            seqs = [s[: self.max_length] for s in seqs]
        longest = max(len(s) for s in seqs)
        if min(len(s) for s in seqs) == 0:
            raise DataError("a classification example has no tokens; remove empty texts")
        width = self.pad_to if self.pad_to is not None else longest
        if longest > width:
            raise DataError(
                f"an example has {longest} tokens, more than pad_to={width}; tokenize with max_length={width}"
            )
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        targets = torch.as_tensor([int(it[self.label_key]) for it in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def _as_list(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)
