"""Networks derived by a ProxylessNAS search, as ``model`` builders of the classification task."""

from __future__ import annotations

from torch import nn

from lightning_nas.nn.builders import build_subnet

from ..recipe.markers import ExistingFile


def proxyless_derived(arch_path: ExistingFile, num_classes: int = 10, width_mult: float | None = None,
                      dropout: float | None = None) -> nn.Module:
    """The standalone network of a ``derived_arch.json`` (written by the ``proxyless`` task), freshly
    initialised: ProxylessNAS trains the derived architecture from scratch.

    ``num_classes`` replaces the search's class count; ``width_mult`` and ``dropout``, when given,
    replace the searched space's (the ops per layer are kept).
    """
    from ..spaces.proxyless import load_derived_arch, space_from_record

    space, ops = load_derived_arch(arch_path, num_classes=num_classes)
    if width_mult is not None or dropout is not None:
        arguments = {"name": space.name, **space.hparams()}
        if width_mult is not None:
            arguments["width_mult"] = width_mult
        if dropout is not None:
            arguments["dropout"] = dropout
        space = space_from_record({"space": arguments})
    return build_subnet(space, ops)
