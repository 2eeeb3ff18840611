"""The command line of every verb: flags and positionals onto its config, `--help` and `--print-config`.

`parse_argv` turns a verb's argv into a mapping (a `--config FILE` merged in order with dotted flags and
positional arguments) and hands it to `config_from_mapping`, the one path every config source takes, so a
flag's error reads like a YAML key's. `VERBS` says, per verb, which config class it fills, which fields
positional arguments fill, and the short flag spellings it keeps.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError
from gptforge.pipeline.config import (
    ClassifyConfig,
    ClassifyTextsConfig,
    ConvertConfig,
    DPOConfig,
    EvaluateConfig,
    ExportConfig,
    GenerateConfig,
    InfoConfig,
    InstructConfig,
    MergeConfig,
    PretrainConfig,
    ServeConfig,
    config_from_mapping,
    origin_lookup,
    set_key,
    to_dict,
)
from gptforge.schema import (
    _dataclass_in,
    field_docs,
    hints,
    known_keys,
    leaf_keys,
    load_yaml_mapping,
    merge,
    suggest,
    type_at,
    type_name,
)


@dataclass(frozen=True)
class Cli:
    """How a verb's command line maps onto its config: positional fields and short flag spellings."""

    cls: type
    prog: str
    positionals: tuple[str, ...] = ()
    """Fields filled by positional arguments in order; a list field takes the rest."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Flag (dashes as underscores) -> dotted key, for the spellings the verb had before its config."""


_EVAL_DATA = ("text_column", "label_column", "max_length", "prompt_style", "limit")
VERBS: dict[str, Cli] = {
    "pretrain": Cli(PretrainConfig, "gptforge pretrain", aliases={"resume": "train.resume"}),
    "finetune classify": Cli(
        ClassifyConfig, "gptforge finetune classify", aliases={"resume": "train.resume"}
    ),
    "finetune instruct": Cli(
        InstructConfig, "gptforge finetune instruct", aliases={"resume": "train.resume"}
    ),
    "finetune dpo": Cli(DPOConfig, "gptforge finetune dpo", aliases={"resume": "train.resume"}),
    "evaluate": Cli(
        EvaluateConfig,
        "gptforge evaluate",
        ("checkpoint",),
        {"data": "data.dataset", "test_data": "data.test_sources", **{k: f"data.{k}" for k in _EVAL_DATA}},
    ),
    "classify": Cli(ClassifyTextsConfig, "gptforge classify", ("checkpoint", "texts")),
    "export": Cli(
        ExportConfig,
        "gptforge export",
        ("checkpoint",),
        {"format": "formats", "quant": "gguf.quant", "ollama": "gguf.ollama"},
    ),
    "convert": Cli(ConvertConfig, "gptforge convert"),
    "generate": Cli(GenerateConfig, "gptforge generate", ("checkpoint", "prompts")),
    "merge": Cli(MergeConfig, "gptforge merge", ("adapter",)),
    "info": Cli(InfoConfig, "gptforge info", ("target",)),
    "serve": Cli(ServeConfig, "gptforge serve", ("model",)),
}


def cli_config(verb: str, argv: list[str]) -> Any | None:
    """A verb's config from its argv; None when `--help` or `--print-config` was answered (printed)."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    if any(a in ("-h", "--help") for a in head):
        print(format_help(verb), end="")
        return None
    cfg, show = parse_argv(verb, argv)
    if show:
        print(dump_config(cfg), end="")
        return None
    return cfg


def parse_config(task: str, argv: list[str]) -> tuple[Any, bool]:
    """Parse `argv` into the task's config dataclass; returns (config, print_config_requested)."""
    return parse_argv(task if task == "pretrain" else f"finetune {task}", argv)


