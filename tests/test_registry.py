"""Every catalog entry points at something that exists and whose signature validation can read."""

from __future__ import annotations

import pytest

from lightning_nas.recipe.signature import signature_of
from lightning_nas.registry import REGISTRIES

ENTRIES = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize(("kind", "name"), ENTRIES, ids=[f"{k}:{n}" for k, n in ENTRIES])
def test_catalog_target_resolves(kind: str, name: str) -> None:
    entry = REGISTRIES[kind].entry(name)
    signature = signature_of(entry.target)
    if kind != "logger":  # loggers are built by the framework, not from recipe arguments
        assert not signature.accepts_any_keyword, f"{entry.target} hides its arguments behind **kwargs"
    assert entry.summary
