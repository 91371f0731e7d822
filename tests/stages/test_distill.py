"""``lightning-nas distill``: the loss table, skipped finished cells, resumed cells (tiny teacher, digits)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_datamodule, write_recipe

from lightning_nas.recipe.sections import DistillSettings
from lightning_nas.spaces.spaceevo_layout import CIFAR_LAYOUT, substage_choices
from lightning_nas.stages import distill

TINY_TEACHER = {"name": "ofa_mbv3_cifar", "width_mult": 0.5, "resolutions": [16], "kernel_choices": [3],
                "expand_choices": [3], "depth_choices": [1], "head_channels": 32, "feature_channels": 32}


def tiny_teacher(*_args: object) -> object:
    from lightning_nas.nn.builders import build_supernet
    from lightning_nas.registry import SPACES
    from lightning_nas.tasks.block_distill import OFAStages

    torch.manual_seed(0)
    space = SPACES.build(TINY_TEACHER)
    return OFAStages(build_supernet(space).extract(space.largest())).eval()


RECIPE = """
description: tiny distill
run_dir: {run_dir}
data: {{name: digits, image_size: 16, batch_size: 32, num_workers: 0, holdout_size: 200, train_subset: 64}}
distill:
  teacher: {teacher}
  stages: [3]
  block_types: [dual_dw, mbconv]
  epochs: 1
  qat_epochs: 1
  table_substages: 5
  table_images: 64
  bn_images: 32
  batch_size: 32
  progress: false
trainer: {{accelerator: cpu, limit_train_batches: 2, enable_progress_bar: false, enable_model_summary: false}}
logger: null
smoke: [distill.epochs=1]
"""


def test_table_rows_fit_the_layout_and_a_rerun_skips_finished_cells(one_thread: None, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_nas.cli import main

    monkeypatch.setattr("lightning_nas.tasks.block_distill.teacher_from_supernet_checkpoint", tiny_teacher)
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(b"")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, RECIPE.format(run_dir=run_dir, teacher=teacher))
    assert main(["distill", str(recipe)]) == 0
    table = run_dir / distill.TABLE_FILE
    rows = list(csv.DictReader(table.open()))
    assert tuple(rows[0]) == distill.COLUMNS
    assert len(rows) == 10
    for block_type in ("dual_dw", "mbconv"):
        cell = [r for r in rows if r["block_type"] == block_type]
        assert len(cell) == 5 and all(r["stage"] == "3" for r in cell)
        choices = substage_choices(3, block_type, None, CIFAR_LAYOUT)
        subs = {(int(r["width"]), int(r["depth"]), int(r["kernel"]), float(r["expand"])) for r in cell}
        assert len(subs) == 5
        assert subs <= {(s.width, s.depth, s.kernel, float(s.expand)) for s in choices}
        assert all(float(r["loss"]) > 0 for r in cell)
    before = table.read_text()
    # a rerun finds both cells finished: nothing trains, nothing is appended
    monkeypatch.setattr(distill, "distill_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert main(["distill", str(recipe)]) == 0
    assert table.read_text() == before


class _Kill(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("killed")  # as a kill: the epoch-0 checkpoint is all there is


class _Steps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: object) -> None:
        self.steps += 1


def test_a_killed_cell_resumes_and_trains_the_full_schedule(one_thread: None, tmp_path: Path) -> None:
    settings = DistillSettings(teacher="unused", epochs=3, qat_epochs=0, table_substages=2, table_images=32,
                               bn_images=32, batch_size=32, progress=False)
    config = {"trainer": {"accelerator": "cpu", "limit_train_batches": 2, "enable_progress_bar": False,
                          "enable_model_summary": False}, "name": "t", "logger": None}
    datamodule = tiny_datamodule()
    datamodule.setup("fit")
    cell_dir = tmp_path / "cell"
    teacher = tiny_teacher()
    with pytest.raises(RuntimeError, match="killed"):
        distill.distill_cell(config, settings, teacher, datamodule, 4, "dual_dw", cell_dir, CIFAR_LAYOUT,
                             callbacks=[_Kill()])
    first = torch.load(cell_dir / "fp32" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2  # one epoch of 2 batches before the kill
    steps = _Steps()
    rows = distill.distill_cell(config, settings, teacher, datamodule, 4, "dual_dw", cell_dir, CIFAR_LAYOUT,
                                callbacks=[steps])
    final = torch.load(cell_dir / "fp32" / "last.ckpt", weights_only=False)
    assert steps.steps == 4  # the two remaining epochs, not a fresh or shortened schedule
    assert final["global_step"] == 6 and final["epoch"] == 2  # saved at the end of epoch index 2 of 0..2
    schedule = final["lr_schedulers"][0]
    assert schedule["last_epoch"] == 6  # the cosine schedule continued over the whole run
    assert len(rows) == 2
