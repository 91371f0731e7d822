"""Evolution operators of the once-for-all MobileNetV3 space: mutation and crossover (torch-free).

:meth:`OFAMobileNetV3Space.mutate <lightning_nas.spaces.ofa_mbv3.OFAMobileNetV3Space.mutate>` and
``crossover`` call these functions. Both return canonical configs and never let a child inherit
the meaningless kernel / expand values of a block that was skipped in its parent.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

__all__ = ["crossover", "mutate"]


def mutate(
    space: OFAMobileNetV3Space, config: Mapping[str, Any], rng: random.Random, prob: float = 0.1, resolution_prob: float = 0.5
) -> dict:
    """Resample each block's kernel and expand ratio and each stage's depth with ``prob``,
    the resolution with ``resolution_prob``; returns a canonical config.

    Blocks that a depth mutation switches on get fresh random choices: in a canonical parent
    they hold the normalised smallest values, which would bias children towards small blocks.
    """
    parent = space.canonical(config)
    child = {"ks": list(parent["ks"]), "e": list(parent["e"]), "d": list(parent["d"]), "r": parent["r"]}
    if rng.random() < resolution_prob:
        child["r"] = rng.choice(space.resolutions)
    for b in range(space.num_blocks):
        if rng.random() < prob:
            child["ks"][b] = rng.choice(space.kernel_choices)
        if rng.random() < prob:
            child["e"][b] = rng.choice(space.expand_choices)
    for s in range(space.num_stages):
        if rng.random() < prob:
            child["d"][s] = rng.choice(space.depth_choices)
    newly_active = set(space.active_blocks(child)) - set(space.active_blocks(parent))
    for b in sorted(newly_active):
        child["ks"][b] = rng.choice(space.kernel_choices)
        child["e"][b] = rng.choice(space.expand_choices)
    return space.canonical(child)

def crossover(space: OFAMobileNetV3Space, a: Mapping[str, Any], b: Mapping[str, Any], rng: random.Random) -> dict:
    """Uniform crossover: every gene (block kernel+ratio, stage depth, resolution) comes from
    one parent at random; returns a canonical config.

    A block's kernel and ratio are taken from a parent in which the block actually runs when
    there is one, so the child never inherits the meaningless values of a skipped block.
    """
    a, b = space.canonical(a), space.canonical(b)
    active_a, active_b = set(space.active_blocks(a)), set(space.active_blocks(b))
    child: dict[str, Any] = {
        "d": [rng.choice((da, db)) for da, db in zip(a["d"], b["d"])],
        "r": rng.choice((a["r"], b["r"])),
        "ks": [],
        "e": [],
    }
    for i in range(space.num_blocks):
        donor = a if rng.random() < 0.5 else b
        if i not in (active_a if donor is a else active_b):
            donor = b if donor is a else a
        child["ks"].append(donor["ks"][i])
        child["e"].append(donor["e"][i])
    return space.canonical(child)
