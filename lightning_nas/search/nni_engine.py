r"""NNI 3.0 plumbing for the joint search: a light executable model space and a batched engine.

:class:`JointModelSpace` is the joint space as an NNI ``ExecutableModelSpace``. NNI's generic
``RawFormatModelSpace`` validates every sample through 126 ``Categorical.check_contains`` calls
(twice), and ``Mutable.random`` draws every label with its own ``RandomState.choice`` call; on
this space that per-model overhead costs more than scoring the model. This class does the same
work directly on the joint space's choice table:

* ``random(memo, random_state)`` draws all labels with one ``random_sample`` call and the same
  inverse-CDF lookup ``RandomState.choice(n, p=weights)`` performs, so it returns the very
  sample NNI's ``MutableDict.random`` returns for the same random state (tested);
* ``simplify()`` is computed once (``RegularizedEvolution`` calls it for every child), and its
  ``Categorical``\ s draw a value with one ``random_sample`` call instead of
  ``RandomState.choice`` (the same value: ``choice`` consumes exactly that one double);
* ``freeze(sample)`` checks the sample with dictionary look-ups (NNI's error when it fails),
  keeps a copy of it (``Mutable.grid`` reuses one dict for every grid point) and builds the
  :class:`~lightning_nas.search.joint_space.Candidate` only when the model is scored;
* a frozen model can carry what the strategy already knows: ``origin``, ``generation`` and the
  costs it computed while rejecting infeasible draws (the APQ evolution), so they are not
  computed twice.

:class:`BatchedExecutionEngine` is an NNI ``ExecutionEngine`` that keeps up to ``concurrency``
submitted models in flight and scores them as one batch (one predictor forward, one call per cost
model) when the batch is full, when the budget is used up, or when the strategy waits for its
models. Each model then gets its metric the way NNI's engines report one: a
``FinalMetricEvent`` and a ``TrainingEndEvent`` dispatched to the strategy's callbacks, whose
default action sets ``model.metrics.final`` and ``model.status``. Strategies that submit one
model and wait for it (NNI's ``wait_models``) see the batch flushed at once, so they still work;
strategies that keep submitting (random, grid, regularized evolution, TPE with its constant liar)
get the batching.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .joint_space import Candidate, JointSpace

with warnings.catch_warnings():
    # NNI's PyTorch layer registry warns about every torch class it does not know; noise only
    warnings.simplefilter("ignore")
    from nni.mutable import Categorical, LabeledMutable, Mutable, MutableDict, SampleValidationError
    from nni.nas.execution import ExecutionEngine
    from nni.nas.execution.event import FinalMetricEvent, TrainingEndEvent
    from nni.nas.space import ExecutableModelSpace, ModelStatus
    from nni.nas.strategy.utils import DeduplicationHelper, DuplicationError

__all__ = ["BatchedExecutionEngine", "JointDeduplication", "JointModelSpace", "use_joint_deduplication"]

_logger = logging.getLogger(__name__)

#: ``score(models) -> metrics``: the metric of every model of a batch, in order.
BatchScorer = Callable[[Sequence["JointModelSpace"]], Sequence[float]]


class _Categorical(Categorical):
    """NNI's ``Categorical`` whose ``random`` skips ``RandomState.choice``'s argument checks
    (about 15 us a call): the same inverse-CDF draw, hence the same value for the same state."""

    def __init__(self, values: Sequence[Any], *, label: str) -> None:
        super().__init__(values, label=label)
        cdf = np.asarray(self.weights, dtype=np.float64).cumsum()
        self._cdf = cdf / cdf[-1]

    def random(self, memo: dict[str, Any] | None = None, random_state: np.random.RandomState | None = None) -> Any:
        memo = {} if memo is None else memo
        if self.label not in memo:
            if random_state is None:
                random_state = np.random.RandomState()
            memo[self.label] = self.values[int(self._cdf.searchsorted(random_state.random_sample(), side="right"))]
        return self.freeze(memo)


class JointModelSpace(ExecutableModelSpace):
    """The joint space as an NNI executable model space; frozen copies are the models.

    Args:
        joint: the joint architecture / policy space.
        evaluator: an NNI evaluator whose ``evaluate(model)`` scores one frozen model (used by
            NNI's sequential engine; the batched engine scores batches itself).
    """

    def __init__(self, joint: JointSpace, evaluator: Any = None) -> None:
        super().__init__()
        self.joint = joint
        self.evaluator = evaluator
        choices = joint.choices()
        self.mutables: MutableDict = MutableDict({label: _Categorical(values, label=label)
                                                  for label, values in choices.items()})
        self._simplified: dict[str, LabeledMutable] = dict(self.mutables.simplify())
        labels = joint.labels
        self._labels = labels
        self._values = [choices[label] for label in labels]
        self._index = [dict(zip(values, range(len(values)))) for values in self._values]
        # RandomState.choice(n, p=weights) draws u = random_sample() and returns
        # cdf.searchsorted(u, "right") with cdf = weights.cumsum() / weights.sum(): the number of
        # cdf entries <= u. One row of cdf per label (padded with inf) does every label at once.
        width = max(len(values) for values in self._values)
        self._cdf = np.full((len(labels), width), np.inf)
        for row, label in enumerate(labels):
            weights = np.asarray(self._simplified[label].weights, dtype=np.float64)
            cdf = weights.cumsum()
            self._cdf[row, : len(cdf)] = cdf / cdf[-1]
        self._sample: dict[str, Any] | None = None
        self._candidate: Candidate | None = None
        self._vector: list[int] | None = None
        #: where the model comes from (:data:`~lightning_nas.search.scoring.ORIGINS`) and its generation
        self.origin = "nni"
        self.generation = -1
        #: metric -> value, when the strategy computed the costs already
        self.costs: Mapping[str, float] | None = None

    # ------------------------------------------------------------------ Mutable interface

    def leaf_mutables(self, is_leaf: Callable[[Mutable], bool]) -> Iterable[LabeledMutable]:
        yield from self.mutables.leaf_mutables(is_leaf)

    def simplify(self, is_leaf: Callable[[Mutable], bool] | None = None) -> dict[str, LabeledMutable]:
        if is_leaf is None:
            return dict(self._simplified)
        return super().simplify(is_leaf)

    def check_contains(self, sample: Mapping[str, Any]) -> SampleValidationError | None:
        try:
            for label, index in zip(self._labels, self._index):
                if sample[label] not in index:
                    break
            else:
                return None
        except (KeyError, TypeError):
            pass
        # the slow path only to produce NNI's own error message
        exception = self.mutables.check_contains(sample)
        if exception is not None:
            exception.paths.append("model")
        return exception

    def random(self, memo: dict[str, Any] | None = None, random_state: np.random.RandomState | None = None
               ) -> JointModelSpace:
        sample: dict[str, Any] = {} if memo is None else memo
        if random_state is None:
            random_state = np.random.RandomState()
        if sample:  # labels fixed by the caller are not redrawn: NNI's generic path handles that
            return super().random(sample, random_state)
        draws = random_state.random_sample(len(self._labels))
        picks = (self._cdf <= draws[:, None]).sum(axis=1).tolist()
        sample.update(zip(self._labels, [values[i] for values, i in zip(self._values, picks)]))
        return self.freeze(sample)

    def freeze(self, sample: Mapping[str, Any]) -> JointModelSpace:
        if self.status != ModelStatus.Initialized:
            raise RuntimeError("Cannot freeze a model space that is not initialized.")
        self.validate(sample)
        model = self._frozen()
        model._sample = dict(sample)
        return model

    def freeze_candidate(self, candidate: Candidate, vector: list[int] | None = None, origin: str = "nni",
                         generation: int = -1, costs: Mapping[str, float] | None = None) -> JointModelSpace:
        """A frozen model of a canonical candidate the strategy built itself (its sample is
        derived when someone reads it)."""
        model = self._frozen()
        model._candidate = candidate
        model._vector = vector
        model.origin, model.generation, model.costs = origin, generation, costs
        return model

    def _frozen(self) -> JointModelSpace:
        model = object.__new__(type(self))
        # share the space's tables; a frozen model only adds its own sample and metrics
        model.__dict__.update(self.__dict__)
        ExecutableModelSpace.__init__(model, ModelStatus.Frozen)
        model._sample = model._candidate = model._vector = None
        model.origin, model.generation, model.costs = "nni", -1, None
        return model

    # ------------------------------------------------------------------ the frozen model

    @property
    def sample(self) -> dict[str, Any] | None:  # type: ignore[override]
        if self._sample is None and self._candidate is not None:
            self._sample = self.joint.to_sample(self._candidate)
        return self._sample

    @sample.setter
    def sample(self, value: dict[str, Any] | None) -> None:
        self._sample = value

    @property
    def candidate(self) -> Candidate:
        """The canonical candidate of a frozen model."""
        if self._candidate is None:
            if self._sample is None:
                raise RuntimeError("the model space is not frozen")
            self._candidate = self.joint.from_checked_sample(self._sample)
        return self._candidate

    @property
    def vector(self) -> list[int]:
        """The candidate's choice-index vector (:meth:`JointSpace.to_vector`)."""
        if self._vector is None:
            self._vector = self.joint.to_vector(self.candidate)
        return self._vector

    def executable_model(self) -> Candidate:
        if not self.status.frozen():
            raise RuntimeError("Model space is not frozen yet.")
        return self.candidate

    def execute(self) -> Any:
        # the evaluator scores the frozen model itself: it needs the origin and precomputed costs
        if self.evaluator is None:
            raise ValueError("no evaluator: the sequential engine needs one to execute a model")
        return self.evaluator.evaluate(self)

    def extra_repr(self) -> str:
        if self.status == ModelStatus.Initialized:
            return repr(self.joint)
        return f"origin={self.origin!r}, metric={self.metric}, status={self.status!r}"


class BatchedExecutionEngine(ExecutionEngine):
    """Scores submitted models in batches of up to ``concurrency`` (see the module docstring).

    Args:
        score: the metrics of a batch of frozen models, in order.
        concurrency: models in flight before a batch is scored.
        max_model_count: the budget (models accepted in total); ``None`` for no limit.
    """

    def __init__(self, score: BatchScorer, concurrency: int = 100, max_model_count: int | None = None) -> None:
        super().__init__()
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.score = score
        self.concurrency = int(concurrency)
        self.max_model_count = max_model_count
        self._history: list[ExecutableModelSpace] = []
        self._pending: list[ExecutableModelSpace] = []
        self.batches = 0

    def extra_repr(self) -> str:
        return f"concurrency={self.concurrency}, max_model_count={self.max_model_count}"

    def submit_models(self, *models: ExecutableModelSpace) -> None:
        for model in models:
            if not model.status.frozen() or model.status.completed():
                raise RuntimeError(f"Model must be frozen before submitting, but got {model}")
            if not self.budget_available():
                _logger.error("Maximum number of models reached (%d). Models cannot be submitted anymore.",
                              self.max_model_count)
            model.status = ModelStatus.Training
            self._history.append(model)
            self._pending.append(model)
            if len(self._pending) >= self.concurrency or not self.budget_available():
                self._flush()

    def _flush(self) -> None:
        """Score the models in flight and report every metric, in submission order."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self.batches += 1
        try:
            metrics = list(self.score(batch))
            if len(metrics) != len(batch):
                raise RuntimeError(f"the scorer returned {len(metrics)} metrics for {len(batch)} models")
        except BaseException:
            for model in batch:
                self.dispatch_model_event(TrainingEndEvent(model, ModelStatus.Failed))
            raise
        for model, metric in zip(batch, metrics):
            self.dispatch_model_event(FinalMetricEvent(model, metric))
            self.dispatch_model_event(TrainingEndEvent(model, ModelStatus.Trained))

    def wait_models(self, *models: ExecutableModelSpace) -> None:
        """Score whatever is in flight: every submitted model has completed when this returns."""
        self._flush()

    def list_models(self, status: ModelStatus | None = None) -> Iterable[ExecutableModelSpace]:
        if status is not None:
            return [m for m in self._history if m.status == status]
        return self._history

    def idle_worker_available(self) -> bool:
        # a full batch is scored inside submit_models, so there is always room for one more
        return True

    def budget_available(self) -> bool:
        return self.max_model_count is None or len(self._history) < self.max_model_count

    @property
    def in_flight(self) -> int:
        """Models submitted and not scored yet."""
        return len(self._pending)

    def shutdown(self) -> None:
        if self._pending:
            _logger.warning("Shutting down with %d models never scored.", len(self._pending))

    def state_dict(self) -> dict:
        return {"model_count": len(self._history), "batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("model_count", 0) > 0:
            _logger.warning("The batched engine does not recover the models of a previous run.")


class JointDeduplication(DeduplicationHelper):
    """NNI's ``DeduplicationHelper`` keyed by the tuple of a sample's values in label order.

    NNI's helper turns every sample into a ``frozenset`` of (label, value) pairs through a
    recursive generator, about 0.2 ms per sample of this space; samples of the joint space are
    flat dicts over fixed labels, so the tuple of their values identifies them as well. Samples
    with other keys fall back to NNI's key.
    """

    def __init__(self, labels: Sequence[str], raise_on_dup: bool = False) -> None:
        super().__init__(raise_on_dup=raise_on_dup)
        self._labels = list(labels)

    def _key(self, sample: Any) -> Any:
        from nni.nas.strategy.utils import _to_hashable

        if isinstance(sample, dict) and len(sample) == len(self._labels):
            try:
                return tuple([sample[label] for label in self._labels])
            except KeyError:
                pass
        return _to_hashable(sample)

    def dedup(self, sample: Any) -> bool:
        key = self._key(sample)
        if key in self._history:
            if self._raise_on_dup:
                raise DuplicationError(sample)
            return False
        self._history.add(key)
        return True

    def remove(self, sample: Any) -> None:
        self._history.remove(self._key(sample))


def use_joint_deduplication(strategy: Any, labels: Sequence[str]) -> None:
    """Give NNI's ``Random`` / ``RegularizedEvolution`` (``_dedup_helper``) and ``GridSearch``
    (``_dedup``) the :class:`JointDeduplication`, with the same raise-or-skip behaviour."""
    for attribute in ("_dedup_helper", "_dedup"):
        helper = getattr(strategy, attribute, None)
        if isinstance(helper, DeduplicationHelper) and not isinstance(helper, JointDeduplication):
            setattr(strategy, attribute, JointDeduplication(labels, raise_on_dup=helper._raise_on_dup))
