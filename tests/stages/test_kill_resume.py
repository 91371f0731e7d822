"""SIGKILL every long stage mid-run, rerun it, and compare with a run that was never interrupted.

Each test kills the stage's whole process group at a moment it observes (a first unit on disk) or
at a pause point (:func:`lightning_nas.files.pause_point`: a file complete under its temporary
name, not yet renamed), reruns the same command (the supernet and QAT fits with ``ckpt_path=last``),
and checks that the result equals an uninterrupted run's and that no file in the run directory is
half-written. Slow: each runs a stage two or three times in subprocesses.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CIFAR10_DIR, REPO, SHARED

from lightning_nas.files import PAUSE_AT_ENV, PAUSE_FILE_ENV

pytestmark = pytest.mark.slow


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_nas.cli", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run(command: list[str], timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=environment(**extra), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float = 300, **extra: str) -> None:
    """Start ``command`` in its own process group and SIGKILL the group once ``ready()``."""
    process = subprocess.Popen(command, cwd=REPO, env=environment(**extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    alive = process.poll() is None
    if alive:
        os.killpg(process.pid, signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert alive, f"the stage ended before it could be killed:\n{stderr[-3000:]}"
    assert process.returncode == -signal.SIGKILL


def kill_at(command: list[str], point: str, marker: Path, timeout: float = 300) -> None:
    """SIGKILL the stage at a pause point (see :mod:`lightning_nas.files`)."""
    kill_when(command, marker.exists, timeout, **{PAUSE_AT_ENV: point, PAUSE_FILE_ENV: str(marker)})


def assert_complete(directory: Path) -> None:
    """No temporary left behind, and every file of a known kind reads back whole."""
    temporaries = [p for p in directory.rglob("*.tmp")]
    assert not temporaries, temporaries
    for path in directory.rglob("*"):
        if not path.is_file() or path.name.endswith(".lock"):
            continue
        suffix = path.suffix
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".jsonl":
            assert path.read_bytes().endswith(b"\n")
            for line in path.read_text().splitlines():
                json.loads(line)
        elif suffix == ".csv":
            with path.open(newline="") as stream:
                rows = list(csv.reader(stream))
            assert rows and all(len(row) == len(rows[0]) for row in rows), path
        elif suffix in (".pt", ".ckpt"):
            with zipfile.ZipFile(path) as archive:  # torch's format; read without unpickling
                assert archive.testzip() is None, path
        elif suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), path
        elif suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(path)))
        elif suffix == ".sqlite":
            with sqlite3.connect(path) as connection:
                assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def state_dict(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    first, second = state_dict(a), state_dict(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not (torch.equal(first[k], second[k]) if isinstance(first[k], torch.Tensor)
                                          else first[k] == second[k])]
    assert not different, different[:5]


def validation_rows(run_dir: Path) -> list[dict]:
    """The validation metrics per epoch of ``metrics.csv``."""
    with (run_dir / "logs" / "metrics.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    keys = sorted(k for k in rows[0] if k.startswith("val/"))
    return [{k: r[k] for k in ["epoch", "step", *keys]} for r in rows if any(r[k] for k in keys)]


# --------------------------------------------------------------------------- supernet fit


SUPERNET = ("fit", "recipes/ofa_supernet.yaml", "--smoke")


@pytest.fixture(scope="module")
def supernet_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted smoke supernet in ``<runs>/ofa_supernet`` (other stages read it there)."""
    runs = tmp_path_factory.mktemp("runs")
    run(cli(*SUPERNET, f"vars.runs={runs}"))
    return runs


def test_killed_supernet_fit_resumes_exactly(tmp_path: Path, supernet_runs: Path) -> None:
    run_dir = tmp_path / "supernet"
    last = run_dir / "checkpoints" / "last.ckpt"
    kill_when(cli(*SUPERNET, f"run_dir={run_dir}"), last.is_file)  # killed after its first epoch
    run(cli(*SUPERNET, f"run_dir={run_dir}", "ckpt_path=last"))
    reference = supernet_runs / "ofa_supernet"
    assert_same_weights(reference / "checkpoints" / "last.ckpt", last)
    assert validation_rows(run_dir) == validation_rows(reference) and len(validation_rows(reference)) == 4
    assert (run_dir / "subnets.csv").read_text() == (reference / "subnets.csv").read_text()
    assert_complete(run_dir)


