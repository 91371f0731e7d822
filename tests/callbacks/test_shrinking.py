"""Progressive shrinking: phases switch at their epochs, and a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_nas.cli import main
from lightning_nas.tasks.phases import parse_phases, phase_at_epoch

RECIPE = "recipes/ofa_supernet.yaml"
PHASES = [
    {"name": "full", "epochs": 1, "lr": 0.1},
    {"name": "kernel", "epochs": 2, "lr": 0.05, "kernel": [3, 5, 7]},
    {"name": "depth", "epochs": 1, "lr": 0.05, "kernel": [3, 5, 7], "depth": [2, 3, 4], "subnets_per_step": 2},
]
STEPS_PER_EPOCH = 2  # the smoke block's trainer.limit_train_batches
BATCH = 16  # the smoke block's data.batch_size


def fit(run_dir: Path, *extra: str) -> None:
    phases = json.dumps(PHASES)
    assert main(["fit", RECIPE, "--smoke", f"run_dir={run_dir}", f"callbacks.progressive_shrinking.init_args.phases={phases}",
                 "callbacks.checkpoint.init_args.save_top_k=-1", "task.record_subnets=true",
                 "data.resolutions=[24,28]", "trainer.log_every_n_steps=1", *extra]) == 0


def test_phase_at_epoch_maps_every_epoch() -> None:
    phases = parse_phases(PHASES)
    assert [phase_at_epoch(phases, e) for e in range(5)] == [(0, 0), (1, 1), (1, 1), (2, 3), (2, 3)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("shrinking") / "uninterrupted"
    fit(run_dir)
    return run_dir


def sampled(run_dir: Path) -> dict[int, list[dict]]:
    lines = (run_dir / "sampled_subnets_rank0.jsonl").read_text().splitlines()
    return {row["step"]: row["subnets"] for row in map(json.loads, lines)}


def test_phases_switch_at_their_epochs(uninterrupted: Path) -> None:
    by_step = sampled(uninterrupted)
    assert sorted(by_step) == list(range(4 * STEPS_PER_EPOCH))
    for step, subnets in by_step.items():
        epoch = step // STEPS_PER_EPOCH
        kernels = {k for s in subnets for k in s["ks"]}
        depths = {d for s in subnets for d in s["d"]}
        expands = {e for s in subnets for e in s["e"]}
        assert expands == {6}, step  # no phase makes the expand ratio elastic
        if epoch == 0:  # full network
            assert (kernels, depths, len(subnets)) == ({7}, {4}, 1), step
        elif epoch in (1, 2):  # kernel phase
            assert depths == {4} and len(subnets) == 1 and kernels <= {3, 5, 7} and len(kernels) > 1, step
        else:  # depth phase
            assert len(subnets) == 2 and depths <= {2, 3, 4} and len(depths) > 1, step

    rows = list(csv.DictReader((uninterrupted / "logs" / "metrics.csv").open()))
    phase_of_epoch = {int(r["epoch"]): float(r["train/phase"]) for r in rows if r.get("train/phase")}
    assert phase_of_epoch == {0: 0.0, 1: 1.0, 2: 1.0, 3: 2.0}

    table = list(csv.DictReader((uninterrupted / "phases.csv").open()))
    assert [(r["name"], int(r["first_epoch"]), int(r["epochs_done"])) for r in table] == \
        [("full", 0, 1), ("kernel", 1, 2), ("depth", 3, 1)]
    assert all(float(r["wall_s"]) > 0 for r in table)
    # every training image counted once per epoch, and the rate is images over wall time
    assert [int(r["images"]) for r in table] == [n * STEPS_PER_EPOCH * BATCH for n in (1, 2, 1)]
    assert all(float(r["images_per_s"]) == pytest.approx(int(r["images"]) / float(r["wall_s"]), rel=0.01)
               for r in table)


def test_resume_in_the_middle_of_a_phase_continues_identically(uninterrupted: Path, tmp_path: Path) -> None:
    # Epoch index 1 is the first of the kernel phase's two epochs.
    middle = uninterrupted / "checkpoints" / "epoch001.ckpt"
    resumed = tmp_path / "resumed"
    fit(resumed, f"ckpt_path={middle}")

    assert sampled(resumed) == {s: v for s, v in sampled(uninterrupted).items() if s >= 2 * STEPS_PER_EPOCH}
    expected = torch.load(uninterrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    actual = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 4 * STEPS_PER_EPOCH
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    momentum = [s["momentum_buffer"] for s in expected["optimizer_states"][0]["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in actual["optimizer_states"][0]["state"].values()]
    for a, b in zip(resumed_momentum, momentum, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The resumed run's phase table carries the epochs run before the checkpoint.
    table = list(csv.DictReader((resumed / "phases.csv").open()))
    assert [int(r["epochs_done"]) for r in table] == [1, 2, 1]
    assert [int(r["images"]) for r in table] == [n * STEPS_PER_EPOCH * BATCH for n in (1, 2, 1)]
