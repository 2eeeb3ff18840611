"""Instruction data: prompt styles, the reference file order split, tokenization and the masking collate.

A prompt style is saved beside every instruction model (prompt_style.json), so generation formats
prompts exactly as training did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gptforge.errors import DataError
from gptforge.model.config import IGNORE_INDEX
from gptforge.model.gpt import cu_seqlens_of
from gptforge.model.tokenizer import EOT, EOT_ID
from gptforge.tasks.sources import column_values, map_fingerprint, read_json_records, resolve, row_place
from gptforge.tasks.splits import first_n

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")


def _field(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else str(value)


@dataclass(frozen=True)
class PromptStyle:
    """How a record becomes text: `format_prompt` (up to and including the response header) + response."""

    name: str
    _prompt: Callable[[Mapping[str, Any]], str] = field(repr=False, compare=False)
    template: str = ""  # a readable description, saved in prompt_style.json
    stop_strings: list[str] = field(default_factory=list)

    def format_prompt(self, record: Mapping[str, Any]) -> str:
        return self._prompt(record)

    def format_response(self, output: str) -> str:
        return output

    def format_example(self, record: Mapping[str, Any]) -> str:
        return self.format_prompt(record) + self.format_response(_field(record, "output"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "stop_strings": list(self.stop_strings)}


ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def alpaca_instruction(record: Mapping[str, Any]) -> str:
    """The Alpaca preamble, instruction and optional input, without the response header.

    The reference's `format_input`: what the alpaca style prompts with, and what its judge is shown.
    """
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{_field(record, 'instruction')}"
    if _field(record, "input"):
        text += f"\n\n### Input:\n{_field(record, 'input')}"
    return text


def _alpaca(record: Mapping[str, Any]) -> str:
    return alpaca_instruction(record) + "\n\n### Response:\n"


def _phi3(record: Mapping[str, Any]) -> str:
    # The reference's exercise 7.1 form: "<|user|>\n{instruction}[\n{input}]\n<|assistant|>:\n".
    text = f"<|user|>\n{_field(record, 'instruction')}"
    if _field(record, "input"):
        text += f"\n{_field(record, 'input')}"
    return text + "\n<|assistant|>:\n"


PROMPT_STYLES: dict[str, PromptStyle] = {
    s.name: s
    for s in [
        PromptStyle(
            "alpaca",
            _alpaca,
            template=ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}[\n\n### Input:\n{input}]"
            "\n\n### Response:\n{output}",
            stop_strings=["\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:", EOT],
        ),
        PromptStyle(
            "phi3",
            _phi3,
            template="<|user|>\n{instruction}[\n{input}]\n<|assistant|>:\n{output}",
            stop_strings=["<|user|>", "<|assistant|>", "<|end|>", EOT],
        ),
    ]
}


def get_prompt_style(name: str | Mapping[str, Any] | PromptStyle) -> PromptStyle:
    """A style by name, by its saved dict (prompt_style.json) or as given."""
    if isinstance(name, PromptStyle):
        return name
    if isinstance(name, Mapping):
        name = name.get("name", "")
    if name not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {name!r}; use one of: {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def load_instruction_data(
    path: str | os.PathLike | None = None,
    columns: Mapping[str, str] | None = None,
    fractions: Sequence[float] = (0.85, 0.1),
    shuffle: bool = False,
    seed: int = 123,
):
    """Instruction records (JSON or JSONL) as train/validation/test.

    As the reference: file order, the first 85% train, the next 10% test, the rest validation
    (1,100 records -> train 935, test 110, validation 55). `columns` maps the file's names to instruction/input/output; a missing
    `input` is "". Extra fields (e.g. chosen/rejected) are kept.
    """
    from datasets import Dataset, DatasetDict

    file = resolve("instruction", path) if path is None else path
    records = read_json_records(file)
    rename = dict(columns or {})
    unknown = [v for v in rename.values() if v not in FIELDS]
    if unknown:
        raise DataError(f"columns={rename}: targets must be among {FIELDS}, not {unknown}")
    rows = []
    for i, rec in enumerate(records):
        row = {rename.get(k, k): v for k, v in rec.items()}
        for key in ("instruction", "output"):
            src = next((k for k, v in rename.items() if v == key), key)
            if key not in row or row[key] is None:
                raise DataError(
                    f"{file}: {row_place(file, i)} has no field {src!r}; add it, or set --data.{key}_column "
                    f"(data.{key}_column in YAML) to the field that holds it (fields: {sorted(rec)})"
                )
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{file}: {row_place(file, i)} field {src!r} must be a non-empty string")
        inp = row.get("input")
        if inp is not None and not isinstance(inp, str):
            src = next((k for k, v in rename.items() if v == "input"), "input")
            raise DataError(f"{file}: {row_place(file, i)} field {src!r} must be a string (or absent)")
        row["input"] = inp or ""
        rows.append(row)
    tr, te = float(fractions[0]), float(fractions[1])
    if len(fractions) != 2 or tr <= 0 or te < 0 or tr + te > 1:
        raise DataError(f"fractions={tuple(fractions)}: need (train, test) > 0 with train + test <= 1")
    keys = list(FIELDS) + [k for k in rows[0] if k not in FIELDS]
    ds = Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    if shuffle:
        ds = ds.shuffle(seed=seed)
    n_train, n_test = int(len(ds) * tr), int(len(ds) * te)

    def rows(start: int, stop: int):
        return ds.select(range(start, stop)) if stop > start else ds.select([])

    parts = {
        "train": rows(0, n_train),
        "validation": rows(n_train + n_test, len(ds)),
        "test": rows(n_train, n_train + n_test),
    }
    if len(parts["train"]) == 0:
        raise DataError(f"{file}: {len(ds)} records give an empty train split; add records")
    log.info("%s: %s records", file, {k: len(v) for k, v in parts.items()})
    return DatasetDict(parts)


class InstructData(Protocol):
    """The data fields `load_splits` reads (`pipeline.config.InstructDataConfig` has them)."""

    dataset: str
    instruction_column: str
    input_column: str
    output_column: str
    limit: int | None


def load_splits(data: InstructData, seed: int):
    """train/validation/test records: the one way training and evaluation read instruction data.

    `dataset` "instruction" is the book's file; the column fields map a file's names to
    instruction/input/output; `data.limit` keeps the first N records of each split.
    """
    columns = {
        src: dst
        for src, dst in (
            (data.instruction_column, "instruction"),
            (data.input_column, "input"),
            (data.output_column, "output"),
        )
        if src != dst
    }
    path = None if data.dataset == "instruction" else data.dataset
    return first_n(load_instruction_data(path, columns=columns or None, seed=seed), data.limit)


def tokenize_instruction(
    dsd, style: str | PromptStyle, max_length: int | None = None, return_truncated: bool = False
):
    """Add `input_ids` (prompt + response tokens) and `prompt_length` to every split.

    Prompt and response are encoded separately and joined, so `prompt_length` is exact and generation
    (which encodes only the prompt) sees the same tokens as training. Examples longer than `max_length`
    keep their first `max_length` tokens; their count is logged (and returned with `return_truncated`).
    """
    from datasets import DatasetDict, Sequence, Value

    from gptforge.model.tokenizer import Tokenizer

    style = get_prompt_style(style)
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length={max_length}: must be a positive number of tokens or None")
    tok = Tokenizer()

    def encode(batch):
        records = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        prompts = tok.encode_batch([style.format_prompt(r) for r in records])
        responses = tok.encode_batch([style.format_response(_field(r, "output")) for r in records])
        ids = [p + r for p, r in zip(prompts, responses)]
        cut = [max_length is not None and len(x) > max_length for x in ids]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
        return {
            "input_ids": ids,
            "prompt_length": [min(len(p), len(x)) for p, x in zip(prompts, ids)],
            "_cut": cut,
        }

    out, counts = {}, {}
    for split, ds in dsd.items():
        feats = ds.features.copy()
        feats["input_ids"] = Sequence(Value("int32"))
        feats["prompt_length"] = Value("int32")
        feats["_cut"] = Value("bool")
        mapped = ds.map(
            encode,
            batched=True,
            features=feats,
            new_fingerprint=map_fingerprint(ds, "instruct-tokens-v1", style.to_dict(), max_length, tok),
            desc=f"tokenize {split}",
        )
        counts[split] = int(sum(column_values(mapped, "_cut")))
        out[split] = mapped.remove_columns("_cut")
        if counts[split]:
            no_response = sum(
                int(p >= len(x))
                for p, x in zip(
                    column_values(out[split], "prompt_length"), column_values(out[split], "input_ids")
                )
            )
            log.warning(
                "%s: %d of %d examples longer than max_length=%d tokens were truncated (%d lost their whole response)",
                split,
                counts[split],
                len(ds),
                max_length,
                no_response,
            )
    dsd = DatasetDict(out)
    return (dsd, counts) if return_truncated else dsd


class InstructionCollator:
    """The reference `custom_collate_fn`, batched as a dict.

    Each example gets one <|endoftext|>; the batch is padded with `pad_token_id` to its longest + 1;
    inputs are all but the last token and targets the inputs shifted by one; in targets every padding
    token after the first is `ignore_index`, so the model learns to end with exactly one <|endoftext|>.
    `mask_prompt` also ignores targets inside the prompt (targets[:prompt_length - 1]), so only the
    response is learned. `allowed_max_length` truncates last, as the reference does.
    """

    def __init__(
        self,
        pad_token_id: int = EOT_ID,
        ignore_index: int = IGNORE_INDEX,
        allowed_max_length: int | None = None,
        mask_prompt: bool = False,
    ) -> None:
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index
        self.allowed_max_length, self.mask_prompt = allowed_max_length, mask_prompt

    def __call__(self, items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [_as_list(it["input_ids"]) for it in items]
        width = max(len(s) for s in seqs) + 1
        inputs, targets = [], []
        for it, s in zip(items, seqs):
            padded = torch.full((width,), self.pad_token_id, dtype=torch.long)
            padded[: len(s)] = torch.as_tensor(s, dtype=torch.long)
            x, y = padded[:-1], padded[1:].clone()
            # The first pad in targets (position len(s) - 1) is the real <|endoftext|>; the rest are ignored.
            y[len(s) :] = self.ignore_index
            if self.mask_prompt:
                if "prompt_length" not in it:
                    raise DataError(
                        "mask_prompt=True needs `prompt_length`; tokenize with tokenize_instruction"
                    )
                y[: max(int(it["prompt_length"]) - 1, 0)] = self.ignore_index
            if self.allowed_max_length is not None:
                x, y = x[: self.allowed_max_length], y[: self.allowed_max_length]
            inputs.append(x)
            targets.append(y)
        return {"input_ids": torch.stack(inputs), "targets": torch.stack(targets)}


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


# -- packing (padding-free finetuning) -------------------------------------------------------------------
def pack_best_fit(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Best-fit decreasing: record indices grouped into rows whose lengths sum to at most `capacity`.

    Longest first, each record goes to the open row it fills most tightly (the earliest such row on a
    tie), else opens a new one. The seed only orders records of equal length, so which of them share
    a row changes with the seed while the rows' lengths, and so the number of rows, do not.
    Deterministic: the same lengths, capacity and seed give the same rows.
    """
    import bisect
    import random

    if capacity < 1:
        raise ValueError(f"capacity={capacity}: must be positive")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -int(lengths[i]))  # stable: equal lengths keep the seeded order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"record {i} has {n} tokens, more than capacity={capacity}; truncate first")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


