"""``lightning-nas fit``: train the recipe's task on its data with a Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import build, build_trainer, prepare_run_dir, resume_checkpoint, seed_everything, write_config

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def ddp_strategy_for(task: object, trainer_args: dict) -> dict:
    """A task that runs different subnets per step leaves parameters unused: tell DDP so."""
    strategy = trainer_args.get("strategy")
    if getattr(task, "ddp_find_unused_parameters", False) and strategy in DDP_STRATEGIES:
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    return {}


def run(recipe: LoadedRecipe) -> Path:
    config = recipe.config
    require_sections(config, ("task", "data"), "fit")
    run_dir = prepare_run_dir(recipe, config=False)
    seed_everything(config["seed"])
    from ..registry import DATA, TASKS

    datamodule = build("data", lambda: DATA.build(config["data"]))
    task = build("task", lambda: TASKS.build(config["task"]))
    trainer = build_trainer(config, run_dir, **ddp_strategy_for(task, config.get("trainer", {})))
    if trainer.is_global_zero:  # one config.yaml on a cluster too (node 1 sees no LOCAL_RANK/NODE_RANK on SLURM)
        write_config(recipe, run_dir)
    # A supernet checkpoint carries its distillation teacher as a module, so it is not weights-only.
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume_checkpoint(config, run_dir), weights_only=False)
    return run_dir
