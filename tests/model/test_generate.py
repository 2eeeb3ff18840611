"""Generation: parity with transformers' greedy `generate`, KV cache == no cache == the book's loop,
left-padded batches == each prompt alone, sampling filters, EOS / stop strings, and the `info` /
`generate` verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptforge.cli import main
from gptforge.errors import ConfigError, GPTForgeError
from gptforge.model.checkpoint import save_checkpoint
from gptforge.model.config import GPTConfig
from gptforge.model.generate import (
    decode_step,
    generate,
    generate_text,
    left_pad,
    prefill,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from gptforge.model.gpt import GPT, KVCache

PROMPTS = [[5, 6, 7, 8, 9], [3], [10, 11, 12, 13, 14, 15, 16, 17], [40, 41]]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def small_model(tie: bool = False, scale: float = 1.0, ctx: int = 64, vocab: int = 512, seed: int = 0) -> GPT:
    """A random 2-layer GPT whose greedy output is varied (a tied, unscaled one just repeats its input)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab,
        context_length=ctx,
        emb_dim=32,
        n_layers=2,
        n_heads=2,
        tie_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def to_hf(model: GPT):
    """The same weights in a transformers GPT2LMHeadModel (eager attention); Conv1D weights transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hc = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        bos_token_id=cfg.eos_token_id,
        attn_implementation="eager",
    )
    hf = GPT2LMHeadModel(hc).eval()
    renames = {
        "attn.qkv": "attn.c_attn",
        "attn.proj": "attn.c_proj",
        "mlp.fc": "mlp.c_fc",
        "mlp.proj": "mlp.c_proj",
    }
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            mod, name = rest.rsplit(".", 1)
            if mod in renames and name == "weight":
                v = v.t()
            k = f"transformer.h.{i}.{renames.get(mod, mod)}.{name}"
        elif k.startswith("tok_emb."):
            k = "transformer.wte.weight"
        elif k.startswith("pos_emb."):
            k = "transformer.wpe.weight"
        elif k.startswith("ln_f."):
            k = "transformer." + k
        sd[k] = v.clone()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if m != "lm_head.weight" or not cfg.tie_embeddings]
    assert hf.config._attn_implementation == "eager"
    return hf


def hf_greedy(hf, prompts, max_new_tokens: int, eos: int | None) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id=0)
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )
    rows = out[:, ids.shape[1] :].tolist()
    if eos is None:
        return rows
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def book_loop(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference loop (ch05 `generate_text_simple`): crop to the window, full forward, argmax."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.cfg.context_length :])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


# -- parity with transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("tie,scale", [(False, 1.0), (True, 10.0)])
def test_greedy_matches_transformers_single_and_left_padded_batch(tie, scale):
    model = small_model(tie=tie, scale=scale)
    hf = to_hf(model)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5)

    single = generate(model, [PROMPTS[0]], max_new_tokens=30, eos_token_id=None)
    assert single == hf_greedy(hf, [PROMPTS[0]], 30, None)
    assert len(single[0]) == 30 and len(set(single[0])) > 5  # a real sequence, not one token repeated

    batch = generate(model, PROMPTS, max_new_tokens=30, eos_token_id=None)
    assert batch == hf_greedy(hf, PROMPTS, 30, None)
    assert batch[0] == single[0]


def test_greedy_with_eos_matches_transformers():
    model = small_model()
    hf = to_hf(model)
    free = generate(model, PROMPTS, max_new_tokens=25, eos_token_id=None)
    eos = free[0][6]  # a token row 0 emits mid-way; other rows may or may not emit it
    ours = generate(model, PROMPTS, max_new_tokens=25, eos_token_id=eos)
    assert ours == hf_greedy(hf, PROMPTS, 25, eos)
    assert ours[0] == free[0][: free[0].index(eos)]
    for mine, full in zip(ours, free):
        assert mine == (full[: full.index(eos)] if eos in full else full)


# -- cache, window cropping, batching ----------------------------------------------------------------
def test_cache_equals_no_cache_equals_book_loop_past_the_context_window():
    model = small_model(ctx=16)
    for prompt in ([7] * 3, list(range(2, 22))):  # short, and longer than the 16-token window
        cached = generate(model, [prompt], max_new_tokens=30, eos_token_id=None)[0]
        uncached = generate(model, [prompt], max_new_tokens=30, eos_token_id=None, use_cache=False)[0]
        assert cached == uncached == book_loop(model, prompt, 30)
        assert len(cached) == 30


def test_left_padded_batch_equals_each_prompt_alone_with_cropping():
    model = small_model(ctx=16)
    prompts = [list(range(2, 22)), [3], [9, 8, 7, 6, 5, 4, 3, 2, 30, 31, 32, 33], [100, 101]]
    alone = [generate(model, [p], max_new_tokens=24, eos_token_id=None)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=24, eos_token_id=None) == alone
    assert generate(model, prompts, max_new_tokens=24, eos_token_id=None, use_cache=False) == alone
    assert generate(model, prompts, max_new_tokens=24, eos_token_id=None, batch_size=3) == alone


def test_cache_rows_of_different_lengths_decode_as_each_sequence_alone():
    """One cache, rows at different lengths, decoded together in place: every step's logits equal each
    sequence's full forward alone; a row moved into a freed one (compaction) goes on the same."""
    model = small_model(ctx=32)
    seqs = [list(range(2, 9)), [5], list(range(20, 32)), [7, 8, 9]]
    torch.manual_seed(1)
    fed = torch.randint(2, 500, (len(seqs), 7)).tolist()
    with torch.no_grad():
        cache = KVCache(model.cfg, len(seqs), 32)
        got = [prefill(model, cache, 0, seqs)]
        got += [decode_step(model, cache, torch.tensor([f[t] for f in fed])) for t in range(6)]
        assert cache.lengths == [len(s) + 6 for s in seqs]
        for i, s in enumerate(seqs):
            want = model(torch.tensor([s + fed[i][:6]]))[0, len(s) - 1 :]
            torch.testing.assert_close(torch.stack([g[i] for g in got]), want, atol=1e-5, rtol=1e-5)
        cache.move(3, 1)  # row 1 leaves; the last row takes its place
        step = decode_step(model, cache, torch.tensor([fed[0][6], fed[3][6], fed[2][6]]))
        for row, i in enumerate([0, 3, 2]):
            want = model(torch.tensor([seqs[i] + fed[i]]))[0, -1]
            torch.testing.assert_close(step[row], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one new token each"):
        model.hidden_states(torch.ones(3, 2, dtype=torch.long), cache=cache.use(0, 3))


def test_rows_leaving_early_keep_sampling_identical_with_and_without_cache():
    """EOS ends rows at different steps (their cache rows are refilled by moving the last one): seeded
    sampling still draws in the caller's row order, so cached and uncached runs agree."""
    model = small_model()
    prompts = PROMPTS + [[60, 61, 62], [70]]
    kw = dict(max_new_tokens=20, temperature=1.0)
    free = generate(model, prompts, generator=torch.Generator().manual_seed(3), eos_token_id=None, **kw)
    eos = free[0][4]
    a = generate(model, prompts, generator=torch.Generator().manual_seed(3), eos_token_id=eos, **kw)
    b = generate(
        model, prompts, generator=torch.Generator().manual_seed(3), eos_token_id=eos, use_cache=False, **kw
    )
    assert a == b
    # Row 0 left after 4 tokens while the last row ran on in its place (the batch order changed).
    assert len(a[0]) == 4 and len(a[-1]) == 20


def test_tensor_input_with_attention_mask_equals_lists():
    model = small_model()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    expected = generate(model, PROMPTS, max_new_tokens=8, eos_token_id=None)
    assert generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None) == expected
    assert generate(model, torch.tensor(PROMPTS[0]), max_new_tokens=8, eos_token_id=None) == expected[:1]


