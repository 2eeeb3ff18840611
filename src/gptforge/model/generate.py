"""Batched text generation: greedy, temperature, top-k, top-p, EOS and stop strings, with a KV cache.

Prompts of different lengths share one preallocated KV cache, one row each at its own length: one
right-padded prefill, then one forward pass per token over every unfinished row, each attending to its
own prefix (`gpt.KVCache`), so a row produces what it would alone. `prefill` and `decode_step` are the
cached forward passes the serving engine uses too. When prompt plus output outgrows the context window,
the last `context_length` tokens are kept, as the book's loop does; positions are absolute, so such a
row recomputes its cropped window every step. `use_cache=False` recomputes the whole window each step
for every row: the reference loop, kept as the baseline the cache is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gptforge.errors import ConfigError
from gptforge.model.gpt import GPT, KVCache, Linear
from gptforge.model.tokenizer import Tokenizer

__all__ = [
    "decode_step",
    "generate",
    "generate_text",
    "left_pad",
    "prefill",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]


# -- sampling ----------------------------------------------------------------------------------------
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus); always >= 1."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` (B, V): argmax at temperature 0, else a draw from the filtered softmax.

    Order as in transformers: temperature, then top-k, then top-p (top-p sees the tempered distribution).
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- batching ----------------------------------------------------------------------------------------
def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, max_len) long; shorter prompts are padded on the left, mask 0 on padding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _as_prompt_lists(
    input_ids: Sequence[Sequence[int]] | torch.Tensor, attention_mask: torch.Tensor | None
) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().cpu()
        if ids.dim() == 1:
            ids = ids[None]
        if attention_mask is None:
            return ids.tolist()
        keep = attention_mask.detach().cpu().reshape(ids.shape).bool()
        return [row[m].tolist() for row, m in zip(ids, keep)]
    if attention_mask is not None:
        raise ConfigError("attention_mask is only meaningful with a tensor input_ids; pass unpadded lists")
    return [[int(t) for t in p] for p in input_ids]


def _check(prompts: list[list[int]], vocab_size: int, **kw) -> None:
    if kw["max_new_tokens"] < 0:
        raise ConfigError(f"max_new_tokens={kw['max_new_tokens']} must be >= 0")
    t = kw["temperature"]
    if t is None or t < 0:
        raise ConfigError(f"temperature={t} must be >= 0 (0 means greedy)")
    if kw["top_k"] is not None and kw["top_k"] < 1:
        raise ConfigError(f"top_k={kw['top_k']} must be >= 1, or None for no top-k filter")
    if kw["top_p"] is not None and not 0.0 < kw["top_p"] <= 1.0:
        raise ConfigError(f"top_p={kw['top_p']} must be in (0, 1], or None for no nucleus filter")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty; give at least one token (e.g. <|endoftext|>, id 50256)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"prompt {i} has token ids {bad[:3]} outside the vocabulary [0, {vocab_size})")


# -- stop strings ------------------------------------------------------------------------------------
def _token_bytes_fn(tokenizer):
    """A function id -> bytes. Exact for gptforge's Tokenizer; others decode one token at a time."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes
    return lambda t: tokenizer.decode([t]).encode("utf-8")


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)  # bytes of `tokens`, kept only with stop strings
    ends: list[int] = field(default_factory=list)  # byte offset after each token
    stop_at: int | None = None  # byte offset where the first stop string starts


