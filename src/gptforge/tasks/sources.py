"""Where data comes from: an explicit path, `$GPTFORGE_DATA_DIR`, the user cache, or the canonical download.

Every known data set has one registry entry with its canonical URL, file name and sha256 (or, where no
hash is known, a structure check). A download is streamed to a temp file beside its final place, checked,
and only then renamed into the cache, so the cache never holds a half-written or unverified file.

Set `GPTFORGE_URL_<NAME>` (e.g. `GPTFORGE_URL_SMS_SPAM`) or pass `url=` to fetch from a mirror, and
`GPTFORGE_OFFLINE=1` to forbid downloads.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.errors import DataError
from gptforge.io import clean_stale_temps, record_read, sha256_file, temp_path

log = logging.getLogger(__name__)

SMS_ROWS, SMS_HAM, SMS_SPAM = 5574, 4827, 747


@dataclass(frozen=True)
class DataSource:
    """One known data set: where it lives canonically and how to tell a good copy."""

    name: str
    subdir: str
    file: str
    url: str
    sha256: str | None
    check: Callable[[Path], None] | None = None  # used when sha256 is None (or in addition to it)
    zip_member: str | None = None  # the URL is a zip; extract this member
    description: str = ""


def check_sms_structure(path: Path) -> None:
    """The UCI SMS Spam Collection: 5,574 `label<TAB>text` lines, 4,827 ham and 747 spam.

    The canonical zip's hash is not known offline, so the extracted file is checked by structure.
    """
    counts = {"ham": 0, "spam": 0}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            label, tab, _ = line.partition("\t")
            if not tab or label not in counts:
                raise DataError(
                    f"{path}: line {i} is not 'ham<TAB>text' or 'spam<TAB>text'; "
                    "this is not the SMS Spam Collection (get it from the UCI zip)"
                )
            counts[label] += 1
    got = (counts["ham"] + counts["spam"], counts["ham"], counts["spam"])
    if got != (SMS_ROWS, SMS_HAM, SMS_SPAM):
        raise DataError(
            f"{path}: {got[0]} messages ({got[1]} ham, {got[2]} spam), expected {SMS_ROWS} "
            f"({SMS_HAM} ham, {SMS_SPAM} spam); replace it with the UCI SMS Spam Collection v.1"
        )


_RAW = "https://raw.githubusercontent.com"
REGISTRY: dict[str, DataSource] = {
    s.name: s
    for s in [
        DataSource(
            "sms_spam",
            "sms_spam",
            "SMSSpamCollection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            None,
            check=check_sms_structure,
            zip_member="SMSSpamCollection",
            description="SMS Spam Collection v.1 (UCI, CC BY 4.0)",
        ),
        DataSource(
            "instruction",
            "instruction",
            "instruction-data.json",
            f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            description="1,100 Alpaca-style instruction records (Apache-2.0)",
        ),
        DataSource(
            "instruction-preference",
            "instruction",
            "instruction-data-with-preference.json",
            f"{_RAW}/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            description="the instruction records plus chosen/rejected responses (Apache-2.0)",
        ),
        DataSource(
            "the-verdict",
            "text",
            "the-verdict.txt",
            f"{_RAW}/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            description='Edith Wharton, "The Verdict" (public domain)',
        ),
        DataSource(
            "tinyshakespeare",
            "text",
            "tinyshakespeare.txt",
            f"{_RAW}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            description="Tiny Shakespeare, 1,115,394 characters (public domain)",
        ),
    ]
}


def get_source(name: str) -> DataSource:
    if name not in REGISTRY:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(REGISTRY)} (or pass a file path)")
    return REGISTRY[name]


def cache_root() -> Path:
    """gptforge's user cache (`$GPTFORGE_CACHE`, else ~/.cache/gptforge); shared with the tokenizer files."""
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge")


def data_cache_dir() -> Path:
    return cache_root() / "data"