def test_finished_rows_stop_and_batch_stops_when_all_done(monkeypatch):
    model = small_model()
    free = generate(model, PROMPTS, max_new_tokens=6, eos_token_id=None)
    calls = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    # Every row's first token is an EOS: one forward pass, nothing returned.
    assert generate(model, PROMPTS, max_new_tokens=6, eos_token_id=[r[0] for r in free]) == [[], [], [], []]
    assert len(calls) == 1
    # Row 1 ends at its 3rd token; each later pass runs only on the rows that have not met the EOS yet.
    calls.clear()
    eos = free[1][2]
    out = generate(model, PROMPTS, max_new_tokens=6, eos_token_id=eos)
    assert out[1] == free[1][:2]
    ends = [r.index(eos) if eos in r else 6 for r in free]
    expected = [sum(e >= step for e in ends) for step in range(6)]
    expected = [n for n in expected if n]
    assert [shape[0] for shape in calls] == expected and expected[3] <= 3


def test_generation_restores_training_mode_and_zero_new_tokens():
    model = small_model().train()
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], [], []]
    generate(model, PROMPTS, max_new_tokens=2)
    assert model.training


# -- sampling ----------------------------------------------------------------------------------------
def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 300, generator=g) * 3
    for k in (1, 5, 50):
        ours = top_k_filter(logits, k)
        assert torch.equal(ours.isinf(), TopKLogitsWarper(k)(None, logits.clone()).isinf())
        assert (~ours.isinf()).sum(-1).tolist() == [k] * 8
    for p in (0.05, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p).isinf(), TopPLogitsWarper(p)(None, logits.clone()).isinf())
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert (~top_p_filter(probs.log(), 0.75).isinf()).tolist() == [[True, True, False, False]]
    assert (~top_p_filter(probs.log(), 0.85).isinf()).tolist() == [[True, True, True, False]]


