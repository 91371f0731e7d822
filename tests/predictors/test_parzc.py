from __future__ import annotations

import ast
import csv
import json
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_nas.data.zc_stats import ZCStatsDataModule
from lightning_nas.errors import RecipeError
from lightning_nas.predictors import zc_cache
from lightning_nas.predictors.losses import kendall_tau
from lightning_nas.predictors.parzc import BayesLinear, ParZC
from lightning_nas.spaces.nb201 import all_archs, weight_slot_names
from lightning_nas.tasks.parzc import ParZCTask
from lightning_nas.tasks.ranking import score_architectures

ARCHS = random.Random(0).sample(all_archs(), 5)
PROXIES = ["snip", "synflow", "params"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def _trainer(epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_bayes_linear_samples_in_training_and_uses_the_mean_in_eval() -> None:
    layer = BayesLinear(4, 3, rho_init=-1.0)
    x = torch.randn(2, 4)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight_mu, layer.bias_mu))
    assert layer.kl() > 0


def test_parzc_scaler_and_uncertainty() -> None:
    feats = torch.randn(20, 7, 3) * torch.tensor([1.0, 1e6, 1e-6])
    model = ParZC(7, 3, embed_dim=8, depth=1, token_hidden=8, channel_hidden=8)
    model.fit_scaler(feats)
    scaled = model.scale(feats)
    assert scaled.min() >= -1e-6 and scaled.max() <= 1 + 1e-6
    assert model(feats).shape == (20,)
    with pytest.raises(ValueError, match="expected features"):
        model(torch.zeros(2, 6, 3))
    # Raw statistics beyond float32's range (synflow reaches ~1e50) must stay finite.
    huge = feats.double() * 1e45
    model.fit_scaler(huge)
    assert torch.isfinite(model(huge)).all()
    out = model.predict_with_uncertainty(feats[:5], samples=4)
    assert out["mean"].shape == (5,) and out["node_std"].shape == (5, 7) and (out["std"] > 0).all()


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Node statistics whose (nonlinear, multi-node) combination sets the accuracy."""
    rng = np.random.default_rng(seed)
    feats = rng.lognormal(0.0, 1.5, size=(n, 6, 3))
    logf = np.log(feats)
    acc = np.tanh(logf[:, 1, 0] + 0.5 * logf[:, 3, 2]) + 0.3 * logf[:, :, 1].mean(1) + 0.05 * rng.standard_normal(n)
    return feats, acc


@pytest.mark.parametrize("loss", ["diffkendall", "pairwise", "mse"])
def test_parzc_learns_a_synthetic_ranking(loss: str) -> None:
    feats, acc = _synthetic(200, 0)
    dm = ZCStatsDataModule.from_arrays(feats, acc, list(range(80)), list(range(80, 200)))
    pl.seed_everything(0, verbose=False)
    task = ParZCTask(embed_dim=16, depth=1, token_hidden=16, channel_hidden=16, loss=loss, lr=1e-2,
                     warmup_epochs=5)
    trainer = _trainer(80, check_val_every_n_epoch=80, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert task.hparams.num_nodes == 6 and task.hparams.num_stats == 3
    tau = kendall_tau(task.score(torch.as_tensor(feats[80:])), torch.as_tensor(acc[80:]))
    assert tau > 0.5, tau  # chance is 0; ~0.7 is reached
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    assert metrics["val/kendall"] == pytest.approx(tau, abs=1e-4)
    assert -1 <= metrics["val/spearman"] <= 1


def test_task_signature_is_explicit() -> None:
    import lightning_nas.data.zc_stats as dm_mod
    import lightning_nas.tasks.parzc as task_mod

    for mod, name in ((task_mod, "ParZCTask"), (dm_mod, "ZCStatsDataModule")):
        tree = ast.parse(Path(mod.__file__).read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        assert init.args.kwarg is None and init.args.vararg is None
        assert all(a.annotation is not None for a in init.args.args[1:])
    with pytest.raises(RecipeError, match="task.loss: unknown ranking loss(.|\n)*diffkendall"):
        ParZCTask(loss="hinge")


# -- statistics cache, datamodule from files, checkpoint ranking -----------------------------------

def test_cache_resumes_adds_proxies_and_rejects_other_settings(tmp_path: Path, batch, monkeypatch, capsys) -> None:
    images, labels = batch
    cache = tmp_path / "stats.jsonl"
    first = zc_cache.compute_statistics(ARCHS[:2], PROXIES, images, labels, seed=0, cache_path=cache, progress=False)
    assert first.nodes.shape == (2, len(weight_slot_names()), len(PROXIES))
    assert first.scores.shape == (2, 3) and (first.seconds > 0).all()
    # A run killed mid-write leaves a partial line; it is dropped, not fatal.
    with cache.open("a") as f:
        f.write('{"arch": "|none~0|+')
    calls: list[tuple[str, tuple[str, ...]]] = []
    real = zc_cache.architecture_statistics

    def counting(arch, proxies, *args, **kwargs):
        calls.append((arch, tuple(proxies)))
        return real(arch, proxies, *args, **kwargs)

    monkeypatch.setattr(zc_cache, "architecture_statistics", counting)
    second = zc_cache.compute_statistics(ARCHS[:3], PROXIES, images, labels, seed=0, cache_path=cache, progress=True)
    assert calls == [(ARCHS[2], tuple(PROXIES))]
    # the progress bar (rich, on stderr) counts what is left to compute and names what was cached
    printed = capsys.readouterr()
    assert "zero-cost statistics (2 cached)" in printed.err and "1/1 arch" in printed.err
    assert "zero-cost statistics" not in printed.out
    np.testing.assert_array_equal(second.nodes[:2], first.nodes)
    assert len(cache.read_text().splitlines()) == 1 + 3
    # Asking for one more proxy computes only that one; records merge on reading.
    calls.clear()
    more = zc_cache.compute_statistics(ARCHS[:2], ["nwot", *PROXIES], images, labels, seed=0, cache_path=cache,
                                       progress=False)
    assert calls == [(ARCHS[0], ("nwot",)), (ARCHS[1], ("nwot",))]
    np.testing.assert_array_equal(more.nodes[:, :, 1:], first.nodes)
    assert zc_cache.load_statistics(cache).proxies == PROXIES  # only those every arch has
    assert zc_cache.load_statistics(cache, proxies=["nwot"]).archs == ARCHS[:2]
    # Same architectures, recomputed without a cache: identical values (deterministic).
    fresh = zc_cache.compute_statistics(ARCHS[:3], PROXIES, images, labels, seed=0, progress=False)
    np.testing.assert_array_equal(fresh.nodes, second.nodes)
    with pytest.raises(ValueError, match="different settings"):
        zc_cache.compute_statistics(ARCHS[:1], PROXIES, images, labels, seed=1, cache_path=cache, progress=False)
    loaded = zc_cache.load_statistics(cache, ARCHS[:3][::-1], PROXIES)
    np.testing.assert_array_equal(loaded.nodes, second.nodes[::-1])
    with pytest.raises(KeyError, match="no cached nwot"):
        zc_cache.load_statistics(cache, ARCHS[:3], ["nwot"])


def test_datamodule_task_checkpoint_and_ranking(tmp_path: Path, batch) -> None:
    images, labels = batch
    cache = tmp_path / "stats.jsonl"
    zc_cache.compute_statistics(ARCHS, PROXIES, images, labels, seed=0, cache_path=cache, progress=False)
    csv_path = tmp_path / "acc.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "CIFAR10TestAccuracy200Epochs", "ArchitectureString"])
        for i, a in enumerate(ARCHS):
            w.writerow([i, 50.0 + i, a])
    dm = ZCStatsDataModule(stats_path=str(cache), accuracy_csv=str(csv_path), num_train=3, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    assert set(dm.train_archs).isdisjoint(dm.val_archs) and dm.proxies == PROXIES
    task = ParZCTask(embed_dim=8, depth=1, token_hidden=8, channel_hidden=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    ckpt = tmp_path / "parzc.ckpt"
    trainer.save_checkpoint(ckpt)
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["num_nodes"] == 98 and hparams["proxies"] == PROXIES and hparams["stats_seed"] == 0
    expected = task.score(torch.as_tensor(zc_cache.load_statistics(cache, ARCHS).nodes)).tolist()
    # Same proxies, seed and batch as the cache: it is reused (recomputation is tested above).
    scores = score_architectures(ARCHS, str(ckpt), images=images, labels=labels, cache_path=cache)
    assert scores == pytest.approx(expected, rel=1e-5)
    by_proxy = score_architectures(ARCHS[:2], "params", images=images, labels=labels)
    assert by_proxy == pytest.approx(zc_cache.load_statistics(cache, ARCHS[:2]).scores[:, 2].tolist())
    with pytest.raises(RecipeError, match="neither a proxy"):
        score_architectures(ARCHS[:1], "no_such_thing")
    json.loads(cache.read_text().splitlines()[0])  # the header stays plain JSON


def test_datamodule_computes_missing_statistics_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = tmp_path / "train.npz"
    np.savez(images, x=rng.integers(0, 255, size=(70, 8, 8, 3), dtype=np.uint8), y=rng.integers(0, 10, size=70))
    csv_path = tmp_path / "acc.csv"
    extra = random.Random(1).sample(all_archs(), 3)
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["CIFAR10TestAccuracy200Epochs", "ArchitectureString"])
        for i, a in enumerate(ARCHS + extra):
            w.writerow([50.0 + i, a])
    cache = tmp_path / "stats.jsonl"

    def datamodule() -> ZCStatsDataModule:
        dm = ZCStatsDataModule(stats_path=str(cache), accuracy_csv=str(csv_path), images_path=str(images),
                               compute_missing=True, proxies=["synflow", "params"], num_train=3, num_val=2, seed=4)
        dm.setup("fit")
        return dm

    first = datamodule()
    assert len(first.train_set) == 3 and len(first.val_set) == 2 and first.proxies == ["synflow", "params"]
    computed = cache.read_text().splitlines()
    assert len(computed) == 1 + 5  # header + the 5 drawn of the 8 labelled architectures
    second = datamodule()
    assert cache.read_text().splitlines() == computed  # nothing recomputed
    assert second.train_archs == first.train_archs and second.val_archs == first.val_archs
    assert set(first.train_archs + first.val_archs) <= set(ARCHS + extra)


def test_missing_statistics_file_names_the_key(tmp_path: Path) -> None:
    dm = ZCStatsDataModule(stats_path=str(tmp_path / "none.jsonl"), accuracy_csv=str(tmp_path / "acc.csv"))
    (tmp_path / "acc.csv").write_text("CIFAR10TestAccuracy200Epochs,ArchitectureString\n")
    with pytest.raises(FileNotFoundError, match="data.stats_path.*compute_missing=true"):
        dm.setup("fit")


def test_computing_missing_statistics_needs_an_images_file(tmp_path: Path) -> None:
    csv_path = tmp_path / "acc.csv"
    csv_path.write_text(f"CIFAR10TestAccuracy200Epochs,ArchitectureString\n50.0,{ARCHS[0]}\n")
    dm = ZCStatsDataModule(accuracy_csv=str(csv_path), stats_path=str(tmp_path / "s.jsonl"), compute_missing=True)
    with pytest.raises(RecipeError, match="data.images_path") as info:
        dm.setup("fit")
    assert info.value.key == "data.images_path"
    assert not (tmp_path / "s.jsonl").exists()
    with pytest.raises(RecipeError, match="data.accuracy_csv"):
        ZCStatsDataModule(stats_path=str(tmp_path / "s.jsonl"), images_path=str(csv_path)).setup("fit")


def test_scoring_without_images_or_a_data_path_is_refused() -> None:
    with pytest.raises(ValueError, match="data_path"):
        score_architectures(ARCHS[:1], "params")
