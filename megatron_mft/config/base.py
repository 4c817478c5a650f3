"""YAML + dotted overrides -> typed dataclasses, with every error reported at once.

Each concern (model, parallel, data, loss, peft, train) owns one dataclass in its own module.
A dataclass may define ``validate(self) -> list[str]`` returning human-readable problems;
``load_config`` collects the problems of every section and raises one ``ConfigError``.
Every float field, in any section, list or mapping, must be finite: nan and inf are refused where
values are parsed, so no ``validate`` has to think about them. A field declared with
``metadata=PATH`` holds a file system path: a leading ``~`` is expanded where values are parsed;
nothing else is (``$HOME`` stays literal, ``shell_variable_warnings`` says so).
A YAML mapping (config file or override value) must not repeat a key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import keyword
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from megatron_mft.errors import UsageError


class ConfigError(UsageError, ValueError):
    """All problems found in a config, one per line, each naming its dotted field (exit 2)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid config{f' {source}' if source else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


#: ``dataclasses.field(metadata=PATH)``: the field is a path; ``~`` / ``~user`` is expanded at load time
PATH = types.MappingProxyType({"path": True})


class _DuplicateKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that records every key a mapping repeats, at any nesting level (PyYAML
    keeps the last value silently: a second ``train:`` block replaced the first wholesale).
    Construction goes on (last value wins); the caller reports ``loader.duplicates`` at once."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []  # (line, "duplicate key 'x' (first at line N)")

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, may repeat
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML refuses an unhashable key itself, with its mark
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((line, f"duplicate key {key!r} (first at line {seen[key]})"))
                else:
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> tuple[Any, list[tuple[int, str]]]:
    """Parse ``text`` as YAML (safe): the value and the duplicate keys found (line, message)."""
    loader = _DuplicateKeyLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def _yaml_reason(error: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, one-line reason) of a PyYAML error, without its multi-line context."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow (control bytes)
        return (text[:error.position].count("\n") + 1,
                f"unacceptable character #x{error.character:04x}: {error.reason}")
    mark = getattr(error, "problem_mark", None)
    reason = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if context and getattr(error, "problem", None):
        reason = f"{reason} ({context})"
    return (mark.line + 1 if mark is not None else None), reason


def expand_path(value: Any) -> Any:
    """A leading ``~`` of a path value -> the home folder (``os.path.expanduser``); others unchanged."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


#: ``$NAME`` / ``${NAME}``: a shell variable that config values do not expand
_SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*")


def shell_variable_warnings(obj: Any, prefix: str = "") -> list[str]:
    """One warning per path field (any nested dataclass) whose value names a shell variable:
    it is used as written (a folder literally named ``$HOME``), only a leading ``~`` is expanded."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += shell_variable_warnings(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path") and isinstance(value, str) and _SHELL_VARIABLE.search(value):
            out.append(f"{prefix}{f.name}: {value!r} is used as written, with a literal '$': config values are not "
                       f"shell-expanded (only a leading ~ is); a single-quoted override or a YAML file keeps the $. "
                       f"Write the path out, or let the shell expand it (an unquoted or double-quoted override)")
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert a YAML/CLI value to ``tp``; append a problem and return None when impossible."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in non_none:
            sub = []
            out = _coerce(value, a, path, sub)
            if not sub:
                return out
        problems.extend(sub)
        return None
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        return _build(tp, value, path, problems)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return None
        item_tp = args[0] if args else Any
        before = len(problems)
        out = [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        if len(problems) > before:  # no container with holes reaches a validate()
            return None
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return None
        vt = args[1] if len(args) == 2 else Any
        before = len(problems)
        out = {str(k): _coerce(v, vt, f"{path}.{k}", problems) for k, v in value.items()}
        return None if len(problems) > before else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{path}: expected true/false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        problems.append(f"{path}: expected an integer, got {value!r}")
        return None
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            problems.append(f"{path}: expected a number, got {value!r}")
        elif not math.isfinite(number):  # nan/inf slip through every `x < 0` check downstream
            problems.append(f"{path}: must be a finite number, got {value!r}")
            number = None
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return None
    return value


def finite_float(text: str) -> float:
    """argparse ``type=`` for float options: the same finite-number rule as config fields."""
    problems: list[str] = []
    number = _coerce(text, float, "value", problems)
    if problems:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return number


def int_range(minimum: int, maximum: int = 2**63 - 1):
    """argparse ``type=`` for integer options in [minimum, maximum] (a size of 0 or a negative seed
    fails as a usage error naming the option, not deep inside torch.distributed or a reshape)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def _list_items(text: str) -> list[str]:
    """The items of a comma-separated option value, spaces around each stripped (as the config's
    own lists: ``"none, lora"``); an empty item (``1,,2``) is an argparse error naming it."""
    items = [x.strip() for x in text.split(",")]
    empty = [str(i + 1) for i, x in enumerate(items) if not x]
    if empty:
        raise argparse.ArgumentTypeError(f"empty item{'s' * (len(empty) > 1)} {', '.join(empty)} in {text!r}")
    return items


def int_list(minimum: int, form: str = ""):
    """argparse ``type=`` for comma-separated integers, each >= minimum; ``form`` (``TP,PP,DP``)
    also fixes how many: ``--layout 2,1,4``, ``--threads 1,2``."""
    one = int_range(minimum)

    def parse(text: str) -> tuple[int, ...]:
        items = _list_items(text)
        if form and len(items) != form.count(",") + 1:
            raise argparse.ArgumentTypeError(f"expected {form} ({form.count(',') + 1} integers), got {text!r}")
        try:
            return tuple(one(x) for x in items)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} in {text!r}") from None

    return parse


def choice_list(choices):
    """argparse ``type=`` for comma-separated names, each one of ``choices``: ``--families llama,qwen2``."""

    def parse(text: str) -> list[str]:
        names = _list_items(text)
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))} in {text!r}; "
                                             f"choose from {', '.join(choices)}")
        return names

    return parse


def _build(cls: type, data: dict, path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        full = f"{path}.{key}" if path else key  # as the YAML writes it
        key = key + "_" if keyword.iskeyword(key) else key  # a YAML key such as `lambda` -> field lambda_
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.7)  # stpes -> steps
            close += [n for n in sorted(fields) if n.startswith(key) and n not in close][:4 - len(close)]  # warmup
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{full}: unknown field{hint}; known: {', '.join(sorted(fields))}")
            continue
        kwargs[key] = _coerce(value, hints[key], full, problems)
        if fields[key].metadata.get("path"):
            kwargs[key] = expand_path(kwargs[key])
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})
    except TypeError as e:  # missing required fields
        problems.append(f"{path or '<root>'}: {e}")
        return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "parallel.tp=2"]`` -> nested dict; values parsed as YAML (scalars, or
    flow lists/mappings such as ``[a, b]``). Every malformed override is reported at once."""
    out: dict = {}
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected dotted key=value, e.g. train.steps=10")
            continue
        key, raw = item.split("=", 1)
        try:
            value, duplicates = _yaml_load(raw) if raw != "" else ("", [])
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: not a valid value ({_yaml_reason(e, raw)[1]})")
            continue
        if duplicates:
            problems.append(f"override {item!r}: not a valid value ({'; '.join(d for _, d in duplicates)})")
            continue
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {p} is not a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def collect_problems(obj: Any, path: str = "") -> list[str]:
    """Run ``validate()`` of every nested dataclass (each names its own section: ``loss.gamma: ...``)."""
    problems: list[str] = []
    if not dataclasses.is_dataclass(obj):
        return problems
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += collect_problems(value, f"{path}{f.name}.")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        problems += validate()
    return problems


def load_dataclass(cls: type, data: dict, source: str | None = None,
                   adjust: Callable[[Any], None] | None = None) -> Any:
    """``cls`` built from ``data`` and validated; ``adjust`` sees the object before its validation."""
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if obj is not None:  # also validate what did parse, so one launch shows every mistake
        if adjust:
            adjust(obj)
        problems += collect_problems(obj)
    if problems:
        raise ConfigError(problems, source)
    return obj


def read_yaml(path: str | Path) -> dict:
    """A user's YAML config file as a dict. Not a file, not readable, not UTF-8, not YAML, a
    repeated key (every one, at any level): a ``ConfigError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} " + ("is a directory" if path.is_dir() else "does not exist")])
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"config file {path}: cannot read it ({e.strerror or e})"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           f"save the file as UTF-8"]) from None
    try:
        data, duplicates = _yaml_load(text)
    except yaml.YAMLError as e:
        line, reason = _yaml_reason(e, text)
        where = f"{path}:{line}" if line is not None else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {reason}"]) from None
    if duplicates:
        raise ConfigError([f"{path}:{line}: {message}" for line, message in duplicates])
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return data


def yaml_key(path: str) -> str:
    """The YAML spelling of a dotted field path: a field named after a Python keyword drops its
    trailing ``_`` (``loss.preference.lambda_`` -> ``loss.preference.lambda``; see ``_build``)."""
    return ".".join(p[:-1] if p.endswith("_") and keyword.iskeyword(p[:-1]) else p for p in path.split("."))


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
