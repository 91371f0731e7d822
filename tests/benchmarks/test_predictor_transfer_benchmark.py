"""benchmarks/predictor_transfer.py on a synthetic store: both curves, the table, the plot."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from conftest import REPO

from lightning_nas.predictors.pair_store import Pair, PairStore, plan_key
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3CifarSpace
from lightning_nas.spaces.quant_policy import QuantPolicySpace


def load_benchmark():
    spec = importlib.util.spec_from_file_location("predictor_transfer", REPO / "benchmarks" / "predictor_transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_store(path: Path, fp32: int, quant: int) -> None:
    space, policies, rng = OFAMobileNetV3CifarSpace(), QuantPolicySpace(), random.Random(0)
    store = PairStore(path)
    for kind, count in (("fp32", fp32), ("quant", quant)):
        for i in range(count):
            config = space.sample(rng)
            policy = policies.sample(rng, space.num_blocks) if kind == "quant" else None
            active = space.active_blocks(config)
            top1 = 60 + 0.5 * sum(config["ks"][b] for b in active) + 0.3 * sum(config["e"][b] for b in active)
            if policy is not None:
                top1 -= 0.5 * sum(8 - policy["pw_w"][b] for b in active)
            store.add(Pair(config, policy, config["r"], top1, None, "synthetic", 0, 1.0, kind=kind,
                           pair_key=plan_key("synthetic", kind, 0, i)))


def test_transfer_and_scratch_curves_are_written(tmp_path: Path) -> None:
    synthetic_store(tmp_path / "pairs.sqlite", fp32=300, quant=90)
    report = load_benchmark().main(["--store", str(tmp_path / "pairs.sqlite"), "--sizes", "20,40", "--seeds", "2",
                                    "--test-pairs", "50", "--epochs", "40", "--hidden", "32", "--layers", "2",
                                    "--lr", "3e-3", "--out", str(tmp_path / "out")])
    summary = report["summary"]
    assert set(summary) == {"20", "40"} and all(set(v) == {"transfer", "scratch"} for v in summary.values())
    assert all(r["test_pairs"] == 50 for r in report["runs"])
    assert {r["train_pairs"] for r in report["runs"]} == {20, 40}
    # the fp32 predictor already knows the architecture part of the ranking
    assert summary["20"]["transfer"]["kendall_mean"] > summary["20"]["scratch"]["kendall_mean"]
    assert (tmp_path / "out" / "sample_efficiency.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.json").is_file()
