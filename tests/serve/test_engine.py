"""The engine: continuous batching equals each request alone, per-request sampling, stops, cancel, bounds."""

from __future__ import annotations

import threading

import pytest

from gptforge.model.generate import generate, generate_text
from gptforge.model.tokenizer import Tokenizer
from gptforge.serve.engine import Engine, EngineError, SamplingParams, wait_all

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = Tokenizer()
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Q: What is the capital of France?\nA:",
    "def f(x):\n    return",
    "A much longer prompt " * 6,
    "Why",
    "Below is an instruction that describes a task.",
    "The weather today is",
    "In 1492,",
    "She said",
    "GPT-2 is a language model that",
    "x",
    "Lists: a, b, c, d, e, f, g, h, i, j, k,",
    "The end.",
]


def test_16_concurrent_greedy_requests_equal_each_alone(tiny_lm):
    ids = [TOK.encode(p) for p in PROMPTS]
    lengths = [5 + (i * 7) % 23 for i in range(len(ids))]  # each request leaves at its own step
    alone = [generate(tiny_lm, [p], max_new_tokens=n, eos_token_id=None)[0] for p, n in zip(ids, lengths)]
    engine = Engine(tiny_lm, TOK, max_batch=16, max_queue=16).start()
    try:
        reqs = [engine.submit(p, SamplingParams(max_tokens=n, eos_ids=())) for p, n in zip(ids, lengths)]
        assert wait_all(reqs, 60)
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.max_rows_seen >= 8  # they really shared forward passes
    assert engine.steps < sum(lengths) // 4


def test_requests_arriving_together_are_prefilled_in_shared_passes(tiny_lm, monkeypatch):
    """Queued requests join in groups prefilled in one right-padded pass each (longest first, padding
    bounded by PREFILL_PADDING); one of them ends on its first token inside a group (its row is refilled by
    the last one's before that one is accepted). Every output still equals the request alone."""
    import gptforge.serve.engine as engine_module

    passes = []
    real = engine_module.prefill
    monkeypatch.setattr(
        engine_module,
        "prefill",
        lambda m, c, start, prompts: passes.append(len(prompts)) or real(m, c, start, prompts),
    )
    ids = [TOK.encode(p) for p in PROMPTS]
    lengths = [1 if i == 3 else 6 + i % 5 for i in range(len(ids))]
    alone = [generate(tiny_lm, [p], max_new_tokens=n, eos_token_id=None)[0] for p, n in zip(ids, lengths)]
    engine = Engine(tiny_lm, TOK, max_batch=16, max_queue=16)
    reqs = [engine.submit(p, SamplingParams(max_tokens=n, eos_ids=())) for p, n in zip(ids, lengths)]
    groups = engine_module.prefill_groups(sorted(reqs, key=lambda r: -len(r.prompt_ids)))
    engine.start()
    try:
        assert wait_all(reqs, 60)
    finally:
        engine.stop()
    assert [r.tokens for r in reqs] == alone
    assert passes == [len(g) for g in groups] and len(passes) < len(ids) // 2  # prompts shared passes
    for g in groups:  # no group computes more than PREFILL_PADDING x its real prompt tokens
        n = [len(r.prompt_ids) for r in g]
        assert len(g) * max(n) <= engine_module.PREFILL_PADDING * sum(n)


def _through_rows(model, ids: list[list[int]], lengths: list[int], rows: int = 3, setup=None):
    """Each prompt alone through generate(), then all of them through an engine with `rows` rows
    (`setup(engine)` first, when given)."""
    alone = [generate(model, [p], max_new_tokens=n, eos_token_id=None)[0] for p, n in zip(ids, lengths)]
    engine = Engine(model, TOK, max_batch=rows, max_queue=8)
    if setup is not None:
        setup(engine)
    reqs = [engine.submit(p, SamplingParams(max_tokens=n, eos_ids=())) for p, n in zip(ids, lengths)]
    engine.start()
    try:
        assert wait_all(reqs, 60)
    finally:
        engine.stop()
    return engine, reqs, alone


