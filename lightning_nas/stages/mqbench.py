"""``lightning-nas mqbench``: build a mixed-precision quantization benchmark (MQ-Bench style).

From a trained network (a classification checkpoint, or a standalone subnet that ``lightning-nas
export`` wrote, e.g. the largest subnet of the CIFAR-10 once-for-all supernet; see
:func:`load_network`): ``num_configs`` random configurations (configuration
``i`` draws every searchable layer's weight bits from ``bit_choices`` with a generator seeded by
``seed`` and ``i``), each quantized post-training by :class:`~lightning_nas.nn.ptq.PTQEvaluator`
and evaluated on the data module's test images. Each result is a pair of kind ``mq`` in the pair
store under a planned key, so a killed run resumes with what is missing. Writes into the run
directory:

* ``pairs.sqlite``: the pairs (``arch``: network and layer names; ``policy``: ``{w_bits, a_bits, ptq}``,
  ``ptq`` a hash of every PTQ setting, also the last part of the pair's key);
* ``stats.npz``: the per-layer statistics of the network on one held-out batch (computed once,
  reused while the checkpoint and the settings are unchanged), with the PTQ settings in its header
  (the perturbation statistics use the clipped nearest-rounding quantizer, also with ``rounding_steps``);
* ``benchmark.json`` / ``benchmark.csv`` / ``benchmark.png``: the configurations with their size,
  BitOps and top-1, and the non-triviality check (Spearman of size and of BitOps with top-1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError
from ..files import replacing, save_png, write_json
from ..predictors.pair_store import Pair, PairStore, file_hash, plan_key
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.validate import require_sections
from .common import build_loggers, prepare_run_dir, seed_everything

KIND = "mq"
STORE_FILE = "pairs.sqlite"
STATS_FILE = "stats.npz"
SUMMARY_FILE = "benchmark.json"
CSV_FILE = "benchmark.csv"
PLOT_FILE = "benchmark.png"
#: Spearman of size with top-1 above which the benchmark is too easy (size alone explains it).
TRIVIAL_SPEARMAN = 0.85


#: What ``mqbench.checkpoint`` and ``allocate.checkpoint`` accept; told apart by their content.
NETWORK_FILES = ("a checkpoint of `lightning-nas fit` of a classification recipe (keys state_dict and "
                 "hyper_parameters naming a model), or a subnet.pt of `lightning-nas export` (keys space, config "
                 "and state_dict)")
_SUBNET_KEYS = ("space", "config", "state_dict")
_CHECKPOINT_KEYS = ("state_dict", "hyper_parameters")


@dataclass
class Network:
    """A trained network read by :func:`load_network`, in eval mode on the CPU."""

    model: Any
    #: ``classification`` (a checkpoint of a classification task) or ``subnet`` (an exported subnet).
    kind: str
    #: The input size the network was chosen for (an exported OFA subnet's ``r``); None: the data's own.
    resolution: int | None = None


def _classification_model(saved: Mapping[str, Any], path: str, key: str) -> Any:
    import inspect

    from ..tasks.classification import ClassificationTask

    hparams = saved["hyper_parameters"]
    if not isinstance(hparams, Mapping) or "model" not in hparams:
        hint = ("; it is a supernet checkpoint: export a subnet of it first (`lightning-nas export`, e.g. "
                "recipes/ofa_export_cifar10.yaml) and name its subnet.pt"
                if isinstance(hparams, Mapping) and "space" in hparams else "")
        raise RecipeError(f"a checkpoint of another task: its hyper_parameters name no model{hint}", key=key,
                          given=path, allowed=NETWORK_FILES)
    # As Lightning's load_from_checkpoint: only the arguments the task takes.
    accepted = inspect.signature(ClassificationTask.__init__).parameters
    try:
        task = ClassificationTask(**{k: v for k, v in hparams.items() if k in accepted})
        task.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # the file's content, not the code
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise RecipeError(f"not a checkpoint of a classification task ({first_line})", key=key, given=path,
                          allowed=NETWORK_FILES) from None
    return task.model


def load_network(path: str, key: str) -> Network:
    """The trained network of ``path``: a classification checkpoint or an exported ``subnet.pt``.

    Read without pickle (:func:`~lightning_nas.nn.safe_load.load_torch_file`); the kind is told by
    the file's keys, never by its name. ``key`` is the recipe key that named the file.
    """
    from ..nn.safe_load import load_torch_file

    saved = load_torch_file(path, key=key, what=NETWORK_FILES)
    if isinstance(saved, Mapping) and all(k in saved for k in _SUBNET_KEYS):
        from ..tasks.supernet import rebuild_network

        model, _, config = rebuild_network(saved, path=str(path), key=key)
        resolution = config.get("r") if isinstance(config, Mapping) else None
        return Network(model.eval(), "subnet", None if resolution is None else int(resolution))
    if isinstance(saved, Mapping) and all(k in saved for k in _CHECKPOINT_KEYS):
        return Network(_classification_model(saved, str(path), key).eval(), "classification")
    found = f"the keys {', '.join(map(str, saved))}" if isinstance(saved, Mapping) else f"a {type(saved).__name__}"
    raise RecipeError(f"neither kind of network file: it holds {found}", key=key, given=str(path),
                      allowed=NETWORK_FILES)


def input_resolution(network: Network, datamodule: Any, key: str) -> int | None:
    """The size the network's images are resized to (None: as stored); never above the stored size."""
    if network.resolution is None or network.resolution == datamodule.image_size:
        return None
    if network.resolution > datamodule.image_size:
        raise RecipeError(f"the subnet runs at {network.resolution} px, the data's images are {datamodule.image_size} "
                          "px: they would be upsampled", key=key, allowed="a subnet exported at a resolution up to "
                          f"{datamodule.image_size}, or data with larger images")
    return network.resolution


