"""``lightning-nas export``: extract a subnet of a trained supernet as a plain PyTorch network.

Writes ``subnet.pt`` (its config, the space spec and a state dict: plain data that loads with
``weights_only=True``; :func:`~lightning_nas.tasks.supernet.rebuild_network` rebuilds the network), ``subnet.json`` (config, MACs, parameters, the check below) and,
when asked, ``subnet.onnx``. The extracted network is checked against the supernet running the
same config: the largest absolute difference of their outputs in eval mode is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError, close_match
from ..files import replacing, write_text
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import prepare_run_dir, seed_everything

SUBNET_FILE = "subnet.pt"


def choose_subnet(task: Any, subnet: str | Mapping[str, Any]) -> dict:
    """A reference subnet by name, or a config validated against the supernet's space."""
    if isinstance(subnet, str):
        if subnet not in task.reference_subnets:
            names = list(task.reference_subnets)
            raise RecipeError("unknown reference subnet", key="export.subnet", given=subnet, allowed=names,
                              suggestion=close_match(subnet, names))
        return dict(task.reference_subnets[subnet])
    try:
        return task.space.canonical(task.space.validate(subnet))
    except ValueError as error:
        raise RecipeError(str(error), key="export.subnet", given=dict(subnet)) from None


def load_supernet_task(checkpoint: str):
    from ..tasks.supernet import SupernetTask

    return SupernetTask.from_checkpoint_file(checkpoint, "export.checkpoint")


def run(recipe: LoadedRecipe) -> Path:
    import torch

    from ..nn.bn_recalibration import recalibrate_batchnorm
    from ..tasks.supernet import holdout_batches, network_record

    config = recipe.config
    require_sections(config, ("export",), "export")
    from ..recipe.sections import ExportSettings

    settings = ExportSettings(**config["export"])
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    task = load_supernet_task(settings.checkpoint)
    subnet_config = choose_subnet(task, settings.subnet)
    supernet = task.supernet.eval()
    supernet.set_active(subnet_config)
    if settings.recalibrate_bn:
        require_sections(config, ("data",), "export with recalibrate_bn")
        from ..registry import DATA

        datamodule = DATA.build(config["data"])
        datamodule.setup("fit")
        batches = holdout_batches(datamodule, settings.bn_recalibration_images, settings.bn_recalibration_batch)
        recalibrate_batchnorm(supernet, (datamodule.normalize(b, subnet_config["r"]) for b in batches))
    subnet = supernet.extract(subnet_config).eval()
    resolution = subnet_config["r"]
    probe = torch.randn(4, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        max_abs_diff = float((supernet(probe) - subnet(probe)).abs().max())
    with replacing(run_dir / SUBNET_FILE) as temporary:
        torch.save(network_record(subnet, task.hparams.space, subnet_config), temporary)
    summary = {"config": subnet_config, "space": task.hparams.space, "macs": task.space.macs(subnet_config),
               "params": task.space.params(subnet_config), "max_abs_diff_vs_supernet": max_abs_diff,
               "checkpoint": str(settings.checkpoint)}
    if settings.onnx:
        onnx_path = run_dir / "subnet.onnx"
        with replacing(onnx_path) as temporary:
            torch.onnx.export(subnet, probe[:1], str(temporary), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        summary["onnx"] = str(onnx_path)
    write_text(run_dir / "subnet.json", json.dumps(summary, indent=2))
    print(f"exported {settings.subnet if isinstance(settings.subnet, str) else 'subnet'}: "
          f"{summary['macs'] / 1e6:.2f}M MACs, {summary['params'] / 1e6:.3f}M params, "
          f"max |supernet - subnet| = {max_abs_diff:.2e}")
    return run_dir
