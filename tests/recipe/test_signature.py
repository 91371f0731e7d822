from __future__ import annotations

import inspect

import pytest

from lightning_nas.recipe.signature import TargetNotFound, signature_of


def test_lightning_trainer_signature_matches_inspect() -> None:
    import lightning.pytorch as pl

    read = signature_of("lightning.pytorch.Trainer")
    real = {n for n, p in inspect.signature(pl.Trainer).parameters.items() if p.kind is not p.VAR_KEYWORD}
    assert set(read.parameters) == real
    assert read.parameters["max_epochs"].annotation == "Optional[int]"


def test_reexported_callback_and_kwargs_forwarding_to_base() -> None:
    checkpoint = signature_of("lightning.pytorch.callbacks.ModelCheckpoint")
    assert "save_last" in checkpoint.parameters and not checkpoint.accepts_any_keyword
    cifar = signature_of("lightning_nas.data.cifar10:CIFAR10DataModule")
    assert {"root", "download", "batch_size", "holdout_size"} <= set(cifar.parameters)
    assert not cifar.accepts_any_keyword


def test_dataclass_fields_and_default_factories() -> None:
    recipe = signature_of("lightning_nas.recipe.sections:Recipe")
    assert recipe.parameters["description"].required
    assert recipe.parameters["callbacks"].default == {}
    assert recipe.parameters["seed"].default == 0


def test_unknown_targets() -> None:
    with pytest.raises(TargetNotFound) as info:
        signature_of("lightning.pytorch.callbacks.ModelCheckpoin")
    assert "ModelCheckpoint" in info.value.candidates
    with pytest.raises(TargetNotFound):
        signature_of("no_such_package.Thing")
