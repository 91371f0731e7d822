"""mqbench and allocate on an exported OFA subnet (``subnet.pt``): the network file is told by its
content; a file of neither kind is refused with a recipe error naming the key and both kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPACE, TINY_SUBNET_CONFIG, tiny_datamodule, tiny_ofa_subnet, write_recipe

from lightning_nas.cli import main
from lightning_nas.predictors.pair_store import PairStore
from lightning_nas.spaces.emq_programs import LayerStatistics

DATA = ("data: {name: digits, image_size: 16, batch_size: 64, eval_batch_size: 120, num_workers: 0, "
        "holdout_size: 200, val_subset: 120, augment: false}")
BOTH_KINDS = ("a checkpoint of `lightning-nas fit` of a classification recipe", "a subnet.pt of `lightning-nas export`")


@pytest.fixture(scope="module")
def subnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny subnet after 20 steps on 16 px digits, saved as `lightning-nas export` saves one
    (renamed: the kind is told by content, not by name)."""
    import torch.nn.functional as F

    from lightning_nas.nn.threads import torch_threads
    from lightning_nas.tasks.supernet import network_record

    path = tmp_path_factory.mktemp("subnet") / "network.bin"
    with torch_threads(1):
        model = tiny_ofa_subnet().train()
        data = tiny_datamodule()
        data.setup("fit")
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step, (images, labels) in enumerate(data.train_dataloader()):
            if step == 20:
                break
            loss = F.cross_entropy(model(data.normalize(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(network_record(model.eval(), TINY_SPACE, TINY_SUBNET_CONFIG), path)
    return path


def bench_recipe(tmp_path: Path, checkpoint: Path, configs: int = 4) -> Path:
    return write_recipe(tmp_path, f"""
description: benchmark of a subnet
run_dir: {tmp_path / 'bench'}
{DATA}
mqbench: {{checkpoint: {checkpoint}, num_configs: {configs}, bn_images: 64, batch_size: 64, stats_images: 8,
          hessian_samples: 1, progress: false}}
smoke: [mqbench.num_configs=2]
""", "bench.yaml")


def test_mqbench_and_allocate_read_an_exported_subnet(tmp_path: Path, subnet_file: Path) -> None:
    from lightning_nas.nn.threads import torch_threads

    with torch_threads(1):
        assert main(["mqbench", str(bench_recipe(tmp_path, subnet_file))]) == 0
    bench = tmp_path / "bench"
    stats = LayerStatistics.load(bench / "stats.npz")
    layers = tiny_ofa_subnet().block_layers()
    assert stats.names == layers and len(layers) == 23
    assert stats.meta["ptq"]["fixed_layers"] == ["stem.conv", "head.final_expand.conv", "head.feature_mix.conv",
                                                 "classifier.linear"]
    for values in stats.scalars.values():
        assert torch.isfinite(torch.as_tensor(values)).all()
    pairs = PairStore(bench / "pairs.sqlite").pairs(kind="mq")
    assert len(pairs) == 4
    for p in pairs:
        assert p.arch["network"] == "MobileNetV3Subnet" and len(p.policy["w_bits"]) == 23
        assert p.resolution == 16 and 0.0 <= p.top1 <= 100.0
    summary = json.loads((bench / "benchmark.json").read_text())
    assert summary["configs"] == 4 and summary["layers"] == layers

    allocate = write_recipe(tmp_path, f"""
description: allocation on a subnet
run_dir: {tmp_path / 'alloc'}
{DATA}
allocate: {{stats: {bench / 'stats.npz'}, checkpoint: {subnet_file}, proxies: [hawq_v3, ompq], budgets: [3.0],
           random_configs: 1, batch_size: 64, progress: false}}
smoke: [allocate.random_configs=1]
""", "alloc.yaml")
    with torch_threads(1):
        assert main(["allocate", str(allocate)]) == 0
    rows = json.loads((tmp_path / "alloc" / "allocation.json").read_text())["rows"]
    assert {"hawq_v3", "ompq", "uniform"} <= {r["method"] for r in rows}
    for r in rows:
        assert r["mean_bits"] <= 3.0 + 1e-9 and 0.0 <= r["top1"] <= 100.0


@pytest.mark.parametrize("content", ["other_keys", "list", "supernet"])
def test_a_file_of_neither_kind_is_a_recipe_error(content: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "subnet.pt"  # named like an export: the name decides nothing
    if content == "other_keys":
        torch.save({"weights": torch.ones(2), "config": {}}, path)
    elif content == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"space": dict(TINY_SPACE)}}, path)
    assert main(["mqbench", str(bench_recipe(tmp_path, path))]) == 2
    err = capsys.readouterr().err
    assert "mqbench.checkpoint" in err and str(path) in err and "Traceback" not in err
    assert all(kind in err for kind in BOTH_KINDS)
    expected = {"other_keys": "neither kind of network file: it holds the keys weights, config",
                "list": "neither kind of network file: it holds a list",
                "supernet": "export a subnet of it first"}[content]
    assert expected in err
    assert not (tmp_path / "bench" / "pairs.sqlite").exists()


def test_a_subnet_larger_than_the_images_is_refused(tmp_path: Path, subnet_file: Path, capsys) -> None:
    recipe = bench_recipe(tmp_path, subnet_file)
    assert main(["mqbench", str(recipe), "data.image_size=12"]) == 2
    err = capsys.readouterr().err
    assert "mqbench.checkpoint" in err and "the subnet runs at 16 px, the data's images are 12 px" in err