def choose_layers(model: Any, given: Sequence[str] | None, key: str) -> tuple[list[str], list[str]]:
    """(searchable layers, the other conv / linear layers, which stay at the fixed bits)."""
    from torch import nn

    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if given is None:
        if not hasattr(model, "block_layers"):
            raise RecipeError("this model does not name its searchable layers: list them", key=key,
                              allowed=", ".join(weighted))
        given = model.block_layers()
    unknown = [n for n in given if n not in weighted]
    if unknown:
        raise RecipeError("not a conv / linear layer of the model", key=key, given=unknown, allowed=", ".join(weighted))
    return list(given), [n for n in weighted if n not in given]


def held_out(datamodule: Any, images: int, batch_size: int,
             resolution: int | None = None) -> tuple[list[Any], Any, Any]:
    """(normalised image batches of the first ``images`` held-out images, all their images, labels),
    resized to ``resolution`` when given."""
    import torch

    xs, ys = [], []
    for x, y in datamodule.holdout_dataloader(batch_size=batch_size):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    if len(x) < images:
        raise RecipeError(f"needs {images} held-out images, the data module holds out {len(x)}",
                          key="data.holdout_size", given=len(x), allowed=f"at least {images}")
    x, y = datamodule.normalize(x[:images], resolution), y[:images]
    return list(x.split(batch_size)), x, y


def test_batches(datamodule: Any, resolution: int | None = None) -> list[tuple[Any, Any]]:
    """The data module's test images (``data.val_subset`` limits them), normalised (and resized to
    ``resolution`` when given)."""
    return [(datamodule.normalize(x, resolution), y) for x, y in datamodule.val_dataloader()]


def plan_config(seed: int, index: int, num_layers: int, bit_choices: Sequence[int]) -> list[int]:
    rng = random.Random(f"mq-{seed}-{index}")
    return [rng.choice(list(bit_choices)) for _ in range(num_layers)]


@dataclass
class PTQSettings:
    """What makes two PTQ evaluations comparable; stored in the statistics file's header."""

    checkpoint_hash: str
    layers: list[str]
    fixed_layers: list[str]
    bit_choices: list[int]
    activation_bits: int
    fixed_bits: int
    bn_images: int
    rounding_steps: int = 0
    rounding_images: int = 256


def ptq_id(ptq: PTQSettings) -> str:
    """A short hash of every PTQ setting: pairs measured under other settings are never mixed in."""
    return hashlib.sha256(json.dumps(asdict(ptq), sort_keys=True).encode()).hexdigest()[:12]


def benchmark_key(ptq: PTQSettings, seed: int, index: int) -> str:
    return f"{plan_key(ptq.checkpoint_hash, KIND, seed, index)}:{ptq_id(ptq)}"


def build_evaluator(model: Any, ptq: PTQSettings, bn_batches: list[Any], tests: list[tuple[Any, Any]]) -> Any:
    from ..nn.ptq import PTQEvaluator

    return PTQEvaluator(model, ptq.layers, ptq.fixed_layers, bn_batches, tests, activation_bits=ptq.activation_bits,
                        fixed_bits=ptq.fixed_bits, rounding_steps=ptq.rounding_steps,
                        rounding_images=ptq.rounding_images)


