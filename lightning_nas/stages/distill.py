"""``lightning-nas distill``: SpaceEvo's quantization term by block-wise distillation.

For every (stage, block type) cell of the SpaceEvo CIFAR layout (``distill.stages`` x
``distill.block_types``): train the cell's elastic stage against the teacher's stage
(:class:`~lightning_nas.tasks.block_distill.BlockDistillTask`; ``epochs`` in float, then
``qat_epochs`` of int8 QAT), then score ``table_substages`` sampled sub-stages (int8
fake-quantized normalised loss on held-out images) into the table ``losses.csv`` with the columns
``stage, block_type, width, depth, kernel, expand, loss`` (the loss half of
:class:`~lightning_nas.search.spaceevo.SpaceEvoTables`).

Crash safety: the table is rewritten whole (temporary file, then rename) after each cell, and a
cell is finished when its rows are in it, so a rerun skips finished cells. Inside a cell each
phase keeps ``cells/<stage>_<block type>/<phase>/last.ckpt`` (written every epoch); a killed cell
resumes from it with Lightning's restored epoch, step and learning-rate schedule, so a resumed
cell trains the full schedule (the reference's resumed distillation trains fewer epochs).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..files import replacing
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import atomic_checkpoint_io, build_loggers, prepare_run_dir, seed_everything

TABLE_FILE = "losses.csv"
COLUMNS = ("stage", "block_type", "width", "depth", "kernel", "expand", "loss")


def read_table(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise RecipeError("the table file has other columns", key="distill.output", given=str(path),
                              allowed=f"a losses.csv of this stage ({', '.join(COLUMNS)}) or a new path")
        return list(reader)


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    with replacing(path) as temporary:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def finished_cells(rows: list[dict[str, str]]) -> set[tuple[int, str]]:
    return {(int(row["stage"]), row["block_type"]) for row in rows}


def _cells(settings: Any, layout: Any) -> list[tuple[int, str]]:
    stages = list(range(layout.num_stages)) if settings.stages is None else list(settings.stages)
    for stage in stages:
        if not 0 <= stage < layout.num_stages:
            raise RecipeError("stage index out of range", key="distill.stages", given=settings.stages,
                              allowed=f"indices 0..{layout.num_stages - 1}")
    types = list(layout.block_types) if settings.block_types is None else list(settings.block_types)
    unknown = [t for t in types if t not in layout.block_types]
    if unknown:
        raise RecipeError("unknown block type", key="distill.block_types", given=unknown, allowed=layout.block_types)
    return [(stage, block_type) for stage in stages for block_type in types]


def _image_batches(datamodule: Any, start: int, count: int, batch_size: int) -> list[Any]:
    """Held-out images ``[start, start + count)``, normalised, in batches."""
    import torch

    images, seen = [], 0
    for batch, _ in datamodule.holdout_dataloader(batch_size=batch_size):
        images.append(batch)
        seen += len(batch)
        if seen >= start + count:
            break
    chosen = torch.cat(images)[start: start + count] if images else torch.empty(0)
    return [datamodule.normalize(chosen[i: i + batch_size]) for i in range(0, len(chosen), batch_size)]


def _fit_phase(config: Any, task: Any, datamodule: Any, directory: Path, epochs: int,
               callbacks: Sequence[Any] = ()) -> None:
    """Train ``task`` for ``epochs``, resuming from ``directory/last.ckpt`` when it is there."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..nn.safe_load import pickle_allowed

    arguments = {k: v for k, v in (config.get("trainer") or {}).items()
                 if k not in ("max_epochs", "min_epochs", "max_steps", "callbacks", "logger")}
    arguments.setdefault("plugins", [atomic_checkpoint_io()])
    # save_top_k=0 would save no last.ckpt either (Lightning writes "last" only after a saved one)
    checkpoint = ModelCheckpoint(dirpath=str(directory), save_last=True, save_top_k=1, every_n_epochs=1,
                                 save_on_train_epoch_end=True)
    trainer = pl.Trainer(default_root_dir=str(directory), max_epochs=epochs, limit_val_batches=0,
                         callbacks=[checkpoint, *callbacks],
                         logger=build_loggers(config, directory) or False, num_sanity_val_steps=0, **arguments)
    last = directory / "last.ckpt"
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None,
                weights_only=not pickle_allowed())