def url_env_var(name: str) -> str:
    return "GPTFORGE_URL_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def check_utf8(path: str | os.PathLike) -> None:
    """Raise a DataError naming the line of the first byte that is not UTF-8 (before a parser hides it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, seen = 1, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(e.start, 0)].count(b"\n")
                raise DataError(
                    f"{path}: line {line} (byte {seen + e.start}) is not valid UTF-8; "
                    "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            line += chunk.count(b"\n")
            seen += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: ends inside a UTF-8 character; re-save the file as UTF-8") from None


def verify(path: Path, source: DataSource) -> None:
    """Raise a DataError unless `path` is a good copy of `source` (sha256, else the structure check)."""
    if source.sha256 is not None:
        got = sha256_file(path)
        if got != source.sha256:
            raise DataError(
                f"{path}: sha256 {got} does not match {source.name}'s {source.sha256}; "
                f"delete it (it is fetched again from {source.url}) or pass your own file as a path"
            )
    if source.check is not None:
        source.check(path)


def resolve(name: str, path: str | os.PathLike | None = None, *, url: str | None = None) -> Path:
    """The local file of a known data set (see `_resolve`); recorded as read by the running stage."""
    file = _resolve(name, path, url=url)
    record_read(file, "data file")
    return file


def _resolve(name: str, path: str | os.PathLike | None = None, *, url: str | None = None) -> Path:
    """The local file of a known data set, downloading it into the cache if need be.

    Order: explicit `path` (a file, or a folder with the `$GPTFORGE_DATA_DIR` layout) ->
    `$GPTFORGE_DATA_DIR/<subdir>/<file>` -> the user cache -> download from `url`, `$GPTFORGE_URL_<NAME>`
    or the canonical URL. An explicit path is trusted as given; the other copies are checked.
    """
    source = get_source(name)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            for cand in (p / source.subdir / source.file, p / source.file):
                if cand.is_file():
                    return cand
            raise DataError(f"{p}: no {source.subdir}/{source.file} or {source.file} inside; fix the path")
        if not p.is_file():
            raise DataError(f"{p}: no such file for {name}; fix the path or leave it unset to download")
        return p
    env_dir = os.environ.get("GPTFORGE_DATA_DIR")
    if env_dir:
        cand = Path(env_dir) / source.subdir / source.file
        if cand.is_file():
            verify(cand, source)
            return cand
        log.info("%s not in $GPTFORGE_DATA_DIR=%s; trying the cache", name, env_dir)
    cached = data_cache_dir() / source.subdir / source.file
    if cached.is_file():
        verify(cached, source)
        return cached
    return download(source, cached, url=url)


def download(source: DataSource, dest: Path, url: str | None = None) -> Path:
    """Fetch `source` into `dest` atomically: temp file, check, rename. A bad file leaves nothing behind."""
    url = url or os.environ.get(url_env_var(source.name)) or source.url
    if os.environ.get("GPTFORGE_OFFLINE") == "1":
        raise DataError(
            f"{source.name} is not available locally and GPTFORGE_OFFLINE=1; put {source.subdir}/"
            f"{source.file} under $GPTFORGE_DATA_DIR or unset GPTFORGE_OFFLINE to download {url}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest.parent, dest.name)  # what a killed download of this file left
    tmp_dir = temp_path(dest)  # `.NAME.tmp-PID-*`: a kill -9 here leaves what the next call removes
    tmp_dir.mkdir()
    try:
        fetched = tmp_dir / "download"
        _fetch(url, fetched, desc=source.name)
        if source.zip_member is not None:
            fetched = _extract(fetched, source.zip_member, tmp_dir / source.file, url)
        try:
            verify(fetched, source)
        except DataError as e:
            raise DataError(f"download of {url} rejected, nothing was kept: {e}") from None
        os.replace(fetched, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("downloaded %s to %s", source.name, dest)
    return dest


def _fetch(url: str, out: Path, desc: str) -> None:
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(out, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {desc}", disable=None) as bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"cannot download {url}: {reason}; check the network, set {url_env_var(desc)} to a mirror, "
            "or put the file under $GPTFORGE_DATA_DIR"
        ) from None


def _extract(zip_path: Path, member: str, out: Path, url: str) -> Path:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            match = [n for n in names if n == member or n.endswith("/" + member)]
            if not match:
                raise DataError(f"download of {url} rejected: the zip has no {member} (it has {names[:5]})")
            with zf.open(match[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise DataError(f"download of {url} rejected: not a zip file; check the URL") from None
    return out


def _no_duplicate_keys(where: str):
    """An `object_pairs_hook` that refuses an object naming a key twice (json keeps the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise DataError(
                    f"{where} has the key {k!r} twice; keep one (json would silently drop the first)"
                )
            out[k] = v
        return out

    return hook


def _jsonl_lines(text: str):
    """(line number, line) of each non-blank line, split on newlines only (as an editor counts them;
    `str.splitlines` would also split inside a string holding U+2028)."""
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield i, line


def read_json_records(path: str | os.PathLike) -> list[dict]:
    """Records from a JSON array file or a JSON Lines file, with errors that name the line.

    Python's json reader is used (not arrow's) because its errors carry line and column numbers. A record
    of a JSON array is named by its 1-based position ("record 3"), a JSON Lines record by its line.
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; fix the path")
    record_read(p, "data file")
    check_utf8(p)
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{p}: the file is empty; add records ({_json_shape(p)})")
    records: list = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for i, line in _jsonl_lines(text):
            try:
                records.append(json.loads(line, object_pairs_hook=_no_duplicate_keys(f"{p}: line {i}")))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {i} column {e.colno}: {e.msg}; fix that JSON line") from None
            if not isinstance(records[-1], dict):
                raise DataError(f"{p}: line {i} is not a JSON object; each line must be {{...}}")
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys(f"{p}: a record"))
        except json.JSONDecodeError as e:
            hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise DataError(f"{p}: line {e.lineno} column {e.colno}: {e.msg}{hint}; fix the JSON") from None
        if not isinstance(data, list):
            raise DataError(
                f"{p}: the top level is a {type(data).__name__}, expected a list of records [{{...}}]"
            )
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise DataError(f"{p}: record {i} is {_json_type(rec)}, expected an object {{...}}")
        records = data
    if not records:
        raise DataError(f"{p}: no records; the data set is empty")
    return records


def _json_type(value: Any) -> str:
    """A JSON value's kind as JSON names it ("a number", "an array"), not as Python does."""
    for t, name in ((bool, "true/false"), (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, t):
            return name
    return "null" if value is None else "a number"


def _json_shape(p: Path) -> str:
    return "one {...} object per line" if p.suffix.lower() in (".jsonl", ".ndjson") else "a list [{...}, ...]"


TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "json"}
TABLE_SUFFIXES |= {".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}


def _root_cause(e: BaseException) -> str:
    """The innermost message of an exception chain, on one line (datasets wraps pandas/arrow errors)."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    msgs = [" ".join(str(x).split()) for x in seen if str(x).strip()]
    # The first message that is not a generic wrapper says what went wrong.
    for m in msgs:
        if "An error occurred while generating the dataset" not in m:
            return m
    return msgs[-1] if msgs else type(seen[-1]).__name__


def _csv_params(kind: str, quoting: int | None) -> tuple[str, int]:
    """(separator, csv quoting) as `load_any` reads a CSV (standard quotes) or a TSV (no quote handling)."""
    import csv

    sep = "\t" if kind == "tsv" else ","
    return sep, quoting if quoting is not None else (csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL)


def _csv_raw(path: Path, sep: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of every record the csv module reads, blank lines included (as `[]`).

    The line is where the record starts, counted as an editor does: a quoted field holding newlines
    makes one record of several lines, and the reader's `line_num` says where it ended.
    """
    import csv

    limit = csv.field_size_limit(2**31 - 1)  # a long text is data, not an error
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=sep, quoting=quoting)
            end = 0
            for fields in reader:
                start, end = end + 1, reader.line_num
                yield start, fields
    finally:
        csv.field_size_limit(limit)


def _csv_records(path: Path, sep: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """The records pandas keeps: blank (or whitespace-only) lines are skipped."""
    for start, fields in _csv_raw(path, sep, quoting):
        if fields and not (len(fields) == 1 and not fields[0].strip()):
            yield start, fields


def check_delimited(
    path: Path, kind: str, quoting: int | None = None, column_names: list[str] | None = None
) -> dict:
    """Check a CSV/TSV's shape before pandas reads it, so each problem is named where the user sees it.

    Refuses an empty file, a header without rows, a column named twice (pandas would rename the second
    `category.1` and go on) and a row with more fields than the header (pandas would silently shift
    the columns, taking the first field as an index when the first row has one field too many). Rows
    that end with empty extra fields (a trailing comma or tab, as some exporters write) lose nothing:
    they are read as the header says, and the extra read options that does are returned.
    """
    sep, q = _csv_params(kind, quoting)
    name, sep_word = kind.upper(), "tab" if sep == "\t" else "comma"
    records = _csv_records(path, sep, q)
    if column_names is None:
        first = next(records, None)
        if first is None:
            size = path.stat().st_size
            what = "empty (0 bytes)" if size == 0 else f"blank ({size} bytes of white space)"
            raise DataError(
                f"{path}: the file is {what}; a {name} needs a header line naming its columns "
                f"(e.g. {'text<TAB>label' if sep == chr(9) else 'text,label'}) and one row per example below it"
            )
        header, where = first[1], f"the header on line {first[0]}"
    else:
        header, where = list(column_names), "the given column_names"
    twice = list(dict.fromkeys(h for h in header if h and header.count(h) > 1))
    if twice:
        cols = ", ".join(f"{h!r} ({header.count(h)} times)" for h in twice)
        raise DataError(
            f"{path}: {where} names the same column more than once: {cols} in ({', '.join(header)}); "
            "rename the copies so every column has its own name"
        )
    n, rows, trailing = len(header), 0, 0
    for line, fields in records:
        rows += 1
        if len(fields) > n:
            if any(f.strip() for f in fields[n:]):
                fix = (
                    "remove the stray tab (a TSV field cannot hold a tab)"
                    if sep == "\t"
                    else 'put the field that holds a comma in quotes ("a, b") or remove the extra comma'
                )
                raise DataError(
                    f"{path}: cannot read as {name}: Expected {n} fields in line {line}, saw {len(fields)} "
                    f"({where} has {n}: {', '.join(header)}); {fix}"
                )
            trailing += 1
    if rows == 0:
        raise DataError(
            f"{path}: no rows: the file has only its header line ({', '.join(header)}); add one row per example below it"
            if column_names is None
            else f"{path}: no rows; the file is blank, add one row per example"
        )
    if trailing:
        log.info(
            "%s: %d of %d rows end with an empty extra field (a trailing %s); read by the header",
            path,
            trailing,
            rows,
            sep_word,
        )
        return {"index_col": False}
    return {}


def row_place(
    path: str | os.PathLike, i: int, *, column_names: list[str] | None = None, quoting: int | None = None
) -> str:
    """Where the `i`-th (0-based) record of a data file is, counted as the user's editor counts:
    "line N" in a CSV/TSV (the header is line 1; quoted newlines count) or a JSON Lines file,
    "record N" (1-based) in a JSON array, "row N" (1-based) anywhere else. Used only to word an error."""
    p = Path(path)
    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    if not p.is_file():
        return f"row {i + 1}"
    if kind in ("csv", "tsv"):
        sep, q = _csv_params(kind, quoting)
        records = _csv_records(p, sep, q)
        if column_names is None:
            next(records, None)
        for k, (line, _) in enumerate(records):
            if k == i:
                return f"line {line}"
    elif kind == "json" and p.suffix.lower() in (".jsonl", ".ndjson"):
        for k, (line, _) in enumerate(_jsonl_lines(p.read_text(encoding="utf-8"))):
            if k == i:
                return f"line {line}"
    elif kind == "json":
        return f"record {i + 1}"
    return f"row {i + 1}"


def _pandas_error(p: Path, kind: str, cause: str, quoting: int | None) -> str:
    """A pandas/arrow read error as one line, with pandas' record count turned into the editor's line."""
    import re

    m = re.search(r"EOF inside string starting at row (\d+)", cause)
    if m and kind in ("csv", "tsv"):
        r = int(m.group(1))
        line = next((s for k, (s, _) in enumerate(_csv_raw(p, *_csv_params(kind, quoting))) if k == r), None)
        if line is not None:
            return (
                f"{p}: cannot read as {kind.upper()}: EOF inside string starting at line {line}: a quote "
                'opens there and never closes; close it (a quote inside a quoted field is written "")'
            )
    return f"{p}: cannot read as {kind.upper()}: {cause}; fix the file"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def load_any(
    path: str | os.PathLike,
    *,
    column_names: list[str] | None = None,
    quoting: int | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a table through `datasets`: CSV, TSV, JSON, JSONL, Parquet, a `save_to_disk` folder or a hub id.

    Returns a `Dataset` (one file) or a `DatasetDict` (saved dict or hub data set). TSV is read without
    quote handling (a `"` inside a message is text, not a quote); CSV with standard quoting.
    """
    import datasets

    p = Path(path).expanduser()
    if p.exists():
        record_read(p, "data file")
    if p.is_dir():
        if not is_saved_dataset(p):
            raise DataError(
                f"{p}: a folder but not a `datasets` save_to_disk folder; pass a data file instead"
            )
        try:
            return datasets.load_from_disk(str(p))
        except Exception as e:  # any failure here is a bad folder
            raise DataError(f"{p}: cannot load with datasets.load_from_disk: {_root_cause(e)}") from None
    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    if p.is_file():
        if kind is None:
            raise DataError(
                f"{p}: unknown file type {p.suffix!r}; use one of {', '.join(sorted(TABLE_SUFFIXES))}"
            )
        if p.stat().st_size == 0:
            shape = {"csv": "a header line (e.g. text,label) and one row per example", "parquet": "rows"}
            need = shape.get(kind, "a header line (e.g. text<TAB>label) and one row per example")
            if kind == "json":
                need = _json_shape(p)
            raise DataError(f"{p}: the file is empty (0 bytes); it needs {need}")
        if kind == "json":
            return datasets.Dataset.from_list(read_json_records(p))
        kwargs: dict = {}
        if kind in ("csv", "tsv"):
            check_utf8(p)
            kwargs = {"sep": "\t" if kind == "tsv" else ","}
            q = quoting if quoting is not None else (3 if kind == "tsv" else None)
            if q is not None:
                kwargs["quoting"] = q
            if column_names is not None:
                kwargs |= {"column_names": list(column_names), "header": None}
            kwargs |= check_delimited(p, kind, quoting, list(column_names) if column_names else None)
        builder = "csv" if kind in ("csv", "tsv") else kind
        with quiet_datasets():
            try:
                dsd = datasets.load_dataset(
                    builder, data_files=str(p), cache_dir=str(cache_dir) if cache_dir else None, **kwargs
                )
            except Exception as e:  # pandas/arrow errors become one line naming the file
                if "corresponds to no data" in _root_cause(e):
                    raise DataError(f"{p}: no rows; the data set is empty") from None
                raise DataError(_pandas_error(p, kind, _root_cause(e), quoting)) from None
        return dsd["train"]
    if kind is not None or p.is_absolute() or str(path).startswith((".", "~")):
        raise DataError(f"{p}: no such file; fix the path")
    # Not a local path: try it as a Hugging Face hub data set id.
    with quiet_datasets():
        try:
            return datasets.load_dataset(str(path), cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as e:
            raise DataError(
                f"{path}: not a local file or folder, and loading it as a hub data set failed "
                f"({_root_cause(e)}); fix the path, or go online (HF_HUB_OFFLINE=0) for a hub id"
            ) from None


class quiet_datasets:
    """Silence datasets' own error log while we turn its exceptions into one-line DataErrors."""

    def __enter__(self):
        import datasets

        self._level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)

    def __exit__(self, *exc):
        import datasets

        datasets.logging.set_verbosity(self._level)


def not_text(feature) -> str | None:
    """None for a string column, else what it holds in words ("integers (int64)"), for an error message."""
    from datasets import Value

    if feature in (Value("string"), Value("large_string")):
        return None
    kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
    words = {"int": "integers", "uin": "integers", "flo": "numbers", "boo": "true/false values"}
    return f"{words.get(kind[:3], kind + ' values')} ({kind})"


def column_values(ds, name: str) -> list:
    """One column as a list in one Arrow read (datasets 5's `ds[name]` is a lazy, row-by-row Column)."""
    if len(ds) == 0:
        return []
    return ds.select_columns([name])[:][name]


def map_fingerprint(ds, *parts: Any) -> str:
    """A stable fingerprint for a `Dataset.map` whose function (a closure over a tokenizer) cannot be
    hashed: the input's fingerprint plus the settings that change the output. The last part may be the
    tokenizer, named by its encoding."""
    from datasets.fingerprint import Hasher, generate_random_fingerprint

    *settings, tok = parts
    from gptforge.model.tokenizer import Tokenizer

    if isinstance(tok, Tokenizer):
        name = tok.enc.name
    else:
        try:  # another tokenizer: its own hash, or no reuse at all rather than a wrong cache hit
            name = Hasher.hash(tok)
        except Exception:
            return generate_random_fingerprint()
    return Hasher.hash([ds._fingerprint, *settings, name])
