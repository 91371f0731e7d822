"""Annotations with a meaning for recipe validation.

At run time they are plain aliases (a path is a ``str``, a component spec a ``dict``); recipe
validation reads them by name from the source and checks more: that a file exists, that a nested
``{name: ..., ...}`` mapping names a registered component with valid arguments, or that a
``{class_path: ..., init_args: ...}`` mapping names an importable class with valid arguments.
"""

from __future__ import annotations

from typing import Any

#: A path to a file that must exist when the recipe is validated.
ExistingFile = str
#: A path to a directory that must exist when the recipe is validated.
ExistingDir = str
#: A directory that must exist unless the same component's ``download`` argument is true.
DownloadableDir = str

#: ``{name: <registered name>, **arguments}`` of the registry in ``MAPPING_MARKERS``.
SpaceSpec = dict[str, Any]
ModelSpec = dict[str, Any]
DataSpec = dict[str, Any]
TaskSpec = dict[str, Any]
CostModelSpec = dict[str, Any]
StrategySpec = dict[str, Any]
#: ``{class_path: package.module.Class, init_args: {...}}``, e.g. a Lightning callback.
ClassPathSpec = dict[str, Any]
#: Keyword arguments of ``lightning.pytorch.Trainer``.
TrainerArgs = dict[str, Any]
#: The name of a registered logger.
LoggerName = str

PATH_MARKERS = ("ExistingFile", "ExistingDir", "DownloadableDir")

#: Numbers whose range recipe validation checks (a negative learning rate fails in the first
#: second, not after the imports and set-up).
PositiveInt = int
NonNegativeInt = int
PositiveFloat = float
NonNegativeFloat = float
#: A share or a probability: a number in [0, 1].
Fraction = float

#: Bit widths of a quantization policy space, and the bits of the layers it keeps fixed; checked
#: in the validation pass by the (torch-free) functions named in ``VALUE_CHECKS``.
BitChoices = list[int]
FixedBits = int
VALUE_CHECKS = {
    "BitChoices": ("list", "lightning_nas.spaces.quant_policy:check_bit_choices", "a list of distinct bit widths"),
    "FixedBits": ("int", "lightning_nas.spaces.quant_policy:check_fixed_bits", "a bit width or 32"),
}

#: Marker -> (base type, lowest value, whether the lowest is allowed, highest value or None, text).
RANGE_MARKERS: dict[str, tuple[str, float, bool, float | None, str]] = {
    "PositiveInt": ("int", 1, True, None, "int >= 1"),
    "NonNegativeInt": ("int", 0, True, None, "int >= 0"),
    "PositiveFloat": ("float", 0, False, None, "float > 0"),
    "NonNegativeFloat": ("float", 0, True, None, "float >= 0"),
    "Fraction": ("float", 0, True, 1.0, "float in [0, 1]"),
}

#: Marker -> how its mapping is validated: ``registry:<kind>``, ``class_path``, ``signature:<target>``.
MAPPING_MARKERS = {
    "SpaceSpec": "registry:space",
    "ModelSpec": "registry:model",
    "DataSpec": "registry:data",
    "TaskSpec": "registry:task",
    "CostModelSpec": "registry:cost_model",
    "StrategySpec": "registry:strategy",
    "ClassPathSpec": "class_path",
    "TrainerArgs": "signature:lightning.pytorch.Trainer",
    "WandbSettings": "signature:lightning_nas.recipe.sections:WandbSettings",
    "SweepSettings": "signature:lightning_nas.recipe.sections:SweepSettings",
    "ExportSettings": "signature:lightning_nas.recipe.sections:ExportSettings",
    "DeploySettings": "signature:lightning_nas.recipe.sections:DeploySettings",
    "ProfileSettings": "signature:lightning_nas.recipe.profile_settings:ProfileSettings",
    "SearchSettings": "signature:lightning_nas.recipe.search_settings:SearchSettings",
    "RankSettings": "signature:lightning_nas.recipe.sections:RankSettings",
    "SpaceEvoProfileSettings": "signature:lightning_nas.recipe.sections:SpaceEvoProfileSettings",
    "MQBenchSettings": "signature:lightning_nas.recipe.sections:MQBenchSettings",
    "EMQSearchSettings": "signature:lightning_nas.recipe.sections:EMQSearchSettings",
    "AllocateSettings": "signature:lightning_nas.recipe.sections:AllocateSettings",
    "DistillSettings": "signature:lightning_nas.recipe.sections:DistillSettings",
    "SpaceEvoSearchSettings": "signature:lightning_nas.recipe.sections:SpaceEvoSearchSettings",
    "ShrinkingPhase": "signature:lightning_nas.tasks.phases:ShrinkingPhase",
    "PipelineSettings": "signature:lightning_nas.recipe.sections:PipelineSettings",
    "PipelineStage": "signature:lightning_nas.recipe.sections:PipelineStage",
}
#: Marker -> registry whose names it must be one of.
NAME_MARKERS = {"LoggerName": "logger"}
