"""Length-grouped training order: batches of examples of similar length, in a shuffled order.

Why: a classification batch is padded to its own longest example, so a random batch of SMS messages
(3 to 120 tokens) is about half padding. Sorting by length inside seeded mega-batches (50 batches, as
the Hugging Face Trainer's `LengthGroupedSampler` does) keeps each batch's lengths close; shuffling the
order of the batches keeps long and short batches spread over the epoch.

The sampler yields example indices (the DataLoader cuts them into `batch_size` chunks), so Accelerate's
sharding (batch i to process i mod N), `skip_first_batches` (exact mid-epoch resume) and `set_epoch`
work on it exactly as on the seeded random sampler it replaces. The one batch that is not full (when
`batch_size` does not divide the data set) is always last, so the chunks stay aligned and `drop_last`
drops exactly it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MEGA_BATCHES = 50  # batches per sorted mega-batch (the HF Trainer's factor)


class LengthGroupedSampler(Sampler[int]):
    """Indices of `lengths` in length-grouped batches of `batch_size`; the order depends on (seed, epoch) only."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = MEGA_BATCHES
    ) -> None:
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"batch_size={batch_size} and mega_batches={mega_batches} must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.mega_batches = batch_size, seed, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop (through Accelerate's loader) before each epoch."""
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's batches in training order (the partial one, if any, last)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        size, mega = self.batch_size, self.batch_size * self.mega_batches
        full, partial = [], []
        for start in range(0, len(perm), mega):
            chunk = perm[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]  # longest first
            for b in range(0, len(chunk), size):
                (full if len(chunk[b : b + size]) == size else partial).append(chunk[b : b + size])
        return [full[i] for i in rng.permutation(len(full))] + partial

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        return len(self.lengths)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of a batch's padded positions that are padding, over all `batches` (each padded to its longest)."""
    lens = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for b in batches:
        sub = lens[np.asarray(b, dtype=np.int64)]
        if len(sub):
            real += int(sub.sum())
            padded += int(sub.max()) * len(sub)
    return 1.0 - real / padded if padded else 0.0
