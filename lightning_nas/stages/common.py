"""What every stage does with a loaded recipe: run directory, objects, Trainer."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from ..files import write_text
from ..recipe.errors import RecipeError
from ..recipe.loader import RUN_DIR_ENV, LoadedRecipe

T = TypeVar("T")
CONFIG_FILE = "config.yaml"


def is_global_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def prepare_run_dir(recipe: LoadedRecipe) -> Path:
    """Create ``run_dir`` and write the resolved recipe into it (once, by the first rank)."""
    run_dir = Path(recipe.config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_global_zero():
        write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(recipe.config)))
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP ranks started from this process reuse it
    return run_dir


def build(key: str, make: Callable[[], T]) -> T:
    """Build one recipe component; a ValueError from its constructor becomes a recipe error."""
    try:
        return make()
    except RecipeError:
        raise
    except ValueError as error:
        raise RecipeError(str(error), key=key) from None


def instantiate(spec: Mapping[str, Any], **extra: Any) -> Any:
    """``{class_path: pkg.mod.Class, init_args: {...}}`` -> an instance."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(spec.get("init_args") or {}), **extra})


def build_callbacks(config: Mapping[str, Any]) -> list[Any]:
    return [build(f"callbacks.{name}", lambda s=spec: instantiate(s))
            for name, spec in (config.get("callbacks") or {}).items() if spec is not None]


def build_loggers(config: Mapping[str, Any], run_dir: Path) -> list[Any]:
    from ..registry import LOGGERS

    names = config.get("logger")
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    return [LOGGERS.entry(n, key="logger").load()(str(run_dir), config["name"], config.get("wandb"))
            for n in names]


def atomic_checkpoint_io() -> Any:
    """Lightning's checkpoint writer with the file written next to its target and renamed over it
    (Lightning's own stages it in the system temporary directory, which is a copy, not a rename,
    when that is another file system): a kill never leaves half a ``last.ckpt``."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from ..files import replacing

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None or "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            with replacing(path) as temporary:
                torch.save(checkpoint, temporary)

    return AtomicCheckpointIO()


def build_trainer(config: Mapping[str, Any], run_dir: Path, **overrides: Any):
    import lightning.pytorch as pl

    arguments = {**config.get("trainer", {}), **overrides}
    arguments.setdefault("plugins", [atomic_checkpoint_io()])
    loggers = build_loggers(config, run_dir)
    return build("trainer", lambda: pl.Trainer(default_root_dir=str(run_dir), callbacks=build_callbacks(config),
                                               logger=loggers or False, **arguments))


def resume_checkpoint(config: Mapping[str, Any], run_dir: Path) -> str | None:
    path = config.get("ckpt_path")
    if path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise RecipeError("ckpt_path=last but the run directory has no checkpoints/last.ckpt",
                              key="ckpt_path", given=str(last))
        return str(last)
    return path


def seed_everything(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
