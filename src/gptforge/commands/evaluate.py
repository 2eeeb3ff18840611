"""`gptforge evaluate` (score a checkpoint or a responses file) and `gptforge classify` (label new texts)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from gptforge.errors import ConfigError, DataError

JUDGE_FIELDS = {
    # flag suffix -> (JudgeConfig field, type, help)
    "backend": ("backend", str, "ollama (native /api/chat) or openai (any /v1/chat/completions server)"),
    "model": ("model", str, "judge model name (default llama3)"),
    "url": ("url", str, "server base URL (default http://localhost:11434 for ollama, :8000/v1 for openai)"),
    "api-key-env": ("api_key_env", str, "environment variable holding the API key (never written anywhere)"),
    "template": (
        "template",
        str,
        "prompt template with {prompt} {instruction} {input} {output} {model_response}",
    ),
    "template-file": (None, str, "read the template from this file"),
    "concurrency": ("concurrency", int, "requests in flight at once (default 4)"),
    "timeout": ("timeout", float, "seconds per request (default 120)"),
    "retries": ("retries", int, "extra attempts after timeouts, 429 and 5xx (default 3)"),
    "backoff": ("backoff", float, "first retry delay in seconds, doubling (default 1)"),
    "seed": ("seed", int, "sampling seed sent to the server (default 123)"),
    "num-ctx": ("num_ctx", int, "Ollama context window (default 2048)"),
    "max-tokens": ("max_tokens", int, "OpenAI: cap on the reply length"),
}


def _parser_error(msg: str):
    raise ConfigError(msg)


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LLM judge (optional; any --judge.* option turns it on)")
    g.add_argument(
        "--judge", action="store_true", help="judge with the defaults (Ollama llama3 on localhost)"
    )
    for flag, (_, typ, help_) in JUDGE_FIELDS.items():
        under = flag.replace("-", "_")
        names = [f"--judge.{flag}"] + ([f"--judge.{under}"] if under != flag else [])
        g.add_argument(*names, dest="judge__" + under, type=typ, metavar=under.upper(), help=help_)


def judge_config_from_args(ns: argparse.Namespace):
    """A JudgeConfig when the judge was asked for, else None."""
    from gptforge.pipeline.judge import JudgeConfig

    given = {flag: getattr(ns, "judge__" + flag.replace("-", "_")) for flag in JUDGE_FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    if not ns.judge and not given:
        return None
    kwargs = {JUDGE_FIELDS[k][0]: v for k, v in given.items() if JUDGE_FIELDS[k][0]}
    if "template-file" in given:
        if "template" in given:
            raise ConfigError("give --judge.template or --judge.template-file, not both")
        path = Path(given["template-file"])
        try:
            kwargs["template"] = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--judge.template-file {path}: cannot read ({e.strerror})") from None
    cfg = JudgeConfig(**kwargs)
    cfg.api_key()  # a missing key variable fails now, not after generation
    return cfg


def _print_summary(metrics: dict, out_dir: Path) -> None:
    task = metrics["task"]
    for split, m in metrics.get("splits", {}).items():
        if task == "pretrain":
            print(f"{split}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  ({m['tokens']} tokens)")
        elif task == "classify":
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro F1 {m['macro']['f1']:.4f}  (n={m['n']})")
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
    from gptforge.pipeline.evaluate import TASKS

    p = argparse.ArgumentParser(
        prog="gptforge evaluate",
        description="Evaluate a gptforge checkpoint on its task's data, or score a responses file "
        "(the reference's JSON format) without a model. Writes metrics.json and report.md.",
    )
    p.error = _parser_error  # type: ignore[method-assign]
    p.add_argument("checkpoint", nargs="?", help="gptforge checkpoint directory")
    p.add_argument("--responses", help="score this JSON list of records with `output` and a response field")
    p.add_argument(
        "--response-key", default="model_response", help="the response field (default model_response)"
    )
    p.add_argument(
        "--task", choices=TASKS, help="default: from the checkpoint (classifier, prompt style, else LM)"
    )
    p.add_argument("--data", help="data set name or file (default: the task's standard data)")
    p.add_argument("--text-column", help="classification files: the text column")
    p.add_argument("--label-column", help="classification files: the label column")
    p.add_argument("--max-length", type=int, help="classification: truncate texts to this many tokens")
    p.add_argument("--test-data", help="pretrain: held-out text file(s), comma-separated, scored as `test`")
    p.add_argument("--prompt-style", help="instruct: override the checkpoint's prompt style (alpaca, phi3)")
    p.add_argument(
        "--splits",
        help="comma-separated splits (default: validation,test for pretrain and "
        "train,validation,test for classify; instruct uses test)",
    )
    p.add_argument("--limit", type=int, help="only the first N examples of each split (quick checks)")
    p.add_argument("--out", help="output directory (default eval/<checkpoint or responses file name>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256, help="instruct: tokens generated per response")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--use-stemmer", action="store_true", help="ROUGE with the Porter stemmer")
    p.add_argument("--no-progress", action="store_true")
    add_judge_arguments(p)
    ns = p.parse_args(argv)
    judge = judge_config_from_args(ns)
    if bool(ns.responses) == bool(ns.checkpoint):
        raise ConfigError("give a checkpoint directory or --responses FILE.json (exactly one)")
    if ns.limit is not None and ns.limit < 1:
        raise ConfigError(f"--limit {ns.limit} must be >= 1")
    if ns.batch_size < 1 or ns.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be >= 1")

    from gptforge.pipeline.config import EvaluateConfig, EvaluateDataConfig
    from gptforge.pipeline.evaluate import evaluate_checkpoint, evaluate_responses_file, output_dir

    cfg = EvaluateConfig(
        checkpoint=ns.checkpoint,
        responses=ns.responses,
        response_key=ns.response_key,
        task=ns.task,
        data=EvaluateDataConfig(
            dataset=ns.data,
            text_column=ns.text_column,
            label_column=ns.label_column,
            max_length=ns.max_length,
            test_sources=ns.test_data.split(",") if ns.test_data else None,
            prompt_style=ns.prompt_style,
            limit=ns.limit,
        ),
        splits=ns.splits.split(",") if ns.splits else None,
        out=ns.out,
        batch_size=ns.batch_size,
        max_new_tokens=ns.max_new_tokens,
        device=ns.device,
        use_stemmer=ns.use_stemmer,
        progress=not ns.no_progress,
        judge=judge,
    )
    metrics = (evaluate_responses_file if cfg.responses else evaluate_checkpoint)(cfg)
    _print_summary(metrics, output_dir(cfg))
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
    p = argparse.ArgumentParser(
        prog="gptforge classify",
        description="Label texts with a classifier checkpoint: prints label, probability and text per line "
        "(or JSON lines with every class's probability).",
    )
    p.error = _parser_error  # type: ignore[method-assign]
    p.add_argument("checkpoint", help="gptforge classifier checkpoint directory")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", help="one text per line, or a .csv/.tsv/.json/.jsonl file read by --column")
    p.add_argument("--column", help="the text column of --file (default text)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--out", help="also write the results as JSONL to this file")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    ns = p.parse_args(argv)
    texts = list(ns.texts)
    if ns.file:
        texts += read_texts(ns.file, ns.column)
    if not texts:
        raise ConfigError("nothing to classify: give texts as arguments or --file FILE")
    if ns.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")

    from gptforge.model.checkpoint import load_checkpoint
    from gptforge.pipeline.evaluate import classify_texts

    model = load_checkpoint(ns.checkpoint)
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
