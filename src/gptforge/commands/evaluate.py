"""`gptforge evaluate` (score a checkpoint or a responses file) and `gptforge classify` (label new texts)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from gptforge.errors import ConfigError, DataError


def _template_file(argv: list[str]) -> list[str]:
    """`--judge.template-file FILE` is short for `--judge.template "<the file's text>"`."""
    out, i = [], 0
    given = {a.split("=", 1)[0][2:].replace("-", "_") for a in argv if a.startswith("--judge.template")}
    if {"judge.template", "judge.template_file"} <= given:
        raise ConfigError("give --judge.template or --judge.template-file, not both")
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name[2:].replace("-", "_") == "judge.template_file":
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError("--judge.template-file needs a file")
                value, i = argv[i + 1], i + 1
            try:
                text = Path(value).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"--judge.template-file {value}: cannot read ({e.strerror})") from None
            out += ["--judge.template", text]
        else:
            out.append(a)
        i += 1
    return out


def _print_summary(metrics: dict, out_dir: Path) -> None:
    task = metrics["task"]
    for split, m in metrics.get("splits", {}).items():
        if task == "pretrain":
            print(f"{split}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  ({m['tokens']} tokens)")
        elif task == "classify":
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro F1 {m['macro']['f1']:.4f}  (n={m['n']})")
        elif task == "dpo":
            print(
                f"{split}: reward accuracy {m['rewards/accuracy']:.1%}  margin {m['rewards/margins']:.4f}  "
                f"log-prob accuracy {m['logp_accuracy']:.1%}  (n={m['n']})"
            )
        else:
            print(
                f"{split}: ROUGE-L F1 {m['rouge_l_f1']:.4f}  exact match {m['exact_match']:.1%}  "
                f"mean words {m['response_words_mean']:.1f}  (n={m['n']})"
            )
    j = metrics.get("judge")
    if j:
        mean = "n/a" if j["mean_score"] is None else f"{j['mean_score']:.2f}"
        print(
            f"judge: mean score {mean} over n={j['n_scored']} of {j['n_total']} "
            f"({j['n_unparseable']} unparseable, {j['n_failed']} failed)"
        )
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.md'}")


def evaluate(argv: list[str]) -> int:
    from gptforge.pipeline.cli_args import cli_config

    cfg = cli_config("evaluate", _template_file(argv))
    if cfg is None:
        return 0
    if bool(cfg.responses) == bool(cfg.checkpoint):
        raise ConfigError("give a checkpoint directory or --responses FILE.json (exactly one)")
    if cfg.judge is not None:
        cfg.judge.api_key()  # a missing key variable fails now, not after generation
    from gptforge.pipeline.evaluate import evaluate_checkpoint, evaluate_responses_file, output_dir

    cfg.out = str(output_dir(cfg))
    metrics = (evaluate_responses_file if cfg.responses else evaluate_checkpoint)(cfg)
    _print_summary(metrics, Path(cfg.out))
    return 0


# -- classify ------------------------------------------------------------------------------------------
def read_texts(path: str | Path, column: str | None = None) -> list[str]:
    """Texts from a file: CSV/TSV or JSONL/JSON by `column` (default "text"), else one text per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--file {p}: not found")
    suffix = p.suffix.lower()
    col = column or "text"
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        if not rows:
            raise DataError(f"{p}: no rows under the header line")
        if col not in rows[0]:
            raise DataError(f"{p}: no column {col!r} (columns: {list(rows[0])}); pass --column")
        texts = [r[col] for r in rows]
    elif suffix in (".jsonl", ".json"):
        try:
            if suffix == ".json":
                records = json.loads(raw)
            else:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{p}: expected a list of records")
        texts = []
        for i, r in enumerate(records, 1):
            if isinstance(r, str) and column is None:
                texts.append(r)
            elif isinstance(r, dict) and isinstance(r.get(col), str):
                texts.append(r[col])
            else:
                raise DataError(f"{p}: record {i} has no string field {col!r}; pass --column")
    else:
        if column:
            raise DataError(
                f"{p}: --column needs a .csv, .tsv, .json or .jsonl file; this one is read by line"
            )
        texts = [line for line in raw.splitlines() if line.strip()]
    for i, t in enumerate(texts, 1):
        if not (t or "").strip():
            raise DataError(f"{p}: row {i} has an empty {col!r}; fill it or remove the row")
    if not texts:
        raise DataError(f"{p}: no texts to classify")
    return texts


def classify(argv: list[str]) -> int:
    from gptforge.pipeline.cli_args import cli_config

    ns = cli_config("classify", argv)
    if ns is None:
        return 0
    if not ns.checkpoint:
        raise ConfigError("give a classifier checkpoint directory, then texts or --file FILE")
    texts = list(ns.texts)
    if ns.file:
        texts += read_texts(ns.file, ns.column)
    if not texts:
        raise ConfigError("nothing to classify: give texts as arguments or --file FILE")

    from gptforge.model.load import load_model
    from gptforge.pipeline.evaluate import classify_texts

    model = load_model(ns.checkpoint)
    results = classify_texts(
        model, texts, max_length=ns.max_length, batch_size=ns.batch_size, device=ns.device
    )
    for r in results:
        if ns.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['label']}\t{r['score']:.4f}\t{r['text']}")
    n_cut = sum(r["truncated"] for r in results)
    if n_cut:
        print(f"note: {n_cut} of {len(results)} texts were truncated to fit the model", file=sys.stderr)
    if ns.out:
        from gptforge.io import write_jsonl

        write_jsonl(ns.out, results)
    return 0