def parse_argv(verb: str, argv: list[str]) -> tuple[Any, bool]:
    """A verb's argv -> (config, print_config_requested). `--config FILE` and flags apply in the order given.

    Flags are exact dotted keys (`--train.lr 1e-4`, `--judge.url=...`; dashes may stand for underscores);
    a bool key alone means true and `--no-KEY` false; an optional section alone (`--judge`) turns it on
    with its defaults; repeating a list key adds items.
    """
    spec = VERBS[verb]
    cls = spec.cls
    data: dict = {}
    origins: dict[str, str] = {}
    positionals: list[str] = []
    show = False
    repeated: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals += argv[i:]
            break
        if not arg.startswith("-") or arg == "-" or _is_number(arg):
            positionals.append(arg)
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unknown option {arg!r}; see `{spec.prog} --help`")
        name, eq, text = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key == "print_config":
            show = _bool_text(text, "--print-config") if eq else True
            continue
        if key == "config":
            if not eq:
                if i >= len(argv):
                    raise ConfigError("--config needs a YAML file")
                text, i = argv[i], i + 1
            if not Path(text).is_file():
                raise ConfigError(f"--config {text}: file not found")
            loaded = load_yaml_mapping(text)
            merge(data, loaded)
            origins.update({k: f"{text}: " for k in leaf_keys(loaded)})
            continue
        key = spec.aliases.get(key, key)
        tp = type_at(cls, key)
        value: Any
        if tp is None and key.startswith("no_") and _is_bool(type_at(cls, key[3:])) and not eq:
            key, tp, value = key[3:], type_at(cls, key[3:]), False
        elif tp is None:
            raise ConfigError(f"unknown config key {key!r}; {suggest(key, known_keys(cls))}")
        elif eq:
            value = text
        elif _is_bool(tp):
            nxt = argv[i].lower() if i < len(argv) else ""
            value = True
            if nxt in ("true", "false"):
                value, i = nxt == "true", i + 1
            elif nxt == "auto" and str in typing.get_args(tp):  # `--train.compile auto`
                value, i = "auto", i + 1
        elif _dataclass_optional(tp):  # `--judge`: on, with defaults (sub-keys still apply)
            value = {}
            if key in _flat(data):
                continue
        elif _dataclass_in(tp) is not None:
            raise ConfigError(
                f"--{name} is a section; give its keys, e.g. --{name}.{known_keys(_dataclass_in(tp))[0]}"
            )
        else:
            if i >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i], i + 1
        if key in repeated and _is_list(tp):
            prev = _get_dotted(data, key)
            value = [*(prev if isinstance(prev, list) else [prev]), value]
        repeated.add(key)
        set_key(data, key, value)
        origins[key] = ""
    _assign_positionals(spec, positionals, data, origins)
    cfg = config_from_mapping(cls, data, where=origin_lookup(origins))
    return cfg, show


def _assign_positionals(spec: Cli, positionals: list[str], data: dict, origins: dict) -> None:
    names = list(spec.positionals)
    for n, name in enumerate(names):
        if not positionals:
            return
        if _is_list(type_at(spec.cls, name)) and n == len(names) - 1:
            data[name], positionals = list(positionals), []
        else:
            data[name] = positionals.pop(0)
        origins[name] = ""
    if positionals:
        takes = " ".join(n.upper() for n in names) or "no positional arguments"
        raise ConfigError(f"unexpected argument {positionals[0]!r}; `{spec.prog}` takes {takes}")


