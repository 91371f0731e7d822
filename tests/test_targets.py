from __future__ import annotations

import ast
import inspect

import pytest

from lightning_nas.errors import RecipeError
from lightning_nas.recipe.sections import DeploySettings, SpaceEvoSearchSettings
from lightning_nas.targets import (
    TARGET_CHOICES,
    TARGETS,
    check_same_target,
    detect_isa,
    host_can_run,
    resolve_target,
)


@pytest.mark.parametrize(
    ("machine", "flags", "isa"),
    [
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "x86_vnni"),  # Intel Xeon / AMD EPYC Zen 4
        ("x86_64", {"avx2", "avx_vnni"}, "x86_vnni"),  # AVX-VNNI without AVX-512
        ("x86_64", {"avx2", "fma"}, "x86_avx2"),  # AMD EPYC Zen 2/3
        ("x86_64", set(), "x86_avx2"),  # unreadable flags: the grid that is exact everywhere
        ("aarch64", {"asimd", "asimddp"}, "arm"),
    ],
)
def test_isa_detection(machine: str, flags: set[str], isa: str) -> None:
    assert detect_isa(machine, flags) == isa


def test_targets_fix_engine_and_weight_grid() -> None:
    assert resolve_target("x86_avx2/onnxruntime").weight_qmax == 63
    assert resolve_target("x86_avx2/torch").engine == "onednn"
    assert resolve_target("x86_vnni/torch").weight_qmax == 127
    assert resolve_target("arm/torch").engine == "qnnpack"
    host = resolve_target("auto")
    assert host.name in TARGETS and host.runtime == "torch" and host.isa == detect_isa()
    assert resolve_target("auto/onnxruntime").runtime == "onnxruntime"
    assert host_can_run(host)
    assert host_can_run("x86_avx2/torch") == (host.isa != "arm")  # a VNNI host computes 7-bit weights exactly
    with pytest.raises(RecipeError, match=r"task.target: unknown deployment target") as error:
        resolve_target("x86/tflite", key="task.target")
    assert "x86_vnni/torch" in str(error.value)


@pytest.mark.parametrize("section", [DeploySettings, SpaceEvoSearchSettings], ids=lambda s: s.__name__)
def test_target_annotations_list_every_target(section: type) -> None:
    # recipe validation reads the annotation as text, so the section spells the names out
    source = inspect.getsource(section)
    annotation = next(
        node.annotation for node in ast.walk(ast.parse(source)) if isinstance(node, ast.AnnAssign)
        and getattr(node.target, "id", None) == "target"
    )
    names = tuple(elt.value for elt in annotation.slice.elts)
    assert names == TARGET_CHOICES


def test_mixing_rule() -> None:
    check_same_target({"table": "x86_vnni/torch", "predictor": "x86_vnni/torch"}, "x86_vnni/torch", False)
    check_same_target({"old table": None}, "x86_avx2/torch", False)  # unrecorded: compared with nothing
    check_same_target({"a": "x86_vnni/torch", "b": "x86_avx2/torch"}, None, True)  # allowed
    with pytest.raises(RecipeError, match=r"search.target: artifacts of different deployment targets .*"
                                          r"predictor p.pt: x86_avx2/torch.*allow_mixed_targets"):
        check_same_target({"predictor p.pt": "x86_avx2/torch"}, "x86_vnni/torch", False, key="search.target")
    with pytest.raises(RecipeError, match="different deployment targets"):
        check_same_target({"a": "x86_vnni/torch", "b": "x86_avx2/torch"}, None, False)