def test_supernet_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path,
                                                                         supernet_runs: Path) -> None:
    run_dir, marker = tmp_path / "supernet", tmp_path / "paused"
    # the second write of last.ckpt (end of epoch 1): complete under its temporary name
    kill_at(cli(*SUPERNET, f"run_dir={run_dir}"), "replace:last.ckpt@2", marker)
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert list((run_dir / "checkpoints").glob(".last.ckpt.*.tmp"))  # the unfinished write, under its own name
    run(cli(*SUPERNET, f"run_dir={run_dir}", "ckpt_path=last"))
    assert_same_weights(supernet_runs / "ofa_supernet" / "checkpoints" / "last.ckpt",
                        run_dir / "checkpoints" / "last.ckpt")
    assert_complete(run_dir)


# --------------------------------------------------------------------------- pair collection


def pairs_command(runs: Path, run_dir: Path) -> list[str]:
    return cli("fit", "recipes/pairs_fp32.yaml", "--smoke", f"vars.runs={runs}", f"run_dir={run_dir}")


def stored_pairs(run_dir: Path) -> dict[str, tuple]:
    from lightning_nas.predictors.pair_store import PairStore

    return {p.pair_key: (p.arch, p.resolution, p.top1, p.loss) for p in PairStore(run_dir / "pairs.sqlite").pairs()}


def test_killed_pair_collection_loses_at_most_the_pair_in_flight(tmp_path: Path, supernet_runs: Path) -> None:
    from lightning_nas.predictors.pair_store import PairStore

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(pairs_command(supernet_runs, reference))
    store = killed / "pairs.sqlite"
    kill_when(pairs_command(supernet_runs, killed), lambda: store.is_file() and len(PairStore(store)) >= 3)
    before = stored_pairs(killed)
    assert 3 <= len(before) < 12
    run(pairs_command(supernet_runs, killed))
    after = stored_pairs(killed)
    assert after == stored_pairs(reference) and len(after) == 12
    assert all(after[key] == value for key, value in before.items())  # nothing measured twice
    assert_complete(killed)


# --------------------------------------------------------------------------- latency profiling


def profile_command(output: Path) -> list[str]:
    return cli("profile", "recipes/latency_lut_cpu.yaml", "--smoke", f"run_dir={output.parent}",
               f"profile.output={output}", "profile.limit=null", "profile.precisions=[fp32]")


def test_killed_profile_keeps_every_entry_it_measured(tmp_path: Path) -> None:
    from lightning_nas.hardware.latency_table import LatencyTable

    reference, killed = tmp_path / "reference" / "table.json", tmp_path / "killed" / "table.json"
    run(profile_command(reference))
    entries = len(LatencyTable.load(reference).keys("fp32"))

    def measured(n: int) -> Callable[[], bool]:
        return lambda: killed.is_file() and len(LatencyTable.load(killed).keys("fp32")) >= n

    kill_when(profile_command(killed), measured(3))
    before = LatencyTable.load(killed).entries["fp32"]
    assert 3 <= len(before) < entries
    rerun = run(profile_command(killed))
    after = LatencyTable.load(killed).entries["fp32"]
    assert set(after) == set(LatencyTable.load(reference).keys("fp32"))
    assert all(after[key] == entry for key, entry in before.items())  # kept, not measured again
    assert f"{len(before)} reused" in rerun.stdout
    assert_complete(killed.parent)


# --------------------------------------------------------------------------- zero-cost statistics


needs_shared = pytest.mark.skipif(not (CIFAR10_DIR / "train.npz").is_file()
                                  or not (SHARED / "benchdata" / "nb201" / "nb201_dev.csv").is_file(),
                                  reason="needs ../shared data")


def parzc_command(run_dir: Path) -> list[str]:
    return cli("fit", "recipes/parzc_nb201.yaml", "--smoke", f"run_dir={run_dir}")


