"""Block-wise distillation of one SpaceEvo cell (tiny random teachers)."""

from __future__ import annotations

import pytest
import torch

from lightning_nas.nn.builders import build_supernet
from lightning_nas.registry import SPACES
from lightning_nas.spaces.spaceevo_layout import CIFAR_LAYOUT, substage_choices
from lightning_nas.tasks.block_distill import (
    BlockDistillTask,
    OFAStages,
    normalized_squared_error,
    sample_substages,
    stage_io,
)

TINY_TEACHER = {"name": "ofa_mbv3_cifar", "width_mult": 0.5, "resolutions": [16], "kernel_choices": [3],
                "expand_choices": [3], "depth_choices": [1], "head_channels": 32, "feature_channels": 32}


def tiny_teacher() -> OFAStages:
    torch.manual_seed(0)
    space = SPACES.build(TINY_TEACHER)
    return OFAStages(build_supernet(space).extract(space.largest())).eval()


def test_loss_is_the_hand_computation_normalised_by_the_teacher() -> None:
    teacher = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    student = torch.tensor([[1.5, 2.0], [2.0, 6.0]])
    # squared error 0.25 + 1 = 1.25; teacher mean 3, spread 4 + 1 + 0 + 9 = 14
    assert float(normalized_squared_error(student, teacher)) == pytest.approx(1.25 / 14)
    # scaling the student changes its own spread, not the denominator
    doubled = normalized_squared_error(2 * student, teacher)
    assert float(doubled) == pytest.approx(float(((2 * student - teacher) ** 2).sum()) / 14)
    # a constant prediction of the teacher's mean scores exactly 1
    assert float(normalized_squared_error(torch.full_like(teacher, 3.0), teacher)) == pytest.approx(1.0)


def test_teacher_stage_strides_match_the_spaceevo_layout() -> None:
    teacher = tiny_teacher()
    assert teacher.stage_strides == [s.stride for s in CIFAR_LAYOUT.stages]
    outputs = teacher.forward_stages(torch.randn(1, 3, 32, 32))
    assert [o.shape[-1] for o in outputs] == [*CIFAR_LAYOUT.stage_sizes(), 2]


def test_sampled_substages_are_distinct_seeded_and_cover_every_width() -> None:
    picked = sample_substages(2, "mbconv", 30, seed=3)
    assert len(set(picked)) == 30
    assert picked == sample_substages(2, "mbconv", 30, seed=3)
    assert picked != sample_substages(2, "mbconv", 30, seed=4)
    assert {s.width for s in picked} == set(CIFAR_LAYOUT.stages[2].widths)
    assert all(s in substage_choices(2, "mbconv") for s in picked)
    assert sample_substages(3, "bottleneck", 10_000, seed=0) == substage_choices(3, "bottleneck")


def test_a_few_sandwich_steps_reduce_the_loss(one_thread: None, tmp_path) -> None:
    from conftest import quiet_trainer

    torch.manual_seed(0)
    teacher = tiny_teacher()
    task = BlockDistillTask(teacher, stage=3, block_type="dual_dw", resolution=16, random_substages=1, lr=3e-3)
    images = torch.randn(64, 3, 16, 16)
    features = [stage_io(teacher, images[i:i + 16], 3) for i in range(0, 64, 16)]
    probe = [task.student.stage.largest(), task.student.stage.smallest()]
    bn_inputs = [t_in for t_in, _ in features]  # elastic batch norms are re-estimated per sub-stage
    before = task.substage_losses(probe, features, bn_inputs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=16)
    trainer = quiet_trainer(tmp_path, max_epochs=8, limit_val_batches=0)
    trainer.fit(task, train_dataloaders=loader)
    after = task.substage_losses(probe, features, bn_inputs)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)


def test_int8_phase_fake_quantizes_every_stage_conv_and_keeps_training(one_thread: None) -> None:
    from lightning_nas.nn.quantize_model import get_bits, quantized_layers

    teacher = tiny_teacher()
    task = BlockDistillTask(teacher, stage=3, block_type="mbconv_se", resolution=16, quantize=True)
    bits = get_bits(task.student.stage)
    assert bits and all(b == (8, 8) for b in bits.values())
    assert any("se." in name for name in bits)
    images = torch.randn(8, 3, 16, 16)
    task.calibrate([images])
    features = [stage_io(teacher, images, 3)]
    sub = task.student.stage.largest()
    quantized = task.substage_losses([sub], features)[0]
    for wq, aq in quantized_layers(task.student.stage).values():
        wq.bits, aq.bits = None, None
    assert task.substage_losses([sub], features)[0] != pytest.approx(quantized, rel=1e-6)
