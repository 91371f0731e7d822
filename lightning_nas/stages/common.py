"""What every stage does with a loaded recipe: run directory, objects, Trainer."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..errors import RecipeError
from ..files import write_text
from ..recipe.loader import RUN_DIR_ENV, LoadedRecipe

CONFIG_FILE = "config.yaml"


def _third_party_argument_errors() -> tuple[type[Exception], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, MisconfigurationException)


def is_global_zero() -> bool:
    """Before a Trainer exists: the launcher's variables. A stage with a Trainer asks it instead
    (``trainer.is_global_zero`` knows every cluster environment Lightning does)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def write_config(recipe: LoadedRecipe, run_dir: Path) -> None:
    """The resolved recipe as ``run_dir/config.yaml`` (temporary name, then rename)."""
    write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(recipe.config)))


def prepare_run_dir(recipe: LoadedRecipe, config: bool = True) -> Path:
    """Create ``run_dir`` and, unless ``config`` is False (the caller writes it once it knows its
    global rank), write the resolved recipe into it by the first rank; also apply the recipe's
    ``allow_pickle`` to every file the stage loads from here on."""
    from ..nn.safe_load import set_allow_pickle

    set_allow_pickle(recipe.config.get("allow_pickle", False))
    run_dir = Path(recipe.config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if config and is_global_zero():
        write_config(recipe, run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP ranks started from this process reuse it
    return run_dir


def instantiate(spec: Mapping[str, Any], **extra: Any) -> Any:
    """``{class_path: pkg.mod.Class, init_args: {...}}`` -> an instance."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(spec.get("init_args") or {}), **extra})


def build_callbacks(config: Mapping[str, Any]) -> list[Any]:
    callbacks = []
    for name, spec in (config.get("callbacks") or {}).items():
        if spec is None:
            continue
        if spec["class_path"].startswith("lightning_nas."):
            callbacks.append(instantiate(spec))  # ours raise RecipeError for what the user can fix
            continue
        try:
            callbacks.append(instantiate(spec))
        except _third_party_argument_errors() as error:  # another library's check of the recipe's init_args
            raise RecipeError(str(error), key=f"callbacks.{name}.init_args", given=spec.get("init_args")) from None
    return callbacks


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
    if isinstance(arguments.get("profiler"), Mapping):  # {class_path, init_args}, like a callback
        arguments["profiler"] = instantiate(arguments["profiler"])
    loggers = build_loggers(config, run_dir)
    callbacks = build_callbacks(config)
    try:
        return pl.Trainer(default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False, **arguments)
    except _third_party_argument_errors() as error:  # Lightning's check of the recipe's trainer: section
        raise RecipeError(str(error), key="trainer", given=dict(config.get("trainer", {}))) from None


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
