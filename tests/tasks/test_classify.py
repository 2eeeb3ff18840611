"""Classification data: the reference SMS split, stratified splits, any labeled table, tokenize, collate."""

import hashlib
import logging

import pytest
import torch

from gptforge.errors import DataError
from gptforge.model.tokenizer import Tokenizer
from gptforge.tasks.classify import (
    ClassificationCollator,
    load_classification_data,
    load_sms_spam,
    longest_length,
    tokenize_classification,
    unlabeled_sms_texts,
)

# sha256 of the reference (rasbt ch06) test split's texts joined by "\n", computed with its pandas code.
BOOK_TEST_SHA256 = "d7fc991c79a3d99b4b307ccbd9fcc3ea6529f02b8743361e77f12e66ffcde620"


def _counts(dsd):
    return {k: (len(v), sum(v[:]["label"])) for k, v in dsd.items()}


@pytest.fixture(scope="module")
def book(shared_data_dir):
    return load_sms_spam("book", path=shared_data_dir / "sms_spam" / "SMSSpamCollection")


def test_book_split_reproduces_the_reference(book):
    # (rows, spam rows): 1,494 balanced rows (747 + 747) -> 1,045 / 149 / 300.
    assert _counts(book) == {"train": (1045, 517), "validation": (149, 79), "test": (300, 151)}
    assert book["train"].features["label"].names == ["ham", "spam"]
    assert book["train"][0] == {"text": "Dude how do you like the buff wind.", "label": 0}
    assert hashlib.sha256("\n".join(book["test"]["text"]).encode()).hexdigest() == BOOK_TEST_SHA256


def test_book_split_resolves_through_data_dir(data_env, book):
    assert load_sms_spam()["test"]["text"] == book["test"]["text"]


def test_stratified_split_reads_every_message(data_env):
    full = load_sms_spam("stratified", balance=False)
    assert _counts(full) == {"train": (3902, 523), "validation": (557, 75), "test": (1115, 149)}
    assert sum(len(v) for v in full.values()) == 5574  # all messages: no quote merging
    bal = load_sms_spam("stratified")
    assert _counts(bal) == {"train": (1046, 523), "validation": (149, 75), "test": (299, 149)}
    again = load_sms_spam("stratified")
    assert again["test"][:]["text"] == bal["test"][:]["text"]  # seeded
    other = load_sms_spam("stratified", seed=7)
    assert other["test"][:]["text"] != bal["test"][:]["text"]
    custom = load_sms_spam("stratified", fractions=(0.8, 0.2, 0.0), balance=False)
    assert {k: len(v) for k, v in custom.items()} == {"train": 4459, "validation": 1115, "test": 0}


def test_bad_split_name_and_fractions(data_env):
    with pytest.raises(DataError, match="split='random': use 'book'"):
        load_sms_spam("random")
    with pytest.raises(DataError, match=r"fractions=\(0.7, 0.7\)"):
        load_sms_spam("stratified", fractions=(0.7, 0.7))


def test_unlabeled_sms_texts_hold_out_the_test_split(data_env, book):
    texts = unlabeled_sms_texts()["text"]
    test = set(book["test"]["text"])
    assert not test & set(texts)
    assert len(texts) == 5195  # 5,572 rows of the reference read minus every copy of a test message
    assert "Dude how do you like the buff wind." in texts  # training messages stay


def test_tokenize_truncation_is_counted_and_logged(book, caplog):
    tok = Tokenizer()
    tokenized = tokenize_classification(book, max_length=None)
    assert longest_length(tokenized["train"]) == 120  # the reference's padded length
    assert tokenized["test"][5]["input_ids"] == tok.encode(book["test"][5]["text"])
    expected = {k: sum(len(tok.encode(t)) > 40 for t in v["text"]) for k, v in book.items()}
    assert expected["train"] > 0
    with caplog.at_level(logging.WARNING, logger="gptforge.tasks.classify"):
        cut, counts = tokenize_classification(book, max_length=40, return_truncated=True)
    assert counts == expected
    assert f"train: {expected['train']} of 1045 examples longer than max_length=40" in caplog.text
    assert longest_length(cut["train"]) == 40
    assert cut["train"].column_names == ["text", "label", "input_ids"]


def test_collator_pads_right_with_mask_and_targets():
    items = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": torch.tensor([8]), "label": 0}]
    b = ClassificationCollator()(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 50256, 50256]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["targets"].tolist() == [1, 0] and b["targets"].dtype == torch.long
    fixed = ClassificationCollator(pad_to=5)(items)
    assert fixed["input_ids"].tolist() == [[5, 6, 7, 50256, 50256], [8, 50256, 50256, 50256, 50256]]
    assert fixed["attention_mask"].sum(1).tolist() == [3, 1]
    cut = ClassificationCollator(max_length=2, pad_to=4)(items)
    assert cut["input_ids"].tolist() == [[5, 6, 50256, 50256], [8, 50256, 50256, 50256]]
    with pytest.raises(DataError, match="more than pad_to=2"):
        ClassificationCollator(pad_to=2)(items)


def test_collated_book_batch_matches_reference_padding(book):
    tokenized = tokenize_classification(book, max_length=None)
    n = longest_length(tokenized["train"])
    b = ClassificationCollator(pad_to=n)([tokenized["train"][i] for i in range(8)])
    assert b["input_ids"].shape == (8, 120)
    lengths = [len(tokenized["train"][i]["input_ids"]) for i in range(8)]
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert all((b["input_ids"][i, lengths[i] :] == 50256).all() for i in range(8))


