r"""Every search strategy is an NNI 3.0 multi-trial strategy, scored by the project's own scorer.

How the pieces fit (checked against the installed NNI 3.0):

* the joint space is an NNI executable model space without any deep-learning framework,
  :class:`~lightning_nas.search.nni_engine.JointModelSpace`, whose frozen models carry a
  :class:`~lightning_nas.search.joint_space.Candidate` (``NasExperiment`` itself only accepts
  PyTorch ``ModelSpace``\ s, which is what the ``RunDirExperiment`` of ``_experiment_class`` changes);
* models are scored in-process by :class:`~lightning_nas.search.nni_engine.BatchedExecutionEngine`
  (default; up to ``concurrency`` models in flight, scored as one batch by
  :meth:`NNISearch.score_models`) or by NNI's ``SequentialExecutionEngine`` (``engine=
  "sequential"``: one trial at a time through a ``FunctionalEvaluator`` and
  ``nni.report_final_result``). The metric is the predicted accuracy; a candidate violating a
  constraint reports ``-1000 * (1 + violation)``, below every feasible one, so strategies move
  towards the feasible region, and it is never returned;
* before NNI's own strategies start, :func:`~lightning_nas.search.scoring.probe_feasible` checks
  (in one cost batch) that the constraints can be met at all, so an unreachable constraint fails
  at once; the APQ evolution checks its capped initial draws and the smallest candidate itself;
* the experiment directory (``config.json``, ``experiment.log``, and the experiment manifest NNI
  would otherwise write to ``~/nni-experiments``) is ``experiment_dir``, inside the run directory.

Strategies (``STRATEGIES``):

* ``apq_evolution``: APQ's evolution on NNI's ``Strategy`` interface
  (:class:`~lightning_nas.search.nni_evolution.APQEvolutionStrategy`); it waits for each
  generation, so its result does not depend on the engine or the concurrency;
* ``random`` and ``grid`` (NNI's ``Random`` and ``GridSearch``) never read results: any
  concurrency gives the sequential engine's search. ``grid`` enumerates the space in NNI's grid
  order (shuffled in blocks of 100) and stops at the budget: on a space of ~1e80 points it only
  covers a corner of it;
* ``regularized_evolution`` (NNI's ``RegularizedEvolution``) breeds each child from the
  population scored so far: with K models in flight a child misses the K - 1 newest results, and
  K is capped at ``population_size`` (its mutation step needs a scored population);
* ``tpe``: NNI's TPE strategy without its one-second sleep per trial (written for trials running
  elsewhere; in-process that sleep is the whole run time), on
  :class:`~lightning_nas.search.nni_tpe.SharedOrderTpeTuner` (NNI's suggestions, one sort per
  suggestion instead of one per parameter). Models in flight get the tuner's constant-liar
  value (``best`` by default), so it works with K > 1, but its cost is the suggestion, not the
  scoring: batching saves little;
* ``policy_rl`` (NNI's ``PolicyBasedRL``) needs the ``tianshou`` package; without it the search
  stops at once with an error saying so.

NNI's ``Random``, ``RegularizedEvolution`` and ``GridSearch`` get the tuple-keyed
:class:`~lightning_nas.search.nni_engine.JointDeduplication` (same decisions), and the experiment
saves ``config.json`` only: NNI's checkpoint pickles the strategy's whole deduplication history.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from .joint_space import JointSpace
from .scoring import Scorer, Scores, SearchHistory, probe_feasible

__all__ = ["DEFAULT_CONCURRENCY", "ENGINES", "INFEASIBLE_BASE", "STRATEGIES", "NNISearch", "make_strategy"]

#: ``apq_evolution`` is APQ's evolution on NNI's Strategy interface; the others are NNI's own.
STRATEGIES = ("apq_evolution", "random", "regularized_evolution", "tpe", "grid", "policy_rl")
ENGINES = ("batched", "sequential")
#: Models in flight per batch of the batched engine (APQ: one generation of 100 children).
DEFAULT_CONCURRENCY = 100
#: Reported metric of an infeasible candidate: ``-INFEASIBLE_BASE * (1 + relative violation)``.
INFEASIBLE_BASE = 1000.0


def _import_nni() -> None:
    # NNI's PyTorch layer registry warns about every torch class it does not know; noise only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nni.nas.experiment  # noqa: F401
        import nni.nas.strategy  # noqa: F401


def make_strategy(name: str, seed: int = 0, options: Mapping[str, Any] | None = None) -> Any:
    """An NNI strategy by name; ``options`` are its constructor's keyword arguments."""
    _import_nni()
    options = dict(options or {})
    try:
        return _make_strategy(name, seed, options)
    except TypeError as error:  # an option the strategy's constructor does not take
        raise RecipeError(f"invalid options {options} for NNI strategy '{name}': {error}", key="search.strategy_options") from None


