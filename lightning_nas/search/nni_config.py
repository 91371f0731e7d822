"""The experiment-config entry of the batched engine (:mod:`lightning_nas.search.nni_engine`).

Kept apart because NNI's config classes are checked with ``typeguard`` at run time, which does
not read the postponed annotations (``from __future__ import annotations``) of the other modules.
"""

import warnings
from dataclasses import dataclass
from typing import Optional

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nni.nas.experiment.config import ExecutionEngineConfig

__all__ = ["BatchedEngineConfig"]


@dataclass(init=False)
class BatchedEngineConfig(ExecutionEngineConfig):
    """``execution_engine`` of a NAS experiment run by ``BatchedExecutionEngine``."""

    name: str = "batched"
    #: models in flight before a batch is scored
    concurrency: int = 100
    #: the budget; default: the experiment's ``max_trial_number``
    max_model_count: Optional[int] = None  # noqa: UP045 (typeguard evaluates this annotation at run time)

    def _canonicalize(self, parents):
        if self.max_model_count is None and parents:
            self.max_model_count = parents[0].max_trial_number
        return super()._canonicalize(parents)
