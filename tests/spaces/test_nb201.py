from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nas.nn.builders import build_subnet
from lightning_nas.spaces import nb201
from lightning_nas.spaces.nb201 import (
    NB201Space,
    all_archs,
    arch_index,
    encode_onehot,
    format_arch,
    parse_arch,
    weight_slot_names,
)

EXAMPLE = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
ALL_CONV3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


def test_parse_and_format_round_trip() -> None:
    ops = parse_arch(EXAMPLE)
    assert ops == ("nor_conv_3x3", "none", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "nor_conv_3x3")
    assert format_arch(ops) == EXAMPLE


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        ("|conv_5x5~0|+|none~0|none~1|+|none~0|none~1|none~2|", "conv_5x5"),
        ("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", "none~1"),
        ("|none~0|+|none~0|none~1|", "node groups"),
        ("|none~0|+|none~0|+|none~0|none~1|none~2|", "expected 2"),
        ("|none0|+|none~0|none~1|+|none~0|none~1|none~2|", "none0"),
    ],
)
def test_parse_errors_name_the_bad_token(arch: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_arch(arch)
    assert fragment in str(info.value)


def test_unknown_op_error_lists_allowed_ops() -> None:
    with pytest.raises(ValueError, match="allowed: none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3"):
        parse_arch("|sep_conv~0|+|none~0|none~1|+|none~0|none~1|none~2|")


def test_enumeration_is_complete_and_indexed() -> None:
    archs = all_archs()
    assert len(archs) == 15625 == len(set(archs)) == len(NB201Space())
    for i in random.Random(0).sample(range(len(archs)), 50):
        assert arch_index(archs[i]) == i


def test_onehot_encoding() -> None:
    vec = encode_onehot(EXAMPLE)
    assert len(vec) == 30 and sum(vec) == 6
    assert vec[0 * 5 + nb201.OPS.index("nor_conv_3x3")] == 1.0
    assert vec[1 * 5 + nb201.OPS.index("none")] == 1.0


def test_module_does_not_import_torch() -> None:
    code = "import sys, lightning_nas.spaces.nb201 as m; m.all_archs(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_space_signature_is_explicit_and_simply_typed() -> None:
    tree = ast.parse(Path(nb201.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NB201Space")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert init.args.kwarg is None and init.args.vararg is None
    params = {a.arg: ast.unparse(a.annotation) for a in init.args.args[1:]}
    assert params == {"num_classes": "int", "init_channels": "int", "cells_per_stage": "int"}


# -- network: independent parameter count ---------------------------------------------------------

def _edge_params(op: str, c: int) -> int:
    # nor_conv_kxk = ReLU, bias-free kxk conv (c*c*k*k) and an affine BN (2c); others have none.
    return {"nor_conv_1x1": c * c + 2 * c, "nor_conv_3x3": 9 * c * c + 2 * c}.get(op, 0)


def _reduction_params(c_in: int, c_out: int) -> int:
    conv_a = 9 * c_in * c_out + 2 * c_out
    conv_b = 9 * c_out * c_out + 2 * c_out
    shortcut = c_in * c_out  # 1x1 conv after the 2x2 average pool, no bias
    return conv_a + conv_b + shortcut


def hand_count(arch: str, num_classes: int = 10, c: int = 16, n: int = 5) -> int:
    ops = parse_arch(arch)
    stem = 3 * c * 9 + 2 * c
    cells = sum(n * sum(_edge_params(op, w) for op in ops) for w in (c, 2 * c, 4 * c))
    head = 2 * 4 * c + 4 * c * num_classes + num_classes
    return stem + cells + _reduction_params(c, 2 * c) + _reduction_params(2 * c, 4 * c) + head


def test_hand_count_reproduces_published_extremes() -> None:
    # NATS-Bench / NAS-Bench-201 (CIFAR-10): largest cell 1.531546 M params, smallest 0.073306 M.
    assert hand_count(ALL_CONV3) == 1_531_546
    assert hand_count(ALL_NONE) == 73_306


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_network_parameters_match_hand_count(seed: int) -> None:
    from lightning_nas.nn.nb201 import count_parameters

    rng = random.Random(seed)
    space = NB201Space()
    archs = [ALL_CONV3, ALL_NONE, EXAMPLE] if seed == 0 else [space.sample(rng) for _ in range(3)]
    for arch in archs:
        assert count_parameters(build_subnet(space, arch)) == hand_count(arch), arch
    assert count_parameters(build_subnet(NB201Space(num_classes=100), ALL_CONV3)) == hand_count(ALL_CONV3, 100)


def test_network_forward_and_weight_slots() -> None:
    import torch

    space = NB201Space()
    net = build_subnet(space, ALL_CONV3)
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers == weight_slot_names() == space.weight_slots()
    assert len(layers) == 98
    small = build_subnet(NB201Space(num_classes=7, init_channels=4, cells_per_stage=1), EXAMPLE)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    # Every layer of a partial cell is one of the slots.
    sub = [n for n, m in build_subnet(space, EXAMPLE).named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert set(sub) <= set(layers) and len(sub) == 1 + 15 * 3 + 6 + 1


def test_all_none_network_outputs_bias_only() -> None:
    import torch

    net = build_subnet(NB201Space(init_channels=4, cells_per_stage=1), ALL_NONE).eval()
    out = net(torch.randn(3, 3, 8, 8))
    assert torch.allclose(out, net.classifier.bias.expand(3, -1))