def _make_strategy(name: str, seed: int, options: dict[str, Any]) -> Any:
    import nni.nas.strategy as strategy

    if name == "random":
        return strategy.Random(**{"seed": seed, **options})
    if name == "regularized_evolution":
        return strategy.RegularizedEvolution(**{"seed": seed, **options})
    if name == "grid":
        return strategy.GridSearch(**{"seed": seed, **options})
    if name == "tpe":
        return _tpe_class()(**{"optimize_mode": "maximize", "seed": seed, **options})
    if name == "policy_rl":
        try:
            return strategy.PolicyBasedRL(**options)
        except ImportError as error:
            raise RecipeError(
                f"strategy 'policy_rl' (NNI's PolicyBasedRL) needs the tianshou package, which is not installed "
                f"({error}); install tianshou or choose one of {[s for s in STRATEGIES if s != 'policy_rl']}", key="search.strategy"
            ) from None
    if name == "apq_evolution":
        raise ValueError("'apq_evolution' needs the joint space and the scorer: build it through NNISearch")
    raise ValueError(f"unknown NNI strategy '{name}'; choose one of {list(STRATEGIES)}")


_TPE_CLASS: type | None = None


def _tpe_class() -> type:
    """NNI's TPE strategy without the one-second sleep per trial, on :class:`SharedOrderTpeTuner`
    (see the module docstring)."""
    global _TPE_CLASS
    if _TPE_CLASS is not None:
        return _TPE_CLASS
    import nni
    from nni.nas.strategy import TPE
    from nni.nas.strategy.hpo import HPOTunerStrategy

    from .nni_tpe import SharedOrderTpeTuner

    class NoSleepTPE(TPE):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # TPE.__init__ builds NNI's TpeTuner; this one suggests the same, sorting once
            HPOTunerStrategy.__init__(self, SharedOrderTpeTuner(*args, **kwargs))

        def _run(self) -> None:
            # the loop of nni.nas.strategy.hpo.HPOTunerStrategy._run minus `time.sleep(1.)`: both
            # engines here finish (or batch) a model inside submit_models, so a worker is always
            # free; models still in flight get the tuner's constant-liar value
            space = {label: mutable.as_legacy_dict() for label, mutable in self.model_space.simplify().items()}
            with self._thread_lock:
                self.tuner.update_search_space(space)
            while self.engine.budget_available():
                with self._thread_lock:
                    try:
                        param = self.tuner.generate_parameters(self._model_count)
                    except nni.NoMoreTrialError:
                        break
                    model = self.model_space.freeze(param)
                    self._model_to_id[model] = self._model_count
                    self._model_count += 1
                self.engine.submit_models(model)

    _TPE_CLASS = NoSleepTPE
    return NoSleepTPE


