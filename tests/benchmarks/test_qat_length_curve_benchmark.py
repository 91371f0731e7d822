"""benchmarks/qat_length_curve.py: the choice of length on hand-made tables, and a tiny run on an
untrained tiny supernet (3 pairs x lengths 0 and 2, plus fp32) that writes its files and resumes a
cut CSV (the plumbing needs no accuracy: a trained supernet would only make the test slower)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPACE, load_benchmark

from lightning_nas.predictors.losses import kendall_tau as reference_tau

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def curve():  # noqa: ANN201
    return load_benchmark("qat_length_curve")


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TINY_SPACE supernet checkpoint as `lightning-nas fit` writes one (weights and hyperparameters)."""
    from lightning_nas.tasks.supernet import SupernetTask

    torch.manual_seed(0)
    task = SupernetTask(space=TINY_SPACE)
    path = tmp_path_factory.mktemp("supernet") / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return str(path)


def test_the_shortest_length_that_ranks_like_the_longest_is_chosen(curve) -> None:  # noqa: ANN001
    longest = [50.0, 52.0, 55.0, 57.0, 60.0]
    table = {0: longest[::-1],  # reversed: tau -1
             10: [52.0, 50.0, 55.0, 57.0, 60.0],  # one swap of ten pairs: (9 - 1) / 10
             30: [40.0, 41.0, 42.0, 43.0, 44.0],  # same order, other values: 1
             100: longest}
    taus, chosen = curve.choose_length(table, 0.8)
    assert taus == pytest.approx({0: -1.0, 10: 0.8, 30: 1.0, 100: 1.0}, abs=1e-12)
    assert chosen == (10 if taus[10] >= 0.8 else 30)
    assert curve.choose_length(table, 0.9)[1] == 30
    assert curve.choose_length({0: [1.0, 2.0], 5: [2.0, 1.0]}, 0.8)[1] == 5  # only the longest agrees
    # a constant ranking (an untrained length) has no tau and is never chosen
    taus, chosen = curve.choose_length({0: [10.0] * 5, 10: longest[::-1], 20: longest}, -1.0)
    assert taus[0] is None and chosen == 10
    # ties: tau-b, as the exact reference computes it
    tied = [50.0, 50.0, 55.0, 54.0, 60.0, 60.0]
    target = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    taus, _ = curve.choose_length({0: tied, 1: target}, 0.8)
    assert taus[0] == pytest.approx(reference_tau(torch.tensor(tied), torch.tensor(target)), abs=1e-9)
    with pytest.raises(ValueError, match="same pairs"):
        curve.choose_length({0: [1.0, 2.0], 1: [1.0, 2.0, 3.0]}, 0.8)


def test_summary_covers_the_pairs_measured_at_every_length(curve) -> None:  # noqa: ANN001
    rows = []
    for pair, (at0, at5, fp32) in enumerate([(10, 40, 60), (20, 30, 61), (30, 50, 62), (40, 45, 63)]):
        rows += [{"pair": pair, "steps": "0", "top1": at0, "seconds": 1.0},
                 {"pair": pair, "steps": "5", "top1": at5, "seconds": 3.0},
                 {"pair": pair, "steps": "fp32", "top1": fp32, "seconds": 0.5}]
    rows.append({"pair": 4, "steps": "0", "top1": 99.0, "seconds": 1.0})  # cut before its 5 steps
    summary = curve.summarise(rows, [0, 5], 0.8)
    assert summary["complete_pairs"] == 4 and summary["pair_indices"] == [0, 1, 2, 3]
    at0, at5 = summary["lengths"]
    assert at0["top1_mean"] == pytest.approx(25.0) and at5["top1_mean"] == pytest.approx(41.25)
    assert at0["kendall_tau"] == pytest.approx(reference_tau(torch.tensor([10., 20, 30, 40]),
                                                             torch.tensor([40., 30, 50, 45])))
    assert at0["kendall_tau"] < 0.8 and summary["chosen_steps"] == 5 and summary["chosen_is_longest"]
    assert at0["seconds_per_pair"] == 1.0 and at5["seconds_per_pair"] == 3.0
    assert summary["fp32"]["seconds_per_pair"] == 0.5 and summary["fp32"]["top1_mean"] == pytest.approx(61.5)
    table = curve.markdown(summary)
    assert "| 5 | 4 | 41.25 (30.0-50.0) | 1.000 | 3.00 |" in table and "Chosen QAT length: 5 steps" in table


