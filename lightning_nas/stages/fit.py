"""``lightning-nas fit``: train the recipe's task on its data with a Lightning Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..nn.safe_load import pickle_allowed
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import build_trainer, prepare_run_dir, resume_checkpoint, seed_everything, write_config

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def ddp_strategy_for(task: object, trainer_args: dict) -> dict:
    """A task that runs different subnets per step leaves parameters unused: tell DDP so."""
    strategy = trainer_args.get("strategy")
    if getattr(task, "ddp_find_unused_parameters", False) and strategy in DDP_STRATEGIES:
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    return {}


def check_resume_checkpoint(path: str, space: Mapping[str, Any] | None) -> None:
    """A checkpoint to resume from: readable without pickle, a Lightning checkpoint, same space."""
    from ..nn.safe_load import load_torch_file, require_mapping

    what = "a checkpoint written by `lightning-nas fit` of this recipe"
    checkpoint = require_mapping(load_torch_file(path, key="ckpt_path", what=what),
                                 ("state_dict", "hyper_parameters", "epoch", "global_step"),
                                 path=path, key="ckpt_path", what=what)
    hparams = checkpoint["hyper_parameters"]
    theirs = hparams.get("space") if isinstance(hparams, Mapping) else None
    if isinstance(theirs, Mapping) and isinstance(space, Mapping) and dict(theirs) != dict(space):
        raise RecipeError("the checkpoint was trained on another space", key="ckpt_path", given=path,
                          allowed=f"a checkpoint of task.space = {dict(space)} (this one's: {dict(theirs)})")


def check_num_classes(datamodule: Any, task: Any) -> None:
    """The data's classes against the classifier of the task's space (when both are known)."""
    space = getattr(task, "space", None)
    expected = getattr(space, "num_classes", None)
    found = getattr(datamodule, "num_classes", None)
    if isinstance(expected, int) and isinstance(found, int) and expected != found:
        raise RecipeError(f"the data has {found} classes but the space's classifier has {expected}",
                          key="task.space.num_classes", given=expected,
                          allowed=f"{found} (the classes of data.name={type(datamodule).__name__}), or other data")


def run(recipe: LoadedRecipe) -> Path:
    config = recipe.config
    require_sections(config, ("task", "data"), "fit")
    run_dir = prepare_run_dir(recipe, config=False)
    seed_everything(config["seed"])
    from ..registry import DATA, TASKS

    ckpt_path = resume_checkpoint(config, run_dir)
    if ckpt_path is not None:  # before any set-up: a refused file fails at once
        check_resume_checkpoint(ckpt_path, config["task"].get("space"))
    datamodule = DATA.build(config["data"])
    task = TASKS.build(config["task"])
    check_num_classes(datamodule, task)
    trainer = build_trainer(config, run_dir, **ddp_strategy_for(task, config.get("trainer", {})))
    if trainer.is_global_zero:  # one config.yaml on a cluster too (node 1 sees no LOCAL_RANK/NODE_RANK on SLURM)
        write_config(recipe, run_dir)
    # Read without pickle unless the recipe trusts its files (checked above, so refusals are clear).
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not pickle_allowed())
    if final_epoch_unvalidated(trainer):
        # Otherwise the run's last val metrics (and a supernet's subnets.csv) describe the weights
        # of an earlier epoch, not the ones in last.ckpt.
        trainer.validate(task, datamodule=datamodule, verbose=False)
    return run_dir


def final_epoch_unvalidated(trainer: Any) -> bool:
    """Whether fit ended on an epoch that ``check_val_every_n_epoch`` skipped (and validation is on)."""
    every = trainer.check_val_every_n_epoch
    if every is None or every <= 1 or trainer.current_epoch == 0 or trainer.limit_val_batches == 0:
        return False
    return trainer.current_epoch % every != 0