def _experiment_class() -> type:
    from nni.nas.experiment import NasExperiment
    from nni.tools.nnictl.config_utils import Experiments

    from .nni_config import BatchedEngineConfig
    from .nni_engine import BatchedExecutionEngine

    class RunDirExperiment(NasExperiment):
        """A NAS experiment on the (already executable) joint model space, run by the batched
        engine or NNI's sequential one, that keeps everything in its working directory (NNI
        writes its experiment manifest to ``~/nni-experiments`` otherwise)."""

        score: Callable[[Sequence[Any]], Sequence[float]]

        def execution_engine_factory(self, config: Any) -> Any:
            if isinstance(config, BatchedEngineConfig):
                return BatchedExecutionEngine(self.score, config.concurrency, config.max_model_count)
            return super().execution_engine_factory(config)

        def executable_model_factory(self, config: Any) -> Any:
            return self.model_space

        def save_checkpoint(self) -> None:
            # config.json only: NNI pickles the strategy's state with torch.save, and that state
            # holds the whole deduplication history (9.7 s of a 23 s random search of 10,000);
            # nothing here resumes from it (the engine and the APQ population live in memory)
            import nni

            directory = self._checkpoint_directory
            directory.mkdir(parents=True, exist_ok=True)
            with (directory / "config.json").open("w", encoding="utf-8") as handle:
                nni.dump(self.config.json(), fp=handle, indent=2)

        def _manifest(self) -> Any:
            return Experiments(home_dir=str(self.config.canonical_copy().experiment_working_directory))

        def _start_without_nni_manager(self) -> None:
            self._manifest().add_experiment(
                self.id, "N/A", 0, "N/A", self.config.experiment_name, "N/A", status="RUNNING", tag=["retiarii"],
                logDir=str(self.config.canonical_copy().experiment_working_directory))

        def _stop_without_nni_manager(self) -> None:
            self._manifest().update_experiment(self.id, "status", "STOPPED")

    return RunDirExperiment


