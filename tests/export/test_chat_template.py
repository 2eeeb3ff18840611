"""The exported chat template renders messages exactly as gptforge's prompt styles format records."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gptforge.export.chat_template import CHAT_TEMPLATES, messages_to_record, render_plain
from gptforge.export.hf import export, write_tokenizer
from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT
from gptforge.tasks.instruct import PROMPT_STYLES, get_prompt_style

RECORDS = [
    {"instruction": "Name the capital of France.", "input": ""},
    {"instruction": "Translate to German.", "input": "Good morning, {{ friend }}!\n\nSee you."},
]


def as_messages(record: dict) -> list[dict]:
    """A record as chat messages, by the documented rule (system = instruction when there is an input)."""
    if record["input"]:
        msgs = [
            {"role": "system", "content": record["instruction"]},
            {"role": "user", "content": "an earlier turn, not shown"},
            {"role": "assistant", "content": "an earlier answer, not shown"},
            {"role": "user", "content": record["input"]},
        ]
    else:
        msgs = [{"role": "user", "content": record["instruction"]}]
    return msgs


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    from transformers import AutoTokenizer

    out = {}
    for name in [*PROMPT_STYLES, None]:
        d = tmp_path_factory.mktemp(f"tok_{name}")
        from gptforge.export.chat_template import chat_template_for

        write_tokenizer(d, 1024, chat_template_for({"name": name} if name else None))
        out[name] = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return out


def test_every_style_has_a_template():
    assert set(CHAT_TEMPLATES) == set(PROMPT_STYLES)


@pytest.mark.parametrize("style", sorted(PROMPT_STYLES))
@pytest.mark.parametrize("record", RECORDS, ids=["single-field", "multi-field"])
def test_apply_chat_template_equals_the_prompt_style(tok_dirs, style, record):
    messages = as_messages(record)
    assert messages_to_record(messages) == record
    fmt = get_prompt_style(style)
    got = tok_dirs[style].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == fmt.format_prompt(record)
    # With the answer as a last assistant message: the training example.
    answer = "Paris.\nIndeed."
    full = messages + [{"role": "assistant", "content": answer}]
    got = tok_dirs[style].apply_chat_template(full, tokenize=False, add_generation_prompt=False)
    assert got == fmt.format_example({**record, "output": answer})


def test_plain_format_for_a_language_model_without_a_style(tok_dirs):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    want = "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert render_plain(messages) == want
    got = tok_dirs[None].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == want


def test_export_writes_the_styles_template_and_none_for_a_classifier(tmp_path):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)
    cfg.update(pad_token_id=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="vocab_size=")
        lm = export(GPT(GPTConfig(**cfg)), tmp_path / "lm", prompt_style={"name": "phi3"}, verify=False)
        clf_model = GPT(GPTConfig(**cfg))
        clf_model.add_classification_head(2)
        clf = export(clf_model, tmp_path / "clf", verify=False)
    assert json.loads((lm / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATES["phi3"]
    assert "chat_template" not in json.loads((clf / "tokenizer_config.json").read_text())
