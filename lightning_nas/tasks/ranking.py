"""Score NAS-Bench-201 architectures with a zero-cost proxy or a trained ParZC checkpoint.

Used by the ``rank`` CLI verb. Higher scores mean "predicted better" for every ranker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_nas.errors import RecipeError
from lightning_nas.nn.safe_load import load_torch_file, pickle_allowed, require_mapping
from lightning_nas.predictors.zc_cache import DEFAULT_PROXIES, compute_statistics, load_cifar10_batch
from lightning_nas.predictors.zero_cost import PROXIES


def available_rankers() -> list[str]:
    return list(PROXIES)


def _load_task(checkpoint: str | Path):
    from .parzc import ParZCTask

    what = "a checkpoint of `lightning-nas fit` with a ParZC recipe"
    # Read and checked without pickle first, so a bad file is refused with a clear error.
    require_mapping(load_torch_file(checkpoint, key="rank.ranker", what=what), ("state_dict", "hyper_parameters"),
                    path=checkpoint, key="rank.ranker", what=what)
    task = ParZCTask.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=not pickle_allowed())
    if task.model is None:
        raise RecipeError("the checkpoint holds no ParZC model (num_nodes / num_stats missing)", key="rank.ranker",
                          given=str(checkpoint), allowed=what)
    return task


def score_architectures(
    arch_strings: Sequence[str],
    ranker: str,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seed: int | None = None,
    data_path: str | Path | None = None,
    batch_size: int = 64,
    cache_path: str | Path | None = None,
    progress: bool = False,
) -> list[float]:
    """One score per architecture (input order); ``ranker`` is a proxy name or a ParZC checkpoint.

    Statistics use ``images`` / ``labels`` when given, else a batch of ``batch_size`` from
    ``data_path`` chosen by ``seed``. For a checkpoint the proxies and the seed default to the
    ones it was trained with, so its inputs are computed the way its training statistics were.
    ``cache_path`` makes long rankings resumable (see :mod:`lightning_nas.predictors.zc_cache`).
    """
    if ranker in PROXIES:
        task, proxies = None, [ranker]
        seed = 0 if seed is None else seed
    elif Path(ranker).is_file():
        task = _load_task(ranker)
        proxies = list(task.hparams.proxies or DEFAULT_PROXIES)
        if seed is None:
            seed = int(task.hparams.stats_seed or 0)
    else:
        raise RecipeError("neither a proxy nor a checkpoint file", key="rank.ranker", given=ranker,
                          allowed=f"{', '.join(PROXIES)}, or a ParZC checkpoint")
    if images is None or labels is None:
        if data_path is None:
            raise ValueError("score_architectures needs images and labels, or the data_path to draw them from")
        images, labels = load_cifar10_batch(data_path, batch_size=batch_size, seed=seed, key="rank.data_path")
    stats = compute_statistics(list(arch_strings), proxies, images, labels, seed=seed,
                               cache_path=cache_path, progress=progress)
    if task is None:
        return [float(s) for s in stats.scores[:, 0]]
    return task.score(torch.as_tensor(stats.nodes, dtype=torch.float64)).tolist()
