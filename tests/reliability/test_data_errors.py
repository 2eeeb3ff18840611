"""Data errors name the real problem where the user sees it (issue 13, item 5).

Each case is met as a new user meets it: a file handed to `gptforge finetune classify`, `finetune instruct`
or `pretrain`. The loader's message must name the file, the line (CSV/TSV/JSONL, as an editor counts them)
or the 1-based record (JSON array), the column and the fix in CLI/YAML terms; the CLI prints that one line
and exits 2, before any output directory exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.errors import DataError
from gptforge.tasks.classify import load_classification_data
from gptforge.tasks.instruct import load_instruction_data
from gptforge.tasks.pretrain import load_corpus

TINY = ["--model.init", "scratch", "--model.preset", "test-tiny", "--train.max_steps", "1"]
ROWS = "".join(f"message {i},{'spam' if i % 2 else 'ham'}\n" for i in range(8))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    """No progress bars on stderr (the error must be its only line); a private `datasets` cache."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _cli(capsys, tmp_path: Path, *argv: str) -> str:
    """Run the CLI; require exit 2, one stderr line, no output dir; return the message after the prefix."""
    out = tmp_path / "out"
    code = main([*argv, *TINY, "--train.out_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    verb = "finetune" if argv[0] == "finetune" else argv[0]
    prefix = f"gptforge {verb}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert not out.exists()
    return lines[0][len(prefix) :]


def _classify(capsys, tmp_path, f: Path, *extra: str) -> str:
    with pytest.raises(DataError) as e:
        text = "text"
        label = "label"
        for k, v in zip(extra[::2], extra[1::2]):
            text = v if k == "--data.text_column" else text
            label = v if k == "--data.label_column" else label
        load_classification_data(f, text_column=text, label_column=label, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg
    assert _cli(capsys, tmp_path, "finetune", "classify", "--data.dataset", str(f), *extra) == msg
    return msg


# -- empty files --------------------------------------------------------------------------------------


def test_a_zero_byte_csv_says_the_file_is_empty(tmp_path, capsys):
    f = tmp_path / "empty.csv"
    f.write_bytes(b"")
    msg = _classify(capsys, tmp_path, f)
    assert msg == (
        f"{f}: the file is empty (0 bytes); it needs a header line (e.g. text,label) and one row per example"
    )


def test_a_header_only_csv_says_it_has_no_rows(tmp_path, capsys):
    f = tmp_path / "header.csv"
    f.write_text("text,label\n")
    msg = _classify(capsys, tmp_path, f)
    assert (
        msg
        == f"{f}: no rows: the file has only its header line (text, label); add one row per example below it"
    )


def test_a_blank_tsv_says_so(tmp_path, capsys):
    f = tmp_path / "blank.tsv"
    f.write_text("\n  \n")
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: the file is blank (4 bytes of white space); a TSV needs a header line naming its columns "
        "(e.g. text<TAB>label) and one row per example below it"
    )


# -- trailing separators, stray separators, duplicated names ------------------------------------------


def test_rows_with_a_trailing_comma_are_read_as_the_header_says(tmp_path):
    """pandas would take the first field as an index (every row has one field more than the header) and
    shift text into label; the extra fields are empty, so reading by the header (pandas' own remedy,
    index_col=False) loses nothing."""
    rows = "".join(f"message {i},{'spam' if i % 2 else 'ham'},\n" for i in range(10))
    for name, header in (("rows.csv", "text,label\n"), ("both.csv", "text,label,\n")):
        f = tmp_path / name
        f.write_text(header + rows)
        dsd, names = load_classification_data(f, fractions=(0.6, 0.2, 0.2), cache_dir=tmp_path / "c")
        assert names == ["ham", "spam"]
        got = sorted((t, names[y]) for s in dsd.values() for t, y in zip(s["text"], s["label"]))
        assert got == sorted((f"message {i}", "spam" if i % 2 else "ham") for i in range(10))


def test_a_trailing_comma_row_missing_its_label_is_named_by_its_line(tmp_path, capsys):
    f = tmp_path / "trailing.csv"
    f.write_text("text,label\nhello,spam,\nbye,ham,\nwin now,,\n" + ROWS.replace("\n", ",\n"))
    assert _classify(capsys, tmp_path, f) == f"{f}: line 4 has no label; fill it in or remove the row"


def test_an_unquoted_comma_in_the_first_row_is_named(tmp_path, capsys):
    f = tmp_path / "comma.csv"
    f.write_text("text,label\nhello, world,spam\n" + ROWS)
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: cannot read as CSV: Expected 2 fields in line 2, saw 3 (the header on line 1 has 2: text, label); "
        'put the field that holds a comma in quotes ("a, b") or remove the extra comma'
    )


def test_a_stray_tab_in_the_first_row_of_a_tsv_is_named(tmp_path, capsys):
    f = tmp_path / "stray.tsv"
    f.write_text("text\tlabel\nhello\tthere\tspam\n" + ROWS.replace(",", "\t"))
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: cannot read as TSV: Expected 2 fields in line 2, saw 3 (the header on line 1 has 2: text, label); "
        "remove the stray tab (a TSV field cannot hold a tab)"
    )


