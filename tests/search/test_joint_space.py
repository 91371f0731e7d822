"""The joint architecture / quantization-policy space: one choice table, NNI description,
conversions, canonical form and the evolution operators delegated to the two spaces."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from conftest import REPO

from lightning_nas.search.joint_space import Candidate, JointSpace
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.spaces.quant_policy import POLICY_KEYS, QuantPolicySpace


def assert_canonical(joint: JointSpace, c: Candidate) -> None:
    again = joint.canonical(c)
    assert again.config == c.config and again.policy == c.policy


def test_choices_come_from_the_two_spaces() -> None:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", kernel_choices=[3, 5], expand_choices=[4, 6], resolutions=[28, 32])
    policies = QuantPolicySpace(bit_choices=[4, 8])
    joint = JointSpace(space, policies)
    choices = joint.choices()
    b, s = space.num_blocks, space.num_stages
    assert len(choices) == 1 + s + 2 * b + len(POLICY_KEYS) * b == 126
    assert choices["r"] == [28, 32]
    assert choices["d_0"] == space.depth_choices
    assert choices[f"ks_{b - 1}"] == [3, 5] and choices["e_3"] == [4, 6]
    assert choices["pw_w_0"] == [4, 8] and choices[f"dw_a_{b - 1}"] == [4, 8]
    assert joint.size == 2 * 3**s * 2 ** (2 * b) * 2 ** (4 * b)
    fp32 = JointSpace(space)
    assert not fp32.quantized and len(fp32.choices()) == 1 + s + 2 * b


def test_nni_mutable_has_the_same_labels_and_samples_map_to_candidates(joint: JointSpace) -> None:
    from numpy.random import RandomState

    mutable = joint.mutable()
    simplified = mutable.simplify()
    assert list(simplified) == joint.labels
    assert all(list(simplified[label].values) == values for label, values in joint.choices().items())
    state = RandomState(0)
    for _ in range(5):
        sample = mutable.random(random_state=state)
        candidate = joint.from_sample(sample)
        assert_canonical(joint, candidate)
        assert mutable.contains(joint.to_sample(candidate))
        assert joint.from_sample(joint.to_sample(candidate)).config == candidate.config


def test_sample_round_trips_and_canonicalises_skipped_blocks(joint: JointSpace) -> None:
    rng = random.Random(1)
    candidate = joint.sample(rng)
    sample = joint.to_sample(candidate)
    back = joint.from_sample(sample)
    assert back.config == candidate.config and back.policy == candidate.policy
    # stage 0 runs 2 blocks: block 3 is skipped, so its kernel and bits do not matter
    sample.update({"d_0": 2, "ks_3": 7, "e_3": 6, "pw_w_3": 8, "dw_a_3": 8})
    canonical = joint.from_sample(sample)
    assert canonical.config["ks"][3] == 3 and canonical.config["e"][3] == 3
    assert canonical.policy["pw_w"][3] == 4 and canonical.policy["dw_a"][3] == 4
    sample["ks_3"] = 5
    assert joint.key(joint.from_sample(sample)) == joint.key(canonical)


def test_from_sample_names_missing_and_bad_values(joint: JointSpace) -> None:
    sample = joint.to_sample(joint.smallest())
    del sample["pw_a_4"]
    with pytest.raises(ValueError, match=r"missing 'pw_a_4'"):
        joint.from_sample(sample)
    sample = joint.to_sample(joint.smallest())
    sample["ks_2"] = 9
    with pytest.raises(ValueError, match=r"sample\['ks_2'\] = 9 is not one of \[3, 5, 7\]"):
        joint.from_sample(sample)


def test_vectors_and_keys(joint: JointSpace) -> None:
    rng = random.Random(2)
    candidates = [joint.sample(rng) for _ in range(20)]
    for c in candidates:
        vector = joint.to_vector(c)
        assert len(vector) == len(joint.labels)
        assert joint.from_vector(vector).as_dict() == c.as_dict()
        assert joint.decode_vector(vector).as_dict() == c.as_dict()
    assert len({joint.key(c) for c in candidates}) == len(candidates)
    with pytest.raises(ValueError, match="has 3 choices"):
        joint.from_vector([5] + joint.to_vector(candidates[0])[1:])
    assert joint.to_vector(joint.smallest()) == [0] * len(joint.labels)


def test_operators_return_canonical_valid_candidates(joint: JointSpace) -> None:
    rng = random.Random(3)
    space, policies = joint.space, joint.policy_space
    parents = [joint.sample(rng) for _ in range(10)]
    for i in range(30):
        a, b = parents[i % 10], parents[(i * 7 + 3) % 10]
        for child in (joint.mutate(a, rng), joint.crossover(a, b, rng)):
            space.validate(child.config)
            policies.validate(child.policy, space.num_blocks)
            assert_canonical(joint, child)


def test_mutation_probability_zero_keeps_the_candidate(joint: JointSpace) -> None:
    rng = random.Random(4)
    parent = joint.sample(rng)
    same = joint.mutate(parent, rng, prob=0.0, resolution_prob=0.0)
    assert joint.key(same) == joint.key(parent)
    changed = joint.mutate(parent, rng, prob=1.0, resolution_prob=1.0)
    assert joint.key(changed) != joint.key(parent)


def test_crossover_takes_every_running_gene_from_a_parent(joint: JointSpace) -> None:
    rng = random.Random(5)
    space = joint.space
    for _ in range(30):
        a, b = joint.sample(rng), joint.sample(rng)
        child = joint.crossover(a, b, rng)
        assert child.config["r"] in (a.config["r"], b.config["r"])
        both = set(space.active_blocks(a.config)) & set(space.active_blocks(b.config))
        for block in set(space.active_blocks(child.config)) & both:
            assert (child.config["ks"][block], child.config["e"][block]) in {
                (a.config["ks"][block], a.config["e"][block]), (b.config["ks"][block], b.config["e"][block])}
            for key in POLICY_KEYS:
                assert child.policy[key][block] in (a.policy[key][block], b.policy[key][block])


def test_blocks_switched_on_get_fresh_bits_not_the_normalised_lowest(joint: JointSpace) -> None:
    # a parent running 2 blocks per stage holds the lowest bits on its skipped blocks; children
    # whose depth grows must not inherit them (that would bias the search towards 4 bits)
    rng = random.Random(6)
    parent = joint.canonical(Candidate({**joint.space.smallest(), "d": [2] * joint.num_stages},
                                       joint.policy_space.uniform(8, joint.num_blocks)))
    new_bits = []
    for _ in range(200):
        child = joint.mutate(parent, rng, prob=0.3, resolution_prob=0.0, policy_prob=0.0)
        new_blocks = set(joint.space.active_blocks(child.config)) - set(joint.space.active_blocks(parent.config))
        new_bits += [child.policy[key][b] for b in new_blocks for key in POLICY_KEYS]
    assert len(new_bits) > 100
    assert 0.2 < new_bits.count(4) / len(new_bits) < 0.5  # uniform over {4, 6, 8}: about 1/3


def test_full_precision_space_has_no_policy() -> None:
    joint = JointSpace(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"))
    rng = random.Random(7)
    c = joint.sample(rng)
    assert c.policy is None
    assert joint.mutate(c, rng).policy is None and joint.crossover(c, c, rng).policy is None
    assert joint.from_sample(joint.to_sample(c)).config == c.config
    with pytest.raises(ValueError, match="full precision only"):
        joint.canonical(Candidate(c.config, QuantPolicySpace().uniform(8, joint.num_blocks)))
    with pytest.raises(ValueError, match="needs a policy"):
        JointSpace(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"), QuantPolicySpace()).canonical(c)


def test_modules_read_by_validation_import_neither_torch_nor_nni() -> None:
    code = ("import sys, lightning_nas.search.joint_space, lightning_nas.recipe.search_settings; "
            "print(sorted(m for m in ('torch', 'nni') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("quantized", [False, True])
def test_encoding_is_the_predictors_two_inputs_concatenated(quantized: bool) -> None:
    from lightning_nas.predictors.encoding import encode_pairs
    from lightning_nas.predictors.pair_store import Pair

    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")
    policies = QuantPolicySpace() if quantized else None
    joint = JointSpace(space, policies)
    rng = random.Random(11)
    candidates = [joint.sample(rng) for _ in range(6)]
    pairs = [Pair(arch=c.config, policy=c.policy, resolution=c.config["r"], top1=0.0, loss=None, checkpoint_hash="x",
                  seed=0, seconds=0.0) for c in candidates]
    archs, bits, _ = encode_pairs(space, policies, pairs)
    for i, candidate in enumerate(candidates):
        expected = archs[i].tolist() + ([] if bits is None else bits[i].tolist())
        assert joint.encode(candidate) == expected
        decoded = joint.decode(expected)
        assert joint.key(decoded) == joint.key(candidate)
    if quantized:  # bits on a skipped block do not describe the architecture
        vector = joint.encode(joint.smallest())
        skipped = next(b for b in range(joint.num_blocks) if b not in space.active_blocks(joint.smallest().config))
        vector[space.encoding_size + skipped * 4 * 3] = 1.0
        with pytest.raises(ValueError, match="skipped block"):
            joint.decode(vector)