# ---------------------------------------------------------------------------- any labeled data set


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_string_labels_is_split_stratified(tmp_path):
    rows = "".join(f'"msg {i}, with comma",{"pos" if i % 3 else "neg"}\n' for i in range(60))
    f = _write(tmp_path / "d.csv", "text,label\n" + rows)
    dsd, names = load_classification_data(f, cache_dir=tmp_path / "hf")
    assert names == ["neg", "pos"]
    assert {k: len(v) for k, v in dsd.items()} == {"train": 42, "validation": 6, "test": 12}
    assert sorted(dsd["train"]["label"]).count(0) == 14  # 20 neg rows stratified 70/10/20
    assert dsd["train"].features["label"].names == ["neg", "pos"]
    assert all(t.startswith("msg ") and ", with comma" in t for t in dsd["test"]["text"])
    fixed, names = load_classification_data(f, labels=["pos", "neg"], cache_dir=tmp_path / "hf")
    assert names == ["pos", "neg"] and sorted(fixed["train"]["label"]).count(1) == 14


def test_tsv_without_header_and_int_labels(tmp_path):
    rows = "".join(f'{i % 2}\tsay "hi" {i}\n' for i in range(40))  # a quote inside a TSV field is text
    f = _write(tmp_path / "d.tsv", rows)
    dsd, names = load_classification_data(
        f, column_names=["label", "text"], fractions=(0.5, 0.25, 0.25), cache_dir=tmp_path / "hf"
    )
    assert names == ["0", "1"]
    assert {k: len(v) for k, v in dsd.items()} == {"train": 20, "validation": 10, "test": 10}
    assert all(t.startswith('say "hi" ') for t in dsd["train"]["text"])


def test_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets

    recs = [{"sentence": f"s{i}", "y": ["a", "b", "c"][i % 3]} for i in range(30)]
    jl = _write(tmp_path / "d.jsonl", "\n".join(__import__("json").dumps(r) for r in recs))
    dsd, names = load_classification_data(
        jl, text_column="sentence", label_column="y", fractions=(0.6, 0.2, 0.2)
    )
    assert names == ["a", "b", "c"] and {k: len(v) for k, v in dsd.items()} == {
        "train": 18,
        "validation": 6,
        "test": 6,
    }
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    dsd2, _ = load_classification_data(
        tmp_path / "d.parquet",
        text_column="sentence",
        label_column="y",
        fractions=(0.6, 0.2, 0.2),
        cache_dir=tmp_path,
    )
    assert sorted(dsd2["test"]["text"]) == sorted(dsd["test"]["text"])
    # A saved DatasetDict with its own train/test keeps them and takes validation out of train.
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
            ),
            "test": datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [1, 0, 1]}),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    dsd3, names3 = load_classification_data(tmp_path / "saved", fractions=(0.8, 0.2, 0.0))
    assert names3 == ["0", "1"]
    assert {k: len(v) for k, v in dsd3.items()} == {"train": 16, "validation": 4, "test": 3}
    assert dsd3["test"]["text"] == ["x", "y", "z"] and dsd3["test"]["label"] == [1, 0, 1]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        (
            "one.csv",
            "text,label\na,x\nb,x\nc,x\n",
            {},
            r"one\.csv: column 'label' has only one class \('x'\)",
        ),
        (
            "col.csv",
            "body,label\na,x\nb,y\n",
            {},
            r"col\.csv: no column 'text' \(columns: \['body', 'label'\]\)",
        ),
        (
            "row.csv",
            "text,label\na,x\nb,y,z\nc,x\n",
            {},
            r"row\.csv: cannot read as CSV: .*Expected 2 fields in line 3, saw 3",
        ),
        ("quote.csv", 'text,label\na,x\n"b,y\n', {}, r"quote\.csv: cannot read as CSV: .*EOF inside string"),
        ("nolab.csv", "text,label\na,x\nb,\nc,y\n", {}, r"nolab\.csv: line 3 has no label"),
        (
            "notext.jsonl",
            '{"text": "a", "label": 1}\n{"text": "", "label": 0}\n',
            {},
            r"notext\.jsonl: line 2 has an empty or missing 'text'",
        ),
        ("empty.csv", "text,label\n", {}, r"empty\.csv: no rows"),
        (
            "lab.csv",
            "text,label\na,x\nb,y\n",
            {"labels": ["x"]},
            r"lab\.csv: line 3 label 'y' is not one of labels=\['x'\]",
        ),
        (
            "float.jsonl",
            '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1.0}\n',
            {},
            r"float\.jsonl: line 1 label 0\.5 is not a class",
        ),
        ("d.xlsx", "x", {}, r"d\.xlsx: unknown file type '\.xlsx'"),
    ],
)
def test_bad_tables_raise_one_line_data_errors(tmp_path, name, content, kwargs, message):
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as e:
        load_classification_data(f, cache_dir=tmp_path / "hf", **kwargs)
    assert "\n" not in str(e.value)


def test_non_utf8_missing_file_and_hub_id(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: line 2 \(byte 14\) is not valid UTF-8"):
        load_classification_data(f)
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load_classification_data(tmp_path / "nope.csv")
    with pytest.raises(
        DataError, match="not a local file or folder, and loading it as a hub data set failed"
    ):
        load_classification_data("no-such-owner/no-such-dataset", cache_dir=tmp_path / "hf")
    with pytest.raises(DataError, match="a folder but not a `datasets` save_to_disk folder"):
        load_classification_data(tmp_path)


def test_empty_text_cannot_reach_the_collator():
    import datasets

    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["ok", ""], "label": [0, 1]})})
    with pytest.raises(DataError, match=r"\[train\] row 2: the text encodes to no tokens"):
        tokenize_classification(dsd, max_length=None)
