"""The joint APQ search space: architecture (kernel, expand ratio = channel pruning, depth,
resolution) and, optionally, the per-block quantization policy.

A candidate is a :class:`Candidate`: an OFA config ``{ks, e, d, r}`` and an APQ policy
``{pw_w, pw_a, dw_w, dw_a}`` (``None`` for a full-precision search). Everything here is derived
from the two spaces it wraps, which stay the single sources of truth:

* the choices of every searched decision (:meth:`JointSpace.choices`) come from the OFA space's
  ``resolutions``, ``depth_choices``, ``kernel_choices``, ``expand_choices`` and the policy space's
  ``bit_choices``; the NNI description (:meth:`JointSpace.mutable`), the NNI sample conversion and
  the compact index vectors (:meth:`JointSpace.to_vector`) are all read off that one table;
* sampling, mutation and crossover delegate to ``OFAMobileNetV3Space`` and ``QuantPolicySpace``;
* :meth:`JointSpace.encode` is the architecture encoding followed by the policy encoding (skipped
  blocks zero), the two inputs :func:`lightning_nas.predictors.encoding.encode_pairs` gives the
  quantization-aware predictor, concatenated; scoring itself uses ``encode_pairs``, the path the
  predictors were trained with.

The joint space satisfies :class:`~lightning_nas.spaces.protocol.BoundedSpace` over candidates.

Candidates are kept canonical: skipped blocks (elastic depth) hold the smallest kernel, expand
ratio and bit width, so two candidates describe the same quantized network iff they are equal
(and :meth:`JointSpace.key` is equal).

This module must not import torch or NNI at import time (recipe validation reads the search
settings next to it); :meth:`JointSpace.mutable` imports ``nni`` when called.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_nas.spaces.protocol import ElasticSpace
from lightning_nas.spaces.quant_policy import POLICY_KEYS, QuantPolicySpace

__all__ = ["Candidate", "JointSpace"]


@dataclass(eq=False)
class Candidate:
    """One point of the joint space: an architecture config and its quantization policy.

    ``eq=False`` keeps identity hashing and weak references (NNI holds frozen models weakly);
    compare candidates with :meth:`JointSpace.key`.
    """

    config: dict[str, Any]
    policy: dict[str, list[int]] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"config": ..., "policy": ...}``."""
        return {"config": self.config, "policy": self.policy}


