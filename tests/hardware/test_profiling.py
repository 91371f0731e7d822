"""The public timing API of latency tables, and that int8 units are timed on the table's target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_nas.hardware.latency_keys import space_units
from lightning_nas.hardware.latency_profile import profile_space
from lightning_nas.hardware.latency_table import LatencyTable, LatencyTableError
from lightning_nas.hardware.profiling import PooledSamples, Timing, measure_module, runner_for, time_chain
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
from lightning_nas.targets import resolve_target

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"kernel_choices": [3], "expand_choices": [3], "depth_choices": [2]}


def conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()


def test_timing_summarises_samples() -> None:
    timing = Timing.from_samples([1.0, 2.0, 4.0])
    assert timing.count == 3 and timing.median == 2.0
    assert timing.mean == pytest.approx(7 / 3) and timing.std == pytest.approx(1.2472191, rel=1e-6)
    assert timing.as_entry() == {"count": 3, "mean": timing.mean, "median": 2.0, "std": timing.std}
    with pytest.raises(ValueError, match="no samples"):
        Timing.from_samples([])


def test_time_chain_splits_every_pass_by_unit_and_restores_threads() -> None:
    calls: list[str] = []

    def unit(name: str):
        def run(x):
            calls.append(name)
            return x + 1
        return run

    before = torch.get_num_threads()
    times = time_chain([unit("a"), unit("b")], torch.zeros(1), warmup=2, repeats=3, threads=2)
    assert torch.get_num_threads() == before
    assert [len(t) for t in times] == [3, 3] and all(v >= 0 for t in times for v in t)
    assert calls == ["a", "b"] * 5  # warm-up passes run the chain too, in order


def test_measure_module_times_fp32_and_int8_on_the_host_target() -> None:
    target = resolve_target("auto")
    for precision in ("fp32", "int8"):
        timing = measure_module(conv(), (3, 8, 8), precision=precision, target=target, warmup=1, repeats=3)
        assert timing.count == 3 and 0 < timing.median < 1000 and timing.std >= 0


@pytest.mark.parametrize("name", ["x86_vnni/torch", "x86_avx2/torch", "arm/torch"])
def test_int8_runner_converts_on_the_targets_engine_and_weight_grid(name: str) -> None:
    target = resolve_target(name)
    if target.engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"torch has no {target.engine} engine here")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run, _ = runner_for(conv(), x, "int8", target)
    assert run.engine == target.engine and torch.backends.quantized.engine == target.engine
    codes = run.get_submodule("0").weight().int_repr()  # the fused conv + ReLU
    assert int(codes.abs().max()) == target.weight_qmax  # the target's grid: 63 on AVX2, 127 elsewhere


def test_int8_runner_strips_boundaries_and_exports_for_onnxruntime(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run, qx = runner_for(conv(), x, "int8", "auto", strip_input=True, strip_output=True)
    assert qx.is_quantized and run(qx).is_quantized
    reference, _ = runner_for(conv(), x, "int8", "auto")
    assert torch.equal(run(qx).dequantize(), reference(x))
    session, same = runner_for(conv(), x, "int8", "auto/onnxruntime", workdir=tmp_path)
    assert same is x and session(x).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="needs a workdir"):
        runner_for(conv(), x, "int8", "auto/onnxruntime")


def test_pooled_samples_pool_over_networks_and_record_each_time(tmp_path: Path) -> None:
    table = LatencyTable({"threads": 1})
    pooled = PooledSamples(table, tmp_path / "t.json")
    assert pooled.add("fp32", ["a", "b", "a"], [[1.0], [5.0], [3.0]], {"a", "b"}) == 2
    assert pooled.add("fp32", ["a", "c"], [[2.0], [9.0]], {"a"}) == 0
    saved = LatencyTable.load(tmp_path / "t.json")
    assert saved.entries["fp32"]["a"]["count"] == 3 and saved.value("fp32", "a") == 2.0
    assert saved.value("fp32", "b") == 5.0 and ("fp32", "c") not in saved and ("fp32", "a") in pooled


def test_profile_converts_int8_units_with_the_targets_engine_and_records_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_nas.deploy.int8 as int8

    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", **TINY)
    seen: list = []
    convert = int8.convert_to_int8

    def spy(*args, **kwargs):
        seen.append(kwargs.get("target"))
        return convert(*args, **kwargs)

    monkeypatch.setattr(int8, "convert_to_int8", spy)
    host = resolve_target("auto")
    output = tmp_path / "t.json"
    profile_space(space, output, resolutions=[32], precisions=["fp32", "int8"], warmup=0, repeats=2,
                  progress=False, target=host)
    table = LatencyTable.load(output)
    assert table.keys("int8") == {u.key for u in space_units(space, [32])}
    assert seen and all(t == host for t in seen)  # every int8 unit converted for the table's target
    assert table.meta["target"] == host.name and table.meta["quantized_engine"] == host.engine


def test_resume_refuses_a_table_of_another_target_or_engine(tmp_path: Path) -> None:
    space = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar", **TINY)
    host = resolve_target("auto")
    other = "x86_avx2/torch" if host.name != "x86_avx2/torch" else "x86_vnni/torch"
    output = tmp_path / "t.json"
    arguments = {"resolutions": [32], "precisions": ["fp32"], "warmup": 0, "repeats": 1, "limit": 1,
                 "progress": False}
    profile_space(space, output, **arguments)
    record = json.loads(output.read_text())
    assert record["meta"]["target"] == host.name and "quantized_engine" not in record["meta"]  # fp32 only

    record["meta"]["target"] = other
    output.write_text(json.dumps(record))
    with pytest.raises(LatencyTableError, match=rf"target: table '{other}' vs now '{host.name}'"):
        profile_space(space, output, **arguments)
    # int8 units of an old table were timed on the x86 engine: not resumed with another one
    record["meta"].update(target=host.name, quantized_engine="x86")
    output.write_text(json.dumps(record))
    if host.engine != "x86":
        with pytest.raises(LatencyTableError, match="quantized_engine: table 'x86'"):
            profile_space(space, output, **{**arguments, "precisions": ["int8"]})
    # a table from before targets records none: it is resumed and takes this run's target on
    del record["meta"]["target"], record["meta"]["quantized_engine"]
    output.write_text(json.dumps(record))
    profile_space(space, output, **{**arguments, "limit": None})
    assert LatencyTable.load(output).meta["target"] == host.name
