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
    "ProfileSettings": "signature:lightning_nas.hardware.settings:ProfileSettings",
    "SearchSettings": "signature:lightning_nas.search.settings:SearchSettings",
    "RankSettings": "signature:lightning_nas.recipe.sections:RankSettings",
    "ShrinkingPhase": "signature:lightning_nas.callbacks.phases:ShrinkingPhase",
    "PipelineSettings": "signature:lightning_nas.recipe.sections:PipelineSettings",
    "PipelineStage": "signature:lightning_nas.recipe.sections:PipelineStage",
}
#: Marker -> registry whose names it must be one of.
NAME_MARKERS = {"LoggerName": "logger"}
