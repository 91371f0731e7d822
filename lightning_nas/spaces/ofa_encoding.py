"""The accuracy-predictor encoding of once-for-all MobileNetV3 configs (one-hot, torch-free).

:meth:`OFAMobileNetV3Space.encode <lightning_nas.spaces.ofa_mbv3.OFAMobileNetV3Space.encode>` and
``decode`` call these functions; they are kept apart from the layout so that a change of the
predictor's input format touches one file.

Layout of the vector: resolution one-hot, then for every block its kernel one-hot followed by its
expand-ratio one-hot; skipped blocks are all zeros, which also encodes the depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

__all__ = ["decode", "encode", "encoding_size"]


def encoding_size(space: OFAMobileNetV3Space) -> int:
    """Length of :func:`encode`'s vector."""
    return len(space.resolutions) + space.num_blocks * (len(space.kernel_choices) + len(space.expand_choices))


def encode(space: OFAMobileNetV3Space, config: Mapping[str, Any]) -> list[float]:
    """One-hot feature vector of ``config``; one-to-one on canonical configs (see :func:`decode`)."""
    config = space.validate(config)
    active = set(space.active_blocks(config))
    vec = [0.0] * encoding_size(space)
    vec[space.resolutions.index(config["r"])] = 1.0
    offset = len(space.resolutions)
    nk, ne = len(space.kernel_choices), len(space.expand_choices)
    for b in range(space.num_blocks):
        if b in active:
            vec[offset + space.kernel_choices.index(config["ks"][b])] = 1.0
            vec[offset + nk + space.expand_choices.index(config["e"][b])] = 1.0
        offset += nk + ne
    return vec


def decode(space: OFAMobileNetV3Space, vector: Sequence[float]) -> dict:
    """Inverse of :func:`encode`: the canonical config of a one-hot vector."""
    size = encoding_size(space)
    if len(vector) != size:
        raise ValueError(f"encoding must have {size} entries, got {len(vector)}")

    def argmax(chunk: Sequence[float]) -> int | None:
        hot = [i for i, v in enumerate(chunk) if v > 0.5]
        if len(hot) > 1:
            raise ValueError(f"encoding chunk {list(chunk)} is not one-hot")
        return hot[0] if hot else None

    n_res = len(space.resolutions)
    r_index = argmax(vector[:n_res])
    if r_index is None:
        raise ValueError("encoding has no resolution set")
    nk, ne = len(space.kernel_choices), len(space.expand_choices)
    ks, es, running = [], [], []
    offset = n_res
    for _ in range(space.num_blocks):
        k = argmax(vector[offset : offset + nk])
        e = argmax(vector[offset + nk : offset + nk + ne])
        if (k is None) != (e is None):
            raise ValueError(f"encoding block at offset {offset} has a kernel xor an expand ratio")
        running.append(k is not None)
        ks.append(space.kernel_choices[k] if k is not None else min(space.kernel_choices))
        es.append(space.expand_choices[e] if e is not None else min(space.expand_choices))
        offset += nk + ne
    depths = []
    for s in range(space.num_stages):
        flags = [running[b] for b in space.stage_blocks(s)]
        d = sum(flags)
        if flags != [True] * d + [False] * (space.max_depth - d):
            raise ValueError(f"encoding stage {s} runs non-leading blocks {flags}")
        depths.append(d)
    return space.canonical({"ks": ks, "e": es, "d": depths, "r": space.resolutions[r_index]})