class PackedRows(torch.utils.data.Dataset):
    """A map-style dataset of packed rows: item `i` is the list of records packed into row `i`.

    Packed once (`pack_best_fit`, seeded) over all the split's records, so each epoch shows every record
    exactly once and the sampler shuffles rows per epoch, resumable like any other dataset.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], capacity: int, seed: int = 0) -> None:
        self.records = [
            {"input_ids": _as_list(r["input_ids"]), "prompt_length": int(r.get("prompt_length", 0))}
            for r in records
        ]
        self.capacity = capacity
        self.rows = pack_best_fit([len(r["input_ids"]) for r in self.records], capacity, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.records[j] for j in self.rows[i]]

    def fill(self) -> float:
        """Real tokens over row capacity: 1 - the padding a full-width row would carry."""
        used = sum(len(r["input_ids"]) for r in self.records)
        return used / max(len(self.rows) * self.capacity, 1)


class PackedInstructionCollator:
    """Rows of several records each, with no padding between records (the batch pads rows to its longest).

    Each record becomes exactly what `InstructionCollator` makes of it alone (inputs = its tokens, targets
    = the next tokens then one <|endoftext|>, prompt targets ignored with `mask_prompt`), laid end to end.
    `segment_ids` number the records of a row (padding is one more segment) and `position_ids` restart
    at each record; the model blocks attention between segments, so each record's logits, loss and
    gradients are those of the unpacked run. `cu_seqlens` lists where each segment starts in the flattened
    batch (for the varlen attention kernel on CUDA).
    """

    def __init__(
        self, pad_token_id: int = EOT_ID, ignore_index: int = IGNORE_INDEX, mask_prompt: bool = False
    ) -> None:
        self.pad_token_id, self.ignore_index, self.mask_prompt = pad_token_id, ignore_index, mask_prompt

    def __call__(self, rows: list[list[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(_as_list(r["input_ids"])) for r in row) for row in rows)
        B = len(rows)
        x = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        y = torch.full((B, width), self.ignore_index, dtype=torch.long)
        pos = torch.zeros((B, width), dtype=torch.long)
        seg = torch.zeros((B, width), dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for k, rec in enumerate(row):
                s = torch.as_tensor(_as_list(rec["input_ids"]), dtype=torch.long)
                n = len(s)
                x[b, at : at + n] = s
                y[b, at : at + n - 1] = s[1:]
                y[b, at + n - 1] = self.pad_token_id  # the one <|endoftext|> each record learns to end with
                if self.mask_prompt:
                    if "prompt_length" not in rec:
                        raise DataError(
                            "mask_prompt=True needs `prompt_length`; tokenize with tokenize_instruction"
                        )
                    y[b, at : at + max(int(rec["prompt_length"]) - 1, 0)] = self.ignore_index
                pos[b, at : at + n] = torch.arange(n)
                seg[b, at : at + n] = k
                at += n
            seg[b, at:] = len(row)  # the row's padding: a segment of its own, every target ignored
            pos[b, at:] = torch.arange(width - at)
        # the segments' starts over the flattened batch, counted here on the host for CUDA's varlen kernel
        return {
            "input_ids": x,
            "targets": y,
            "position_ids": pos,
            "segment_ids": seg,
            "cu_seqlens": cu_seqlens_of(seg),
        }


# -- response extraction (evaluation) --------------------------------------------------------------------
RESPONSE_HEADER = "### Response:"


def extract_response(
    token_ids: Sequence[int],
    tokenizer,
    *,
    prompt_ids: Sequence[int] | None = None,
    eos_token_id: int | None = EOT_ID,
    stop_strings: Sequence[str] = (),
    response_header: str = RESPONSE_HEADER,
) -> str:
    """The model's answer in generated token ids.

    Drops an echoed prompt (as tokens, or as text when the model re-tokenized it), cuts at the first
    EOS token, drops a trailing partial UTF-8 character (generation stopped mid-character), removes a
    leading response header, cuts at the first stop string (e.g. a following "### Instruction:"),
    removes any remaining header (as the reference does) and strips whitespace.
    """
    ids = [int(t) for t in token_ids]
    prompt_text = None
    if prompt_ids is not None:
        p = [int(t) for t in prompt_ids]
        if p and ids[: len(p)] == p:
            ids = ids[len(p) :]
        else:
            prompt_text = tokenizer.decode(p)
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    text = tokenizer.decode(ids).rstrip("\ufffd")
    if prompt_text and text.startswith(prompt_text):
        text = text[len(prompt_text) :]
    text = text.lstrip()
    if response_header and text.startswith(response_header):
        text = text[len(response_header) :]
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    if response_header:
        text = text.replace(response_header, "")
    return text.strip()
