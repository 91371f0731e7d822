from __future__ import annotations

import importlib.util
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR10_DIR = SHARED / "data" / "cifar10"

os.environ.setdefault("WANDB_MODE", "offline")
# Busy-waiting OpenMP threads collapse throughput when the cores are shared (CI runners, xdist).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes name paths relative to the repository root, as users run them."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    A second OpenMP thread only adds synchronisation there, and stalls badly when the machine is
    shared; results do not depend on the thread count.
    """
    from lightning_nas.nn.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cifar_space() -> Any:
    """The once-for-all MobileNetV3 space in its CIFAR layout."""
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space

    return OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar")


@pytest.fixture(scope="module")
def joint() -> Any:
    """The joint once-for-all CIFAR x quantization-policy space."""
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    return JointSpace(OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"), QuantPolicySpace())


@pytest.fixture(scope="module")
def models(joint: Any) -> dict:
    """The two cost models the search tests score with, on the joint space's network space."""
    from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel

    return {"counts": CountsCostModel(joint.space), "bitfusion": BitFusionCostModel(joint.space)}


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module: the scripts are not a package, their tests import them by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A W&B run left open by one test would swallow the next test's logger."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def true_accuracy(space: Any, config: dict, policy: dict | None) -> float:
    """A known ground truth: bigger kernels, wider and deeper nets and more bits are better."""
    active = space.active_blocks(config)
    score = 50 + 0.4 * sum(config["ks"][b] for b in active) + 0.3 * sum(config["e"][b] for b in active)
    score += (config["r"] - 24) * 0.5
    if policy is not None:
        score -= sum((8 - policy["pw_w"][b]) * 0.6 + (8 - policy["dw_a"][b]) * 0.3 for b in active)
    return score


def fill_store(path: Path, count: int, kind: str, seed: int = 0) -> None:
    """``count`` synthetic pairs of ``kind`` with :func:`true_accuracy` as their top-1."""
    from lightning_nas.predictors.pair_store import Pair, PairStore, plan_key
    from lightning_nas.spaces.ofa_mbv3 import OFAMobileNetV3Space
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    space, policies = OFAMobileNetV3Space.from_preset("ofa_mbv3_cifar"), QuantPolicySpace()
    rng = random.Random(seed)
    store = PairStore(path)
    for i in range(count):
        config = space.sample(rng)
        policy = policies.sample(rng, space.num_blocks) if kind == "quant" else None
        store.add(Pair(config, policy, config["r"], true_accuracy(space, config, policy), None, "synthetic",
                       seed, 0.0, kind=kind, pair_key=plan_key("synthetic", kind, seed, i)))


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(target, "w")``: a stand-in for a checkpoint that runs code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def code_payload():
    """``write(path, target)``: a checkpoint-shaped torch file whose unpickling creates ``target``."""
    import torch

    def write(path: Path, target: Path) -> Path:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {}, "epoch": 0, "global_step": 0,
                    "payload": CreatesFileWhenUnpickled(target)}, path)
        return path

    return write


@dataclass
class SmokeRun:
    """One recipe's ``--smoke`` run: how it ended and how long it took by itself (its upstream runs apart)."""

    stem: str
    run_dir: Path
    exit_code: int | None = None
    seconds: float = 0.0
    skipped: str | None = None
    error: Exception | None = None
    #: an upstream run that failed or raised, so this one did not start
    blocked_by: str | None = None


