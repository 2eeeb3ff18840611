"""Preference data and the DPO loss: pairs of (prompt, chosen, rejected) responses.

Why it is written the way it is:
- A pair is tokenized as prompt ids + response ids + one <|endoftext|> (the end the instruction model
  learned), prompt and responses encoded separately, so the prompt tokens are exactly the generation
  prompt. The collator puts every chosen row first and every rejected row after it (2B rows, one forward
  pass), with targets IGNORE_INDEX over the prompt and padding: a response's log-probability is the sum
  over its own tokens only.
- The frozen reference is run once before training (`add_reference_logps`), its per-pair log-probs stored
  as dataset columns and cached by fingerprint like tokenization, so training holds one model. With LoRA
  the reference is the base with the adapters switched off, computed per batch instead.
- `dpo_loss` is the sigmoid loss of Rafailov et al. with conservative label smoothing (cDPO: the
  preference is flipped with probability `label_smoothing`; TRL's sigmoid before 1.0), its unbiased
  "robust" form (rDPO, divided by 1 - 2 eps: TRL's `robust`), or IPO (Azar et al.) on per-token mean
  log-ratios (TRL's normalisation); `tests/tasks/test_dpo.py` checks them against TRL.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import DataError
from gptforge.model.config import IGNORE_INDEX
from gptforge.model.tokenizer import EOT_ID
from gptforge.tasks.instruct import get_prompt_style
from gptforge.tasks.sources import column_values, map_fingerprint, read_json_records, resolve, row_place
from gptforge.tasks.splits import first_n

log = logging.getLogger(__name__)

KNOWN = "instruction-preference"
LOSSES = ("sigmoid", "robust", "ipo")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
FIELDS = ("instruction", "input", "chosen", "rejected", "where")  # where: file and record, for errors


class PreferenceData(Protocol):
    """The data fields `load_splits` reads (`pipeline.config.DPODataConfig` has them)."""

    dataset: str
    prompt_column: str | None
    instruction_column: str
    input_column: str
    chosen_column: str
    rejected_column: str
    drop_identical: bool | None
    limit: int | None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def load_preference_data(data: PreferenceData, seed: int = 123, fractions: Sequence[float] = (0.85, 0.1)):
    """Preference records as train/validation/test with fields instruction, input, prompt, chosen, rejected.

    Split as the instruction data is (file order: the first 85% train, the next 10% test, the rest
    validation), so DPO after instruction tuning never trains on the instruction model's held-out records.
    A record needs a non-empty `chosen` and `rejected` that differ, and either `prompt` (when
    `prompt_column` is set: used as the instruction) or `instruction` (+ optional `input`).
    """
    from datasets import Dataset, DatasetDict

    known = data.dataset == KNOWN
    file = resolve(KNOWN) if known else resolve("instruction-preference", data.dataset)
    records = read_json_records(file)
    drop_identical = known if data.drop_identical is None else data.drop_identical
    rows = []
    instr_col = data.prompt_column or data.instruction_column
    for i, rec in enumerate(records):
        where = f"{file}: {row_place(file, i)}"
        out = {}
        for key, col in (("chosen", data.chosen_column), ("rejected", data.rejected_column)):
            if col not in rec or rec[col] is None:
                raise DataError(
                    f"{where} has no field {col!r}; add it, or set data.{key}_column to the field that holds "
                    f"the {key} response (fields: {sorted(rec)})"
                )
            if _text(rec[col]) is None:
                raise DataError(f"{where} field {col!r} must be a non-empty string; fix or remove the record")
            out[key] = rec[col]
        if _text(rec.get(instr_col)) is None:
            flag = "prompt_column" if data.prompt_column else "instruction_column"
            raise DataError(
                f"{where} has no non-empty field {instr_col!r}; add it, or set data.{flag} to the field "
                f"that holds the prompt (fields: {sorted(rec)})"
            )
        inp = "" if data.prompt_column else rec.get(data.input_column)
        if inp is not None and not isinstance(inp, str):
            raise DataError(f"{where} field {data.input_column!r} must be a string (or absent)")
        same = out["chosen"].strip() == out["rejected"].strip()
        if same and not drop_identical:
            raise DataError(
                f"{where}: {data.chosen_column!r} and {data.rejected_column!r} are identical, so there is "
                "no preference to learn; fix or remove the record, or set data.drop_identical: true"
            )
        rows.append({"instruction": rec[instr_col], "input": inp or "", **out, "where": where, "_same": same})
    # split first, drop after: the splits are the instruction data's, record for record
    n_train, n_test = int(len(rows) * fractions[0]), int(len(rows) * fractions[1])
    bounds = {
        "train": (0, n_train),
        "validation": (n_train + n_test, len(rows)),
        "test": (n_train, n_train + n_test),
    }
    parts, dropped = {}, 0
    for split, (lo, hi) in bounds.items():
        keep = [r for r in rows[lo:hi] if not r["_same"]]
        dropped += hi - lo - len(keep)
        parts[split] = Dataset.from_dict({k: [r[k] for r in keep] for k in FIELDS})
    if dropped:
        log.warning("%s: dropped %d records whose chosen and rejected responses are identical", file, dropped)
    if len(parts["train"]) == 0:
        raise DataError(f"{file}: {len(rows)} records give an empty train split; add records")
    return DatasetDict(parts)


def load_splits(data: PreferenceData, seed: int):
    """train/validation/test pairs: the one way DPO training and evaluation read preference data."""
    return first_n(load_preference_data(data, seed=seed), data.limit)


def tokenize_preference(dsd, style, max_length: int):
    """Add prompt_ids, chosen_ids and rejected_ids (each response ends with <|endoftext|>) to every split.

    A pair longer than `max_length` keeps its whole prompt and the start of each response; a prompt that
    leaves no room for a response token is an error naming the record.
    """
    from datasets import DatasetDict, Sequence, Value

    from gptforge.model.tokenizer import Tokenizer

    style = get_prompt_style(style)
    tok = Tokenizer()

    def encode(batch):
        records = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        prompts = tok.encode_batch([style.format_prompt(r) for r in records])
        out: dict[str, list] = {"prompt_ids": prompts, "_cut": []}
        for key in ("chosen", "rejected"):
            ids = tok.encode_batch([style.format_response(r[key]) for r in records])
            out[f"{key}_ids"] = [x + [EOT_ID] for x in ids]
        for j, p in enumerate(prompts):
            room = max_length - len(p)
            if room < 1:
                raise DataError(
                    f"{records[j]['where']}: its prompt is {len(p)} tokens and leaves no room for a response "
                    f"in max_length={max_length}; shorten or remove the record, or raise data.max_length "
                    "(up to the model's context length)"
                )
            cut = False
            for key in ("chosen_ids", "rejected_ids"):
                if len(out[key][j]) > room:
                    out[key][j], cut = out[key][j][:room], True
            out["_cut"].append(cut)
        return out

    res = {}
    for split, ds in dsd.items():
        feats = ds.features.copy()
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            feats[key] = Sequence(Value("int32"))
        feats["_cut"] = Value("bool")
        mapped = ds.map(
            encode,
            batched=True,
            features=feats,
            new_fingerprint=map_fingerprint(ds, "dpo-tokens-v1", style.to_dict(), max_length, tok),
            desc=f"tokenize {split}",
        )
        n_cut = sum(column_values(mapped, "_cut"))
        if n_cut:
            log.warning(
                "%s: %d of %d pairs were cut to max_length=%d tokens", split, n_cut, len(ds), max_length
            )
        res[split] = mapped.remove_columns("_cut")
    return DatasetDict(res)


class PreferenceCollator:
    """Pairs into one batch: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected.

    `input_ids` (2B, T) are each sequence but its last token, right-padded with `pad_token_id`; `targets`
    the sequence shifted by one with IGNORE_INDEX over the prompt and the padding, so only response tokens
    are scored. `ref_chosen_logps`/`ref_rejected_logps` (B,) ride along when the dataset has them.
    """

    def __init__(self, pad_token_id: int = EOT_ID) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, n_prompt = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for it in items:
                p = list(it["prompt_ids"])
                seqs.append(p + list(it[key]))
                n_prompt.append(len(p))
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        y = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, n_prompt)):
            t = torch.as_tensor(s, dtype=torch.long)
            x[i, : len(s) - 1] = t[:-1]
            y[i, p - 1 : len(s) - 1] = t[
                p:
            ]  # the first response token is predicted at the last prompt position
        batch = {"input_ids": x, "targets": y}
        for key in REF_COLUMNS:
            if key in items[0]:
                batch[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float64)
        return batch


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its targets (IGNORE_INDEX positions add nothing), (rows,) fp32.

    Through the model's fused cross-entropy (`reduction="none"`), so the 50k-wide logits never exist.
    """
    nll = model(input_ids, targets=targets, reduction="none")
    return -nll.float().view(input_ids.shape[0], -1).sum(1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, chosen reward and rejected reward, (B,) each; rewards are beta * log-ratio, detached.

    sigmoid: -(1 - eps) log sigma(beta d) - eps log sigma(-beta d), d the difference of the log-ratios
    (eps = label_smoothing, cDPO); robust: (-(1 - eps) log sigma(beta d) + eps log sigma(-beta d)) / (1 - 2 eps).
    ipo: (d' - 1 / (2 beta))^2 with d' from per-token mean log-ratios
    (`chosen_tokens`/`rejected_tokens` are the response lengths).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps.to(chosen_logps.dtype)
    rejected_ratio = rejected_logps - ref_rejected_logps.to(rejected_logps.dtype)
    if loss in ("sigmoid", "robust"):
        d = beta * (chosen_ratio - rejected_ratio)
        eps = label_smoothing
        if loss == "sigmoid":
            losses = -F.logsigmoid(d) * (1.0 - eps) - F.logsigmoid(-d) * eps
        else:
            losses = (-F.logsigmoid(d) * (1.0 - eps) + F.logsigmoid(-d) * eps) / (1.0 - 2.0 * eps)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss='ipo' needs chosen_tokens and rejected_tokens (the response lengths)")
        d = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def batch_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    beta: float,
    loss: str,
    label_smoothing: float,
    reference=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpo_loss` of a collated batch: one policy forward over chosen+rejected rows.

    The reference log-probs come from the batch (precomputed) or, when `reference` is a context manager
    factory (LoRA: adapters off), from a no-grad forward of the same model inside it.
    """
    x, y = batch["input_ids"], batch["targets"]
    logps = sequence_logps(model, x, y)
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        if reference is None:
            raise ValueError("the batch has no reference log-probs and no reference was given")
        with torch.no_grad(), reference():
            ref_c, ref_r = sequence_logps(model, x, y).chunk(2)
    n = (y != IGNORE_INDEX).sum(1)
    c, r = logps.chunk(2)
    nc, nr = n.chunk(2)
    return dpo_loss(
        c,
        r,
        ref_c,
        ref_r,
        beta=beta,
        loss=loss,
        label_smoothing=label_smoothing,
        chosen_tokens=nc,
        rejected_tokens=nr,
    )


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every weight, exact: the reference log-probs cached for one model never serve another."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def add_reference_logps(dsd, model: nn.Module, batch_size: int = 8, device: str | torch.device = "cpu"):
    """Add `ref_chosen_logps`/`ref_rejected_logps` (the frozen model's, fp64 columns) to every split.

    One eval-mode pass before training; the result is an Arrow file in the `datasets` cache named by the
    tokenized data's fingerprint and the weights' hash, so a rerun, a resume or a second process reads it
    instead of computing it again.
    """
    from datasets import DatasetDict, Value

    was_training = model.training
    model.eval()
    collate = PreferenceCollator()
    fp = weights_fingerprint(model)

    def score(batch):
        items = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        b = collate(items)
        logps = sequence_logps(model, b["input_ids"].to(device), b["targets"].to(device)).double().cpu()
        c, r = logps.chunk(2)
        return {"ref_chosen_logps": c.tolist(), "ref_rejected_logps": r.tolist()}

    import datasets

    base = Path(datasets.config.HF_DATASETS_CACHE) / "gptforge"  # where pretraining's token cache lives
    base.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, ds in dsd.items():
        feats = ds.features.copy()
        for key in REF_COLUMNS:
            feats[key] = Value("float64")
        fingerprint = map_fingerprint(ds, "dpo-ref-logps-v1", fp, None)
        out[split] = ds.map(
            score,
            batched=True,
            batch_size=batch_size,
            features=feats,
            cache_file_name=str(base / f"dpo-ref-logps-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            desc=f"reference log-probs {split}",
        )
    model.train(was_training)
    return DatasetDict(out)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in the policy (TRL's default too): with it the policy's log-probs at step 0 would not
    equal the reference's, and the implicit rewards would start as noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0