class JointSpace:
    """Architecture x quantization-policy space built from an OFA space and a policy space.

    Args:
        space: an elastic architecture space (:class:`~lightning_nas.spaces.protocol.ElasticSpace`,
            e.g. :class:`~lightning_nas.spaces.ofa_mbv3.OFAMobileNetV3Space`).
        policy_space: the APQ policy space, or ``None`` for a full-precision search (candidates
            then have ``policy=None``).
    """

    #: Name of the space in reports (built from a search recipe, not from the space registry).
    name: str = "joint"

    def __init__(self, space: ElasticSpace, policy_space: QuantPolicySpace | None = None) -> None:
        self.space = space
        self.policy_space = policy_space
        self.num_blocks: int = int(space.num_blocks)
        self.num_stages: int = int(space.num_stages)
        self._choices = self._build_choices()
        self.labels: list[str] = list(self._choices)
        # value -> index per label, for the compact vectors
        self._index = {label: {v: i for i, v in enumerate(values)} for label, values in self._choices.items()}
        self._lookups = [self._index[label] for label in self.labels]
        self._values = [self._choices[label] for label in self.labels]

    @property
    def quantized(self) -> bool:
        """Whether candidates carry a quantization policy."""
        return self.policy_space is not None

    def __repr__(self) -> str:
        return f"JointSpace(space={type(self.space).__name__}, policy_space={self.policy_space!r})"

    # ------------------------------------------------------------------ the choice table

    def _build_choices(self) -> dict[str, list[int]]:
        s = self.space
        table: dict[str, list[int]] = {"r": list(s.resolutions)}
        table.update({f"d_{i}": list(s.depth_choices) for i in range(self.num_stages)})
        table.update({f"ks_{b}": list(s.kernel_choices) for b in range(self.num_blocks)})
        table.update({f"e_{b}": list(s.expand_choices) for b in range(self.num_blocks)})
        if self.policy_space is not None:
            for key in POLICY_KEYS:
                table.update({f"{key}_{b}": list(self.policy_space.bit_choices) for b in range(self.num_blocks)})
        return table

    def choices(self) -> dict[str, list[int]]:
        """Every searched decision and its allowed values, in a fixed order.

        Labels: ``r``; ``d_{stage}``; ``ks_{block}``, ``e_{block}``; with a policy space also
        ``pw_w_{block}``, ``pw_a_{block}``, ``dw_w_{block}``, ``dw_a_{block}``.
        """
        return {label: list(values) for label, values in self._choices.items()}

    @property
    def size(self) -> int:
        """Number of points of the flat decision table (skipped blocks' entries included)."""
        total = 1
        for values in self._choices.values():
            total *= len(values)
        return total

    def mutable(self) -> Any:
        """The space as an ``nni.mutable.MutableDict`` of ``Categorical`` choices labelled as in
        :meth:`choices`; its ``freeze(sample)`` gives the flat sample :meth:`from_sample` reads."""
        from nni.mutable import Categorical, MutableDict

        return MutableDict({label: Categorical(values, label=label) for label, values in self._choices.items()})

    # ------------------------------------------------------------------ conversions

    def from_sample(self, sample: Mapping[str, Any]) -> Candidate:
        """A canonical candidate from a flat NNI sample ``{label: value}``.

        Raises ``ValueError`` naming the first missing label or disallowed value.
        """
        for label, values in self._choices.items():
            if label not in sample:
                raise ValueError(f"sample is missing '{label}' (choose from {values})")
            if sample[label] not in self._index[label]:
                raise ValueError(f"sample['{label}'] = {sample[label]!r} is not one of {values}")
        return self.from_checked_sample(sample)

    def from_checked_sample(self, sample: Mapping[str, Any]) -> Candidate:
        """:meth:`from_sample` for a sample whose labels and values are known to be valid (an NNI
        model space checked it when it froze the model): the canonical candidate, unchecked."""
        values = [int(sample[label]) for label in self.labels]
        s, b = self.num_stages, self.num_blocks
        config = {"ks": values[1 + s : 1 + s + b], "e": values[1 + s + b : 1 + s + 2 * b],
                  "d": values[1 : 1 + s], "r": values[0]}
        config = self.space.canonical(config)
        if self.policy_space is None:
            return Candidate(config, None)
        start = 1 + s + 2 * b
        policy = {key: values[start + i * b : start + (i + 1) * b] for i, key in enumerate(POLICY_KEYS)}
        return Candidate(config, self._canonical_policy(config, policy, validate=False))

    def to_sample(self, candidate: Candidate) -> dict[str, int]:
        """The flat NNI sample of ``candidate`` (inverse of :meth:`from_sample` on canonical ones)."""
        c = self.canonical(candidate)
        sample: dict[str, int] = {"r": c.config["r"]}
        sample.update({f"d_{s}": c.config["d"][s] for s in range(self.num_stages)})
        sample.update({f"ks_{b}": c.config["ks"][b] for b in range(self.num_blocks)})
        sample.update({f"e_{b}": c.config["e"][b] for b in range(self.num_blocks)})
        if c.policy is not None:
            for key in POLICY_KEYS:
                sample.update({f"{key}_{b}": c.policy[key][b] for b in range(self.num_blocks)})
        return sample

    def _flat(self, candidate: Candidate) -> list[int]:
        """The candidate's values in :meth:`choices` order."""
        c, p = candidate.config, candidate.policy
        values = [c["r"], *c["d"], *c["ks"], *c["e"]]
        if self.policy_space is not None:
            if p is None:
                raise ValueError("this joint space is quantized: every candidate needs a policy")
            for key in POLICY_KEYS:
                values += p[key]
        return values

    def to_vector(self, candidate: Candidate) -> list[int]:
        """Choice indices in :meth:`choices` order: a compact record of a canonical candidate.

        The candidate is assumed canonical (everything this class returns is); use
        :meth:`canonical` first on anything else.
        """
        values = self._flat(candidate)
        if len(values) != len(self._lookups):
            raise ValueError(f"candidate has {len(values)} decisions, the space {len(self._lookups)}")
        try:
            return [lookup[v] for lookup, v in zip(self._lookups, values)]
        except (KeyError, TypeError):
            bad = next(i for i, (lk, v) in enumerate(zip(self._lookups, values)) if v not in lk)
            raise ValueError(f"{self.labels[bad]} = {values[bad]!r} is not one of {self._values[bad]}") from None

    def decode_vector(self, vector: Sequence[int]) -> Candidate:
        """:meth:`to_vector`'s inverse without validation, for vectors this class produced
        (e.g. a :class:`~lightning_nas.search.scoring.SearchHistory`'s); see :meth:`from_vector`."""
        values = [choices[int(i)] for choices, i in zip(self._values, vector)]
        s, b = self.num_stages, self.num_blocks
        config = {"ks": values[1 + s : 1 + s + b], "e": values[1 + s + b : 1 + s + 2 * b],
                  "d": values[1 : 1 + s], "r": values[0]}
        policy = None
        if self.policy_space is not None:
            start = 1 + s + 2 * b
            policy = {key: values[start + i * b : start + (i + 1) * b] for i, key in enumerate(POLICY_KEYS)}
        return Candidate(config, policy)

    def from_vector(self, vector: Sequence[int]) -> Candidate:
        """Inverse of :meth:`to_vector`: the canonical candidate of any index vector."""
        if len(vector) != len(self.labels):
            raise ValueError(f"vector must have {len(self.labels)} entries, got {len(vector)}")
        for label, values, i in zip(self.labels, self._values, vector):
            if not 0 <= int(i) < len(values):
                raise ValueError(f"vector entry for '{label}' is {int(i)}, but it has {len(values)} choices")
        return self.canonical(self.decode_vector(vector))

    def key(self, candidate: Candidate) -> bytes:
        """A hashable identity, equal for candidates describing the same quantized network."""
        return bytes(self.to_vector(candidate))

    def config_key(self, candidate: Candidate) -> bytes:
        """:meth:`key` of the canonical form of any candidate (the protocol's identity)."""
        return self.key(self.canonical(candidate))

    # ------------------------------------------------------------------ protocol: rebuild, check, encode

    def hparams(self) -> dict[str, Any]:
        """The two spaces' specs: the architecture space's registry spec and the policy space's
        arguments (``None`` for full precision)."""
        return {"space": {"name": self.space.name, **self.space.hparams()},
                "policy_space": None if self.policy_space is None else self.policy_space.hparams()}

    def validate(self, candidate: Candidate) -> Candidate:
        """A normalised copy (architecture and policy checked, skipped blocks left as given)."""
        if not isinstance(candidate, Candidate):
            raise ValueError(f"a joint-space point is a Candidate, got {type(candidate).__name__}")
        config = self.space.validate(candidate.config)
        policy = self._policy_of(candidate)
        return Candidate(config, None if policy is None else self.policy_space.validate(policy, self.num_blocks))

    def _policy_of(self, candidate: Candidate) -> Any:
        """The candidate's policy, checked against whether this space quantizes at all."""
        if self.policy_space is None:
            if candidate.policy is not None:
                raise ValueError("this joint space searches full precision only: candidates have no policy")
            return None
        if candidate.policy is None:
            raise ValueError("this joint space is quantized: every candidate needs a policy")
        return candidate.policy

    @property
    def encoding_size(self) -> int:
        """Architecture features plus, when quantized, policy features."""
        policy = 0 if self.policy_space is None else self.policy_space.encoding_size(self.num_blocks)
        return self.space.encoding_size + policy

    def encode(self, candidate: Candidate) -> list[float]:
        """The architecture encoding followed by the policy encoding (skipped blocks all zeros)."""
        c = self.validate(candidate)
        vec = self.space.encode(c.config)
        if self.policy_space is not None:
            assert c.policy is not None
            active = set(self.space.active_blocks(c.config))
            vec += self.policy_space.encode(c.policy, [b in active for b in range(self.num_blocks)])
        return vec

    def decode(self, vector: Sequence[float]) -> Candidate:
        """Inverse of :meth:`encode`: the canonical candidate (skipped blocks get the lowest bits)."""
        if len(vector) != self.encoding_size:
            raise ValueError(f"encoding must have {self.encoding_size} entries, got {len(vector)}")
        arch_size = self.space.encoding_size
        config = self.space.decode(vector[:arch_size])
        if self.policy_space is None:
            return Candidate(config, None)
        choices, width = self.policy_space.bit_choices, len(self.policy_space.bit_choices)
        active = set(self.space.active_blocks(config))
        policy: dict[str, list[int]] = {key: [] for key in POLICY_KEYS}
        offset = arch_size
        for b in range(self.num_blocks):
            for key in POLICY_KEYS:
                hot = [i for i, v in enumerate(vector[offset : offset + width]) if v > 0.5]
                if len(hot) != (1 if b in active else 0):
                    raise ValueError(f"policy encoding of block {b} '{key}' does not match the architecture "
                                     f"({'running' if b in active else 'skipped'} block, {len(hot)} bits set)")
                policy[key].append(choices[hot[0]] if hot else min(choices))
                offset += width
        return Candidate(config, policy)

    # ------------------------------------------------------------------ canonical form

    def _canonical_policy(self, config: Mapping[str, Any], policy: Mapping[str, Sequence[int]],
                          validate: bool = True) -> dict[str, list[int]]:
        """``policy`` with the smallest bits on skipped blocks; ``validate=False`` for policies
        that the policy space itself just produced (validation dominates the cost of evolution)."""
        assert self.policy_space is not None
        checked = self.policy_space.validate(policy, self.num_blocks) if validate else policy
        low = min(self.policy_space.bit_choices)
        active = set(self.space.active_blocks(config))
        return {key: [v if b in active else low for b, v in enumerate(checked[key])] for key in POLICY_KEYS}

    def canonical(self, candidate: Candidate) -> Candidate:
        """Validated copy whose skipped blocks hold the smallest kernel, ratio and bits."""
        config = self.space.canonical(candidate.config)
        policy = self._policy_of(candidate)
        return Candidate(config, None if policy is None else self._canonical_policy(config, policy))

    # ------------------------------------------------------------------ reference points

    def smallest(self) -> Candidate:
        """The smallest architecture at the lowest bit width."""
        config = self.space.smallest()
        if self.policy_space is None:
            return Candidate(config, None)
        return self.canonical(Candidate(config, self.policy_space.uniform(min(self.policy_space.bit_choices),
                                                                          self.num_blocks)))

    def largest(self) -> Candidate:
        """The largest architecture at the highest bit width."""
        config = self.space.largest()
        if self.policy_space is None:
            return Candidate(config, None)
        return self.canonical(Candidate(config, self.policy_space.uniform(max(self.policy_space.bit_choices),
                                                                          self.num_blocks)))

    # ------------------------------------------------------------------ evolution operators

    def sample(self, rng: random.Random) -> Candidate:
        """A uniformly random candidate (architecture and policy drawn independently)."""
        config = self.space.sample(rng)
        if self.policy_space is None:
            return Candidate(config, None)
        return Candidate(config, self._canonical_policy(config, self.policy_space.sample(rng, self.num_blocks),
                                                        validate=False))

    def _fresh_bits(self, policy: dict[str, list[int]], blocks: Sequence[int], rng: random.Random) -> None:
        """Draw new bits for ``blocks`` (blocks that start running hold normalised values, which
        would otherwise bias children towards the lowest bit width)."""
        assert self.policy_space is not None
        drawn = self.policy_space.sample(rng, len(blocks))
        for i, b in enumerate(blocks):
            for key in POLICY_KEYS:
                policy[key][b] = drawn[key][i]

    def mutate(
        self,
        candidate: Candidate,
        rng: random.Random,
        prob: float = 0.1,
        resolution_prob: float = 0.5,
        policy_prob: float | None = None,
    ) -> Candidate:
        """Architecture mutation of the OFA space (per gene ``prob``, resolution
        ``resolution_prob``) and policy mutation of the policy space (per entry ``policy_prob``,
        default ``prob``). Blocks that a depth mutation switches on get fresh random bits."""
        config = self.space.mutate(candidate.config, rng, prob=prob, resolution_prob=resolution_prob)
        if self.policy_space is None:
            return Candidate(config, None)
        assert candidate.policy is not None
        policy = self.policy_space.mutate(candidate.policy, rng, prob=prob if policy_prob is None else policy_prob)
        newly_active = sorted(set(self.space.active_blocks(config)) - set(self.space.active_blocks(candidate.config)))
        if newly_active:
            self._fresh_bits(policy, newly_active, rng)
        return Candidate(config, self._canonical_policy(config, policy, validate=False))

    def crossover(self, first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
        """Uniform crossover of the architectures (OFA space) and of the policies (policy space).

        Before the policy crossover, each parent's skipped-block bits are filled with the other
        parent's bits for that block when it runs there, so a child never inherits the
        meaningless bits of a skipped block when a meaningful one exists; blocks that run in the
        child but in neither parent get fresh random bits.
        """
        config = self.space.crossover(first.config, second.config, rng)
        if self.policy_space is None:
            return Candidate(config, None)
        assert first.policy is not None and second.policy is not None
        active_a = set(self.space.active_blocks(first.config))
        active_b = set(self.space.active_blocks(second.config))
        pa = {k: list(v) for k, v in first.policy.items()}
        pb = {k: list(v) for k, v in second.policy.items()}
        for b in range(self.num_blocks):
            for key in POLICY_KEYS:
                if b not in active_a and b in active_b:
                    pa[key][b] = pb[key][b]
                elif b in active_a and b not in active_b:
                    pb[key][b] = pa[key][b]
        policy = self.policy_space.crossover(pa, pb, rng)
        orphans = sorted(set(self.space.active_blocks(config)) - active_a - active_b)
        if orphans:
            self._fresh_bits(policy, orphans, rng)
        return Candidate(config, self._canonical_policy(config, policy, validate=False))