def statistics(path: Path, model: Any, ptq: PTQSettings, images: Any, labels: Any, settings: Any) -> Any:
    """The layer statistics, reused from ``path`` when they were computed for the same settings."""
    from ..spaces.emq_programs import LayerStatistics

    wanted = {"ptq": asdict(ptq), "stats_images": int(len(images)), "hessian_samples": settings.hessian_samples,
              "activation_images": settings.activation_images, "seed": settings.seed}
    if path.is_file():
        stats = LayerStatistics.load(path)
        if all(stats.meta.get(k) == v for k, v in wanted.items()):
            return stats
    from ..predictors.mq_stats import compute_layer_statistics

    started = time.perf_counter()
    stats = compute_layer_statistics(model, ptq.layers, images, labels, ptq.bit_choices, ptq.activation_bits,
                                     settings.hessian_samples, settings.activation_images, seed=settings.seed)
    stats.meta.update(wanted, seconds=time.perf_counter() - started)
    stats.save(path)
    return stats


def benchmark_pairs(store: PairStore, ptq: PTQSettings) -> list[Pair]:
    wanted = ptq_id(ptq)
    return [p for p in store.pairs(kind=KIND, checkpoint_hash=ptq.checkpoint_hash)
            if p.policy and p.policy.get("ptq") == wanted]


def nontriviality(stats: Any, pairs: Sequence[Pair]) -> dict[str, Any]:
    from ..search.emq_evolution import spearman
    from ..spaces.emq_programs import bitops_table, config_indices, score_configs, size_table

    index = config_indices(stats, [p.policy["w_bits"] for p in pairs])
    top1 = np.array([p.top1 for p in pairs])
    size, bitops = score_configs(size_table(stats), index), score_configs(bitops_table(stats), index)
    result = {"configs": len(pairs), "top1_mean": float(top1.mean()), "top1_min": float(top1.min()),
              "top1_max": float(top1.max()), "top1_std": float(top1.std()),
              "spearman_size": spearman(size, top1) if len(pairs) > 2 else float("nan"),
              "spearman_bitops": spearman(bitops, top1) if len(pairs) > 2 else float("nan")}
    result["trivial"] = bool(result["spearman_size"] > TRIVIAL_SPEARMAN)
    return {**result, "_size": size, "_bitops": bitops, "_top1": top1}