class SmokeRuns:
    """Every recipe's ``--smoke`` run under one ``vars.runs`` folder, each at most once per session.

    A recipe reads an earlier stage's artifacts through ``${vars.runs}/<stage>/...``; :meth:`get` finds
    those stages in the resolved recipe and runs them first, so any one recipe's smoke can run alone and
    a whole-file run still builds each artifact once.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, SmokeRun] = {}
        self._running: list[str] = []

    def overrides(self, path: Path) -> list[str]:
        from lightning_nas.recipe.loader import load_recipe

        overrides = [f"run_dir={self.root / path.stem}"]
        config = load_recipe(path, overrides, smoke=True, validate=False).config
        if "runs" in config.get("vars", {}):
            overrides.append(f"vars.runs={self.root}")
        # benchmarks/gpu_check.sh: the same smoke runs on a GPU, reading a small CIFAR-10 copy
        accelerator = os.environ.get("LIGHTNING_NAS_SMOKE_ACCELERATOR")
        if accelerator and "trainer" in config:
            overrides.append(f"trainer.accelerator={accelerator}")
        cifar10 = os.environ.get("LIGHTNING_NAS_SMOKE_CIFAR10")
        if cifar10 and str((config.get("data") or {}).get("root", "")).endswith("shared/data/cifar10"):
            overrides.append(f"data.root={cifar10}")
        return overrides

    def upstream(self, path: Path) -> tuple[str, list[str]]:
        """The resolved recipe (as text) and the stages whose run directories it reads."""
        from lightning_nas.recipe.loader import load_recipe

        resolved = repr(load_recipe(path, self.overrides(path), smoke=True, validate=False).config)
        stems = sorted(other.stem for other in (REPO / "recipes").glob("*.yaml")
                       if other.stem != path.stem and f"{self.root / other.stem}/" in resolved)
        return resolved, stems

    def get(self, stem: str) -> SmokeRun:
        if stem in self.runs:
            return self.runs[stem]
        if stem in self._running:
            raise RuntimeError(f"recipes read each other's artifacts in a cycle: {' -> '.join(self._running)}")
        from lightning_nas.cli import main, recipe_verb
        from lightning_nas.recipe.loader import load_recipe

        path = REPO / "recipes" / f"{stem}.yaml"
        run = SmokeRun(stem, self.root / stem)
        resolved, needed = self.upstream(path)
        self._running.append(stem)
        try:
            if "../shared/" in resolved and not SHARED.is_dir():
                run.skipped = "reads ../shared (benchmark data beside the repository)"
            for other in needed:
                before = self.get(other)
                if before.skipped:
                    run.skipped = f"reads the artifacts of {other}, skipped"
                elif before.exit_code != 0:
                    run.blocked_by = other
                if run.skipped or run.blocked_by:
                    break
            if not (run.skipped or run.blocked_by):
                overrides = self.overrides(path)
                verb = recipe_verb(load_recipe(path, overrides, smoke=True, validate=False).config)
                started = time.perf_counter()
                try:
                    run.exit_code = main([verb, str(path), "--smoke", *overrides])
                except Exception as error:  # kept for the recipe's own test, which re-raises it
                    run.error = error
                run.seconds = time.perf_counter() - started
        finally:
            self._running.pop()
        self.runs[stem] = run
        return run


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> SmokeRuns:
    """Recipe smoke runs on demand, cached for the session (see :class:`SmokeRuns`)."""
    return SmokeRuns(tmp_path_factory.mktemp("runs"))


# --- a tiny supernet and QAT runs from it (tests/tasks/test_qat.py, tests/stages/test_deploy.py) ----------
#: A narrow, shallow OFA MobileNetV3 space (SE and h-swish stages kept, so every kind of int8
#: rounding point occurs) on 16 x 16 digits.
TINY_SPACE = {
    "name": "ofa_mbv3_cifar",
    "num_classes": 10,
    "width_mult": 0.5,
    "resolutions": [16],
    "kernel_choices": [3, 5],
    "expand_choices": [3, 4],
    "depth_choices": [1, 2],
    "head_channels": 96,
    "feature_channels": 128,
}
#: The data of the tiny runs, as a recipe's data section.
TINY_DATA = {"name": "digits", "image_size": 16, "batch_size": 64, "num_workers": 0, "holdout_size": 200}
#: Every concrete deployment target, in the order the tests are parametrised.
TARGET_NAMES = ("x86_vnni/torch", "x86_avx2/torch", "arm/torch", "x86_vnni/onnxruntime", "x86_avx2/onnxruntime")


def tiny_datamodule() -> Any:
    from lightning_nas.data.digits import DigitsDataModule

    return DigitsDataModule(**{k: v for k, v in TINY_DATA.items() if k != "name"})


#: One block per stage of TINY_SPACE, 3x3 depthwise, expand 3: 16 block convolutions, with
#: depthwise, squeeze-excite (stages 2 and 3) and h-swish (stages 3 and 4).
TINY_SUBNET_CONFIG = {"ks": [3] * 10, "e": [3] * 10, "d": [1] * 5, "r": 16}


def randomise_batchnorm(net: Any, generator: Any) -> None:
    """Non-trivial running statistics and affine parameters on every BatchNorm2d of ``net``."""
    import torch
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


def tiny_ofa_subnet(seed: int = 0) -> Any:
    """A standalone TINY_SPACE subnet (eval mode) with random weights and non-trivial BN statistics."""
    import torch

    from lightning_nas.nn.builders import build_subnet
    from lightning_nas.registry import SPACES

    torch.manual_seed(seed)
    model = build_subnet(SPACES.build(TINY_SPACE), TINY_SUBNET_CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomise_batchnorm(model, g)
    return model.eval()


def quiet_trainer(root: Path, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(default_root_dir=str(root), accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def target_param(name: str) -> Any:
    """``name`` as a pytest param, skipped where this host cannot compute its int8 arithmetic: a
    test of agreement never assumes the CPU's instruction set."""
    from lightning_nas.targets import host_can_run, resolve_target

    reason = f"this host ({resolve_target('auto').isa}) does not compute {name}'s int8 arithmetic natively"
    return pytest.param(name, marks=pytest.mark.skipif(not host_can_run(name), reason=reason), id=name)


