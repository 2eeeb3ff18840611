"""Continuous batching over the model's KV cache: requests join the running batch at token boundaries.

One background thread owns the model. Each step it admits waiting requests into free slots (a prefill of
that prompt alone, into the slot's rows of one shared cache), then runs ONE forward pass over the newest
token of every active request, samples each row with its own settings, and lets finished or cancelled
requests leave at once, which frees their slot for the next waiting one.

Exactness: a prompt's prefill is the same batch-of-one computation `generate` does; in a decode step each
row attends to its own cached positions only (keys past a row's length are masked), at its own absolute
positions. Greedy output under load is therefore token for token what `generate` gives it alone (up to
float rounding of a masked softmax, which the tests check does not change a token). Output is cut as
`generate_text` cuts it: before <|endoftext|> (not included) and exactly where a stop string begins.
"""

from __future__ import annotations

import codecs
import collections
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gptforge.model.generate import sample_next
from gptforge.model.gpt import GPT

log = logging.getLogger(__name__)

EOT_ID = 50256


class EngineError(Exception):
    """A request the engine cannot take; `kind` says why ("queue_full", "invalid", "stopping")."""

    def __init__(self, message: str, kind: str = "invalid", param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param


@dataclass
class SamplingParams:
    """Per-request decoding settings."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_ids: tuple[int, ...] = (EOT_ID,)


@dataclass
class Request:
    """One generation: its prompt, settings, output so far and how it ended."""

    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[[Request, str, bool], None] | None = None
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS excluded
    data: bytearray = field(default_factory=bytearray)  # bytes of `tokens`
    ends: list[int] = field(default_factory=list)  # byte offset after each token
    stop_at: int | None = None  # byte offset where the first stop string begins
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None
    sent: int = 0  # bytes already handed to `on_update`
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    slot: int = -1
    length: int = 0  # tokens in the cache for this request
    last: int = -1  # newest sampled token, not yet in the cache
    generator: torch.Generator | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    @property
    def completion_ids(self) -> list[int]:
        """Generated ids as `generate` returns them: before the token where a stop string begins."""
        if self.stop_at is None:
            return list(self.tokens)
        return [t for t, end in zip(self.tokens, self.ends) if end <= self.stop_at]

    @property
    def text(self) -> str:
        """The output as `generate_text` returns it (cut exactly where a stop string begins)."""
        end = len(self.data) if self.stop_at is None else self.stop_at
        return bytes(self.data[:end]).decode("utf-8", errors="replace")

    @property
    def generated(self) -> int:
        """Tokens sampled (what `usage.completion_tokens` counts), a final EOS included."""
        return len(self.tokens) + (1 if self.finish_reason == "stop" and self.stop_at is None else 0)

    def _delta(self, final: bool) -> str:
        """New text that can be shown: everything before a possible stop-string start, whole characters."""
        if final:
            end = len(self.data) if self.stop_at is None else self.stop_at
        else:
            hold = max((len(s.encode("utf-8")) for s in self.params.stop if s), default=1) - 1
            end = max(self.sent, len(self.data) - hold)
        chunk = bytes(self.data[self.sent : end])
        self.sent = end
        return self._decoder.decode(chunk, final=final)


class SlotCache:
    """Keys and values of `slots` sequences in one buffer; each sequence has its own length.

    Duck-types `model.gpt.KVCache` for `GPT.hidden_states` (`pos`, `update`): in prefill it writes one
    slot's prompt; in a decode step it writes each row's new token at that row's own position and returns
    every row's keys up to the longest row (the attention mask hides the rest).
    """

    def __init__(self, model: GPT, slots: int) -> None:
        cfg = model.cfg
        p = next(model.parameters())
        shape = (cfg.n_layers, slots, cfg.n_heads, cfg.context_length, cfg.head_dim)
        self.k = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.pos = 0
        self._slot: int | None = None  # prefill: one slot
        self._rows: torch.Tensor | None = None  # decode: slot per row
        self._at: torch.Tensor | None = None  # decode: write position per row
        self._width = 0

    def prefill(self, slot: int) -> SlotCache:
        self._slot, self._rows, self.pos = slot, None, 0
        return self

    def decode(self, rows: torch.Tensor, at: torch.Tensor, width: int) -> SlotCache:
        self._slot, self._rows, self._at, self._width = None, rows, at, width
        self.pos = width - 1
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._slot is not None:
            s, end = self._slot, self.pos + k.shape[2]
            self.k[layer, s : s + 1, :, self.pos : end] = k
            self.v[layer, s : s + 1, :, self.pos : end] = v
            return self.k[layer, s : s + 1, :, :end], self.v[layer, s : s + 1, :, :end]
        rows, at, w = self._rows, self._at, self._width
        self.k[layer, rows, :, at] = k[:, :, 0]
        self.v[layer, rows, :, at] = v[:, :, 0]
        keys, values = self.k[layer, rows, :, :w], self.v[layer, rows, :, :w]  # gathered copies
        # GPT's mask always lets a query see the key at its own index (w - 1); a shorter row's new token
        # sits at `at` < w - 1, so the copies get it at w - 1 too and the mask hides index `at` instead.
        keys[:, :, w - 1] = k[:, :, 0]
        values[:, :, w - 1] = v[:, :, 0]
        return keys, values


class Engine:
    """Serve many generation requests with one model: bounded queue, bounded batch, one thread.

    `submit` enqueues (or raises EngineError "queue_full"); `cancel` frees a request's slot at the next
    token boundary; `stop(drain=True)` finishes everything already accepted, then the thread exits.
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = model.cfg.context_length
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._free = list(range(max_batch - 1, -1, -1))
        self._cache: SlotCache | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._accepting = True
        self._running = False
        self._thread: threading.Thread | None = None
        self._token_bytes = getattr(tokenizer, "token_bytes", None) or (
            lambda t: tokenizer.decode([t]).encode("utf-8")
        )
        self.steps = 0  # decode forward passes (for tests and stats)
        self.max_rows_seen = 0  # the widest decode step so far
        self.finished: collections.Counter[str] = collections.Counter()  # requests by finish reason

    # -- public API ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cond:
            if self._thread is None:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the accepted ones first, else cancel them."""
        with self._cond:
            self._accepting = False
            if not drain:
                for r in list(self._waiting) + self._active:
                    r.cancelled = True
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise EngineError (kind "invalid") naming the field when a request cannot fit or run."""
        n, ctx = len(prompt_ids), self.context_length
        if n == 0:
            raise EngineError("the prompt is empty; give at least one token", param="prompt")
        if n >= ctx:
            raise EngineError(
                f"the prompt has {n} tokens; this model's context window is {ctx} tokens, so a prompt "
                f"may have at most {ctx - 1}",
                param="messages/prompt",
            )
        if params.max_tokens < 1 or n + params.max_tokens > ctx:
            raise EngineError(
                f"max_tokens={params.max_tokens} must be between 1 and {ctx - n} (context window {ctx} "
                f"tokens minus the prompt's {n})",
                param="max_tokens",
            )
        if params.temperature < 0:
            raise EngineError(f"temperature={params.temperature} must be >= 0", param="temperature")
        if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
            raise EngineError(f"top_p={params.top_p} must be in (0, 1]", param="top_p")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EngineError(f"the prompt has token ids outside the vocabulary [0, {vocab})", param="prompt")

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_update: Callable[[Request, str, bool], None] | None = None,
    ) -> Request:
        """Queue a request; `on_update(request, new_text, finished)` is called from the engine thread."""
        self.check(prompt_ids, params)
        req = Request([int(t) for t in prompt_ids], params, on_update)
        with self._cond:
            if not self._accepting:
                raise EngineError("the server is shutting down", kind="stopping")
            if len(self._active) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineError(
                    f"the queue is full ({self.max_queue} waiting, {len(self._active)} running)",
                    kind="queue_full",
                )
            req.id = next(self._ids)
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (a client went away); its slot is free before the next decode step."""
        with self._cond:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "cancelled")
            self._cond.notify_all()

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float | None = None
    ) -> Request:
        """Submit and wait (for tests and scripts)."""
        req = self.submit(prompt_ids, params)
        if not req.done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        return req

    @property
    def load(self) -> dict:
        with self._cond:
            return {
                "running": len(self._active),
                "waiting": len(self._waiting),
                "finished": dict(self.finished),
                "widest_step": self.max_rows_seen,
            }

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                self._cache = SlotCache(self.model, self.max_batch)
                while True:
                    with self._cond:
                        self._drop_cancelled()
                        while not self._waiting and not self._active and self._running:
                            self._cond.wait(0.5)
                        if not self._waiting and not self._active and not self._running:
                            return
                        joining = []
                        while self._waiting and self._free:
                            req = self._waiting.popleft()
                            req.slot = self._free.pop()
                            joining.append(req)
                        self._active.extend(joining)
                    for req in joining:
                        self._prefill(req)
                    self._step()
        except Exception as e:  # a model failure must not leave clients waiting forever
            log.exception("engine failed")
            with self._cond:
                self._accepting = False
                for r in list(self._waiting) + self._active:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")
                self._waiting.clear()
                self._active.clear()

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._active if r.cancelled]:
            self._finish(r, "cancelled")

    def _finish(self, req: Request, reason: str) -> None:
        """Mark done, free the slot, tell the client (final text delta)."""
        if req.done.is_set():
            return
        req.finish_reason = reason
        self.finished[reason] += 1
        if req in self._active:
            self._active.remove(req)
        if req.slot >= 0:
            self._free.append(req.slot)
            req.slot = -1
        delta = req._delta(final=True) if reason != "cancelled" else ""
        req.done.set()
        if req.on_update is not None:
            try:
                req.on_update(req, delta, True)
            except Exception:
                log.exception("on_update failed for request %s", req.id)

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        if p.temperature == 0:
            return int(logits.argmax(-1))
        if req.generator is None:
            req.generator = torch.Generator(device=logits.device)
            req.generator.manual_seed(p.seed if p.seed is not None else random.getrandbits(63))
        return int(sample_next(logits[None], p.temperature, None, p.top_p, req.generator)[0])

    def _prefill(self, req: Request) -> None:
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        h = self.model.hidden_states(ids, cache=self._cache.prefill(req.slot))
        logits = self.model.lm_head(h[:, -1]).float()[0]
        req.length = len(req.prompt_ids)
        self._accept(req, self._sample(req, logits))

    def _step(self) -> None:
        """One forward pass over the newest token of every active request."""
        with self._cond:
            self._drop_cancelled()
            rows = list(self._active)
        if not rows:
            return
        lengths = [r.length for r in rows]
        width = max(lengths) + 1
        dev = self.device
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=dev)
        at = torch.tensor(lengths, dtype=torch.long, device=dev)
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        mask = None
        if min(lengths) != width - 1:  # rows of different lengths: each sees its history and itself
            mask = torch.arange(width, device=dev)[None, :] < at[:, None]  # (see SlotCache.update)
        cache = self._cache.decode(slots, at, width)
        h = self.model.hidden_states(ids, attention_mask=mask, position_ids=at[:, None], cache=cache)
        logits = self.model.lm_head(h[:, -1]).float()
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            r.length += 1
            tok = greedy[i] if r.params.temperature == 0 else self._sample(r, logits[i])
            self._accept(r, tok)

    def _accept(self, req: Request, tok: int) -> None:
        """Add a sampled token to a request; finish it on EOS, a stop string or max_tokens."""
        p = req.params
        with self._cond:
            if req.cancelled:
                self._finish(req, "cancelled")
                return
            if tok in p.eos_ids:
                self._finish(req, "stop")
                return
            req.tokens.append(tok)
            req.last = tok
            start = len(req.data)
            req.data += self._token_bytes(tok)
            req.ends.append(len(req.data))
            if p.stop:
                hits = [
                    j
                    for s in p.stop
                    if s
                    and (j := req.data.find(s.encode("utf-8"), max(0, start - len(s.encode("utf-8")) + 1)))
                    >= 0
                ]
                if hits:
                    req.stop_at = min(hits)
                    self._finish(req, "stop")
                    return
            if len(req.tokens) >= p.max_tokens:
                self._finish(req, "length")
                return
        if req.on_update is not None:
            delta = req._delta(final=False)
            if delta:
                try:
                    req.on_update(req, delta, False)
                except Exception:
                    log.exception("on_update failed for request %s", req.id)


def wait_all(requests: Sequence[Request], timeout: float) -> bool:
    """True when every request finished within `timeout` seconds (in total)."""
    end = time.monotonic() + timeout
    return all(r.done.wait(max(0.0, end - time.monotonic())) for r in requests)