def test_sampling_draws_from_the_tempered_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.7, 0.2, 0.1]).log().expand(20000, 3)
    freq = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=3) / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
    # T = 0.5 squares the probabilities before renormalising: 0.49/0.54, 0.04/0.54, 0.01/0.54.
    freq = torch.bincount(sample_next(logits, 0.5, generator=g), minlength=3) / 20000
    assert torch.allclose(freq, torch.tensor([0.49, 0.04, 0.01]) / 0.54, atol=0.015)
    # top-p 0.75 keeps the first two tokens, renormalised.
    freq = torch.bincount(sample_next(logits, 1.0, top_p=0.75, generator=g), minlength=3) / 20000
    assert freq[2] == 0 and abs(freq[0] - 0.7 / 0.9) < 0.015


def test_sampling_is_seeded_and_identical_with_and_without_cache():
    model = small_model(ctx=16)
    kw = dict(max_new_tokens=24, eos_token_id=None, temperature=1.3, top_k=40, top_p=0.95)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b
    assert a != c
    greedy = generate(model, PROMPTS, max_new_tokens=24, eos_token_id=None)
    assert a != greedy
    # top-k 1 and a tiny top-p leave only the argmax: sampling becomes greedy.
    assert generate(model, PROMPTS, max_new_tokens=24, eos_token_id=None, temperature=2.0, top_k=1) == greedy
    assert (
        generate(model, PROMPTS, max_new_tokens=24, eos_token_id=None, temperature=2.0, top_p=1e-6) == greedy
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=[[1, 2], []]), "prompt 1 is empty"),
        (dict(input_ids=[[1, 600]]), r"prompt 0 has token ids \[600\]"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_raise_config_errors(kw, match):
    args = dict(input_ids=[[1, 2]], max_new_tokens=3) | kw
    with pytest.raises(ConfigError, match=match):
        generate(small_model(), **args)


# -- stop strings (real GPT-2 vocabulary) ------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from gptforge.model.tokenizer import Tokenizer

    return Tokenizer()


@pytest.fixture(scope="module")
def vocab_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("test-tiny", tie_embeddings=False)).eval()