def write_outputs(run_dir: Path, stats: Any, pairs: Sequence[Pair], check: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    summary = {k: v for k, v in check.items() if not k.startswith("_")}
    summary.update(extra)
    write_json(run_dir / SUMMARY_FILE, summary)
    with replacing(run_dir / CSV_FILE) as temporary, temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["pair_key", "w_bits", "mean_bits", "size_bytes", "bitops", "top1", "loss", "seconds"])
        for p, size, bitops in zip(pairs, check["_size"], check["_bitops"]):
            writer.writerow([p.pair_key, " ".join(map(str, p.policy["w_bits"])), f"{np.mean(p.policy['w_bits']):.4f}",
                             f"{size:.1f}", f"{bitops:.6g}", f"{p.top1:.4f}", f"{p.loss:.6g}", f"{p.seconds:.3f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    axis.scatter(np.asarray(check["_size"]) / 1024, check["_top1"], s=8, alpha=0.6)
    axis.set_xlabel("weight size of the searchable layers (KiB)")
    axis.set_ylabel("top-1 after PTQ (%)")
    axis.set_title(f"{len(pairs)} configurations; Spearman(size, top-1) = {summary['spearman_size']:.3f}")
    save_png(figure, run_dir / PLOT_FILE)
    return summary


def log_summary(config: Mapping[str, Any], run_dir: Path, summary: Mapping[str, Any], prefix: str,
                table: tuple[list[str], list[list[Any]]] | None = None, image: Path | None = None) -> None:
    """Numbers of ``summary`` to every logger; a table and an image to W&B."""
    loggers = build_loggers(config, run_dir)
    metrics = {f"{prefix}/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_metrics(metrics, step=0)
        if type(logger).__name__ == "WandbLogger":
            if table is not None:
                logger.log_table(key=f"{prefix}/table", columns=table[0], data=table[1])
            if image is not None:
                logger.log_image(key=f"{prefix}/plot", images=[str(image)])
        logger.save()
        logger.finalize("success")


def run(recipe: LoadedRecipe) -> Path:
    from ..recipe.sections import MQBenchSettings
    from ..registry import DATA

    config = recipe.config
    require_sections(config, ("mqbench", "data"), "mqbench")
    settings = MQBenchSettings(**config["mqbench"])
    if not settings.bit_choices or any(not 2 <= b <= 8 for b in settings.bit_choices):
        raise RecipeError("bit widths must be in [2, 8]", key="mqbench.bit_choices", given=settings.bit_choices)
    if settings.num_configs < 1:
        raise RecipeError("a benchmark needs at least one configuration", key="mqbench.num_configs",
                          given=settings.num_configs)
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    datamodule = DATA.build(config["data"])
    datamodule.setup("fit")
    network = load_network(settings.checkpoint, "mqbench.checkpoint")
    model, resolution = network.model, input_resolution(network, datamodule, "mqbench.checkpoint")
    layers, fixed = choose_layers(model, settings.layers, "mqbench.layers")
    ptq = PTQSettings(file_hash(settings.checkpoint), layers, fixed, list(settings.bit_choices),
                      settings.activation_bits, settings.fixed_bits, settings.bn_images, settings.rounding_steps,
                      settings.rounding_images)
    bn_batches, _, _ = held_out(datamodule, settings.bn_images, settings.batch_size, resolution)
    _, stats_x, stats_y = held_out(datamodule, settings.stats_images, settings.stats_images, resolution)
    stats = statistics(run_dir / STATS_FILE, model, ptq, stats_x, stats_y, settings)

    store = PairStore(settings.store or run_dir / STORE_FILE)
    prefix = plan_key(ptq.checkpoint_hash, KIND, settings.seed, 0).rsplit(":", 1)[0] + ":"
    done = store.done_keys(prefix)
    todo = [i for i in range(settings.num_configs) if benchmark_key(ptq, settings.seed, i) not in done]
    arch = {"network": type(model).__name__, "layers": layers}
    started = time.perf_counter()
    if todo:
        evaluator = build_evaluator(model, ptq, bn_batches, test_batches(datamodule, resolution))
        with progress_bar("mq pairs", settings.progress, fields=["{task.fields[note]}"]) as progress:
            bar = progress.add_task("pairs", total=len(todo), note="")
            for n, index in enumerate(todo, start=1):
                bits = plan_config(settings.seed, index, len(layers), settings.bit_choices)
                pair_started = time.perf_counter()
                top1, loss = evaluator.evaluate(bits)
                store.add(Pair(arch=arch, policy={"w_bits": bits, "a_bits": settings.activation_bits,
                                                  "ptq": ptq_id(ptq)},
                               resolution=int(resolution or datamodule.image_size), top1=top1, loss=loss,
                               checkpoint_hash=ptq.checkpoint_hash, seed=settings.seed,
                               seconds=time.perf_counter() - pair_started, kind=KIND,
                               pair_key=benchmark_key(ptq, settings.seed, index)))
                elapsed = time.perf_counter() - started
                progress.update(bar, advance=1, note=f"{elapsed / n:.1f} s/config, last top-1 {top1:.2f}")
    pairs = benchmark_pairs(store, ptq)
    check = nontriviality(stats, pairs)
    summary = write_outputs(run_dir, stats, pairs, check, {
        "store": str(store.path), "stats": str(run_dir / STATS_FILE), "layers": layers, "fixed_layers": fixed,
        "bit_choices": ptq.bit_choices, "activation_bits": ptq.activation_bits, "checkpoint_hash": ptq.checkpoint_hash,
        "measured_now": len(todo), "seconds_now": time.perf_counter() - started,
        "seconds_per_config": float(np.mean([p.seconds for p in pairs]))})
    log_summary(config, run_dir, summary, "mqbench", (["w_bits", "size_bytes", "top1"], [
        [" ".join(map(str, p.policy["w_bits"])), float(s), p.top1] for p, s in zip(pairs, check["_size"])]),
        run_dir / PLOT_FILE)
    verdict = "TRIVIAL: size alone explains the ranking" if summary["trivial"] else "not trivial"
    print(f"mqbench: {len(pairs)} configurations ({len(todo)} measured now), top-1 {summary['top1_min']:.2f}-"
          f"{summary['top1_max']:.2f} %; Spearman(size, top-1) = {summary['spearman_size']:.3f}, "
          f"Spearman(BitOps, top-1) = {summary['spearman_bitops']:.3f} ({verdict})")
    return run_dir