class NNISearch:
    """One NNI search: build it, :meth:`run` it, read :attr:`history`.

    Args:
        joint: the joint space.
        scorer: predictor, cost models and constraints.
        strategy: one of :data:`STRATEGIES`.
        evaluations: trials (candidates evaluated).
        experiment_dir: NNI's experiment working directory (inside the run directory).
        seed: the strategy's seed.
        options: keyword arguments of the strategy: of the NNI strategy's constructor (e.g.
            ``population_size``, ``sample_size``, ``mutation_prob``, ``crossover`` for
            ``regularized_evolution``), or of :class:`~lightning_nas.search.evolution.APQEvolution`
            for ``apq_evolution`` (``population_size``, ``parents``, ``mutations``,
            ``mutation_prob``, ``resolution_prob``, ``policy_prob``, ``max_tries``).
        progress: called with the number of newly scored candidates after every batch.
        engine: ``"batched"`` (:class:`~lightning_nas.search.nni_engine.BatchedExecutionEngine`)
            or ``"sequential"`` (NNI's ``SequentialExecutionEngine``: one trial at a time).
        concurrency: models in flight per batch of the batched engine (for
            ``regularized_evolution`` at most its ``population_size``: its mutation step needs a
            scored population).
    """

    def __init__(
        self,
        joint: JointSpace,
        scorer: Scorer,
        strategy: str,
        evaluations: int,
        experiment_dir: str | Path,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        engine: str = "batched",
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown NNI strategy '{strategy}'; choose one of {list(STRATEGIES)}")
        if evaluations < 1:
            raise ValueError(f"evaluations must be at least 1, got {evaluations}")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine '{engine}'; choose one of {list(ENGINES)}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.joint, self.scorer, self.strategy_name = joint, scorer, strategy
        self.evaluations, self.seed, self.options = evaluations, seed, dict(options or {})
        self.experiment_dir = Path(experiment_dir)
        self.progress = progress
        self.engine_name = engine
        self.history = SearchHistory(joint, scorer.metrics)
        self.experiment_id: str | None = None
        #: the APQ evolution's settings and statistics (``apq_evolution`` only)
        self.evolution: Any = None
        # built here so that bad options fail before anything runs
        if strategy == "apq_evolution":
            from .evolution import APQEvolution

            try:
                self.evolution = APQEvolution(joint, scorer, evaluations=evaluations, seed=seed, **self.options)
            except TypeError as error:  # an option APQEvolution does not take
                raise RecipeError(f"invalid options {self.options} for strategy 'apq_evolution': {error}",
                                  key="search.strategy_options") from None
            from .nni_evolution import APQEvolutionStrategy

            self.strategy = APQEvolutionStrategy(self.evolution)
        else:
            self.strategy = make_strategy(strategy, seed, self.options)
            from .nni_engine import use_joint_deduplication

            use_joint_deduplication(self.strategy, joint.labels)
        if strategy == "regularized_evolution":
            concurrency = min(concurrency, int(self.strategy.population_size))
        self.concurrency = concurrency
        from nni.runtime.log import silence_stdout

        silence_stdout()  # the stage draws its own progress; NNI's log goes to experiment.log

    def score_models(self, models: Sequence[Any]) -> list[float]:
        """Score frozen :class:`~lightning_nas.search.nni_engine.JointModelSpace` models as one
        batch, record them in :attr:`history`, and return their metrics: the predicted accuracy
        of a feasible candidate, ``-INFEASIBLE_BASE * (1 + violation)`` of an infeasible one."""
        candidates = [m.candidate for m in models]
        known = [m.costs for m in models]
        if all(c is not None for c in known):
            costs = {metric: np.fromiter((c[metric] for c in known), np.float64, len(known))
                     for metric in self.scorer.metrics}
        else:
            costs = self.scorer.costs(candidates)
        feasible = self.scorer.feasible(costs)
        scores = Scores(self.scorer.accuracy(candidates), costs, feasible)
        self.history.add(candidates, scores, [m.origin for m in models], [m.generation for m in models],
                         vectors=[m.vector for m in models])
        metric = np.where(feasible, scores.accuracy, -INFEASIBLE_BASE * (1.0 + self.scorer.penalty(costs)))
        if self.progress is not None:
            self.progress(len(models))
        return metric.tolist()

    def _evaluate_one(self, model: Any) -> None:
        """The sequential engine's trial: score one model, report its metric through NNI."""
        import nni

        nni.report_final_result(self.score_models([model])[0])

    def run(self) -> SearchHistory:
        """Run the experiment; raises :class:`InfeasibleConstraintsError` when no evaluated
        candidate satisfies the constraints."""
        if self.strategy_name != "apq_evolution":
            # an unreachable constraint must fail before NNI spends its whole budget on it (the
            # APQ evolution checks its initial draws and the smallest candidate itself)
            probe_feasible(self.joint, self.scorer, self.seed)
        from nni.nas.evaluator import FunctionalEvaluator
        from nni.nas.experiment.config import (
            NasExperimentConfig,
            RawModelFormatConfig,
            SequentialEngineConfig,
        )

        from .nni_config import BatchedEngineConfig
        from .nni_engine import JointModelSpace

        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        if self.engine_name == "batched":
            # NNI's config wants a training service; "local" is the in-process one (nothing starts)
            config = NasExperimentConfig(execution_engine=BatchedEngineConfig(concurrency=self.concurrency),
                                         model_format=RawModelFormatConfig(), training_service_platform="local",
                                         trial_concurrency=self.concurrency)
        else:
            config = NasExperimentConfig(execution_engine=SequentialEngineConfig(),
                                         model_format=RawModelFormatConfig())
        config.max_trial_number = int(self.evaluations)
        config.experiment_working_directory = str(self.experiment_dir.resolve())
        config.experiment_name = f"lightning-nas {self.strategy_name}"
        evaluator = FunctionalEvaluator(self._evaluate_one)
        experiment = _experiment_class()(JointModelSpace(self.joint, evaluator), evaluator, self.strategy, config)
        experiment.score = self.score_models
        self.experiment_id = experiment.id
        # NNI's strategies log every individual at INFO with its whole 126-label sample, about
        # 3.3 kB per evaluation of regularized evolution (166 MB of experiment.log at 50,000): keep
        # their warnings only
        strategy_logger = logging.getLogger("nni.nas.strategy")
        level = strategy_logger.level
        strategy_logger.setLevel(max(logging.WARNING, level))
        try:
            experiment.run(port=None)
        finally:
            strategy_logger.setLevel(level)
            experiment.stop()
        if not self.history.scores.feasible.any():
            raise self.scorer.infeasible_error()
        return self.history
