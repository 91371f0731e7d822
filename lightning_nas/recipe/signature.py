"""Read a class's constructor signature from its source file, without importing it.

Importing torch and Lightning takes several seconds; a recipe with a typo must fail in well under
two. So recipe validation reads constructor signatures (names, annotations as text, defaults) from
the source with :mod:`ast`, following ``from x import Name`` re-exports and base classes. Targets it
cannot read (compiled modules, dynamic definitions) fall back to importing and
:func:`inspect.signature`, which is slower but exact.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path

_NO_DEFAULT = object()
_MAX_HOPS = 8


@dataclass(frozen=True)
class Parameter:
    name: str
    annotation: str | None  # source text of the annotation, None when absent
    default: object = _NO_DEFAULT  # a Python literal, or ``...`` for a non-literal default

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


@dataclass(frozen=True)
class Signature:
    target: str
    parameters: dict[str, Parameter] = field(default_factory=dict)
    accepts_any_keyword: bool = False  # the constructor takes **kwargs somewhere we cannot see


class TargetNotFound(LookupError):
    """The dotted path names no module or no class/function in it."""

    def __init__(self, target: str, reason: str, candidates: tuple[str, ...] = ()) -> None:
        self.target = target
        self.reason = reason
        self.candidates = candidates
        super().__init__(f"{target}: {reason}")


def split_target(target: str) -> tuple[str, str]:
    """``pkg.mod:Name`` or ``pkg.mod.Name`` -> (module, name)."""
    if ":" in target:
        module, _, name = target.partition(":")
    else:
        module, _, name = target.rpartition(".")
    if not module or not name:
        raise TargetNotFound(target, "expected a dotted path such as 'package.module.ClassName'")
    return module, name


@functools.lru_cache(maxsize=256)
def module_source_file(module: str) -> Path | None:
    """The ``.py`` file of a module, found without importing any of its packages."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    if not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        base = Path(location, *parts[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=256)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _resolve_relative(module: str, level: int, name: str | None, is_package: bool) -> str:
    base = module.split(".")
    # In a package's __init__, level 1 means the package itself.
    drop = level - 1 if is_package else level
    base = base[: len(base) - drop] if drop else base
    return ".".join(base + ([name] if name else []))


def _find_definition(module: str, name: str, hops: int = 0) -> tuple[str, ast.AST] | None:
    """Locate ``name`` as defined in (or re-exported by) ``module``: (defining module, node)."""
    if hops > _MAX_HOPS:
        return None
    path = module_source_file(module)
    if path is None:
        return None
    tree = _parse(path)
    is_package = path.name == "__init__.py"
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return module, node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = (
                        _resolve_relative(module, node.level, node.module, is_package)
                        if node.level
                        else node.module or ""
                    )
                    found = _find_definition(source, alias.name, hops + 1)
                    if found is None:  # `from pkg import submodule_attr` where the name is a module
                        found = _find_definition(f"{source}.{alias.name}", alias.name, hops + 1)
                    if found is not None:
                        return found
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == name and isinstance(node.value, ast.Name):
                return _find_definition(module, node.value.id, hops + 1)
    return None


def module_public_names(module: str) -> tuple[str, ...]:
    """Names a module defines or imports, for close-match suggestions on a bad class path."""
    path = module_source_file(module)
    if path is None:
        return ()
    names: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return tuple(sorted(n for n in names if not n.startswith("_")))


def _literal(node: ast.AST) -> object:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "field":
        for keyword in node.keywords:  # dataclass fields: field(default=...) / field(default_factory=list)
            if keyword.arg == "default":
                return _literal(keyword.value)
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
                return {"list": [], "dict": {}}.get(keyword.value.id, ...)
        return ...
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return ...


