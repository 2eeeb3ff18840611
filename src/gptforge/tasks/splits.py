"""What every task does to its train/validation/test `DatasetDict` after loading it."""

from __future__ import annotations


def first_n(dsd, n: int | None):
    """The first `n` examples of every split (quick runs and tests); all of them when `n` is None."""
    from datasets import DatasetDict

    if n is None:
        return dsd
    return DatasetDict({k: v.select(range(min(n, len(v)))) for k, v in dsd.items()})
