"""Configuration files read into dataclasses of sections, with `section.key=value` overrides.

    tree = read_tree(path, "run file")             # YAML or JSON; a key given twice is an error
    keys = apply_overrides(tree, ["data.path=/d", "duration.steps=1000"])
    cfg = from_dict(RunConfig, tree)                # unknown keys and wrong types: one line each

Used by pretraining's run files (train.run_config), finetuning's settings (glue.settings) and the
DeepSpeed JSON reader (train.ds_config, for `unique_json_pairs`). Every mistake is a UserError
with one sentence. Imports nothing else of the package but its errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


class DuplicateKey(ValueError):
    """A key given twice in one mapping of a YAML or JSON file."""


def unique_json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads that refuses a key given twice (json keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool, type(None))):
            continue  # construct_mapping reports unhashable keys itself
        if key in seen:
            raise DuplicateKey(f"line {line}: duplicate key {key!r} (first on line {seen[key]})")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_tree(path: Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file (JSON for a .json path); `what` names the file in errors."""
    try:
        text = path.read_text()
        tree = (
            json.loads(text, object_pairs_hook=unique_json_pairs)
            if path.suffix == ".json"
            else yaml.load(text, Loader=UniqueKeyLoader)
        )
    except DuplicateKey as err:
        raise UserError(f"{what} {path}, {err}; give each section and key once") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from None
    tree = tree or {}
    if not isinstance(tree, dict):
        raise UserError(f"{what} {path} must hold a mapping of sections")
    return tree


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML so that 3, 3e-4, true, null and [0.9, 0.98] work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for key "a.b.c", creating the sections on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(
    tree: dict[str, Any], overrides: Iterable[str], alternatives: Mapping[str, str] | None = None
) -> set[str]:
    """Set each `key=value` (dotted key, value read by `parse_value`) in `tree`; returns the keys.
    `alternatives` maps a key to a sibling it replaces: {"duration.steps": "samples"} drops the
    file's duration.samples when duration.steps is given."""
    keys = set()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        set_dotted(tree, key, parse_value(value))
        if alternatives and key in alternatives:
            tree.get(key.split(".")[0], {}).pop(alternatives[key], None)
        keys.add(key)
    return keys


def as_float(text: str) -> float | None:
    """A number written as text (`1e-3`, ` 5E-4 `), or None; nan/inf spellings are not numbers here."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_KINDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a list of numbers",
    dict: "a mapping",
}
_NO = object()


def _coerce_to(value: Any, base: type) -> Any:
    """`value` as `base`, or _NO."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is bool and isinstance(value, bool):
        return value
    if base is int and number and float(value).is_integer():
        return int(value)
    if base is float and number:
        return float(value)
    if base is float and isinstance(value, str) and as_float(value) is not None:
        return as_float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if base is str and isinstance(value, str):
        return value
    if base is tuple and isinstance(value, (list, tuple)):
        numbers = [
            v
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            else as_float(v)
            if isinstance(v, str)
            else None
            for v in value
        ]
        if all(v is not None for v in numbers):
            return tuple(float(v) for v in numbers)
    if base is dict and isinstance(value, dict):
        return value
    return _NO


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type: bool, int, float, str, tuple (of numbers), dict, or a
    union of them with or without None (the first that fits, in the order written)."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise UserError(f"{where} may not be empty")
    bases = [a for a in args if a is not type(None)]
    for base in bases:
        if (result := _coerce_to(value, base)) is not _NO:
            return result
    raise UserError(f"{where} must be {' or '.join(_KINDS[b] for b in bases)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "", root: str = "the run file") -> Any:
    """`cls(**data)` with each value checked against its field's type; a field whose type is a
    dataclass is a section, read from a nested mapping. `root` names the whole tree in errors."""
    if not isinstance(data, dict):
        raise UserError(f"{where or root} must be a mapping of keys to values")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(where + k for k in unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, f"{where}{name}.", root)
        else:
            kwargs[name] = coerce(value, hint, where + name)
    return cls(**kwargs)