@pytest.fixture(scope="session")
def tiny_supernet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny supernet trained for a few epochs on digits, saved the way ``lightning-nas fit`` does."""
    import lightning.pytorch as pl
    import torch

    from lightning_nas.tasks.supernet import SupernetTask

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(0, verbose=False)
        root = tmp_path_factory.mktemp("supernet")
        task = SupernetTask(space=TINY_SPACE, lr=0.1, kd_ratio=0.0, num_reference_random=1,
                            bn_recalibration_images=100, bn_recalibration_batch=100, label_smoothing=0.0)
        fit = quiet_trainer(root, max_epochs=4, limit_val_batches=0)
        fit.fit(task, datamodule=tiny_datamodule())
        path = root / "last.ckpt"
        fit.save_checkpoint(path)
    finally:
        torch.set_num_threads(threads)
    return str(path)


class QATRuns:
    """QAT runs of the tiny supernet's largest subnet (uniform 8 bits, trained for deployment), one
    per target, each at most once per session: ``get(target)`` -> ``{task, root, metrics}``; the
    run directory holds ``qat_subnet.pt`` and ``qat_metrics.json``."""

    def __init__(self, checkpoint: str, root: Path) -> None:
        self.checkpoint, self.root = checkpoint, root
        self.runs: dict[str, dict] = {}

    def get(self, target: str) -> dict:
        if target not in self.runs:
            import json

            import lightning.pytorch as pl
            import torch

            from lightning_nas.tasks.qat import QAT_METRICS_FILE, QATTask

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                pl.seed_everything(0, verbose=False)
                root = self.root / target.replace("/", "_")
                task = QATTask(supernet_checkpoint=self.checkpoint, subnet="largest", policy=8, freeze_bn_fraction=0.5,
                               target=target, bn_recalibration_images=100, calibration_batch=100)
                quiet_trainer(root, max_epochs=1, limit_train_batches=6, limit_val_batches=1).fit(
                    task, datamodule=tiny_datamodule())
            finally:
                torch.set_num_threads(threads)
            self.runs[target] = {"task": task, "root": root,
                                 "metrics": json.loads((root / QAT_METRICS_FILE).read_text())}
        return self.runs[target]


@pytest.fixture(scope="session")
def qat_runs(tiny_supernet_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> QATRuns:
    return QATRuns(tiny_supernet_checkpoint, tmp_path_factory.mktemp("qat"))


@pytest.fixture(scope="session")
def randomise_elastic() -> Callable:
    """``randomise(net, seed)``: non-trivial batch-norm statistics and affine parameters and
    perturbed kernel transforms, so that a wrong slice or a missing copy shows in the outputs."""
    import torch
    from torch import nn

    from lightning_nas.nn.elastic import DynamicDepthwiseConv2d

    def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            randomise_batchnorm(net, g)
            for m in net.modules():
                if isinstance(m, DynamicDepthwiseConv2d):
                    for p in m.kernel_transforms():
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return net

    return randomise
