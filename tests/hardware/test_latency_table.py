from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml

from lightning_nas.hardware import profiling
from lightning_nas.hardware.latency_keys import UnitDecomposition, space_units
from lightning_nas.hardware.latency_model import TableLatencyModel
from lightning_nas.hardware.latency_profile import profile_space, profiling_configs
from lightning_nas.hardware.latency_table import OVERHEAD_KEY, LatencyTable
from lightning_nas.hardware.profiling import strip_int8_boundaries
from lightning_nas.nn.builders import build_subnet
from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

# Keys exactly as once-for-all's MobileNetV3 tables spell them (ImageNet layout, 224x224).
OFA_YAML = """\
Conv-input:224x224x3-output:112x112x16:
  count: 20
  mean: 3.5
  std: 0.1
expanded_conv-input:112x112x16-output:56x56x24-expand:64-kernel:3-stride:2-idskip:0-se:0-hs:0:
  count: 20
  mean: 2.25
  std: 0.05
Logits-input:1x1x1280-output:1000:
  count: 20
  mean: 0.5
  std: 0.01
"""


def test_keys_follow_the_once_for_all_format() -> None:
    space = OFAMobileNetV3Space(resolutions=[224])
    config = space.canonical({"ks": [3] * 20, "e": [4] * 20, "d": [2] * 5, "r": 224})
    keys = [unit.key for unit in UnitDecomposition(space).units(config)]
    assert keys[:3] == [
        "Conv-input:224x224x3-output:112x112x16",
        "expanded_conv-input:112x112x16-output:112x112x16-expand:16-kernel:3-stride:1-idskip:1-se:0-hs:0",
        "expanded_conv-input:112x112x16-output:56x56x24-expand:64-kernel:3-stride:2-idskip:0-se:0-hs:0",
    ]
    assert "expanded_conv-input:56x56x24-output:28x28x40-expand:96-kernel:3-stride:2-idskip:0-se:1-hs:0" in keys
    assert "expanded_conv-input:14x14x112-output:7x7x160-expand:448-kernel:3-stride:2-idskip:0-se:1-hs:1" in keys
    assert keys[-4:] == [
        "Conv_1-input:7x7x160-output:7x7x960",
        "AvgPool2D-input:7x7x960-output:1x1x960",
        "Conv_2-input:1x1x960-output:1x1x1280",
        "Logits-input:1x1x1280-output:1000",
    ]
    assert len(keys) == 2 + 10 + 4  # stem, first block, 5 stages x depth 2, four head parts


@pytest.mark.parametrize("space", [OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"), OFAMobileNetV3Space(resolutions=[160, 224])],
                         ids=["cifar", "imagenet"])
def test_table_keys_cover_every_block_the_space_can_produce(space) -> None:
    units = space_units(space)
    keys = {u.key for u in units}
    assert len(keys) == len(units)  # each distinct unit listed once
    decomposition = UnitDecomposition(space)
    rng = random.Random(0)
    configs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(300)]
    needed = {u.key for config in configs for u in decomposition.units(config)}
    assert needed <= keys
    # every choice of every block at every resolution has its key
    for r in space.resolutions:
        for b in range(space.num_blocks):
            for k in space.kernel_choices:
                for e in space.expand_choices:
                    config = space.largest()
                    config.update(r=r)
                    config["ks"][b], config["e"][b] = k, e
                    assert {u.key for u in decomposition.units(config)} <= keys
    # the profiler's networks hold every key, and are subnets of varied depth
    for r in space.resolutions:
        networks = profiling_configs(space, decomposition, r)
        assert {u.key for c in networks for u in decomposition.units(c)} == {u.key for u in space_units(space, [r])}
        assert len(networks) == len(space.kernel_choices) * len(space.expand_choices)
        assert len({tuple(c["d"]) for c in networks}) > 1 and networks == profiling_configs(space, decomposition, r)


