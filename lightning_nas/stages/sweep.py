"""``lightning-nas sweep``: a W&B sweep definition from the recipe's ``sweep:`` section.

The sweep's runs call ``lightning-nas fit RECIPE key=value ...`` with flat dotted keys, which is
exactly the override syntax, so every swept parameter is validated here first by loading the
recipe with a sample value for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..files import write_text
from ..recipe.errors import RecipeError
from ..recipe.loader import LoadedRecipe, load_recipe
from ..recipe.validate import require_sections


def sample_value(spec: dict[str, Any]) -> Any:
    """A value a W&B parameter spec can produce, to validate the key it sets."""
    if "value" in spec:
        return spec["value"]
    if spec.get("values"):
        return spec["values"][0]
    if "min" in spec:
        return spec["min"]
    if "max" in spec:
        return spec["max"]
    raise RecipeError("a sweep parameter needs value, values, or min/max", given=spec,
                      allowed="{values: [...]}, {value: x}, {min: a, max: b, distribution: ...}")


def _override_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def sweep_definition(recipe: LoadedRecipe, overrides: Sequence[str] = ()) -> dict[str, Any]:
    config = recipe.config
    require_sections(config, ("sweep",), "sweep")
    settings = config["sweep"]
    for key, spec in settings["parameters"].items():
        where = f"sweep.parameters.{key}"
        try:
            load_recipe(recipe.path, [*overrides, f"{key}={_override_text(sample_value(spec))}"])
        except RecipeError as error:
            raise RecipeError(f"this swept key does not fit the recipe: {error.render()}", key=where,
                              source=str(recipe.path)) from None
    definition: dict[str, Any] = {
        "method": settings["method"],
        "parameters": settings["parameters"],
        "command": ["${env}", "lightning-nas", "fit", str(recipe.path), *overrides, "${args_no_hyphens}"],
    }
    for optional in ("metric", "name", "early_terminate", "run_cap"):
        if settings.get(optional) is not None:
            definition[optional] = settings[optional]
    return definition


def run(recipe: LoadedRecipe, overrides: Sequence[str] = (), out: str | None = None, start: bool = False,
        count: int | None = None) -> Path:
    definition = sweep_definition(recipe, overrides)
    path = Path(out) if out else Path(recipe.config["run_dir"]) / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(definition, sort_keys=False))
    print(f"sweep definition: {path}")
    if start:
        import wandb

        settings = recipe.config.get("wandb") or {}
        sweep_id = wandb.sweep(definition, project=settings.get("project", "lightning-nas"),
                               entity=settings.get("entity"))
        print(f"sweep id: {sweep_id}; starting an agent")
        wandb.agent(sweep_id, count=count)
    return path
