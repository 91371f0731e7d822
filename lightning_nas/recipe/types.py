"""Check recipe values against constructor annotations given as source text.

Understands the annotations recipes meet in practice: builtins, ``Optional``/``Union``/``|``,
``Literal``, lists, tuples, sequences and mappings, plus the markers of
:mod:`lightning_nas.recipe.markers`. An annotation naming anything else (a class such as
``torch.device``, an alias defined elsewhere) accepts any value: Lightning and the component
itself still check it when the object is built.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import RecipeError
from .markers import MAPPING_MARKERS, NAME_MARKERS, PATH_MARKERS, RANGE_MARKERS, VALUE_CHECKS

_ANY = ast.Name(id="Any")
_SEQUENCES = {"list", "List", "Sequence", "MutableSequence", "Iterable", "Collection", "tuple", "Tuple", "set"}
_MAPPINGS = {"dict", "Dict", "Mapping", "MutableMapping", "DictConfig"}
_UNIONS = {"Union", "Optional"}
_ANY_NAMES = {"Any", "object", "Optional"}
_SIMPLE = {
    "int": "int",
    "float": "float",
    "str": "str",
    "bool": "bool",
    "None": "None",
    "NoneType": "None",
    "Path": "str",
    "PathLike": "str",
    "_PATH": "str",
    "timedelta": "dict",
}

NestedValidator = Callable[[str, Any, str], None]  # (kind from markers, value, key path)


@functools.lru_cache(maxsize=1024)
def parse_annotation(text: str | None) -> ast.expr:
    if not text:
        return _ANY
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return _ANY
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a forward reference
        return parse_annotation(node.value)
    return node


def _head(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _args(node: ast.Subscript) -> list[ast.expr]:
    inner = node.slice
    return list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]


def _union_members(node: ast.expr) -> list[ast.expr] | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return (_union_members(node.left) or [node.left]) + (_union_members(node.right) or [node.right])
    if isinstance(node, ast.Subscript) and _head(node.value) in _UNIONS:
        members = _args(node)
        return members + [ast.Constant(value=None)] if _head(node.value) == "Optional" else members
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def matches(node: ast.expr, value: Any) -> bool:
    """Whether ``value`` has the structure ``node`` describes (markers count as their base type)."""
    members = _union_members(node)
    if members is not None:
        return any(matches(member, value) for member in members)
    if isinstance(node, ast.Constant):
        return node.value is None and value is None
    if isinstance(node, ast.Subscript):
        head = _head(node.value)
        if head == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == value and type(a.value) is type(value)
                       for a in _args(node))
        if head in _SEQUENCES:
            if not isinstance(value, (list, tuple)):
                return False
            args = _args(node)
            if head in {"tuple", "Tuple"} and not (len(args) == 2 and isinstance(args[1], ast.Constant)
                                                   and args[1].value is Ellipsis):
                return len(args) == len(value) and all(matches(a, v) for a, v in zip(args, value))
            return all(matches(args[0], item) for item in value)
        if head in _MAPPINGS:
            if not isinstance(value, Mapping):
                return False
            args = _args(node)
            return len(args) != 2 or all(matches(args[1], v) for v in value.values())
        return True
    head = _head(node)
    if head in VALUE_CHECKS:
        if VALUE_CHECKS[head][0] == "list":
            return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value)
        return isinstance(value, int) and not isinstance(value, bool)
    if head in RANGE_MARKERS:
        base = RANGE_MARKERS[head][0]
        return _is_number(value) if base == "float" else isinstance(value, int) and not isinstance(value, bool)
    if head in PATH_MARKERS:
        return isinstance(value, str)
    if head in MAPPING_MARKERS:
        return isinstance(value, Mapping)
    if head in NAME_MARKERS:
        return isinstance(value, str)
    if head in _SEQUENCES:
        return isinstance(value, (list, tuple))
    if head in _MAPPINGS:
        return isinstance(value, Mapping)
    simple = _SIMPLE.get(head)
    if simple == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if simple == "float":
        return _is_number(value)
    if simple == "str":
        return isinstance(value, str)
    if simple == "bool":
        return isinstance(value, bool)
    if simple == "None":
        return value is None
    if simple == "dict":
        return isinstance(value, Mapping)
    return True  # a type we do not model: the component checks it when built


def describe(node: ast.expr) -> str:
    members = _union_members(node)
    if members is not None:
        return " or ".join(dict.fromkeys(describe(m) for m in members))
    if isinstance(node, ast.Constant):
        return "null" if node.value is None else repr(node.value)
    if isinstance(node, ast.Subscript):
        head = _head(node.value)
        args = _args(node)
        if head == "Literal":
            return "one of " + ", ".join(repr(a.value) if isinstance(a, ast.Constant) else ast.unparse(a)
                                         for a in args)
        if head in _SEQUENCES:
            return f"a list of {describe(args[0])}" if args else "a list"
        if head in _MAPPINGS:
            return "a mapping"
        return ast.unparse(node)
    head = _head(node)
    if head in VALUE_CHECKS:
        return VALUE_CHECKS[head][2]
    if head in RANGE_MARKERS:
        return RANGE_MARKERS[head][4]
    if head in PATH_MARKERS:
        return {"ExistingFile": "a path to an existing file", "ExistingDir": "a path to an existing directory",
                "DownloadableDir": "a path to a directory"}[head]
    if head in MAPPING_MARKERS:
        kind = MAPPING_MARKERS[head]
        if kind.startswith("registry:"):
            return f"a {kind.partition(':')[2]} spec {{name: ..., ...}}"
        return "a {class_path: ..., init_args: {...}} mapping" if kind == "class_path" else "a mapping"
    if head in NAME_MARKERS:
        return f"the name of a {NAME_MARKERS[head]}"
    if head in _SEQUENCES:
        return "a list"
    if head in _MAPPINGS:
        return "a mapping"
    if head in _SIMPLE:
        return {"None": "null", "dict": "a mapping"}.get(_SIMPLE[head], _SIMPLE[head])
    return ast.unparse(node)


def check_value(
    annotation: str | None,
    value: Any,
    *,
    key: str,
    siblings: Mapping[str, Any],
    validate_nested: NestedValidator,
) -> None:
    """Raise :class:`RecipeError` when ``value`` does not fit ``annotation``."""
    node = parse_annotation(annotation)
    if not matches(node, value):
        raise RecipeError(f"expected {describe(node)}", key=key, given=value)
    _deep_check(node, value, key=key, siblings=siblings, validate_nested=validate_nested)


def _deep_check(node: ast.expr, value: Any, *, key: str, siblings: Mapping[str, Any],
                validate_nested: NestedValidator) -> None:
    members = _union_members(node)
    if members is not None:
        first_error: RecipeError | None = None
        for member in (m for m in members if matches(m, value)):
            try:  # e.g. `ExistingFile | Literal["last"]`: "last" is a str, but only the literal fits
                _deep_check(member, value, key=key, siblings=siblings, validate_nested=validate_nested)
                return
            except RecipeError as error:
                first_error = first_error or error
        if first_error is not None:
            raise first_error
        return
    if isinstance(node, ast.Subscript):
        head = _head(node.value)
        args = _args(node)
        if head in _SEQUENCES and args and isinstance(value, (list, tuple)) and head not in {"tuple", "Tuple"}:
            for index, item in enumerate(value):
                _deep_check(args[0], item, key=f"{key}[{index}]", siblings=siblings, validate_nested=validate_nested)
        elif head in _MAPPINGS and len(args) == 2 and isinstance(value, Mapping):
            for name, item in value.items():
                _deep_check(args[1], item, key=f"{key}.{name}", siblings=siblings, validate_nested=validate_nested)
        return
    head = _head(node)
    if head in VALUE_CHECKS:
        module, _, name = VALUE_CHECKS[head][1].partition(":")
        try:
            getattr(importlib.import_module(module), name)(value)
        except ValueError as error:  # the torch-free check this marker names
            raise RecipeError(str(error), key=key, given=value) from None
    elif head in RANGE_MARKERS:
        _, low, low_allowed, high, text = RANGE_MARKERS[head]
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            raise RecipeError("out of range", key=key, given=value, allowed=text)
    elif head in MAPPING_MARKERS:
        validate_nested(MAPPING_MARKERS[head], value, key)
    elif head in NAME_MARKERS:
        validate_nested(f"name:{NAME_MARKERS[head]}", value, key)
    elif head == "ExistingFile" and not os.path.isfile(value):
        raise RecipeError("file not found" if not os.path.isdir(value) else "expected a file, found a directory",
                          key=key, given=value, allowed=f"an existing file (relative to {os.getcwd()})")
    elif head == "ExistingDir" and not os.path.isdir(value):
        raise RecipeError("directory not found", key=key, given=value,
                          allowed=f"an existing directory (relative to {os.getcwd()})")
    elif head == "DownloadableDir" and not os.path.isdir(value) and not siblings.get("download", False):
        raise RecipeError("directory not found", key=key, given=value,
                          allowed=f"an existing directory (relative to {os.getcwd()}), or set download=true")