def test_stop_string_cuts_text_exactly_and_tokens_before_it(tok, vocab_model):
    prompt = "The verdict was"
    full = generate(vocab_model, [tok.encode(prompt)], max_new_tokens=20, eos_token_id=None)[0]
    pieces = [tok.token_bytes(t) for t in full]
    # A stop string that starts inside token j: the tokens keep 0..j-1, the text keeps the bytes before it.
    j = next(j for j in range(3, 20) if len(pieces[j]) >= 3 and pieces[j].isascii())
    c = sum(len(p) for p in pieces[:j]) + 1
    text = b"".join(pieces).decode("utf-8", errors="replace")
    data = b"".join(pieces)
    stop = data[c : c + 2].decode()
    assert data.find(stop.encode()) == c  # the first occurrence is the one placed
    assert generate(
        vocab_model, [tok.encode(prompt)], max_new_tokens=20, eos_token_id=None, stop_strings=[stop]
    ) == [full[:j]]
    texts = generate_text(
        vocab_model, tok, [prompt, "x"], max_new_tokens=20, eos_token_id=None, stop_strings=stop
    )
    assert texts[0] == data[:c].decode("utf-8", errors="replace") and texts[0] == text[: text.find(stop)]
    # the other prompt in the batch is unaffected unless it meets the stop string itself
    other = generate_text(vocab_model, tok, ["x"], max_new_tokens=20, eos_token_id=None)[0]
    assert texts[1] == (other[: other.find(stop)] if stop in other else other)
    # a stop string inside the prompt does not count
    assert generate_text(vocab_model, tok, [prompt], max_new_tokens=5, stop_strings="verdict") == [
        tok.decode(full[:5])
    ]


# -- the verbs ---------------------------------------------------------------------------------------
def test_help_does_not_import_torch():
    code = "import sys; from gptforge.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "generate" in out and out.strip().endswith("False")


def test_info_lists_presets_with_known_gpt2_counts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(r for r in out.splitlines() if r.startswith("gpt2 "))
    assert "124,439,808" in line and "163,037,184" in line
    assert main(["info", "gpt2-medium", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 354_823_168
    assert d["train_memory_bytes"] == {"fp32": 354_823_168 * 16, "bf16": 354_823_168 * 8}
    assert main(["info", "gtp2"]) == 2
    assert "did you mean 'gpt2'" in capsys.readouterr().err


def test_info_on_a_checkpoint(tmp_path, capsys):
    model = GPT(GPTConfig.from_preset("test-tiny"))
    save_checkpoint(model, tmp_path / "ck", metadata={"prompt_style.json": {"name": "alpaca"}})
    assert main(["info", str(tmp_path / "ck"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == model.num_parameters() == 1_635_744
    assert d["params_counting_tied_head"] == 1_635_744 + 50257 * 32
    assert d["stored_dtypes"] == ["float32"] and d["prompt_style"] == {"name": "alpaca"}
    assert "model.safetensors" in d["files"]
    # a config that no longer matches the weights is refused, naming the file
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg | {"emb_dim": 64}))
    assert main(["info", str(tmp_path / "ck")]) == 2
    assert "model.safetensors: tensors do not match" in capsys.readouterr().err


def test_generate_verb_prints_what_generate_text_gives(tmp_path, capsys, tok, vocab_model):
    save_checkpoint(vocab_model, tmp_path / "ck")
    prompts = ["Every effort moves you", "I HAD always thought"]
    assert main(["generate", str(tmp_path / "ck"), *prompts, "--max-new-tokens", "12", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = generate_text(vocab_model, tok, prompts, max_new_tokens=12)
    assert [r["completion"] for r in rows] == expected and [r["prompt"] for r in rows] == prompts

    args = ["generate", str(tmp_path / "ck"), prompts[0], "--max-new-tokens", "12", "--temperature", "1"]
    assert main([*args, "--seed", "3", "--top-k", "20", "--echo"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "3", "--top-k", "20", "--echo", "--no-cache"]) == 0
    assert capsys.readouterr().out == first and first.startswith(prompts[0])
    g = torch.Generator().manual_seed(3)
    sampled = generate_text(
        vocab_model, tok, prompts[:1], max_new_tokens=12, temperature=1.0, top_k=20, generator=g
    )
    assert first == prompts[0] + sampled[0] + "\n"


def test_generate_verb_user_errors_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 2
    assert "not a gptforge checkpoint" in capsys.readouterr().err
    clf = GPT(GPTConfig.from_preset("test-tiny", num_labels=2))
    save_checkpoint(clf, tmp_path / "clf")
    assert main(["generate", str(tmp_path / "clf"), "hi"]) == 2
    assert "classifier" in capsys.readouterr().err
    save_checkpoint(GPT(GPTConfig.from_preset("test-tiny")), tmp_path / "lm")
    assert main(["generate", str(tmp_path / "lm"), "hi", "--top-p", "0"]) == 2
    assert "top_p=0.0" in capsys.readouterr().err
    assert issubclass(ConfigError, GPTForgeError)
