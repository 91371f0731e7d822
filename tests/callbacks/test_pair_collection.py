"""Pair collection: SIGKILL in the middle, then resume; two nodes, one store: every planned pair exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from lightning_nas.predictors.pair_store import PairStore

RECIPE = "recipes/pairs_fp32.yaml"


def collect_command(run_dir: Path, num_pairs: int) -> list[str]:
    return [sys.executable, "-m", "lightning_nas.cli", "fit", RECIPE, "--smoke", f"run_dir={run_dir}",
            "task.init_checkpoint=null", f"callbacks.pairs.init_args.num_pairs={num_pairs}",
            "callbacks.pairs.init_args.bn_images=32", "callbacks.pairs.init_args.eval_images=64",
            "logger=null"]


@pytest.mark.timeout(900)  # two subprocess runs with generous waits for a loaded machine
def test_killed_collection_resumes_without_duplicates(tmp_path: Path) -> None:
    run_dir, planned = tmp_path / "pairs", 16
    store_path = run_dir / "pairs.sqlite"
    process = subprocess.Popen(collect_command(run_dir, planned), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300  # a loaded 2-core machine took over 120 s to write 3 pairs
    while time.monotonic() < deadline and process.poll() is None:
        if store_path.is_file() and len(PairStore(store_path)) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = len(PairStore(store_path))
    assert 3 <= partial < planned
    finished = subprocess.run(collect_command(run_dir, planned), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    pairs = PairStore(store_path).pairs()
    keys = [p.pair_key for p in pairs]
    assert len(keys) == planned == len(set(keys))
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))
    assert all(0 <= p.top1 <= 100 and p.resolution in (24, 28, 32) for p in pairs)
    import json

    summary = json.loads((run_dir / "pairs_fp32_summary.json").read_text())
    assert summary["pairs"] == planned and summary["seconds_per_pair_mean"] > 0
    assert summary["top1_min"] <= summary["top1_mean"] <= summary["top1_max"]


class CountingData:
    """A data module stand-in whose training loader has 3 batches and counts how often it is built."""

    def __init__(self) -> None:
        self.loaders = 0

    def train_dataloader(self):  # noqa: ANN201
        import torch

        self.loaders += 1
        return [(torch.full((2, 3, 4, 4), float(10 * self.loaders + i)), torch.zeros(2, dtype=torch.long))
                for i in range(3)]


def test_quantized_collector_draws_its_finetuning_batches_once() -> None:
    from lightning_nas.callbacks.pairs import QuantizedPairCollector

    collector, data = QuantizedPairCollector(finetune_steps=5), CountingData()
    first = collector.finetune_batches(data)
    assert len(first) == 5 and data.loaders == 2  # the loader ran out once and was restarted
    assert [float(x[0, 0, 0, 0]) for x, _ in first] == [10, 11, 12, 20, 21]
    assert collector.finetune_batches(data) is first and data.loaders == 2  # the next pairs reuse them


def test_a_shorter_finetuning_takes_a_prefix_of_the_same_batches() -> None:
    from lightning_nas.callbacks.pairs import QuantizedPairCollector

    collector, data = QuantizedPairCollector(finetune_steps=5), CountingData()
    first = collector.finetune_batches(data)
    shorter = collector.finetune_batches(data, 2)
    assert len(shorter) == 2 and all(a is b for a, b in zip(shorter, first, strict=False)) and data.loaders == 2
    assert collector.finetune_batches(data, 0) == []
    longer = collector.finetune_batches(data, 7)  # more than were drawn: drawn again, from the start
    assert [float(x[0, 0, 0, 0]) for x, _ in longer] == [30, 31, 32, 40, 41, 42, 50]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two processes importing torch and Lightning, then 12 pairs: about a minute on 2 shared cores
def test_two_nodes_gather_their_pairs_into_node_zeros_store(tmp_path: Path) -> None:
    port, planned = free_port(), 12
    nodes = []
    for rank in (0, 1):
        work = tmp_path / f"node{rank}"  # nothing shared on disk: own working and run directory
        work.mkdir()
        command = [*collect_command(work / "run", planned), "trainer.num_nodes=2", "trainer.devices=1",
                   "trainer.strategy=ddp", "callbacks.pairs.init_args.write_every=2"]
        command[4] = str(REPO / RECIPE)
        env = {**os.environ, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("LOCAL_RANK", None)
        nodes.append(subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-3000:] for e in errors)

    pairs = PairStore(tmp_path / "node0" / "run" / "pairs.sqlite").pairs()
    keys = [p.pair_key for p in pairs]
    assert len(keys) == len(set(keys)) == planned
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))
    node1 = tmp_path / "node1"
    assert not list(node1.rglob("*.sqlite*")) and not list(node1.rglob("pairs_*_summary.json"))
    assert not list(node1.rglob("config.yaml"))
    import json

    summary = json.loads((tmp_path / "node0" / "run" / "pairs_fp32_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["collected"] == planned and summary["pairs_per_minute"] > 0


@pytest.mark.slow
def test_two_collectors_on_one_store_store_every_pair_once(tmp_path: Path) -> None:
    store_path, planned = tmp_path / "shared.sqlite", 16
    commands = [collect_command(tmp_path / name, planned) + [f"callbacks.pairs.init_args.store={store_path}"]
                for name in ("first", "second")]
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    errors = [p.communicate(timeout=600)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [e[-2000:] for e in errors]
    keys = [p.pair_key for p in PairStore(store_path).pairs()]
    assert len(keys) == planned == len(set(keys))
    assert {int(k.rsplit(":", 1)[1]) for k in keys} == set(range(planned))


# --- quantized pairs per deployment target ---------------------------------------------------------
class TinyData:
    """A data module stand-in: 16x16 random images, held out and for finetuning."""

    def __init__(self) -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(48, 3, 16, 16, generator=gen)
        self.labels = torch.randint(0, 10, (48,), generator=gen)
        self.holdout_set = list(range(48))

    def normalize(self, images, resolution: int):  # noqa: ANN001, ANN201
        return (images - 0.5) / 0.25

    def holdout_dataloader(self, batch_size: int):  # noqa: ANN201
        return [(self.images[i:i + batch_size], self.labels[i:i + batch_size]) for i in range(0, 48, batch_size)]

    def train_dataloader(self):  # noqa: ANN201
        return self.holdout_dataloader(16)


def tiny_supernet_module():  # noqa: ANN201
    """The CIFAR OFA space shrunk to a few thousand weights, as a stand-in for the supernet task."""
    from types import SimpleNamespace

    import torch

    from lightning_nas.nn.builders import build_supernet
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

    torch.manual_seed(0)
    space = OFAMobileNetV3Space.from_preset(
        "ofa_mbv3_cifar", resolutions=[16], stage_widths=[8, 8, 16, 16, 16], head_channels=32, feature_channels=32,
        kernel_choices=[3], expand_choices=[3], depth_choices=[2], stem_channels=8, first_block_channels=8)
    return SimpleNamespace(space=space, supernet=build_supernet(space), device=torch.device("cpu"))


class OneProcessTrainer:
    """The part of a Trainer that the collectors read, for one process."""

    is_global_zero, global_rank, world_size, loggers = True, 0, 1, []

    def __init__(self, run_dir: Path) -> None:
        from types import SimpleNamespace

        self.default_root_dir, self.datamodule = str(run_dir), TinyData()
        self.strategy = SimpleNamespace(broadcast=lambda value, src: value)


def folded_bias_in_steps(subnet) -> list:  # noqa: ANN001
    """Every conv + batch norm's folded bias (the output for a zero input, eval mode) in steps of
    its int32 grid ``s_in * s_w`` (the int8 conversion's per-channel weight scale of the folded weight)."""
    import torch

    steps = []
    subnet.eval()
    with torch.no_grad():
        for module in subnet.modules():
            conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
            if not isinstance(conv, torch.nn.Conv2d) or not isinstance(bn, torch.nn.BatchNorm2d):
                continue
            wq = conv.parametrizations.weight[0]
            gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            step = conv.input_quantizer.scale() * wq.scale(conv.parametrizations.weight.original).flatten() * gain.abs()
            out = bn(conv(torch.zeros(1, conv.in_channels, 3, 3)))
            steps.append(out[0, :, 1, 1] / step)
    return steps


def test_onnxruntime_pairs_are_finetuned_and_evaluated_on_the_int32_bias_grid() -> None:
    import copy
    import random

    import torch

    from lightning_nas.callbacks.pairs import QuantizedPairCollector
    from lightning_nas.nn.evaluation import evaluate
    from lightning_nas.nn.quantize_model import (
        attach_bias_grids,
        bias_grid_layers,
        quantized_layers,
        remove_quantizers,
    )

    module, data = tiny_supernet_module(), TinyData()
    bn = [x for x, _ in data.holdout_dataloader(16)][:2]
    nets = {}
    for target in ("x86_avx2/torch", "x86_avx2/onnxruntime"):
        collector = QuantizedPairCollector(target=target, policy_bits=[8], finetune_steps=2)
        nets[target] = collector.quantized_subnet(module, data, random.Random("pairs-0-0"), bn)
    (config, policy, plain), (config2, policy2, grid) = nets.values()
    assert config == config2 and policy == policy2
    assert bias_grid_layers(plain) == []
    assert sorted(bias_grid_layers(grid)) == sorted(quantized_layers(grid))  # every quantized layer
    on_grid, off_grid = torch.cat(folded_bias_in_steps(grid)), torch.cat(folded_bias_in_steps(plain))
    assert len(on_grid) > 100
    assert (on_grid - on_grid.round()).abs().max() < 1e-3  # whole int32 codes, as ONNX Runtime adds them
    assert (off_grid - off_grid.round()).abs().mean() > 0.1  # the float biases of the torch target are not

    # the evaluated network is the grid one: taking the hooks off changes its loss, putting them back restores it
    batches = [(data.normalize(data.images, 16), data.labels)]
    _, loss_grid = evaluate(grid, batches)
    without = copy.deepcopy(grid)
    for m in without.modules():
        for key in [k for k, h in m._forward_hooks.items() if h.__name__ == "_bias_grid_hook"]:
            del m._forward_hooks[key]
    assert not bias_grid_layers(without)
    assert abs(evaluate(without, batches)[1] - loss_grid) > 1e-6
    attach_bias_grids(without)
    assert evaluate(without, batches)[1] == pytest.approx(loss_grid, rel=1e-6)
    remove_quantizers(without)
    assert not bias_grid_layers(without)


def test_measuring_at_a_given_length_is_measuring_with_a_collector_of_that_length() -> None:
    import torch

    from lightning_nas.callbacks.pairs import QuantizedPairCollector, plan_rng

    module, data = tiny_supernet_module(), TinyData()
    bn = [x for x, _ in data.holdout_dataloader(16)][:1]
    evaluation = data.holdout_dataloader(16)[1:]

    def measure(collector: QuantizedPairCollector, steps: int | None = None) -> dict:
        torch.manual_seed(0)  # the classifier's dropout
        return collector.measure(module, data, plan_rng(0, 1), bn, evaluation, finetune_steps=steps)

    longer = QuantizedPairCollector(finetune_steps=3, policy_bits=[4, 8], lr=0.05)
    at_one = measure(longer, 1)
    assert at_one == measure(QuantizedPairCollector(finetune_steps=1, policy_bits=[4, 8], lr=0.05))
    assert at_one["loss"] != measure(longer, 0)["loss"] != measure(longer)["loss"]
    assert measure(longer)["loss"] == measure(longer, 3)["loss"]


def test_pairs_of_two_targets_share_a_store_without_taking_each_others_plan(tmp_path: Path) -> None:
    from lightning_nas.callbacks.pairs import QuantizedPairCollector
    from lightning_nas.errors import RecipeError

    module = tiny_supernet_module()
    store_path = tmp_path / "pairs.sqlite"

    def collect(target: str, allow_mixed: bool = True, num_pairs: int = 2) -> QuantizedPairCollector:
        collector = QuantizedPairCollector(num_pairs=num_pairs, store=str(store_path), target=target, policy_bits=[8],
                                           finetune_steps=1, bn_images=16, eval_images=32, batch_size=16,
                                           allow_mixed_targets=allow_mixed)
        collector.on_fit_end(OneProcessTrainer(tmp_path), module)
        return collector

    assert collect("x86_avx2/torch", allow_mixed=False).collection["collected"] == 2
    with pytest.raises(RecipeError, match="different deployment targets"):  # the mixing rule still holds
        collect("x86_avx2/onnxruntime", allow_mixed=False)
    # allowed to mix: the other target's pairs are not taken as done; each target resumes its own plan
    assert collect("x86_avx2/onnxruntime").collection["collected"] == 2
    assert collect("x86_avx2/torch", num_pairs=3).collection["collected"] == 1
    assert collect("x86_avx2/onnxruntime", num_pairs=3).collection["collected"] == 1
    pairs = PairStore(store_path).pairs(kind="quant")
    by_target = {t: sorted((p.pair_key, json_key(p)) for p in pairs if p.target == t)
                 for t in ("x86_avx2/torch", "x86_avx2/onnxruntime")}
    assert [len(v) for v in by_target.values()] == [3, 3] and len(pairs) == 6
    assert all(f":quant:{p.target}:0:" in p.pair_key for p in pairs)
    # the same plan (architectures and policies) for both targets, measured twice
    assert [a for _, a in by_target["x86_avx2/torch"]] == [a for _, a in by_target["x86_avx2/onnxruntime"]]


def json_key(pair) -> str:  # noqa: ANN001
    import json

    return json.dumps([pair.arch, pair.policy], sort_keys=True)
