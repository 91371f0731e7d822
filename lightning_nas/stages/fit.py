"""``lightning-nas fit``: train the recipe's task on its data with a Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import build, build_trainer, prepare_run_dir, resume_checkpoint, seed_everything


def run(recipe: LoadedRecipe) -> Path:
    config = recipe.config
    require_sections(config, ("task", "data"), "fit")
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    from ..registry import DATA, TASKS

    datamodule = build("data", lambda: DATA.build(config["data"]))
    task = build("task", lambda: TASKS.build(config["task"]))
    trainer = build_trainer(config, run_dir)
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume_checkpoint(config, run_dir))
    return run_dir
