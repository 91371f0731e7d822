"""NNI 3.0 multi-trial strategies over the joint space, scored by the project's own scorer.

How the pieces fit (checked against the installed NNI 3.0):

* the joint space is an NNI model space without any deep-learning framework: a
  ``BaseModelSpace`` whose mutables are :meth:`JointSpace.mutable` and whose ``freeze(sample)``
  is a :class:`~lightning_nas.search.joint_space.Candidate`; NNI wraps it in a
  ``RawFormatModelSpace`` (``NasExperiment`` itself only accepts PyTorch ``ModelSpace``s, which
  is what :class:`_RunDirExperiment` changes);
* each trial runs in-process (``SequentialEngineConfig``) through a ``FunctionalEvaluator`` that
  scores the candidate with the :class:`~lightning_nas.search.scoring.Scorer` and reports the
  predicted accuracy; a candidate violating a constraint reports ``-1000 * (1 + violation)``, below
  every feasible one, so strategies move towards the feasible region, and it is never returned;
* before NNI starts, :func:`~lightning_nas.search.scoring.probe_feasible` checks (in one cost
  batch) that the constraints can be met at all, so an unreachable constraint fails at once;
* the experiment directory (checkpoint, ``experiment.log``, and the experiment manifest NNI would
  otherwise write to ``~/nni-experiments``) is ``experiment_dir``, inside the run directory.

Strategies (``STRATEGIES``): ``random``, ``regularized_evolution``, ``tpe``, ``grid`` and
``policy_rl``. NNI's ``TPE`` wrapper sleeps one second after every trial (it was written for
trials running elsewhere); with in-process trials that sleep is the whole run time, so
``tpe`` runs the same loop without it. ``policy_rl`` needs the ``tianshou`` package; without it
the search stops at once with an error saying so. ``grid`` enumerates the space in NNI's grid
order (shuffled in blocks of 100) and stops at the budget: on a space of ~1e80 points it only
covers a corner of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..recipe.errors import RecipeError
from .joint_space import Candidate, JointSpace
from .scoring import Scorer, SearchHistory, probe_feasible

__all__ = ["INFEASIBLE_BASE", "STRATEGIES", "NNISearch", "make_strategy"]

STRATEGIES = ("random", "regularized_evolution", "tpe", "grid", "policy_rl")
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
        return _sequential_tpe()(**{"optimize_mode": "maximize", "seed": seed, **options})
    if name == "policy_rl":
        try:
            return strategy.PolicyBasedRL(**options)
        except ImportError as error:
            raise RecipeError(
                f"strategy 'policy_rl' (NNI's PolicyBasedRL) needs the tianshou package, which is not installed "
                f"({error}); install tianshou or choose one of {[s for s in STRATEGIES if s != 'policy_rl']}", key="search.strategy"
            ) from None
    raise ValueError(f"unknown NNI strategy '{name}'; choose one of {list(STRATEGIES)}")


_TPE_CLASS: type | None = None


def _sequential_tpe() -> type:
    """NNI's TPE strategy without the one-second sleep per trial (see the module docstring)."""
    global _TPE_CLASS
    if _TPE_CLASS is not None:
        return _TPE_CLASS
    import nni
    from nni.nas.strategy import TPE

    class SequentialTPE(TPE):
        def _run(self) -> None:
            # the loop of nni.nas.strategy.hpo.HPOTunerStrategy._run minus `time.sleep(1.)`:
            # the sequential engine has finished a trial when submit_models returns
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

    _TPE_CLASS = SequentialTPE
    return SequentialTPE


def _model_space(joint: JointSpace) -> Any:
    """The joint space as an NNI ``BaseModelSpace`` whose frozen models are candidates."""
    from nni.nas.space import BaseModelSpace

    class JointModelSpace(BaseModelSpace):
        def __init__(self) -> None:
            self.joint = joint
            self.mutables = joint.mutable()

        def leaf_mutables(self, is_leaf: Callable[[Any], bool]):
            yield from self.mutables.leaf_mutables(is_leaf)

        def check_contains(self, sample: dict) -> Any:
            return self.mutables.check_contains(sample)

        def freeze(self, sample: dict) -> Candidate:
            return self.joint.from_sample(self.mutables.freeze(sample))

        def extra_repr(self) -> str:
            return repr(self.joint)

    return JointModelSpace()


def _experiment_class() -> type:
    from nni.nas.experiment import NasExperiment
    from nni.nas.space import RawFormatModelSpace
    from nni.tools.nnictl.config_utils import Experiments

    class RunDirExperiment(NasExperiment):
        """A NAS experiment on a framework-free model space that keeps everything in its
        working directory (NNI writes its experiment manifest to ``~/nni-experiments`` otherwise)."""

        def executable_model_factory(self, config: Any) -> Any:
            return RawFormatModelSpace.from_model(self.model_space, self.evaluator)

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
        options: keyword arguments of the NNI strategy (e.g. ``population_size``,
            ``sample_size``, ``mutation_prob``, ``crossover`` for ``regularized_evolution``).
        progress: called with 1 after every trial.
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
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown NNI strategy '{strategy}'; choose one of {list(STRATEGIES)}")
        if evaluations < 1:
            raise ValueError(f"evaluations must be at least 1, got {evaluations}")
        self.joint, self.scorer, self.strategy_name = joint, scorer, strategy
        self.evaluations, self.seed, self.options = evaluations, seed, dict(options or {})
        self.experiment_dir = Path(experiment_dir)
        self.progress = progress
        self.history = SearchHistory(joint, scorer.metrics)
        self.experiment_id: str | None = None
        # built here so that bad options fail before anything runs
        self.strategy = make_strategy(strategy, seed, self.options)
        from nni.runtime.log import silence_stdout

        silence_stdout()  # the stage draws its own progress; NNI's log goes to experiment.log

    def _evaluate(self, candidate: Candidate) -> None:
        import nni

        scores = self.scorer.score([candidate])
        self.history.add([candidate], scores, "nni")
        if scores.feasible[0]:
            metric = float(scores.accuracy[0])
        else:
            metric = -INFEASIBLE_BASE * (1.0 + float(self.scorer.penalty(scores.costs)[0]))
        nni.report_final_result(metric)
        if self.progress is not None:
            self.progress(1)

    def run(self) -> SearchHistory:
        """Run the experiment; raises :class:`InfeasibleConstraintsError` when no evaluated
        candidate satisfies the constraints."""
        # an unreachable constraint must fail before NNI spends its whole budget on it
        probe_feasible(self.joint, self.scorer, self.seed)
        from nni.nas.evaluator import FunctionalEvaluator
        from nni.nas.experiment.config import (
            NasExperimentConfig,
            RawModelFormatConfig,
            SequentialEngineConfig,
        )
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        config = NasExperimentConfig(execution_engine=SequentialEngineConfig(), model_format=RawModelFormatConfig())
        config.max_trial_number = int(self.evaluations)
        config.experiment_working_directory = str(self.experiment_dir.resolve())
        config.experiment_name = f"lightning-nas {self.strategy_name}"
        experiment = _experiment_class()(_model_space(self.joint), FunctionalEvaluator(self._evaluate), self.strategy,
                                         config)
        self.experiment_id = experiment.id
        try:
            experiment.run(port=None)
        finally:
            experiment.stop()
        if not self.history.scores.feasible.any():
            raise self.scorer.infeasible_error()
        return self.history

