"""Jinja chat templates that render chat messages exactly as gptforge's prompt styles format records.

How messages map onto a prompt style (the server, `serve.chat`, applies the same rule in Python):

- the last `user` message is the record's `instruction`;
- a `system` message (the first one, if any) becomes the `instruction` and the last user message its
  `input`: the book's two-field record ("Translate to German" + "Good morning");
- earlier turns are not shown: the styles are single-turn, as training was;
- an `assistant` message after the last user message is the record's `output` (the training example).

A language model without a style gets the plain format: every message as "Role: content\\n" (System,
User, Assistant), then "Assistant:" as the generation prompt; it stops at "\\nUser:" and <|endoftext|>.

`export` cannot import `tasks` (tests/test_layers.py), so the templates live here and a test checks them
against `tasks.instruct`'s formatters.
"""

from __future__ import annotations

from gptforge.errors import ConversionError

# Collects system / last user / assistant-after-it into a namespace; no whitespace leaks out.
_COLLECT = (
    "{%- set ns = namespace(system=none, user='', output=none) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' and ns.system is none -%}{%- set ns.system = m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.user = m['content'] -%}{%- set ns.output = none -%}"
    "{%- elif m['role'] == 'assistant' -%}{%- set ns.output = m['content'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system is not none -%}"
    "{%- set instruction = ns.system -%}{%- set input = ns.user -%}"
    "{%- else -%}{%- set instruction = ns.user -%}{%- set input = '' -%}"
    "{%- endif -%}"
)

_OUTPUT = "{%- if ns.output is not none -%}{{ ns.output }}{%- endif -%}"

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": _COLLECT
    + "{{ '"
    + ALPACA_PREAMBLE
    + "\\n\\n### Instruction:\\n' }}{{ instruction }}"
    + "{%- if input -%}{{ '\\n\\n### Input:\\n' }}{{ input }}{%- endif -%}"
    + "{{ '\\n\\n### Response:\\n' }}"
    + _OUTPUT,
    "phi3": _COLLECT
    + "{{ '<|user|>\\n' }}{{ instruction }}"
    + "{%- if input -%}{{ '\\n' }}{{ input }}{%- endif -%}"
    + "{{ '\\n<|assistant|>:\\n' }}"
    + _OUTPUT,
}

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP_STRINGS = ["\nUser:", "<|endoftext|>"]
PLAIN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ 'System: ' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'User: ' }}"
    "{%- else -%}{{ 'Assistant: ' }}{%- endif -%}"
    "{{ m['content'] }}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def chat_template_for(prompt_style: dict | None) -> str:
    """The chat template for a model's prompt_style.json (None: the plain format)."""
    if not prompt_style:
        return PLAIN_CHAT_TEMPLATE
    name = prompt_style.get("name", "")
    if name not in CHAT_TEMPLATES:
        raise ConversionError(
            f"prompt_style.json names style {name!r}, which has no chat template; use one of: "
            f"{', '.join(CHAT_TEMPLATES)}"
        )
    return CHAT_TEMPLATES[name]


def _text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (the text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def messages_to_record(messages: list[dict]) -> dict[str, str]:
    """The record (instruction, input[, output]) that a style formats, by the rule in the module doc."""
    system = None
    user = ""
    output = None
    for m in messages:
        role = m.get("role")
        if role == "system" and system is None:
            system = _text(m.get("content"))
        elif role == "user":
            user, output = _text(m.get("content")), None
        elif role == "assistant":
            output = _text(m.get("content"))
    record = (
        {"instruction": system, "input": user} if system is not None else {"instruction": user, "input": ""}
    )
    if output is not None:
        record["output"] = output
    return record


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The plain format (PLAIN_CHAT_TEMPLATE) in Python."""
    text = "".join(
        f"{PLAIN_ROLES.get(m.get('role'), 'Assistant')}: {_text(m.get('content'))}\n" for m in messages
    )
    return text + ("Assistant:" if add_generation_prompt else "")
