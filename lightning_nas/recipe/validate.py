"""Validate a resolved recipe against the constructor signatures of what it will build.

Everything here works from source text (see :mod:`.signature`), so it runs before torch or
Lightning is imported and a bad recipe fails in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import RecipeError, close_match
from ..registry import REGISTRIES
from .markers import PATH_MARKERS
from .signature import Signature, TargetNotFound, signature_of
from .types import check_value

RECIPE_SCHEMA = "lightning_nas.recipe.sections:Recipe"
#: Trainer arguments the framework sets from other recipe keys.
TRAINER_MANAGED = {
    "callbacks": "list them under the top-level `callbacks:` key",
    "logger": "choose them with the top-level `logger:` key",
    "default_root_dir": "set the top-level `run_dir:` key",
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate_arguments(
    signature: Signature, values: Mapping[str, Any], key: str, *, skip: tuple[str, ...] = ()
) -> None:
    """Check ``values`` as keyword arguments of ``signature`` (unknown, missing, wrongly typed)."""
    if not isinstance(values, Mapping):
        raise RecipeError("expected a mapping", key=key or None, given=values)
    params = signature.parameters
    for name in values:
        if name in skip:
            continue
        if name not in params and not signature.accepts_any_keyword:
            raise RecipeError(
                "unknown key",
                key=_join(key, str(name)),
                given=values[name],
                allowed=", ".join(sorted(params)) or "(no arguments)",
                suggestion=close_match(str(name), params),
            )
    for name, param in params.items():
        if name in values:
            check_value(param.annotation, values[name], key=_join(key, name), siblings=values,
                        validate_nested=validate_nested)
        elif _names_a_path(param.annotation) and isinstance(param.default, str):
            # A default path is as much the user's choice as a written one: check it too.
            check_value(param.annotation, param.default, key=_join(key, name), siblings=values,
                        validate_nested=validate_nested)
        elif param.required and name not in skip:
            raise RecipeError(
                "missing required value",
                key=_join(key, name),
                allowed=f"a value of type {param.annotation}" if param.annotation else None,
            )


def _names_a_path(annotation: str | None) -> bool:
    return bool(annotation) and any(marker in annotation for marker in PATH_MARKERS)


def validate_component(kind: str, spec: Any, key: str) -> None:
    """``{name: <registered>, **arguments}`` for the registry of ``kind``."""
    registry = REGISTRIES[kind]
    if not isinstance(spec, Mapping):
        raise RecipeError(f"expected a {kind} spec {{name: ..., ...}}", key=key, given=spec)
    if "name" not in spec:
        raise RecipeError(f"missing required value (which {registry.description})", key=_join(key, "name"),
                          allowed=registry.names())
    entry = registry.entry(spec["name"], key=_join(key, "name"))
    validate_arguments(signature_of(entry.target), spec, key, skip=("name",))
    if kind == "space":
        build_space(spec, key)


def build_space(spec: Mapping[str, Any], key: str) -> Any:
    """A space from its spec; spaces import no torch, so their layout checks run in this pass.

    A space's constructor raises ValueError for a layout it cannot build (its documented check
    of its arguments), which is the user's spec here.
    """
    from ..registry import SPACES

    try:
        return SPACES.build(spec)
    except ValueError as error:
        raise RecipeError(f"the space cannot be built: {error}", key=key, given=dict(spec)) from None


def validate_data_against_space(config: Mapping[str, Any]) -> None:
    """Resolutions and classes of ``data:`` against the task's space (both known from the recipe),
    and ``profile.resolutions`` against the profiled space."""
    profile = config.get("profile")
    if isinstance(profile, Mapping) and isinstance(profile.get("space"), Mapping) and profile.get("resolutions"):
        allowed = getattr(build_space(profile["space"], "profile.space"), "resolutions", None)
        unknown = [r for r in profile["resolutions"] if allowed and r not in allowed]
        if unknown:
            raise RecipeError(f"resolution {unknown[0]} is not one the profiled space takes",
                              key="profile.resolutions", given=profile["resolutions"],
                              allowed=f"values of profile.space.resolutions: {allowed}")
    task, data = config.get("task"), config.get("data")
    if not isinstance(task, Mapping) or not isinstance(data, Mapping) or not isinstance(task.get("space"), Mapping):
        return
    space = build_space(task["space"], "task.space")
    allowed = getattr(space, "resolutions", None)
    if allowed:
        for name in ("resolutions", "eval_resolution"):
            given = data.get(name)
            values = given if isinstance(given, list) else [] if given is None else [given]
            unknown = [r for r in values if r not in allowed]
            if unknown:
                raise RecipeError(f"resolution {unknown[0]} is not one the task's space takes", key=f"data.{name}",
                                  given=given, allowed=f"values of task.space.resolutions: {allowed}")
    classes = getattr(space, "num_classes", None)
    if isinstance(data.get("num_classes"), int) and isinstance(classes, int) and data["num_classes"] != classes:
        raise RecipeError(f"the data has {data['num_classes']} classes but the space's classifier has {classes}",
                          key="data.num_classes", given=data["num_classes"], allowed=f"{classes} (task.space.num_classes)")


def validate_class_path(spec: Any, key: str) -> None:
    """``{class_path: package.module.Class, init_args: {...}}``."""
    if not isinstance(spec, Mapping):
        raise RecipeError("expected {class_path: ..., init_args: {...}}", key=key, given=spec)
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        name = sorted(unknown)[0]
        raise RecipeError("unknown key", key=_join(key, name), given=spec[name], allowed="class_path, init_args",
                          suggestion=close_match(name, ["class_path", "init_args"]))
    if not isinstance(spec.get("class_path"), str):
        raise RecipeError("missing required value" if "class_path" not in spec else "expected a dotted path",
                          key=_join(key, "class_path"), allowed="a dotted path such as "
                          "lightning.pytorch.callbacks.ModelCheckpoint")
    try:
        signature = signature_of(spec["class_path"])
    except TargetNotFound as error:
        name = spec["class_path"].rpartition(".")[2]
        raise RecipeError(f"cannot find it: {error.reason}", key=_join(key, "class_path"),
                          given=spec["class_path"], suggestion=close_match(name, error.candidates)) from None
    validate_arguments(signature, spec.get("init_args") or {}, _join(key, "init_args"))


def validate_trainer(values: Any, key: str) -> None:
    if isinstance(values, Mapping):
        for name, hint in TRAINER_MANAGED.items():
            if name in values:
                raise RecipeError(f"set by the framework: {hint}", key=_join(key, name), given=values[name])
    validate_arguments(signature_of("lightning.pytorch.Trainer"), values, key)


def validate_nested(kind: str, value: Any, key: str) -> None:
    """Dispatch for the markers of :mod:`.markers` (see ``MAPPING_MARKERS``/``NAME_MARKERS``)."""
    how, _, what = kind.partition(":")
    if how == "registry":
        validate_component(what, value, key)
    elif how == "class_path":
        validate_class_path(value, key)
    elif how == "signature" and what == "lightning.pytorch.Trainer":
        validate_trainer(value, key)
    elif how == "signature":
        validate_arguments(signature_of(what), value, key)
    elif how == "name":
        REGISTRIES[what].entry(value, key=key)
    else:  # pragma: no cover - a marker without a rule is a programming error
        raise ValueError(f"no validation rule for {kind}")


def validate_recipe(config: Mapping[str, Any]) -> None:
    """Validate a whole resolved recipe (top-level keys and everything nested)."""
    validate_arguments(signature_of(RECIPE_SCHEMA), config, "")
    validate_data_against_space(config)


def require_sections(config: Mapping[str, Any], names: tuple[str, ...], verb: str) -> None:
    for name in names:
        if config.get(name) is None:
            raise RecipeError(f"`lightning-nas {verb}` needs a `{name}:` section", key=name)