def run_args(checkpoint: str, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--data", "digits", "--pairs", "3", "--steps", "0,2", "--out", str(out),
            "--set", "data.image_size=16", "--set", "data.batch_size=16",
            "--set", "callbacks.pairs.init_args.bn_images=32", "--set", "callbacks.pairs.init_args.eval_images=64",
            "--set", "callbacks.pairs.init_args.batch_size=32", *extra]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def test_a_tiny_curve_is_written_and_a_cut_run_resumes(curve, untrained_checkpoint: str,  # noqa: ANN001
                                                        tmp_path: Path) -> None:
    out = tmp_path / "curve"
    report = curve.main(run_args(untrained_checkpoint, out))
    rows = read_csv(out / curve.CSV_FILE)
    assert len(rows) == 9 and report["measured_now"] == 9
    assert sorted((int(r["pair"]), r["steps"]) for r in rows) == [(p, s) for p in range(3) for s in ("0", "2", "fp32")]
    by_key = {(r["pair"], r["steps"]): r for r in rows}
    for pair in "012":
        quant, fp32 = json.loads(by_key[pair, "2"]["policy"]), json.loads(by_key[pair, "fp32"]["policy"])
        # one (architecture, policy) per pair at every length; the fp32 row is the same architecture
        assert by_key[pair, "0"]["arch"] == by_key[pair, "2"]["arch"] == by_key[pair, "fp32"]["arch"]
        assert quant == json.loads(by_key[pair, "0"]["policy"]) and quant and fp32 is None
        assert float(by_key[pair, "0"]["loss"]) != float(by_key[pair, "2"]["loss"])  # two QAT steps ran
    assert len({by_key[p, "2"]["policy"] for p in "012"}) == 3
    assert all(0 <= float(r["top1"]) <= 100 and float(r["seconds"]) > 0 for r in rows)

    summary = json.loads((out / curve.SUMMARY_FILE).read_text())
    assert summary == json.loads(json.dumps(report))
    assert summary["complete_pairs"] == 3 and [length["steps"] for length in summary["lengths"]] == [0, 2]
    assert summary["lengths"][1]["kendall_tau"] == 1.0 and summary["chosen_steps"] in (0, 2)
    tops = {s: [float(by_key[p, s]["top1"]) for p in "012"] for s in ("0", "2")}
    assert summary["lengths"][0]["top1_mean"] == pytest.approx(sum(tops["0"]) / 3)
    assert (summary["lengths"][0]["kendall_tau"] or 0) == pytest.approx(
        float(curve.kendall_tau(tops["0"], tops["2"]) or 0))
    assert summary["fp32"]["seconds_per_pair"] > 0 and len(summary["checkpoint_sha256"]) == 64
    assert (out / curve.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # cut: the last two rows lost, the one before them torn in the middle
    lines = (out / curve.CSV_FILE).read_text().splitlines(keepends=True)
    (out / curve.CSV_FILE).write_text("".join(lines[:-3]) + lines[-3][:25])
    resumed = curve.main(run_args(untrained_checkpoint, out))
    assert resumed["measured_now"] == 3
    again = read_csv(out / curve.CSV_FILE)
    assert len(again) == 9 and len({(r["pair"], r["steps"]) for r in again}) == 9
    assert again[:6] == rows[:6]  # kept, not measured again
    for row in again[6:]:  # the same numbers as before the cut: every pair is reproducible
        assert float(row["top1"]) == float(by_key[row["pair"], row["steps"]]["top1"])
        assert float(row["loss"]) == pytest.approx(float(by_key[row["pair"], row["steps"]]["loss"]), rel=1e-5)
    assert curve.main(run_args(untrained_checkpoint, out))["measured_now"] == 0

    with pytest.raises(SystemExit, match="other settings"):  # another learning rate is another curve
        curve.main(run_args(untrained_checkpoint, out, "--set", "callbacks.pairs.init_args.lr=0.1"))