@needs_shared
def test_killed_zero_cost_statistics_resume_to_the_same_model(tmp_path: Path) -> None:
    from lightning_nas.predictors.zc_cache import load_statistics

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(parzc_command(reference))
    cache = killed / "zc_stats.jsonl"

    def records() -> int:
        return len(cache.read_bytes().splitlines()) - 1 if cache.is_file() else 0

    kill_when(parzc_command(killed), lambda: records() >= 2)
    done_before = records()
    run(parzc_command(killed))
    ours, theirs = load_statistics(cache), load_statistics(reference / "zc_stats.jsonl")
    assert ours.archs == theirs.archs and ours.proxies == theirs.proxies
    import numpy as np

    np.testing.assert_array_equal(ours.nodes, theirs.nodes)
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    # each architecture once, but for at most the one being computed when the kill came
    lines = cache.read_text().splitlines()[1:]
    assert len(ours.archs) <= len(lines) <= len(ours.archs) + 1 and done_before >= 2
    assert validation_rows(killed) == validation_rows(reference)
    assert_same_weights(reference / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")
    assert_complete(killed)


# --------------------------------------------------------------------------- search


def write_predictor(path: Path) -> None:
    import torch

    from lightning_nas.predictors.accuracy import QuantAccuracyPredictor, save_predictor
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    torch.manual_seed(0)
    predictor = QuantAccuracyPredictor(space.encoding_size, QuantPolicySpace().encoding_size(space.num_blocks),
                                       hidden=32, layers=2, base_accuracy=70.0)
    path.parent.mkdir(parents=True)
    save_predictor(predictor.eval(), path)


def search_command(runs: Path, run_dir: Path) -> list[str]:
    return cli("search", "recipes/apq_int8.yaml", "--smoke", f"vars.runs={runs}", f"run_dir={run_dir}",
               "logger=null")


def search_outputs(run_dir: Path) -> tuple[dict, str]:
    topk = json.loads((run_dir / "search" / "topk.json").read_text())
    # timings, and NNI's experiment directory (inside the run directory, named by a random id)
    for varying in ("seconds", "candidates_per_second", "nni_experiment_dir"):
        topk.pop(varying)
    return topk, (run_dir / "search" / "pareto.csv").read_text()


def test_search_killed_while_writing_its_outputs_reruns_to_the_same_result(tmp_path: Path) -> None:
    write_predictor(tmp_path / "predictor_quant" / "predictor.pt")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(search_command(tmp_path, reference))
    kill_at(search_command(tmp_path, killed), "replace:pareto.csv", tmp_path / "paused")
    assert json.loads((killed / "search" / "topk.json").read_text())["topk"]  # written whole before the kill
    assert not (killed / "search" / "pareto.csv").exists()  # its content exists only under a temporary name
    run(search_command(tmp_path, killed))
    assert search_outputs(killed) == search_outputs(reference)
    assert_complete(killed)


# --------------------------------------------------------------------------- QAT


def qat_command(runs: Path, run_dir: Path, *extra: str) -> list[str]:
    return cli("fit", "recipes/qat_finetune.yaml", "--smoke", f"vars.runs={runs}", f"run_dir={run_dir}",
               "trainer.max_epochs=2", *extra)


def qat_results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "qat_metrics.json").read_text())
    return {k: metrics[k] for k in ("config", "policy", "test_top1", "test_images", "epochs", "steps",
                                    "bn_frozen_at_step")}