def distill_cell(config: Any, settings: Any, teacher: Any, datamodule: Any, stage: int, block_type: str,
                 cell_dir: Path, layout: Any,
                 callbacks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Train one cell (resumably) and return its table rows (``callbacks``: extra Lightning
    callbacks of both phases)."""
    import torch

    from ..tasks.block_distill import BlockDistillTask, sample_substages, stage_io

    resolution = datamodule.image_size
    common = {"layout": layout, "resolution": resolution, "random_substages": settings.random_substages,
              "optimizer": settings.optimizer, "weight_decay": settings.weight_decay, "sample_seed": settings.seed,
              "reduce_weight_range": settings.reduce_weight_range}
    task = BlockDistillTask(teacher, stage, block_type, lr=settings.lr, **common)
    _fit_phase(config, task, datamodule, cell_dir / "fp32", settings.epochs, callbacks)
    float_state = {k: v for k, v in task.state_dict().items()}

    held = _image_batches(datamodule, 0, settings.table_images + settings.bn_images, settings.batch_size)
    images = torch.cat(held) if held else torch.empty(0)
    if len(images) < settings.table_images + max(settings.bn_images, 1):
        raise RecipeError("the held-out split is smaller than the table's and the calibration's images",
                          key="data.holdout_size", given=len(images),
                          allowed=f"at least distill.table_images + max(distill.bn_images, 1) = "
                          f"{settings.table_images + max(settings.bn_images, 1)}")
    table = [images[i: i + settings.batch_size] for i in range(0, settings.table_images, settings.batch_size)]
    table = [b[: max(0, settings.table_images - i * settings.batch_size)] for i, b in enumerate(table)]
    rest = images[settings.table_images: settings.table_images + max(settings.bn_images, 1)]
    calibration = [rest[i: i + settings.batch_size] for i in range(0, len(rest), settings.batch_size)]

    qat = BlockDistillTask(teacher, stage, block_type, lr=settings.qat_lr, quantize=True, **common)
    missing, unexpected = qat.load_state_dict(float_state, strict=False)
    if unexpected or any("quantizer" not in key for key in missing):  # only the quantizers are new
        raise RuntimeError(f"float and int8 students differ: missing {missing}, unexpected {unexpected}")
    qat_dir = cell_dir / "int8"
    if not (qat_dir / "last.ckpt").is_file():
        qat.calibrate(calibration)
    if settings.qat_epochs > 0:
        _fit_phase(config, qat, datamodule, qat_dir, settings.qat_epochs, callbacks)
    device = qat.device
    teacher = teacher.to(device)
    features = [stage_io(teacher, b.to(device), stage) for b in table]
    bn_inputs = [stage_io(teacher, b.to(device), stage)[0] for b in calibration] if settings.bn_images else []
    substages = sample_substages(stage, block_type, settings.table_substages, settings.seed, layout)
    # The bar is opened only around scoring: a live display open while a Trainer runs breaks
    # rich's console stack when the trainer's own bar stops.
    with progress_bar(f"scoring {stage}_{block_type}", settings.progress, fields=["{task.fields[note]}"]) as bar:
        task_id = bar.add_task("sub-stages", total=len(substages), note=f"stage {stage} {block_type}")
        losses = qat.substage_losses(substages, features, bn_inputs, progress=lambda: bar.advance(task_id))
    return [{"stage": stage, "block_type": block_type, "width": s.width, "depth": s.depth, "kernel": s.kernel,
             "expand": s.expand, "loss": f"{loss:.6g}"} for s, loss in zip(substages, losses)]


def run(recipe: LoadedRecipe) -> Path:
    from ..recipe.sections import DistillSettings
    from ..registry import DATA
    from ..spaces.spaceevo_layout import CIFAR_LAYOUT
    from ..tasks.block_distill import teacher_from_supernet_checkpoint

    config = recipe.config
    require_sections(config, ("distill", "data"), "distill")
    try:
        settings = DistillSettings(**config["distill"])
    except TypeError as error:
        raise RecipeError(f"invalid distill settings ({error})", key="distill") from None
    layout = CIFAR_LAYOUT
    cells = _cells(settings, layout)
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    output = Path(settings.output) if settings.output else run_dir / TABLE_FILE
    rows = read_table(output)
    done = finished_cells(rows)
    todo = [cell for cell in cells if cell not in done]
    print(f"distill: {len(cells)} cells, {len(cells) - len(todo)} already in {output}")
    if not todo:
        return run_dir
    teacher = teacher_from_supernet_checkpoint(settings.teacher)
    datamodule = DATA.build(config["data"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    for stage, block_type in todo:
        cell_rows = distill_cell(config, settings, teacher, datamodule, stage, block_type,
                                 run_dir / "cells" / f"{stage}_{block_type}", layout)
        rows = [*rows, *cell_rows]
        write_table(output, rows)
    print(f"wrote {output}: {len(rows)} rows, {len(finished_cells(rows))} cells")
    return run_dir