def test_requests_joining_a_running_batch_equal_each_alone(tiny_lm):
    """Seven requests, three slots: each waiting one joins the running batch when a slot frees up."""
    ids = [TOK.encode(p) for p in PROMPTS[:7]]
    lengths = [10, 25, 40, 12, 30, 8, 20]
    engine, reqs, alone = _through_rows(tiny_lm, ids, lengths)
    assert [r.tokens for r in reqs] == alone
    assert engine.max_rows_seen == 3
    assert engine.steps < sum(lengths) / 2


def test_rows_refilled_and_reused_equal_each_alone(tiny_lm, monkeypatch):
    """Requests of very different lengths through three cache rows: a finishing request's row is refilled
    by moving the last active row into it (that request goes on from its moved keys), and a freed row is
    reused by the next prompt (its old keys hidden). Every output still equals the request alone."""
    from gptforge.model.gpt import KVCache

    moves = []
    real_move = KVCache.move
    monkeypatch.setattr(
        KVCache, "move", lambda self, src, dst: moves.append((src, dst)) or real_move(self, src, dst)
    )
    ids = [TOK.encode(p) for p in (PROMPTS[6], PROMPTS[0], PROMPTS[2], PROMPTS[13], PROMPTS[4], PROMPTS[1])]
    lengths = [40, 3, 30, 5, 12, 20]  # the short ones leave first, from rows 1 and then 0
    engine, reqs, alone = _through_rows(tiny_lm, ids, lengths)
    assert [r.tokens for r in reqs] == alone
    assert any(src != dst for src, dst in moves)  # a running request really moved to another row
    assert engine.load["running"] == 0


def test_the_cache_grows_when_a_longer_request_joins_and_outputs_equal_each_alone(tiny_lm):
    """The engine's cache is made at the first request, as long as the longest request needs (rounded up
    to CACHE_STEP), and grows when a request that needs longer rows joins: here while another is halfway,
    whose keys move into the larger cache. Every output equals the request alone; the rows never pass
    the context window (96 here)."""
    import gptforge.serve.engine as engine_module

    ids = [TOK.encode(p) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[6])]
    lengths = [40, 8, 50]  # the first two fit 64 positions; the third (37-token prompt) needs 87
    sizes = []
    real = engine_module.Engine._make_room

    def make_room(self, need):
        real(self, need)
        sizes.append((need, self._cache.max_len, [r.generated for r in self._active]))

    def setup(engine):
        engine._make_room = make_room.__get__(engine)

    engine, reqs, alone = _through_rows(tiny_lm, ids, lengths, rows=2, setup=setup)
    assert [r.tokens for r in reqs] == alone
    assert engine_module.CACHE_STEP == 64 and sizes[0][:2] == (len(ids[0]) + 40, 64)
    grown = [s for s in sizes if s[1] == 96]
    assert grown and grown[0][0] == len(ids[2]) + 50 and 0 < grown[0][2][0] < 40  # the first was halfway
    assert max(s[1] for s in sizes) == 96


def test_stop_strings_and_eos_cut_as_generate_text(tiny_lm):
    engine = Engine(tiny_lm, TOK, max_batch=4).start()
    try:
        prompt = PROMPTS[2]
        free = generate_text(tiny_lm, TOK, prompt, max_new_tokens=20, eos_token_id=None)[0]
        stop = free[5:8]  # a stop string that occurs in the output, maybe inside a token
        want = generate_text(tiny_lm, TOK, prompt, max_new_tokens=20, eos_token_id=None, stop_strings=[stop])[
            0
        ]
        chunks = []
        req = engine.submit(
            TOK.encode(prompt),
            SamplingParams(max_tokens=20, stop=[stop], eos_ids=()),
            on_update=lambda r, d, done: chunks.append(d),
        )
        assert req.done.wait(30)
        assert req.text == want == free[: free.index(stop)]
        assert "".join(chunks) == want and req.finish_reason == "stop"
        # EOS: the model's 3rd greedy token declared EOS ends the output before it
        toks = generate(tiny_lm, [TOK.encode(prompt)], max_new_tokens=20, eos_token_id=None)[0]
        req = engine.generate(TOK.encode(prompt), SamplingParams(max_tokens=20, eos_ids=(toks[2],)), 30)
        assert req.tokens == toks[:2] and req.finish_reason == "stop" and req.generated == 3
    finally:
        engine.stop()


