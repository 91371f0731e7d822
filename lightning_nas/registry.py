"""Registries of the components a recipe can name, and the catalog that fills them.

A registry maps a short name (``cifar10``, ``ofa_mbv3``) to an import target
(``package.module:Class``) and a one-line summary. A *preset* entry (``ofa_mbv3_cifar``) names a
class and one of its named argument sets: it is built with ``Class.from_preset(preset, **args)``,
so a layout variant is data next to its class, not a subclass repeating the signature; recipe
validation reads the class's own signature. Targets are imported only when a component is
built, so listing, validating and suggesting names never pays for importing torch. The catalog
at the bottom is the one place where components are registered.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RecipeError, close_match


@dataclass(frozen=True)
class Entry:
    name: str
    target: str
    summary: str
    #: Name of the target's argument set (``Class.from_preset(preset, ...)``), or None.
    preset: str | None = None

    def load(self) -> Any:
        """The callable that builds the component (the preset's factory for a preset entry)."""
        module, _, attribute = self.target.partition(":")
        loaded = getattr(importlib.import_module(module), attribute)
        return functools.partial(loaded.from_preset, self.preset) if self.preset is not None else loaded


class Registry:
    """Named components of one kind, e.g. all data modules."""

    def __init__(self, kind: str, description: str) -> None:
        self.kind = kind
        self.description = description
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: str, summary: str, preset: str | None = None) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if ":" not in target:
            raise ValueError(f"target of {self.kind} '{name}' must look like 'package.module:Name'")
        self._entries[name] = Entry(name, target, summary, preset)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def entry(self, name: str, key: str = "name") -> Entry:
        if not isinstance(name, str):
            raise RecipeError(f"expected the name of a {self.description}", key=key, given=name,
                              allowed=self.names())
        if name not in self._entries:
            raise RecipeError(
                f"unknown {self.description} '{name}'",
                key=key,
                given=name,
                allowed=self.names(),
                suggestion=close_match(str(name), self._entries),
            )
        return self._entries[name]

    def build(self, spec: Mapping[str, Any], **injected: Any) -> Any:
        """Build from ``{name: ..., **arguments}``; ``injected`` arguments win over the spec's."""
        arguments = {k: v for k, v in spec.items() if k != "name"}
        arguments.update(injected)
        return self.entry(spec["name"]).load()(**arguments)


SPACES = Registry("space", "search space")
MODELS = Registry("model", "model")
DATA = Registry("data", "data module")
TASKS = Registry("task", "task")
COST_MODELS = Registry("cost_model", "cost model")
STRATEGIES = Registry("strategy", "search strategy")
LOGGERS = Registry("logger", "logger")

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (SPACES, MODELS, DATA, TASKS, COST_MODELS, STRATEGIES, LOGGERS)
}

# --- catalog ---------------------------------------------------------------------------------

DATA.add("digits", "lightning_nas.data.digits:DigitsDataModule",
         "scikit-learn's handwritten digits upscaled to RGB images; ships with the package, no download")
DATA.add("cifar10", "lightning_nas.data.cifar10:CIFAR10DataModule",
         "CIFAR-10 from train.npz/test.npz arrays or torchvision's format (downloads when allowed)")
DATA.add("npz", "lightning_nas.data.arrays:NpzDataModule",
         "any image classification set stored as .npz arrays (x uint8 NHWC, y int)")
DATA.add("image_folder", "lightning_nas.data.folders:ImageFolderDataModule",
         "ImageNet-style class folders (train/ and val/)")

SPACES.add("ofa_mbv3", "lightning_nas.spaces.ofa_mbv3:OFAMobileNetV3Space",
           "once-for-all elastic MobileNetV3 (kernel, expand, depth, resolution), ImageNet layout")
SPACES.add("ofa_mbv3_cifar", "lightning_nas.spaces.ofa_mbv3:OFAMobileNetV3Space",
           "once-for-all elastic MobileNetV3 for 32x32 inputs (stride-1 stem, 10 classes)", preset="ofa_mbv3_cifar")
SPACES.add("ofa_mbv3_cifar_4x4", "lightning_nas.spaces.ofa_mbv3:OFAMobileNetV3Space",
           "once-for-all elastic MobileNetV3 for 32x32 inputs with 4x4 maps before the head (width 0.75)",
           preset="ofa_mbv3_cifar_4x4")
SPACES.add("nb201", "lightning_nas.spaces.nb201:NB201Space",
           "NAS-Bench-201 cell space (15,625 cells, 5 ops on 6 edges)")
SPACES.add("proxyless", "lightning_nas.spaces.proxyless:ProxylessSpace",
           "ProxylessNAS MobileNetV2-style layout with MBConv candidates per layer (ImageNet)")
SPACES.add("proxyless_cifar", "lightning_nas.spaces.proxyless:ProxylessSpace",
           "ProxylessNAS MobileNetV2-style layout for 32x32 inputs", preset="proxyless_cifar")

DATA.add("zc_stats", "lightning_nas.data.zc_stats:ZCStatsDataModule",
         "node-wise zero-cost statistics of NAS-Bench-201 architectures with their accuracies")
DATA.add("pairs", "lightning_nas.data.pairs:PairsDataModule",
         "accuracy pairs of a pair store, encoded for predictors")

MODELS.add("timm", "lightning_nas.tasks.models:timm_model", "any timm architecture, trained from scratch")
MODELS.add("cifar_resnet", "lightning_nas.nn.cifar_resnet:cifar_resnet",
           "CIFAR ResNet-20/32/44/56 (option-A shortcuts) for 32x32 images; the mixed-precision benchmark's network")
MODELS.add("proxyless_derived", "lightning_nas.tasks.proxyless_models:proxyless_derived",
           "the architecture a ProxylessNAS search derived (derived_arch.json), from scratch")

TASKS.add("supernet", "lightning_nas.tasks.supernet:SupernetTask",
          "once-for-all supernet training with progressive shrinking and distillation")
TASKS.add("predictor", "lightning_nas.tasks.predictor:PredictorTask",
          "accuracy predictor (MLP) on stored pairs, with predictor transfer for quantized pairs")
TASKS.add("qat", "lightning_nas.tasks.qat:QATTask",
          "quantization-aware finetuning of a subnet under a policy, then int8/ONNX deployment")
TASKS.add("proxyless", "lightning_nas.tasks.proxyless:ProxylessSearchTask",
          "ProxylessNAS: binary-gate differentiable search with a latency loss")
TASKS.add("parzc", "lightning_nas.tasks.parzc:ParZCTask",
          "ParZC: Bayesian MLP-Mixer ranker over node-wise zero-cost statistics")
TASKS.add("classification", "lightning_nas.tasks.classification:ClassificationTask",
          "train a fixed network with cross-entropy")

COST_MODELS.add("counts", "lightning_nas.hardware.cost_models:CountsCostModel",
                "MACs, parameters, BitOps and model size from the config")
COST_MODELS.add("latency_table", "lightning_nas.hardware.cost_models:LatencyTableCostModel",
                "latency from a table measured with `lightning-nas profile`")
COST_MODELS.add("bitfusion", "lightning_nas.hardware.cost_models:BitFusionCostModel",
                "analytic BitFusion-style mixed-precision accelerator: latency and energy")

LOGGERS.add("csv", "lightning_nas.loggers:csv_logger", "metrics as CSV in run_dir/logs")
LOGGERS.add("wandb", "lightning_nas.loggers:wandb_logger",
            "Weights & Biases; offline (synced later) when there is no network or WANDB_MODE=offline")
