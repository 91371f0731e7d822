"""The TPE tuner that sorts once per suggestion suggests exactly what NNI's TpeTuner suggests."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lightning_nas.search.nni_tpe import SharedOrderTpeTuner

SPACE = {f"x{i}": {"_type": "choice", "_value": [1, 2, 3] if i % 2 else [24, 28, 32, 36]} for i in range(30)}


@pytest.fixture(autouse=True)
def _quiet_tuner():
    # NNI's tuners log every duplicate suggestion at INFO
    logger = logging.getLogger("nni")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def drive(tuner_a, tuner_b, space, steps: int, in_flight: int, seed: int = 0) -> int:
    """Suggest with both tuners, report the same results in batches of ``in_flight`` (the rest
    stay running, so the constant liar is used); returns how many suggestions were compared."""
    tuner_a.update_search_space(space)
    tuner_b.update_search_space(space)
    rng = np.random.default_rng(seed)
    pending = []
    for parameter_id in range(steps):
        a, b = tuner_a.generate_parameters(parameter_id), tuner_b.generate_parameters(parameter_id)
        assert a == b, parameter_id
        pending.append((parameter_id, a))
        if len(pending) >= in_flight:
            for pid, params in pending:
                numeric = [v for v in params.values() if isinstance(v, (int, float))]
                # ties (every 7th result) exercise the stable order of the split
                value = 5.0 if pid % 7 == 0 else float(sum(numeric) + rng.normal())
                for tuner in (tuner_a, tuner_b):
                    tuner.receive_trial_result(pid, params, value)
                    tuner.trial_end(pid, True)
            pending = []
    return steps


@pytest.mark.parametrize("in_flight", [1, 6])
@pytest.mark.parametrize("mode", ["maximize", "minimize"])
def test_suggestions_equal_nni_tpe(in_flight: int, mode: str) -> None:
    from nni.algorithms.hpo.tpe_tuner import TpeTuner

    fast = SharedOrderTpeTuner(mode, seed=3)
    assert drive(TpeTuner(mode, seed=3), fast, SPACE, 160, in_flight) == 160
    assert fast._flat and fast._count == 160 // in_flight * in_flight


def test_other_spaces_and_liars_use_nni_code() -> None:
    from nni.algorithms.hpo.tpe_tuner import TpeTuner

    space = {**SPACE, "lr": {"_type": "loguniform", "_value": [1e-4, 1e-1]}}
    fast = SharedOrderTpeTuner("maximize", seed=1, tpe_args={"constant_liar_type": "mean"})
    drive(TpeTuner("maximize", seed=1, tpe_args={"constant_liar_type": "mean"}), fast, space, 60, 4)
    assert not fast._flat
    fast = SharedOrderTpeTuner("maximize", seed=2, tpe_args={"constant_liar_type": "worst"})
    drive(TpeTuner("maximize", seed=2, tpe_args={"constant_liar_type": "worst"}), fast, SPACE, 80, 5)
    assert fast._flat
