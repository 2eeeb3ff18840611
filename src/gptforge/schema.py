"""Mappings into typed dataclasses: the one validation path for every config in gptforge.

A YAML file, a pipeline stage section, `--set` overrides and command-line flags all become a plain
mapping, and `from_dict` turns that mapping into a dataclass, checking each key against the fields and
each value against the field's type hint. It sits at the bottom of the package (beside `errors` and `io`)
because `model/` needs it for `GPTConfig` and `LoRAConfig` and must not import `pipeline/`.

Every problem is one `ConfigError` line: an unknown key names where it came from and the nearest known
key; a bad value names the field, the value and the expected type. Keys are exact: no abbreviations.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gptforge.errors import ConfigError

Where = Callable[[str], str]  # dotted key -> prefix naming its source ("c.yaml: "), or ""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NULL = ("null", "none", "~")


def _where_fn(where: str | Where | None) -> Where:
    if callable(where):
        return where
    text = where or ""
    return lambda _key: text


def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields, in field order."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_in(inner[0])
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def known_keys(cls: type, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
    """Every leaf key of a config as a dotted path (`train.lr`), nested dataclasses expanded."""
    keys = []
    for name, tp in hints(cls).items():
        if name in exclude:
            continue
        sub = _dataclass_in(tp)
        keys += known_keys(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return keys


def type_at(cls: type, dotted: str) -> Any:
    """The type hint of a dotted key, or None when the key does not exist (exact names only)."""
    tp: Any = cls
    for part in dotted.split("."):
        sub = _dataclass_in(tp)
        if sub is None:
            return None
        fields = hints(sub)
        if part not in fields:
            return None
        tp = fields[part]
    return tp


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {type_name(args[0])}"
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def suggest(key: str, known: list[str]) -> str:
    """`did you mean 'x'?` for the nearest known key (or one with the same last part), else a pointer."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == tail][:1]
    return f"did you mean {close[0]!r}?" if close else "see --help for the known keys"


def _first_leaf(key: str, value: Any) -> str:
    while isinstance(value, Mapping) and value:
        k, value = next(iter(value.items()))
        key = f"{key}.{k}"
    return key


def from_dict(
    cls: type,
    data: Mapping,
    *,
    where: str | Where | None = None,
    base: Any = None,
    exclude: tuple[str, ...] = (),
    prefix: str = "",
) -> Any:
    """Build `cls` from `data`, checking keys and types; fields not in `data` come from `base` (or defaults).

    `where(key)` names a key's source in messages; `exclude` lists fields the mapping may not set (the
    runner fills them); `prefix` is the dotted path of `cls` inside the root config.
    """
    where_fn = _where_fn(where)
    return _build(cls, data, where_fn, base, exclude, prefix, known_keys(cls, prefix, exclude))


def _build(cls, data, where: Where, base, exclude, prefix: str, root_keys: list[str]):
    if not isinstance(data, Mapping):
        key = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where(key)}{key}={data!r}: expected a mapping of keys")
    fields = hints(cls)
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields or key in exclude:
            bad = _first_leaf(f"{prefix}{key}", value)
            raise ConfigError(f"{where(bad)}unknown config key {bad!r}; {suggest(bad, root_keys)}")
    if base is None:
        try:
            base = cls()
        except (TypeError, ConfigError):
            base = None
    splits = {f.name: f.metadata.get("split", True) for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, tp in fields.items():
        if name in data:
            sub_base = getattr(base, name, None) if base is not None else None
            value = data[name]
            kwargs[name] = _convert(tp, value, f"{prefix}{name}", where, sub_base, root_keys, splits[name])
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        first = next(iter(data), "")
        raise ConfigError(f"{where(prefix + str(first))}{e}") from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where(prefix.rstrip('.'))}{prefix.rstrip('.') or 'config'}: {e}") from None


def _bad(key: str, value: Any, tp: Any, where: Where) -> ConfigError:
    return ConfigError(f"{where(key)}{key}={value!r}: expected {type_name(tp)}")


def _split_list(value: str, key: str, where: Where, split: bool) -> list:
    text = value.strip()
    if text.startswith("["):
        import yaml

        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{where(key)}{key}={value!r}: not a valid [a, b] list") from None
        if isinstance(parsed, list):
            return parsed
    if not split:
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def _convert(tp: Any, value: Any, key: str, where: Where, base: Any, root_keys: list[str], split=True):
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NULL)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, where, base, root_keys, split)
            except ConfigError:
                if dataclasses.is_dataclass(
                    arg
                ):  # a mapping's own message (bad key inside) is the precise one
                    raise
        raise _bad(key, value, tp, where)
    sub = _dataclass_in(tp)
    if sub is not None:
        if not isinstance(value, Mapping):
            raise _bad(key, value, tp, where)
        return _build(sub, value, where, base, (), f"{key}.", root_keys)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _split_list(value, key, where, split)
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp, where)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _bad(key, value, tp, where)
            return tuple(
                _convert(a, v, f"{key}[{i}]", where, None, root_keys)
                for i, (a, v) in enumerate(zip(args, value))
            )
        item = args[0] if args else Any
        out = [_convert(item, v, f"{key}[{i}]", where, None, root_keys) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, value, tp, where)
        kt, vt = args or (Any, Any)
        return {
            _convert(kt, k, f"{key}.{k}", where, None, root_keys): _convert(
                vt, v, f"{key}.{k}", where, None, root_keys
            )
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise _bad(key, value, tp, where)
    if tp in (int, float):
        numeric = (int,) if tp is int else (int, float)
        if isinstance(value, numeric) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                pass
        raise _bad(key, value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # load_config(..., **{"train.out_dir": tmp_path / "x"})
            return os.fspath(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a YAML `dataset: 2024` or `init: 123` names a file or dir
        raise _bad(key, value, tp, where)
    raise ConfigError(f"{key}: type {tp!r} is not supported by the config loader")  # a programming error


# -- YAML -----------------------------------------------------------------------------------------------


def load_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; syntax errors and other top levels name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}{line}: not valid YAML ({problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        first = next(
            (n for n, s in enumerate(text.splitlines(), 1) if s.strip() and not s.lstrip().startswith("#")), 1
        )
        raise ConfigError(
            f"{p} line {first}: the top level must be a mapping of keys (key: value), not a {type(raw).__name__}"
        )
    return raw


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """`set_dotted(d, "train.lr", 1e-3)`: creates sections as needed; refuses to descend into a value."""
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {k} is a value, not a section")
    d[keys[-1]] = value


def merge(dst: dict, src: Mapping) -> dict:
    """Deep-merge `src` into `dst` (sections merge, values replace); returns `dst`."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def leaf_keys(d: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [f"{prefix}{k}"]
    return out


# -- field docs -------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right under a field), inherited ones included: `--help` text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