# -- the cached forward passes (shared with the serving engine) ---------------------------------------
def prefill(model: GPT, cache: KVCache, start: int, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Write `prompts` into cache rows start, start + 1, ... from position 0; logits (n, V) of their last token.

    One forward pass, prompts right-padded: the causal mask alone keeps each prompt's tokens from seeing
    the padding after them, and the padding's keys sit past the row's length, hidden until overwritten.
    The LM head runs on the last real token of each row only.
    """
    lens = [len(p) for p in prompts]
    width = max(lens)
    dev = cache.k.device
    ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=dev)
    for r in range(start, start + len(prompts)):
        cache.lengths[r] = 0
    h = model.hidden_states(ids, cache=cache.use(start, start + len(prompts)))
    for r, n in enumerate(lens, start):
        cache.lengths[r] = n
    if width == min(lens):
        last = h[:, -1]
    else:
        last = h[torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev) - 1]
    return _head(model, last)


def _head(model: GPT, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits (n, V) in float32 for the sampler; may be a transposed view (see `Linear`)."""
    head = model.lm_head
    return (head(h, contiguous=False) if isinstance(head, Linear) else head(h)).float()


def decode_step(model: GPT, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one new token per row to cache rows 0..n-1 (each at its own length); next-token logits (n, V)."""
    n = tokens.shape[0]
    h = model.hidden_states(tokens.view(n, 1), cache=cache.use(0, n))
    return _head(model, h[:, -1])


# -- the loop ----------------------------------------------------------------------------------------
def _window_logits(model: GPT, seq: list[int], device) -> torch.Tensor:
    """Logits after the last `context_length` tokens of `seq`, recomputed without a cache (1, V)."""
    ids = torch.tensor([seq[-model.cfg.context_length :]], dtype=torch.long, device=device)
    return model.lm_head(model.hidden_states(ids)[:, -1]).float()


@torch.inference_mode()
def _generate_batch(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_ids: set[int],
    stops: list[bytes],
    token_bytes,
    use_cache: bool,
    generator: torch.Generator | None,
) -> list[_Row]:
    """Rows that fit the context window decode from one per-row KV cache (cache row j holds prompt
    `cached[j]`); a row longer than the window recomputes its last `context_length` tokens each step, as
    the book's loop does (all rows do with `use_cache=False`). A finished row's cache row is refilled by
    moving the last one into it, so a step's batch is always rows 0..n-1 of the cache."""
    ctx = model.cfg.context_length
    dev = next(model.parameters()).device
    rows = [_Row() for _ in prompts]
    seqs = [list(p) for p in prompts]  # every token so far, for a row that outgrows the window
    cached = [i for i, p in enumerate(prompts) if use_cache and len(p) <= ctx]
    windowed = [i for i, p in enumerate(prompts) if not use_cache or len(p) > ctx]
    cache = None
    if cached:
        size = min(ctx, max(len(prompts[i]) for i in cached) + max_new_tokens - 1)
        p = next(model.parameters())
        cache = KVCache(model.cfg, len(cached), size, device=dev, dtype=p.dtype)
    last: list[int] = []  # newest token of each cached row, in cache-row order

    for step in range(max_new_tokens):
        # Cached rows whose window is full from now on recompute it instead.
        for j in range(len(cached) - 1, -1, -1):
            if cache.lengths[j] >= ctx:
                windowed.append(cached[j])
                _drop_cache_row(cache, cached, last, j)
        parts, order = [], []
        if cached:
            if step == 0:
                parts.append(prefill(model, cache, 0, [prompts[i] for i in cached]))
            else:
                parts.append(decode_step(model, cache, torch.tensor(last, dtype=torch.long, device=dev)))
            order += cached
        for i in windowed:
            parts.append(_window_logits(model, seqs[i], dev))
            order.append(i)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if temperature != 0 and order != sorted(order):
            # Draws follow the caller's row order, so a seeded run samples the same with or without cache.
            perm = sorted(range(len(order)), key=order.__getitem__)
            logits, order = logits[torch.tensor(perm, device=dev)], [order[k] for k in perm]
        nxt = sample_next(logits, temperature, top_k, top_p, generator).tolist()

        finished = set()
        for i, t in zip(order, nxt):
            row = rows[i]
            if t in eos_ids:
                finished.add(i)
                continue
            row.tokens.append(t)
            if stops:
                start = len(row.data)
                row.data += token_bytes(t)
                row.ends.append(len(row.data))
                hits = [j for s in stops if (j := row.data.find(s, max(0, start - len(s) + 1))) >= 0]
                if hits:
                    row.stop_at = min(hits)
                    finished.add(i)
        by_row = dict(zip(order, nxt))
        last = [by_row[i] for i in cached]
        for i, t in by_row.items():
            seqs[i].append(t)
        if finished:
            for j in range(len(cached) - 1, -1, -1):
                if cached[j] in finished:
                    _drop_cache_row(cache, cached, last, j)
            windowed = [i for i in windowed if i not in finished]
            if not cached and not windowed:
                break
    return rows


def _drop_cache_row(cache: KVCache, cached: list[int], last: list[int], j: int) -> None:
    """Remove cache row `j` from the batch: the last row moves into it (one copy of that row's keys)."""
    end = len(cached) - 1
    cache.move(end, j)
    cached[j], last[j] = cached[end], last[end]
    cached.pop()
    last.pop()


def _generate_rows(
    model: GPT,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = 50256,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> tuple[list[_Row], object]:
    prompts = _as_prompt_lists(input_ids, attention_mask)
    limits = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    _check(prompts, model.cfg.vocab_size, **limits)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1, or None for one batch")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stops = [s.encode("utf-8") for s in (stop_strings or []) if s]
    if stops and tokenizer is None:
        tokenizer = Tokenizer()
    if eos_token_id is None:
        eos_ids: set[int] = set()
    elif isinstance(eos_token_id, int):
        eos_ids = {eos_token_id}
    else:
        eos_ids = {int(t) for t in eos_token_id}
    if not prompts or max_new_tokens == 0:
        return [_Row() for _ in prompts], tokenizer

    # Batches of similar length waste less compute on padding; results go back in the caller's order.
    order = (
        sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        if batch_size
        else list(range(len(prompts)))
    )
    size = batch_size or len(prompts)
    out: list[_Row | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), size):
            chunk = order[b : b + size]
            rows = _generate_batch(
                model,
                [prompts[i] for i in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_ids=eos_ids,
                stops=stops,
                token_bytes=_token_bytes_fn(tokenizer) if stops else None,
                use_cache=use_cache,
                generator=generator,
            )
            for i, row in zip(chunk, rows):
                out[i] = row
    finally:
        model.train(was_training)
    return out, tokenizer  # type: ignore[return-value]


def generate(
    model: GPT,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = 50256,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """New token ids per prompt: cut at (and without) EOS, and before the token where a stop string starts.

    `input_ids` is a list of unpadded prompts, or a (B, T) tensor (with `attention_mask` for padded rows).
    Temperature 0 is greedy; otherwise sampling draws from `generator` (seed it for reproducible output).
    Stop strings are matched on the generated bytes only (not the prompt); without a `tokenizer` the
    GPT-2 one is used. `batch_size` splits many prompts into length-sorted batches (memory bound).
    """
    rows, _ = _generate_rows(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        use_cache=use_cache,
        generator=generator,
        attention_mask=attention_mask,
        batch_size=batch_size,
    )
    out = []
    for row in rows:
        if row.stop_at is None:
            out.append(row.tokens)
        else:
            out.append([t for t, end in zip(row.tokens, row.ends) if end <= row.stop_at])
    return out


def generate_text(model: GPT, tokenizer, prompts: str | Sequence[str], **kw) -> list[str]:
    """Continuations of `prompts` as text (a single string counts as one prompt); `kw` as for `generate`.

    With a stop string the text ends exactly where the stop string begins, even inside a token.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    rows, tokenizer = _generate_rows(model, ids, tokenizer=tokenizer, **kw)
    out = []
    for row in rows:
        if row.stop_at is None:
            out.append(tokenizer.decode(row.tokens))
        else:
            out.append(bytes(row.data[: row.stop_at]).decode("utf-8", errors="replace"))
    return out