def test_killed_qat_resumes_exactly(tmp_path: Path, supernet_runs: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(qat_command(supernet_runs, reference))
    kill_when(qat_command(supernet_runs, killed), (killed / "checkpoints" / "last.ckpt").is_file)
    run(qat_command(supernet_runs, killed, "ckpt_path=last"))
    assert qat_results(killed) == qat_results(reference)
    assert_same_weights(reference / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")
    assert_complete(killed)


def test_qat_killed_while_writing_its_metrics_reruns_to_the_same_result(tmp_path: Path, supernet_runs: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(qat_command(supernet_runs, reference, "trainer.max_epochs=1"))
    kill_at(qat_command(supernet_runs, killed, "trainer.max_epochs=1"), "replace:qat_metrics.json",
            tmp_path / "paused")
    assert (killed / "qat_subnet.pt").is_file() and not (killed / "qat_metrics.json").exists()
    run(qat_command(supernet_runs, killed, "trainer.max_epochs=1"))
    assert qat_results(killed) == qat_results(reference)
    assert_complete(killed)


# --------------------------------------------------------------------------- deploy


def deploy_command(qat_dir: Path, run_dir: Path) -> list[str]:
    """The shipped deploy recipe on the subnet of ``qat_dir`` (its images: the QAT run's config.yaml)."""
    return cli("deploy", "recipes/deploy_int8.yaml", "--smoke", f"deploy.qat_subnet={qat_dir / 'qat_subnet.pt'}",
               f"run_dir={run_dir}", "deploy.progress=false")


def deploy_results(run_dir: Path) -> dict:
    latency = json.loads((run_dir / "latency.json").read_text())  # timings apart, a deployment repeats exactly
    return {k: latency[k] for k in ("config", "target", "agreement", "top1", "calibrated_tensors", "carried_ranges")}


def test_deploy_killed_while_exporting_onnx_reruns_to_the_same_result(tmp_path: Path, supernet_runs: Path) -> None:
    qat = tmp_path / "qat"
    run(qat_command(supernet_runs, qat, "trainer.max_epochs=1"))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(deploy_command(qat, reference))
    kill_at(deploy_command(qat, killed), "replace:model_int8.onnx", tmp_path / "paused")
    assert not (killed / "model_int8.onnx").exists() and not (killed / "latency.json").exists()
    run(deploy_command(qat, killed))
    assert deploy_results(killed) == deploy_results(reference)
    assert_complete(killed)


# --------------------------------------------------------------------------- pipeline


def test_killed_pipeline_resumes_its_unfinished_fit_exactly(tmp_path: Path, supernet_runs: Path) -> None:
    recipe = tmp_path / "one_stage.yaml"
    recipe.write_text(f"description: x\nrun_dir: {tmp_path / 'runs'}\npipeline:\n  smoke: true\n  stages:\n"
                      "    - recipe: recipes/ofa_supernet.yaml\n")
    stage_dir = tmp_path / "runs" / "ofa_supernet"
    command = cli("pipeline", str(recipe))
    kill_when(command, (stage_dir / "checkpoints" / "last.ckpt").is_file)
    done = run(command)
    assert "resuming the interrupted run" in done.stdout
    assert_same_weights(supernet_runs / "ofa_supernet" / "checkpoints" / "last.ckpt",
                        stage_dir / "checkpoints" / "last.ckpt")
    assert_complete(tmp_path / "runs")


def test_killed_quickstart_pipeline_resumes_at_the_unfinished_stage(tmp_path: Path) -> None:
    from lightning_nas.predictors.pair_store import PairStore

    run_dir = tmp_path / "quickstart"
    command = cli("pipeline", "recipes/quickstart.yaml", "--smoke", f"run_dir={run_dir}")
    store = run_dir / "pairs_quant" / "pairs.sqlite"
    # killed in the fourth stage (quantized pairs), after three stages finished and a few pairs
    kill_when(command, lambda: store.is_file() and len(PairStore(store)) >= 2, timeout=900)
    finished = {p.parent.name for p in run_dir.glob("*/stage_done.json")}
    assert finished == {"ofa_supernet", "pairs_fp32", "predictor_fp32"}
    before = {p.pair_key: p.top1 for p in PairStore(store).pairs()}
    done = run(command, timeout=1200)
    with (run_dir / "pipeline.csv").open(newline="") as stream:
        status = {Path(r["recipe"]).stem: r["status"] for r in csv.DictReader(stream)}
    assert status == {"ofa_supernet": "reused", "pairs_fp32": "reused", "predictor_fp32": "reused",
                      "pairs_quant": "ran", "apq_int8": "ran", "qat_finetune": "ran", "deploy_int8": "ran"}
    assert done.stdout.count("finished before") == 3
    after = {p.pair_key: p.top1 for p in PairStore(store).pairs()}
    import yaml

    planned = yaml.safe_load((run_dir / "pairs_quant" / "config.yaml").read_text())["callbacks"]["pairs"]
    assert len(after) == planned["init_args"]["num_pairs"] > len(before)
    assert all(after[key] == top1 for key, top1 in before.items())
    assert json.loads((run_dir / "qat_finetune" / "qat_metrics.json").read_text())["test_top1"] >= 0
    assert json.loads((run_dir / "deploy_int8" / "latency.json").read_text())["agreement"]["images"] > 0
    assert_complete(run_dir)
