"""Tokenizing and packing a ~10 MB corpus: gptforge `load_corpus` vs GPT2TokenizerFast + `group_texts`.

The corpus is Tiny Shakespeare copied into a folder of files until it holds 10 MB. Both sides start
from the text files with an empty cache (a fresh cache dir per run) and use the same `num_proc`.
The baseline is the recipe of transformers' `run_clm.py`: `load_dataset("text")`, a batched `map`
of the tokenizer, then a batched `map` of `group_texts` into blocks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from itertools import chain
from pathlib import Path

from common import ROOT, interleaved, log, median, record

from gptforge.errors import DataError


def find_text(path: str | None) -> Path:
    """tinyshakespeare.txt from the path given, $GPTFORGE_DATA_DIR, or ../shared/data beside the repo."""
    cands = [Path(path)] if path else []
    if os.environ.get("GPTFORGE_DATA_DIR"):
        cands.append(Path(os.environ["GPTFORGE_DATA_DIR"]) / "text" / "tinyshakespeare.txt")
    cands.append(ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt")
    for c in cands:
        if c.is_file():
            return c
    raise DataError(
        "tinyshakespeare.txt not found; pass --data-path FILE or set GPTFORGE_DATA_DIR to the data folder"
    )


def make_corpus(src: Path, out: Path, target_mb: float) -> tuple[list[Path], int]:
    text = src.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    copies = max(1, -(-int(target_mb * 1e6) // size))
    files = []
    for i in range(copies):
        f = out / f"part-{i:03d}.txt"
        f.write_text(text, encoding="utf-8")
        files.append(f)
    return files, copies * size


def _hf_recipe(files: list[Path], cache: str, block: int, num_proc: int, tok) -> int:
    import datasets

    raw = datasets.load_dataset(
        "text", data_files=[str(f) for f in files], cache_dir=cache, keep_linebreaks=True
    )["train"]

    def tokenize(batch):
        return tok(batch["text"])

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block) * block
        return {k: [t[i : i + block] for i in range(0, total, block)] for k, t in joined.items()}

    blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    return len(blocks) * block


def _ours(folder: Path, cache: str, context_length: int, num_proc: int) -> int:
    from gptforge.tasks.pretrain import load_corpus

    dd = load_corpus([str(folder)], context_length=context_length, num_proc=num_proc, cache_dir=cache)
    return sum(len(ds) for ds in dd.values()) * (context_length + 1)


def run(data_path: str | None, target_mb: float, context_length: int, num_proc: int, reps: int) -> list[dict]:
    import datasets
    import transformers

    from gptforge.model.tokenizer import build_hf_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected
    src = find_text(data_path)
    work = Path(tempfile.mkdtemp(prefix="gptforge-bench-data-"))
    try:
        folder = work / "corpus"
        folder.mkdir()
        files, nbytes = make_corpus(src, folder, target_mb)
        tok = build_hf_tokenizer()
        log(f"data: {nbytes / 1e6:.1f} MB in {len(files)} files, num_proc={num_proc} ...")
        counts: dict[str, int] = {}

        def fresh() -> str:
            return tempfile.mkdtemp(prefix="cache-", dir=work)

        def ours():
            c = fresh()
            counts["gptforge"] = _ours(folder, c, context_length, num_proc)
            shutil.rmtree(c, ignore_errors=True)

        def theirs():
            c = fresh()
            counts["transformers"] = _hf_recipe(files, c, context_length, num_proc, tok)
            shutil.rmtree(c, ignore_errors=True)

        times = interleaved({"gptforge": ours, "transformers": theirs}, reps=reps, warmup=1)
        mbps = {k: nbytes / 1e6 / median(v) for k, v in times.items()}
        log(
            f"data: gptforge {mbps['gptforge']:.2f} MB/s, transformers recipe {mbps['transformers']:.2f} MB/s"
        )
        return [
            record(
                "data",
                f"tokenize + pack {nbytes / 1e6:.1f} MB into blocks of {context_length}, num_proc={num_proc}",
                "MB/s",
                mbps["gptforge"],
                mbps["transformers"],
                "GPT2TokenizerFast + group_texts (run_clm recipe)",
                higher_is_better=True,
                target=3.0,
                samples=times,
                block_tokens=counts,
            )
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
