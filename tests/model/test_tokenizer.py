"""The offline GPT-2 tokenizer: tiktoken ids == the exported Hugging Face tokenizer's, round trips, and
refusal of damaged BPE files."""

from __future__ import annotations

import json
import shutil

import pytest

from gptforge.errors import GPTForgeError
from gptforge.model import tokenizer as tkmod
from gptforge.model.tokenizer import EOT, EOT_ID, Tokenizer, bpe_files_dir, save_hf_tokenizer

CORPUS = [
    "Hello, world!",
    "It's, I'm, you're, we've, they'll, he'd, don't, O'Neil's 'quoted' text",
    "IT'S LOUD and it'S mixed",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs\n\nnew\nlines\r\nwindows\r\n\n\n",
    "whitespace runs:      then\u00a0nbsp and\u2003em-space and \u200b zero width",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000 2024-06-01 0x1F",
    "unicode: héllo naïve café Ünïcödé Ελληνικά русский 中文字符 日本語のテキスト 한국어",
    "emoji: 🤗🚀👩‍👩‍👧‍👦 🇺🇸 ❤️ combining é (e + \u0301)",
    "special token <|endoftext|> in the middle<|endoftext|>and glued",
    "<|endoftext|>",
    "code: def f(x):\n    return x ** 2  # square\n\tif a != b: print('{}'.format(a))",
    "symbols: @#$%^&*()_+-=[]{}|;:'\",.<>/?`~ §±µ€£¥ — – … «»",
    "",
    " ",
    "\n",
    "a" * 300,
    "The quick brown fox jumps over the lazy dog." * 5,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_tok")
    save_hf_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)


def test_known_ids(tok):
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.encode(EOT) == [EOT_ID] and tok.vocab_size == 50257


def test_hf_tokenizer_ids_equal_tiktoken_on_varied_corpus(tok, hf_tok):
    for text in CORPUS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == EOT_ID


def test_hf_tokenizer_ids_equal_tiktoken_on_the_verdict(tok, hf_tok, shared_data_dir):
    text = (shared_data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) == 5145  # the figure in the data README and the book
    assert hf_tok(text)["input_ids"] == ids
    # line by line too: other boundaries, other whitespace contexts
    lines = text.splitlines(keepends=True)
    assert [hf_tok(x)["input_ids"] for x in lines] == tok.encode_batch(lines)


@pytest.mark.slow
def test_hf_tokenizer_ids_equal_tiktoken_on_tinyshakespeare(tok, hf_tok, shared_data_dir):
    text = (shared_data_dir / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_gpt2_tokenizer_classes_load_the_export(tok, hf_dir):
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    for cls in (GPT2TokenizerFast, PreTrainedTokenizerFast):
        t = cls.from_pretrained(str(hf_dir), local_files_only=True)
        assert [t(x)["input_ids"] for x in CORPUS] == [tok.encode(x) for x in CORPUS]


def test_decode_round_trips(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(t) for t in ids) == text.encode("utf-8")
    assert tok.decode_batch([tok.encode(x) for x in CORPUS]) == CORPUS
    # a token sequence cut inside a multi-byte character decodes with a replacement, not an exception
    ids = tok.encode("🤗")
    assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd"


def test_export_dir_has_the_hf_files(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp dir left behind
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2Tokenizer" and cfg["eos_token"] == EOT
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab[EOT] == EOT_ID
    merges = (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len([m for m in merges[1:] if m]) == 50000


@pytest.fixture
def bpe_copy(tmp_path, monkeypatch):
    """A private copy of the BPE files that GPTFORGE_TOKENIZER_DIR points at; the cached Encoding is reset."""
    d = tmp_path / "bpe"
    shutil.copytree(bpe_files_dir(), d)
    monkeypatch.setenv("GPTFORGE_TOKENIZER_DIR", str(d))
    tkmod.get_encoding.cache_clear()
    yield d
    tkmod.get_encoding.cache_clear()


def test_tokenizer_dir_copy_is_used(bpe_copy):
    assert bpe_files_dir() == bpe_copy
    assert Tokenizer().encode("Hello, world!") == [15496, 11, 995, 0]


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_corrupted_bpe_file_is_refused_naming_it(bpe_copy, name):
    path = bpe_copy / name
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("the", "teh", 1), encoding="utf-8")
    with pytest.raises(GPTForgeError, match=rf"{path}: sha256 does not match"):
        Tokenizer()


def test_tokenizer_dir_without_files_is_refused(bpe_copy):
    (bpe_copy / "encoder.json").unlink()
    with pytest.raises(GPTForgeError, match=r"GPTFORGE_TOKENIZER_DIR=.* lacks encoder.json"):
        bpe_files_dir()