def test_a_column_named_twice_is_refused(tmp_path, capsys):
    f = tmp_path / "dup.csv"
    f.write_text("message,category,category\n" + ROWS.replace("\n", ",x\n"))
    msg = _classify(capsys, tmp_path, f, "--data.text_column", "message", "--data.label_column", "category")
    assert msg == (
        f"{f}: the header on line 1 names the same column more than once: 'category' (2 times) in "
        "(message, category, category); rename the copies so every column has its own name"
    )


def test_a_key_given_twice_in_a_json_record_is_refused(tmp_path, capsys):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n')
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: line 2 has the key 'label' twice; keep one (json would silently drop the first)"
    )


# -- types and columns --------------------------------------------------------------------------------


def test_an_integer_text_column_in_parquet_says_integers(tmp_path, capsys):
    import datasets

    f = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"text": [7, 8, 9, 10], "label": ["a", "b", "a", "b"]}).to_parquet(str(f))
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: column 'text' holds integers (int64), e.g. 7, not text; set --data.text_column "
        "(data.text_column in YAML) to the column that holds the text, or store the texts as strings"
    )


def test_a_missing_column_names_the_cli_field(tmp_path, capsys):
    f = tmp_path / "body.csv"
    f.write_text("body,label\n" + ROWS)
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: no column 'text' (columns: ['body', 'label']); set --data.text_column "
        "(data.text_column in YAML) to the column that holds the text"
    )
    assert "label_column=" not in _classify(
        capsys, tmp_path, f, "--data.text_column", "body", "--data.label_column", "kind"
    )


# -- where a record is: the editor's line, or the 1-based record -------------------------------------


def test_csv_lines_count_quoted_newlines_and_blank_lines(tmp_path, capsys):
    f = tmp_path / "multi.csv"
    f.write_text('text,label\n"two\nlines",spam\n\nhello,\n' + ROWS)
    assert _classify(capsys, tmp_path, f) == f"{f}: line 5 has no label; fill it in or remove the row"


def test_an_unclosed_quote_is_named_by_its_line(tmp_path, capsys):
    f = tmp_path / "quote.csv"
    f.write_text('text,label\n"two\nlines",spam\n\nhello,ham\n"never closed,spam\nbye,ham\n')
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: cannot read as CSV: EOF inside string starting at line 6: a quote opens there and never "
        'closes; close it (a quote inside a quoted field is written "")'
    )


def test_jsonl_rows_are_named_by_their_line(tmp_path, capsys):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": " ", "label": "y"}\n{"text": "c", "label": "x"}\n')
    assert _classify(capsys, tmp_path, f) == (
        f"{f}: line 3 has an empty or missing 'text'; fill it or remove the row"
    )


def test_instruction_records_count_from_one_and_name_the_cli_field(tmp_path, capsys):
    f = tmp_path / "ins.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]))
    want = (
        f"{f}: record 2 has no field 'output'; add it, or set --data.output_column "
        "(data.output_column in YAML) to the field that holds it (fields: ['answer', 'instruction'])"
    )
    with pytest.raises(DataError) as e:
        load_instruction_data(f)
    assert str(e.value) == want
    assert _cli(capsys, tmp_path, "finetune", "instruct", "--data.dataset", str(f)) == want
    g = tmp_path / "ins.jsonl"
    g.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "", "output": "d"}\n')
    with pytest.raises(
        DataError, match=r"ins\.jsonl: line 4 field 'instruction' must be a non-empty string$"
    ):
        load_instruction_data(g)


def test_pretraining_tables_name_the_line_and_the_type(tmp_path, capsys):
    import datasets

    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": null}\n')
    with pytest.raises(DataError) as e:
        load_corpus(f, cache_dir=tmp_path / "c")
    assert str(e.value) == f"{f}: line 3 has no text in 'text'; fill it or remove the row"
    g = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"text": [1, 2, 3]}).to_parquet(str(g))
    want = (
        f"{g}: column 'text' holds integers (int64), not text; rename the column that holds the text to "
        "'text' (a table in data.sources is read by its 'text' column), or store the texts as strings"
    )
    with pytest.raises(DataError) as e:
        load_corpus(g, cache_dir=tmp_path / "c")
    assert str(e.value) == want
    assert _cli(capsys, tmp_path, "pretrain", "--data.sources", json.dumps([str(g)])) == want