def format_help(verb: str) -> str:
    """`--help` of a verb: every key of its config with type, default and field docstring."""
    spec = VERBS[verb]
    cls = spec.cls
    pos = " ".join(f"[{n.upper()}{' ...' if _is_list(type_at(cls, n)) else ''}]" for n in spec.positionals)
    lines = [
        f"usage: {spec.prog} {pos + ' ' if pos else ''}[--config FILE.yaml] [--print-config] [--KEY VALUE ...]",
        "",
        inspect.cleandoc(cls.__doc__ or ""),
        "",
        "options:",
        "  -h, --help            show this help and exit",
        "  --config FILE.yaml    read keys from a YAML file (later flags override it; repeatable)",
        "  --print-config        print the resolved config as YAML (what --config accepts) and exit",
    ]
    if spec.positionals:
        lines.append(f"  positional arguments fill: {', '.join(spec.positionals)}")
    lines += _help_fields(cls, "", None)
    inverse: dict[str, list[str]] = {}
    for flag, key in spec.aliases.items():
        inverse.setdefault(key, []).append("--" + flag.replace("_", "-"))
    if inverse:
        lines += ["", "short forms:"] + [f"  {', '.join(v)} = --{k}" for k, v in inverse.items()]
    lines += [
        "",
        "Keys are exact; dashes may stand for underscores; a bool key alone means true, --no-KEY false.",
    ]
    return "\n".join(lines) + "\n"


def _help_fields(cls: type, prefix: str, obj: Any) -> list[str]:
    """Help lines of a config's fields; defaults come from `obj` (the parent's default: a task's own)."""
    docs = field_docs(cls)
    if obj is None:
        try:
            obj = cls()
        except (TypeError, ConfigError):
            obj = None
    defaults = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init} if obj else {}
    out = []
    sections = []
    for name, tp in hints(cls).items():
        sub = _dataclass_in(tp)
        if sub is not None:
            sections.append((name, sub, docs.get(name) or (sub.__doc__ or "").strip().splitlines()[0]))
            continue
        default = defaults.get(name)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        out.append(f"  --{prefix}{name}  ({type_name(tp)}; default: {shown})")
        if docs.get(name):
            out.append(f"      {docs[name]}")
    for name, sub, doc in sections:
        out += ["", f"{prefix}{name}: {doc}"]
        if _dataclass_optional(hints(cls)[name]):
            out.append(f"  --{prefix}{name}  turn it on with its defaults (null: off)")
        sub_obj = defaults.get(name)
        out += _help_fields(sub, f"{prefix}{name}.", sub_obj if isinstance(sub_obj, sub) else None)
    return out


# Config keys whose values are secrets: `--print-config` shows them as null with a comment, never the value.
SECRET_KEYS = ("api_key",)


def dump_config(cfg: Any, drop: tuple[str, ...] = ()) -> str:
    """The resolved config as YAML (what `--print-config` shows and `--config` accepts); `drop` top-level keys.

    A secret (SECRET_KEYS) that is set prints as null plus a comment: a printed config lands in terminals,
    logs and bug reports, and fed back as `--config` it must not carry the key (nor a placeholder that
    would become the key).
    """
    import yaml

    d = {k: v for k, v in to_dict(cfg).items() if k not in drop}
    hidden = [k for k in SECRET_KEYS if d.get(k) is not None]
    for k in hidden:
        d[k] = None
    text = yaml.safe_dump(_yaml_safe(d), sort_keys=False)
    for k in hidden:
        text += (
            f"# {k}: set, not shown; give it again (--{k.replace('_', '-')} or its environment variable)\n"
        )
    return text


def _yaml_safe(obj):
    if isinstance(obj, dict):
        return {k: _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_safe(v) for v in obj]
    return obj


def _get_dotted(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _flat(data: dict) -> set[str]:
    out = set()
    for k in leaf_keys(data):
        parts = k.split(".")
        out.update(".".join(parts[: n + 1]) for n in range(len(parts)))
    return out


def _is_bool(tp: Any) -> bool:
    import typing

    # `bool | str` is a switch with a word besides true/false (`train.compile`: true, false or auto)
    return tp is bool or (tp is not None and set(typing.get_args(tp)) in ({bool, type(None)}, {bool, str}))


def _is_list(tp: Any) -> bool:
    import typing

    if tp is None:
        return False
    return typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))


def _dataclass_optional(tp: Any) -> bool:
    import typing

    return _dataclass_in(tp) is not None and type(None) in typing.get_args(tp)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _bool_text(text: str, flag: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise ConfigError(f"{flag}={text!r}: expected true or false")