def test_reads_once_for_all_yaml_tables(tmp_path: Path) -> None:
    path = tmp_path / "224_lookup_table.yaml"
    path.write_text(OFA_YAML, encoding="utf-8")
    table = LatencyTable.load(path)
    assert table.precisions == ["fp32"]
    key = "expanded_conv-input:112x112x16-output:56x56x24-expand:64-kernel:3-stride:2-idskip:0-se:0-hs:0"
    assert table.entries["fp32"][key] == {"mean": 2.25, "std": 0.05, "count": 20}
    assert table.value("fp32", key) == 2.25  # no median in OFA tables: the mean stands in
    assert table.value("fp32", "Logits-input:1x1x1280-output:1000", "mean") == 0.5
    assert LatencyTable.load(path, precision="int8").precisions == ["int8"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("Conv-input:1x1x3-output:1x1x8: {count: 3}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="entry 'Conv-input:1x1x3-output:1x1x8' has no 'mean'"):
        LatencyTable.load(bad)


def test_latency_model_sums_units_of_an_ofa_yaml_table(tmp_path: Path) -> None:
    space = OFAMobileNetV3Space(resolutions=[192, 224])
    units = space_units(space)
    means = {u.key: 0.01 * (i + 1) for i, u in enumerate(units)}
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump({k: {"count": 5, "mean": v, "std": 0.0} for k, v in means.items()}), encoding="utf-8")
    model = TableLatencyModel(space, path)
    rng = random.Random(1)
    configs = [space.sample(rng) for _ in range(50)]
    decomposition = UnitDecomposition(space)
    predicted = model.evaluate(configs)
    for config, value in zip(configs, predicted):
        assert value == pytest.approx(sum(means[u.key] for u in decomposition.units(config)))
        assert model.predict(config) == pytest.approx(value)
    assert [k for k, _ in model.breakdown(configs[0])] == [u.key for u in decomposition.units(configs[0])]


def test_latency_model_names_missing_entries(cifar_space, tmp_path: Path) -> None:
    units = space_units(cifar_space, [32])
    table = LatencyTable({"threads": 1}, {"fp32": {u.key: {"median": 1.0} for u in units[:-1]}})
    with pytest.raises(ValueError, match=r"lacks 1 'fp32' entries the space needs, e.g. \['expanded_conv-"):
        TableLatencyModel(cifar_space, table, resolutions=[32])
    with pytest.raises(ValueError, match=r"has no 'int8' entries; it has \['fp32'\]"):
        TableLatencyModel(cifar_space, table, precision="int8")
    full = LatencyTable({}, {"fp32": {u.key: {"median": 1.0, "mean": 2.0} for u in units}})
    model = TableLatencyModel(cifar_space, full, resolutions=[32])
    smallest = cifar_space.smallest()
    with pytest.raises(ValueError, match="candidate 0: resolution 24 is not in the latency model"):
        model.evaluate([smallest])
    config = {**smallest, "r": 32}
    assert model.predict(config) == len(UnitDecomposition(cifar_space).units(config))
    assert TableLatencyModel(cifar_space, full, stat="mean", resolutions=[32]).predict(config) == 2 * model.predict(config)


def test_table_file_round_trip_and_format_errors(tmp_path: Path) -> None:
    table = LatencyTable({"device": "cpu", "threads": 1}, {"fp32": {"k": {"count": 3, "mean": 1.0, "median": 0.9, "std": 0.1}}})
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.meta == table.meta and again.entries == table.entries
    assert ("fp32", "k") in again and ("int8", "k") not in again
    (tmp_path / "other.json").write_text(json.dumps({"entries": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.load(tmp_path / "other.json")


def test_onnxruntime_call_overhead_is_taken_off_once_per_extra_unit(cifar_space) -> None:
    units = space_units(cifar_space, [32])
    entries = {u.key: {"median": 1.0} for u in units}
    table = LatencyTable({}, {"int8": {**entries, OVERHEAD_KEY: {"median": 0.25}}})
    model = TableLatencyModel(cifar_space, table, precision="int8", resolutions=[32])
    config = {**cifar_space.smallest(), "r": 32}
    n = len(UnitDecomposition(cifar_space).units(config))
    assert model.predict(config) == pytest.approx(n - (n - 1) * 0.25)


def test_stripped_int8_unit_runs_int8_to_int8(cifar_space) -> None:
    import torch

    from lightning_nas.deploy.int8 import convert_to_int8

    subnet = build_subnet(cifar_space, cifar_space.smallest()).eval()
    block = subnet.blocks["4"]  # a squeeze-excite block with a residual connection
    x = torch.randn(1, cifar_space.blocks[4].in_channels, 8, 8)
    converted = convert_to_int8(block, [x], example_input=x)
    reference = converted(x)
    stripped, scale, zero_point = strip_int8_boundaries(copy.deepcopy(converted), True, True)
    qx = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    out = stripped(qx)
    assert out.is_quantized
    assert torch.equal(out.dequantize(), reference)


def fake_chain(calls: list[int], interrupt_at: int | None = None):
    def chain(runners, x, *, warmup, repeats, threads=None, realtime=False):
        calls.append(len(runners))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return [[0.1 + 0.01 * i + 0.001 * r for r in range(repeats)] for i in range(len(runners))]

    return chain


def test_interrupted_profile_resumes_where_it_stopped(cifar_space, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "table.json"
    calls: list[int] = []
    monkeypatch.setattr(profiling, "time_chain", fake_chain(calls, interrupt_at=3))
    arguments = {"resolutions": [32], "precisions": ["fp32"], "warmup": 0, "repeats": 3, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        profile_space(cifar_space, output, **arguments)
    first = LatencyTable.load(output)
    done = first.keys("fp32")
    all_keys = {u.key for u in space_units(cifar_space, [32])}
    assert 0 < len(done) < len(all_keys)  # two profiling networks finished before the interruption
    assert first.meta["threads"] == 1 and first.meta["batch_size"] == 1 and first.meta["context"] == "network"

    calls.clear()
    monkeypatch.setattr(profiling, "time_chain", fake_chain(calls))
    result = profile_space(cifar_space, output, **arguments)
    assert result.skipped == len(done) and result.remaining == 0
    assert result.measured == len(all_keys) - len(done)
    assert len(calls) == 9 - 2  # the finished networks are not run again
    final = LatencyTable.load(output)
    assert final.keys("fp32") == all_keys
    for key in done:  # entries of the first run are kept as they were
        assert final.entries["fp32"][key] == first.entries["fp32"][key]
    entry = next(iter(final.entries["fp32"].values()))
    assert set(entry) == {"count", "mean", "median", "std"} and entry["count"] % 3 == 0

    with pytest.raises(ValueError, match=r"measured with other settings \(threads: table 1 vs now 2\)"):
        profile_space(cifar_space, output, **{**arguments, "threads": 2})


def test_isolated_profile_times_units_alone(cifar_space, tmp_path: Path) -> None:
    result = profile_space(cifar_space, tmp_path / "t.json", resolutions=[32], precisions=["fp32", "int8"],
                           context="isolated", warmup=1, repeats=3, limit=4, progress=False)
    assert result.measured == 4
    table = LatencyTable.load(tmp_path / "t.json")
    # a limited run measures every precision of the first units
    assert len(table.keys("fp32")) == len(table.keys("int8")) == 2
    for precision in ("fp32", "int8"):
        for entry in table.entries[precision].values():
            assert entry["count"] == 3 and 0 < entry["median"] < 1000 and entry["std"] >= 0


def test_onnxruntime_backend_records_its_call_overhead(cifar_space, tmp_path: Path) -> None:
    result = profile_space(cifar_space, tmp_path / "t.json", resolutions=[32], precisions=["int8"],
                           int8_backend="onnxruntime", context="isolated", warmup=1, repeats=3, limit=1,
                           progress=False)
    table = LatencyTable.load(tmp_path / "t.json")
    assert result.measured == 2 and table.meta["int8_backend"] == "onnxruntime" and table.meta["onnxruntime"]
    assert set(table.keys("int8")) == {OVERHEAD_KEY, "Conv-input:32x32x3-output:32x32x16"}
    assert 0 < table.value("int8", OVERHEAD_KEY) < table.value("int8", "Conv-input:32x32x3-output:32x32x16")


def test_rounds_pool_later_passes_over_the_profiling_networks(cifar_space, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(profiling, "time_chain", fake_chain(calls))
    arguments = {"resolutions": [32], "precisions": ["fp32"], "warmup": 0, "repeats": 3, "limit": 2, "progress": False}
    profile_space(cifar_space, tmp_path / "one.json", **arguments)
    profile_space(cifar_space, tmp_path / "two.json", rounds=2, **arguments)
    assert len(calls) == 2 + 2 * 2
    one, two = LatencyTable.load(tmp_path / "one.json"), LatencyTable.load(tmp_path / "two.json")
    assert one.keys("fp32") == two.keys("fp32")
    stem = "Conv-input:32x32x3-output:32x32x16"
    assert one.entries["fp32"][stem]["count"] == 2 * 3  # met in both networks of the run
    assert two.entries["fp32"][stem]["count"] == 2 * 2 * 3


def _table_writer(path: str, keys: list[str], start) -> None:  # noqa: ANN001
    from lightning_nas.hardware.latency_table import LatencyTable

    table = LatencyTable({"device": "test", "threads": 1})
    start.wait(60)
    for key in keys:  # one entry at a time, as the profiler records them
        table.add("fp32", key, {"median": float(len(key)), "count": 3})
        table.merge_save(path)


def test_two_processes_writing_one_table_lose_nothing(tmp_path: Path) -> None:
    import multiprocessing as mp

    path = tmp_path / "table.json"
    context = mp.get_context("spawn")
    start = context.Barrier(2)
    first = [f"a{i}" for i in range(40)] + [f"shared{i}" for i in range(10)]
    second = [f"b{i}" for i in range(40)] + [f"shared{i}" for i in range(10)]
    workers = [context.Process(target=_table_writer, args=(str(path), keys, start)) for keys in (first, second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    table = LatencyTable.load(path)
    assert table.keys("fp32") == set(first) | set(second)  # 90 keys, each once
    assert all(table.value("fp32", key) == len(key) for key in table.keys("fp32"))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_merge_save_refuses_a_table_measured_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    LatencyTable({"device": "other", "threads": 1}, {"fp32": {"k": {"median": 1.0}}}).save(path)
    with pytest.raises(ValueError, match="device"):
        LatencyTable({"device": "test", "threads": 1}).merge_save(path)
