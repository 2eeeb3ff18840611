"""Instruction data: the reference split, exact prompt text, tokenization and the masking collate."""

import json
import logging

import pytest
import torch

from gptforge.errors import DataError
from gptforge.model.tokenizer import Tokenizer
from gptforge.tasks.instruct import (
    PROMPT_STYLES,
    InstructionCollator,
    get_prompt_style,
    load_instruction_data,
    tokenize_instruction,
)

P = 50256
REC = {"instruction": "Name a color.", "input": "", "output": "Blue."}
REC_IN = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}


@pytest.fixture(scope="module")
def records(shared_data_dir):
    return json.loads((shared_data_dir / "instruction" / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dsd(shared_data_dir):
    return load_instruction_data(shared_data_dir / "instruction" / "instruction-data.json")


def test_reference_split_in_file_order(dsd, records):
    assert {k: len(v) for k, v in dsd.items()} == {"train": 935, "validation": 55, "test": 110}
    assert dsd["train"][0] == records[0]
    assert dsd["test"][0] == records[935] and dsd["test"][109] == records[1044]
    assert dsd["validation"][0] == records[1045] and dsd["validation"][54] == records[1099]


def test_default_path_resolves_and_shuffle_is_seeded(data_env, dsd):
    assert load_instruction_data()["test"][:]["output"] == dsd["test"][:]["output"]
    a = load_instruction_data(shuffle=True, seed=1)
    b = load_instruction_data(shuffle=True, seed=1)
    assert a["train"][:]["instruction"] == b["train"][:]["instruction"] != dsd["train"][:]["instruction"]
    assert sorted(
        a["train"][:]["instruction"] + a["validation"][:]["instruction"] + a["test"][:]["instruction"]
    ) == (
        sorted(
            dsd["train"][:]["instruction"]
            + dsd["validation"][:]["instruction"]
            + dsd["test"][:]["instruction"]
        )
    )
    pref = load_instruction_data(data_env / "instruction" / "instruction-data-with-preference.json")
    assert pref["train"].column_names == ["instruction", "input", "output", "rejected", "chosen"]


def test_alpaca_prompt_text_is_exact():
    alpaca = get_prompt_style("alpaca")
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert alpaca.format_prompt(REC) == f"{head}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    assert alpaca.format_example(REC_IN) == (
        f"{head}\n\n### Instruction:\nTranslate to French.\n\n### Input:\ncat\n\n### Response:\nchat"
    )
    assert alpaca.format_prompt({"instruction": "x"}) == alpaca.format_prompt(
        {"instruction": "x", "input": None}
    )


def test_phi3_prompt_text_is_exact():
    phi3 = get_prompt_style("phi3")
    assert phi3.format_example(REC) == "<|user|>\nName a color.\n<|assistant|>:\nBlue."
    assert phi3.format_example(REC_IN) == "<|user|>\nTranslate to French.\ncat\n<|assistant|>:\nchat"


def test_styles_round_trip_and_unknown_style_lists_them():
    for name, style in PROMPT_STYLES.items():
        d = style.to_dict()
        assert d["name"] == name and json.loads(json.dumps(d)) == d and d["stop_strings"]
        assert get_prompt_style(d) is style
    with pytest.raises(DataError, match="unknown prompt style 'chatml'; use one of: alpaca, phi3"):
        get_prompt_style("chatml")


def test_tokenize_matches_whole_text_encoding(dsd):
    tok = Tokenizer()
    style = get_prompt_style("alpaca")
    out = tokenize_instruction(dsd, "alpaca")
    rows = out["train"][:]
    for i in range(0, 935, 7):
        rec = dsd["train"][i]
        assert rows["input_ids"][i] == tok.encode(style.format_example(rec))  # as the reference encodes it
        assert rows["prompt_length"][i] == len(tok.encode(style.format_prompt(rec)))
    assert max(len(x) for x in rows["input_ids"]) == 91


def test_tokenize_truncation_is_counted(dsd, caplog):
    with caplog.at_level(logging.WARNING, logger="gptforge.tasks.instruct"):
        out, counts = tokenize_instruction(dsd, "phi3", max_length=40, return_truncated=True)
    full = tokenize_instruction(dsd, "phi3")
    expected = {k: sum(len(x) > 40 for x in v[:]["input_ids"]) for k, v in full.items()}
    assert counts == expected and counts["train"] > 0
    assert max(len(x) for x in out["train"][:]["input_ids"]) == 40
    assert f"train: {expected['train']} of 935 examples longer than max_length=40" in caplog.text


def test_collate_by_hand():
    items = [{"input_ids": [1, 2, 3], "prompt_length": 2}, {"input_ids": [4, 5], "prompt_length": 1}]
    b = InstructionCollator()(items)
    # Each example + one <|endoftext|>, padded to longest + 1 = 4; inputs drop the last, targets shift by one.
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, P]]
    assert b["targets"].tolist() == [[2, 3, P], [5, P, -100]]
    assert b["input_ids"].dtype == b["targets"].dtype == torch.long
    m = InstructionCollator(mask_prompt=True)(items)
    # Targets predicting prompt tokens (targets[:prompt_length - 1]) are ignored; the response is kept.
    assert m["targets"].tolist() == [[-100, 3, P], [5, P, -100]]
    t = InstructionCollator(allowed_max_length=2, ignore_index=-1)(items)
    assert t["input_ids"].tolist() == [[1, 2], [4, 5]] and t["targets"].tolist() == [[2, 3], [5, P]]