def test_sampling_is_per_request_and_seeded(tiny_lm):
    engine = Engine(tiny_lm, TOK, max_batch=4).start()
    try:
        p = TOK.encode(PROMPTS[1])
        a = SamplingParams(max_tokens=15, temperature=1.5, top_p=0.95, seed=7, eos_ids=())
        greedy = SamplingParams(max_tokens=15, eos_ids=())
        solo = engine.generate(p, a, 30).tokens
        reqs = [engine.submit(p, a), engine.submit(p, greedy), engine.submit(p, a)]
        assert wait_all(reqs, 30)
        assert reqs[0].tokens == solo == reqs[2].tokens
        assert reqs[1].tokens == generate(tiny_lm, [p], max_new_tokens=15, eos_token_id=None)[0]
        assert reqs[1].tokens != solo
    finally:
        engine.stop()


def test_cancel_frees_the_slot_and_the_queue_is_bounded(tiny_lm):
    engine = Engine(tiny_lm, TOK, max_batch=1, max_queue=1)
    long = SamplingParams(max_tokens=80, eos_ids=())

    def cancel_after_first_token(req, delta, done):  # a client going away mid-stream
        if not done:
            engine.cancel(req)

    first = engine.submit(TOK.encode("a"), long, on_update=cancel_after_first_token)
    second = engine.submit(TOK.encode("b"), long)
    with pytest.raises(EngineError) as e:
        engine.submit(TOK.encode("c"), long)
    assert e.value.kind == "queue_full"
    engine.start()
    try:
        assert first.done.wait(10) and first.finish_reason == "cancelled" and len(first.tokens) == 1
        assert second.done.wait(30) and second.finish_reason == "length" and len(second.tokens) == 80
        assert engine.finished == {"cancelled": 1, "length": 1}
    finally:
        engine.stop()
    waiting = Engine(tiny_lm, TOK, max_batch=1, max_queue=1)
    queued = waiting.submit(TOK.encode("a"), long)
    waiting.cancel(queued)  # cancelled before it ever ran
    assert queued.done.is_set() and queued.finish_reason == "cancelled" and waiting.load["waiting"] == 0


def test_bad_requests_are_refused_naming_the_field(tiny_lm):
    engine = Engine(tiny_lm, TOK)
    ctx = tiny_lm.cfg.context_length
    with pytest.raises(EngineError, match="context window is 96") as e:
        engine.submit([1] * ctx, SamplingParams())
    assert e.value.param == "messages/prompt"
    for n in (0, ctx):
        with pytest.raises(EngineError, match=r"max_tokens=\d+ must be between 1 and 86") as e:
            engine.submit([1] * 10, SamplingParams(max_tokens=n))
        assert e.value.param == "max_tokens"


def test_stop_drains_accepted_requests(tiny_lm):
    engine = Engine(tiny_lm, TOK, max_batch=2, max_queue=4).start()
    reqs = [engine.submit(TOK.encode(p), SamplingParams(max_tokens=10, eos_ids=())) for p in PROMPTS[:4]]
    t = threading.Thread(target=engine.stop)
    t.start()
    t.join(60)
    assert not t.is_alive() and all(r.done.is_set() and len(r.tokens) == 10 for r in reqs)
    with pytest.raises(EngineError) as e:
        engine.submit(TOK.encode("late"), SamplingParams())
    assert e.value.kind == "stopping"
