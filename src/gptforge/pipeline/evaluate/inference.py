"""Running a model over data for evaluation: token losses, class probabilities, greedy responses.

Each function takes a model and batches or records and returns plain numbers and strings; scoring
them is `metrics`' job and writing them `report`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from gptforge.errors import DataError, GPTForgeError
from gptforge.model.config import IGNORE_INDEX
from gptforge.tasks.instruct import RESPONSE_HEADER, extract_response


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else Accelerate's pick (the best available)."""
    if device is not None:
        return torch.device(device)
    from accelerate import PartialState

    return PartialState().device


@torch.no_grad()
def lm_metrics(model, batches: Iterable[dict], device: str | torch.device | None = None) -> dict:
    """Loss averaged over every target token (not over batches) and its perplexity."""
    dev = resolve_device(device)
    model.eval().to(dev)
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].to(dev)
        loss = model(batch["input_ids"].to(dev), targets=targets, reduction="sum")
        total += float(loss)
        count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise DataError("no target tokens to evaluate: the split is empty or shorter than one block")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def label_names(model) -> list[str]:
    """Class names in id order, from the checkpoint's config (LABEL_i where none were saved)."""
    cfg = model.cfg
    if not cfg.num_labels:
        raise GPTForgeError("this checkpoint is a language model (num_labels=0); classify needs a classifier")
    labels = cfg.labels()
    return [labels[i] for i in range(cfg.num_labels)]


@torch.no_grad()
def predict_classes(model, batches: Iterable[dict], device: str | torch.device | None = None):
    """(targets, predictions, probabilities) over batches from `ClassificationCollator`."""
    dev = resolve_device(device)
    model.eval().to(dev)
    y_true: list[int] = []
    y_pred: list[int] = []
    probs: list[list[float]] = []
    for batch in batches:
        logits = model(batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        p = logits.float().softmax(-1).cpu()
        y_pred += p.argmax(-1).tolist()
        probs += p.tolist()
        if "targets" in batch:
            y_true += batch["targets"].tolist()
    return y_true, y_pred, probs


def classify_texts(
    model,
    texts: Sequence[str],
    *,
    tokenizer=None,
    max_length: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Label new texts: per text the predicted label, its probability and every class's probability.

    Texts longer than `max_length` tokens (default: the model's context) keep their first tokens, as in
    training; the count of truncated texts is returned in each result's `truncated` flag.
    """
    from gptforge.model.tokenizer import Tokenizer
    from gptforge.tasks.classify import ClassificationCollator

    names = label_names(model)
    tok = tokenizer or Tokenizer()
    limit = min(max_length or model.cfg.context_length, model.cfg.context_length)
    ids = tok.encode_batch(list(texts)) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    for i, x in enumerate(ids):
        if not x:
            raise DataError(f"text {i + 1} is empty; give at least one character to classify")
    collate = ClassificationCollator(pad_token_id=model.cfg.pad_token_id, max_length=limit)
    items = [{"input_ids": x, "label": 0} for x in ids]
    batches = (collate(items[b : b + batch_size]) for b in range(0, len(items), batch_size))
    _, pred, probs = predict_classes(model, batches, device)
    return [
        {
            "text": text,
            "label": names[k],
            "score": p[k],
            "probabilities": dict(zip(names, p)),
            "truncated": len(x) > limit,
        }
        for text, x, k, p in zip(texts, ids, pred, probs)
    ]


def generate_responses(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    format_prompt,
    stop_strings: Sequence[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    eos_token_id: int | None = 50256,
    response_header: str = RESPONSE_HEADER,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[dict]:
    """Greedy, batched, KV-cached generation for every record; per record the prompt, the raw
    generation (decoded new tokens), the extracted response and the number of new tokens.

    Prompts are batched by length (less left padding); results come back in record order.
    """
    from gptforge.model.generate import generate

    dev = resolve_device(device)
    model.eval().to(dev)
    prompts = [format_prompt(r) for r in records]
    ids = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generate", unit="batch")
    out: list[dict | None] = [None] * len(ids)
    for chunk in chunks:
        new = generate(
            model,
            [ids[i] for i in chunk],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            stop_strings=list(stop_strings) or None,
            tokenizer=tokenizer,
        )
        for i, toks in zip(chunk, new):
            out[i] = {
                "prompt": prompts[i],
                "generation": tokenizer.decode(toks),
                "response": extract_response(
                    toks,
                    tokenizer,
                    eos_token_id=eos_token_id,
                    stop_strings=stop_strings,
                    response_header=response_header,
                ),
                "new_tokens": len(toks),
            }
    return out  # type: ignore[return-value]