def _function_parameters(func: ast.FunctionDef, skip_self: bool) -> tuple[dict[str, Parameter], bool]:
    args = func.args
    positional = args.posonlyargs + args.args
    if skip_self and positional:
        positional = positional[1:]
    defaults: list[object] = [_NO_DEFAULT] * (len(positional) - len(args.defaults))
    defaults += [_literal(d) for d in args.defaults]
    params: dict[str, Parameter] = {}
    for arg, default in zip(positional, defaults):
        params[arg.arg] = Parameter(arg.arg, _annotation(arg), default)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params[arg.arg] = Parameter(arg.arg, _annotation(arg), _NO_DEFAULT if default is None else _literal(default))
    return params, args.kwarg is not None


def _annotation(arg: ast.arg) -> str | None:
    return ast.unparse(arg.annotation) if arg.annotation is not None else None


def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name) and target.id == "dataclass":
            return True
        if isinstance(target, ast.Attribute) and target.attr == "dataclass":
            return True
    return False


def _class_signature(module: str, node: ast.ClassDef, hops: int) -> tuple[dict[str, Parameter], bool] | None:
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            params, any_keyword = _function_parameters(item, skip_self=True)
            if any_keyword:
                # The usual `def __init__(self, own, **kwargs): super().__init__(**kwargs)`: the
                # accepted keywords are the bases' (when we can read them).
                for base in node.bases:
                    inherited = _base_signature(module, base, hops)
                    if inherited is not None:
                        params = {**inherited[0], **params}
                        any_keyword = inherited[1]
                        break
            return params, any_keyword
    if _is_dataclass(node):
        params: dict[str, Parameter] = {}
        for base in node.bases:
            inherited = _base_signature(module, base, hops)
            if inherited:
                params.update(inherited[0])
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                default = _NO_DEFAULT if item.value is None else _literal(item.value)
                params[item.target.id] = Parameter(item.target.id, ast.unparse(item.annotation), default)
        return params, False
    for base in node.bases:
        inherited = _base_signature(module, base, hops)
        if inherited is not None:
            return inherited
    return {}, False  # no __init__ anywhere we can see: object's, which takes nothing


def _base_signature(module: str, base: ast.expr, hops: int) -> tuple[dict[str, Parameter], bool] | None:
    if not isinstance(base, ast.Name):
        return None  # e.g. `nn.Module` or `pl.LightningModule`: their __init__ takes nothing useful
    found = _find_definition(module, base.id, hops + 1)
    if found is None or not isinstance(found[1], ast.ClassDef):
        return None
    return _class_signature(found[0], found[1], hops + 1)


def _signature_by_import(target: str, module: str, name: str) -> Signature:
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise TargetNotFound(target, f"cannot import it ({error})", module_public_names(module)) from None
    params: dict[str, Parameter] = {}
    any_keyword = False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            any_keyword = True
        elif p.kind is not p.VAR_POSITIONAL:
            default = _NO_DEFAULT if p.default is p.empty else p.default
            annotation = None if p.annotation is p.empty else str(p.annotation)
            params[p.name] = Parameter(p.name, annotation, default)
    return Signature(target, params, any_keyword)


@functools.lru_cache(maxsize=256)
def signature_of(target: str) -> Signature:
    """The constructor (for a class) or call (for a function) signature of ``target``."""
    module, name = split_target(target)
    if module_source_file(module) is None:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise TargetNotFound(target, f"no module named '{module}'")
        return _signature_by_import(target, module, name)
    found = _find_definition(module, name)
    if found is None:
        candidates = module_public_names(module)
        if name in candidates:  # defined dynamically: ask the interpreter
            return _signature_by_import(target, module, name)
        raise TargetNotFound(target, f"module '{module}' has no '{name}'", candidates)
    defining_module, node = found
    if isinstance(node, ast.FunctionDef):
        params, any_keyword = _function_parameters(node, skip_self=False)
    else:
        params, any_keyword = _class_signature(defining_module, node, 0) or ({}, True)
    return Signature(target, params, any_keyword)
