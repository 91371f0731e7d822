"""The light joint model space and the batched NNI execution engine."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from lightning_nas.search.joint_space import JointSpace
from lightning_nas.search.nni_engine import (
    BatchedExecutionEngine,
    JointDeduplication,
    JointModelSpace,
    use_joint_deduplication,
)


@pytest.fixture()
def space(joint: JointSpace) -> JointModelSpace:
    return JointModelSpace(joint)


def test_random_draws_what_nni_draws_for_the_same_random_state(joint, space) -> None:
    ours, theirs = np.random.RandomState(11), np.random.RandomState(11)
    reference = joint.mutable()  # NNI's own MutableDict of Categoricals
    for _ in range(300):
        sample: dict = {}
        reference.random(sample, theirs)
        model = space.random(random_state=ours)
        assert model.sample == sample
    # the Categoricals of simplify() (what RegularizedEvolution mutates with) draw the same too
    ours_simple, theirs_simple = space.simplify(), reference.simplify()
    assert list(ours_simple) == list(theirs_simple) == joint.labels
    draws = [(ours_simple[k].random(random_state=ours), theirs_simple[k].random(random_state=theirs))
             for _ in range(20) for k in joint.labels]
    assert all(a == b for a, b in draws)
    # a caller's fixed labels are kept, the others drawn
    model = space.random({"r": 24}, np.random.RandomState(0))
    assert model.sample["r"] == 24 and model.candidate.config["r"] == 24


def test_freeze_checks_and_copies_the_sample(joint, space) -> None:
    from nni.mutable import SampleValidationError
    from nni.nas.space import ModelStatus

    rng = random.Random(0)
    candidate = joint.sample(rng)
    sample = joint.to_sample(candidate)
    model = space.freeze(sample)
    assert model.status == ModelStatus.Frozen and space.status == ModelStatus.Initialized
    assert joint.key(model.candidate) == joint.key(candidate) == bytes(model.vector)
    sample["r"] = 24 if sample["r"] != 24 else 28  # NNI's grid reuses one dict: the model keeps its copy
    assert joint.key(model.candidate) == joint.key(candidate)
    with pytest.raises(SampleValidationError, match=r"7 not found in \[24, 28, 32\]"):
        space.freeze({**sample, "r": 7})
    with pytest.raises(SampleValidationError, match="ks_3"):
        space.freeze({k: v for k, v in sample.items() if k != "ks_3"})
    with pytest.raises(RuntimeError, match="not initialized"):
        model.freeze(sample)
    # a model built from a candidate derives its sample on demand
    built = space.freeze_candidate(candidate, origin="mutation", generation=3)
    assert built.sample == joint.to_sample(candidate) and built.origin == "mutation" and built.generation == 3


def test_batched_engine_reports_every_metric_exactly_once(joint, space) -> None:
    from nni.nas.execution.event import ModelEventType

    batches: list[int] = []

    def score(models):
        batches.append(len(models))
        return [float(sum(m.vector)) for m in models]

    engine = BatchedExecutionEngine(score, concurrency=7, max_model_count=30)
    finals: Counter = Counter()
    ends: Counter = Counter()
    metric_of: dict[int, float] = {}

    def on_final(event):
        finals[id(event.model)] += 1
        metric_of[id(event.model)] = event.metric

    engine.register_model_event_callback(ModelEventType.FinalMetric, on_final)
    engine.register_model_event_callback(ModelEventType.TrainingEnd, lambda e: ends.update([id(e.model)]))
    state = np.random.RandomState(0)
    models = []
    while engine.budget_available():
        model = space.random(random_state=state)
        engine.submit_models(model)
        models.append(model)
        assert engine.in_flight < 7  # a full batch is scored inside submit_models
    engine.wait_models()
    assert len(models) == 30 and batches == [7, 7, 7, 7, 2]  # the last, partial batch at the budget
    assert engine.batches == 5 and engine.in_flight == 0
    assert set(finals.values()) == {1} and len(finals) == 30
    assert set(ends.values()) == {1} and len(ends) == 30
    for model in models:
        assert model.status.value == "trained"
        assert model.metric == metric_of[id(model)] == float(sum(model.vector))
    assert list(engine.list_models()) == models
    with pytest.raises(RuntimeError, match="must be frozen"):
        engine.submit_models(space)


def test_wait_models_scores_a_partial_batch(space) -> None:
    engine = BatchedExecutionEngine(lambda models: [1.0] * len(models), concurrency=50)
    models = [space.random(random_state=np.random.RandomState(i)) for i in range(3)]
    engine.submit_models(*models)
    assert engine.in_flight == 3 and all(m.metric is None for m in models)
    engine.wait_models(*models)
    assert [m.metric for m in models] == [1.0, 1.0, 1.0]


def test_a_failing_scorer_fails_its_batch(space) -> None:
    def broken(models):
        raise ArithmeticError("predictor exploded")

    engine = BatchedExecutionEngine(broken, concurrency=2)
    first, second = (space.random(random_state=np.random.RandomState(i)) for i in range(2))
    engine.submit_models(first)
    with pytest.raises(ArithmeticError, match="exploded"):
        engine.submit_models(second)
    assert first.status.value == second.status.value == "failed" and first.metric is None
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        BatchedExecutionEngine(broken, concurrency=0)


def test_joint_deduplication_decides_as_nni_does(joint, space) -> None:
    from nni.nas.strategy import RegularizedEvolution
    from nni.nas.strategy.utils import DeduplicationHelper, DuplicationError

    state = np.random.RandomState(2)
    samples = [space.random(random_state=state).sample for _ in range(20)]
    sequence = samples + [dict(samples[3]), dict(reversed(list(samples[5].items()))), {"other": 1}, {"other": 1}]
    ours, theirs = JointDeduplication(joint.labels), DeduplicationHelper()
    assert [ours.dedup(s) for s in sequence] == [theirs.dedup(s) for s in sequence]
    assert sum(ours.dedup(s) for s in sequence) == 0
    raising = JointDeduplication(joint.labels, raise_on_dup=True)
    raising.dedup(samples[0])
    with pytest.raises(DuplicationError):
        raising.dedup(dict(samples[0]))
    strategy = RegularizedEvolution(population_size=10, sample_size=3)
    use_joint_deduplication(strategy, joint.labels)
    assert isinstance(strategy._dedup_helper, JointDeduplication) and strategy._dedup_helper._raise_on_dup