def test_collate_real_batch_masks_prompt_and_padding(dsd):
    tok = tokenize_instruction(dsd, "alpaca")
    items = [tok["train"][i] for i in range(4)]
    b = InstructionCollator(mask_prompt=True)(items)
    longest = max(len(it["input_ids"]) for it in items)
    assert b["input_ids"].shape == b["targets"].shape == (4, longest)
    for row, it in zip(b["targets"], items):
        n, p = len(it["input_ids"]), it["prompt_length"]
        kept = (row != -100).nonzero().flatten().tolist()
        assert kept == list(range(p - 1, n))  # response tokens + the one <|endoftext|>
        assert row[n - 1].item() == P
        assert row[p - 1 : n - 1].tolist() == it["input_ids"][p:]
    with pytest.raises(DataError, match="mask_prompt=True needs `prompt_length`"):
        InstructionCollator(mask_prompt=True)([{"input_ids": [1, 2]}])


def _write(tmp_path, name, obj):
    f = tmp_path / name
    f.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return f


def test_columns_mapping_and_missing_input(tmp_path):
    recs = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]
    f = _write(tmp_path, "qa.jsonl", "\n".join(json.dumps(r) for r in recs))
    d = load_instruction_data(
        f, columns={"question": "instruction", "answer": "output"}, fractions=(0.5, 0.25)
    )
    assert {k: len(v) for k, v in d.items()} == {"train": 10, "validation": 5, "test": 5}
    assert d["train"][0] == {"instruction": "q0", "input": "", "output": "a0"}
    assert d["test"][0]["instruction"] == "q10" and d["validation"][0]["instruction"] == "q15"


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        (
            "a.json",
            [{"instruction": "x", "input": ""}],
            {},
            r"a\.json: record 1 has no field 'output'; add it, or set --data\.output_column",
        ),
        ("b.json", [{"q": "x", "output": "y"}], {"columns": {"q": "instruction"}}, None),
        ("c.json", [{"q": "x"}], {"columns": {"q": "instruction"}}, r"record 1 has no field 'output'"),
        (
            "d.json",
            [{"instruction": "", "output": "y"}],
            {},
            r"record 1 field 'instruction' must be a non-empty string",
        ),
        ("e.json", [{"instruction": "x", "input": 3, "output": "y"}], {}, r"field 'input' must be a string"),
        ("f.json", '[{"instruction": "x" "output": "y"}]', {}, r"f\.json: line 1 column 22: Expecting ','"),
        (
            "g.json",
            [{"instruction": "x", "output": "y"}],
            {"columns": {"q": "prompt"}},
            r"targets must be among",
        ),
        (
            "h.json",
            [{"instruction": "x", "output": "y"}],
            {"fractions": (0.9, 0.2)},
            r"fractions=\(0.9, 0.2\)",
        ),
        ("i.json", [], {}, r"i\.json: no records"),
    ],
)
def test_bad_instruction_files(tmp_path, name, content, kwargs, message):
    f = _write(tmp_path, name, content)
    if message is None:
        assert load_instruction_data(f, fractions=(1.0, 0.0), **kwargs)["train"][0]["instruction"] == "x"
        return
    with pytest.raises(DataError, match=message):
        load_instruction_data(f, **kwargs)


def test_non_utf8_and_missing_file(tmp_path):
    f = tmp_path / "latin.json"
    f.write_bytes('[{"instruction": "caf\xe9", "output": "y"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json: line 1 \(byte 21\) is not valid UTF-8"):
        load_instruction_data(f)
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        load_instruction_data(tmp_path / "nope.json")
