"""Bad data and pair stores are answered with exit 2 and a message naming the file, the key and
what is expected (never a traceback)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from lightning_nas.cli import main
from lightning_nas.data.arrays import load_npz
from lightning_nas.data.pairs import PairsDataModule
from lightning_nas.errors import RecipeError
from lightning_nas.predictors.pair_store import Pair, PairStore

SUPERNET = "recipes/ofa_supernet.yaml"


def arrays(n: int = 60, size: int = 32, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8), np.arange(n) % classes


def fit_npz(tmp_path: Path, x: np.ndarray, y: np.ndarray, *overrides: str) -> tuple[int, Path]:
    path = tmp_path / "train.npz"
    np.savez(path, x=x, y=y)
    code = main(["fit", SUPERNET, "--smoke", "data.name=npz", f"data.train_path={path}", "data.holdout_size=10",
                 f"run_dir={tmp_path / 'run'}", *overrides])
    return code, path


@pytest.mark.parametrize(
    ("make", "overrides", "fragments"),
    [
        (lambda x, y: (x.transpose(0, 3, 1, 2), y), (), ["N x C x H x W", "x.transpose(0, 2, 3, 1)"]),
        (lambda x, y: (x.astype(np.float32), y), (), ["x must be uint8", "float32"]),
        (lambda x, y: (x, y - 1), (), ["negative labels", "smallest -1"]),
        (lambda x, y: (x, y.astype(np.float64)), (), ["integer class labels"]),
        (lambda x, y: (x, y[:-1]), (), ["one label per image"]),
        (lambda x, y: (x[:, :, :20], y), (), ["square images"]),
        (lambda x, y: (x, y), ("data.holdout_size=5000",), ["data.holdout_size", "the training set has 54",
                                                          "0 to 53"]),
        (lambda x, y: (x, y % 7), (), ["task.space.num_classes", "the data has 7 classes", "has 10"]),
        (lambda x, y: (x[:, :20, :20], y), (), ["data.resolutions", "20 x 20 pixels", "up to 20"]),
    ],
    ids=["nchw", "float-images", "negative-labels", "float-labels", "label-count", "not-square",
         "holdout-too-large", "class-count", "resolution-above-image-size"],
)
def test_bad_npz_data_exits_2_naming_file_key_and_layout(tmp_path: Path, capsys, make, overrides,
                                                          fragments: list[str]) -> None:
    x, y = make(*arrays())
    code, path = fit_npz(tmp_path, x, y, *overrides)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "data." in err or "task." in err
    for fragment in fragments:
        assert fragment in err, err
    if not overrides and not fragments[0].startswith(("task.", "data.")):  # a content check of the file
        assert str(path) in err and "data.train_path" in err


def test_labels_are_checked_against_a_given_class_count(tmp_path: Path) -> None:
    x, y = arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(RecipeError, match="label 9, but there are 5 classes"):
        load_npz(tmp_path / "d.npz", "data.train_path", num_classes=5)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(RecipeError, match="cannot read it as an .npz file") as caught:
        load_npz(tmp_path / "text.npz", "data.train_path")
    assert caught.value.key == "data.train_path"
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(RecipeError, match="cannot read it as an .npz file"):  # object arrays need pickle
        load_npz(tmp_path / "pickled.npz", "data.train_path")


SPACE = {"name": "ofa_mbv3_cifar", "num_classes": 10}


def test_a_text_file_is_not_a_pair_store(tmp_path: Path) -> None:
    path = tmp_path / "pairs.sqlite"
    path.write_text("arch,top1\n")
    with pytest.raises(RecipeError, match="not a pair store: SQLite cannot read it") as caught:
        PairsDataModule(str(path), SPACE).setup("fit")
    assert caught.value.key == "data.path" and caught.value.given == str(path)


def test_a_database_of_another_schema_is_not_a_pair_store(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE pairs (id INTEGER PRIMARY KEY, arch TEXT, accuracy REAL)")
    with pytest.raises(RecipeError, match="its `pairs` table has no column 'pair_key'"):
        PairStore(path, key="data.path")


def test_pairs_of_another_space_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.sqlite"
    store = PairStore(path)
    # NAS-Bench-201 style archs stored where an OFA space's predictor reads them
    for i in range(6):
        store.add(Pair(arch={"cell": f"|nor_conv_3x3~0|+|skip_connect~{i}|"}, policy=None, resolution=32, top1=50.0,
                       loss=None, checkpoint_hash="abc", seed=0, seconds=1.0, pair_key=f"abc:fp32:0:{i}"))
    with pytest.raises(RecipeError, match="pair 0 of kind 'fp32' does not fit data.space") as caught:
        PairsDataModule(str(path), SPACE).setup("fit")
    assert "another space or supernet" in caught.value.render() and caught.value.key == "data.path"


def test_the_cli_answers_a_bad_store_with_exit_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pairs.sqlite"
    path.write_bytes(b"\x00garbage" * 100)
    code = main(["fit", "recipes/predictor_fp32.yaml", "--smoke", f"data.path={path}", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.path" in err and str(path) in err and "not a pair store" in err


def test_pairs_of_two_supernets_need_a_choice(tmp_path: Path) -> None:
    from conftest import fill_store

    path = tmp_path / "pairs.sqlite"
    fill_store(path, 20, "fp32")
    store = PairStore(path)
    first = store.pairs()[0]
    for i in range(5):  # the same architectures measured on another supernet's weights
        store.add(Pair(first.arch, None, first.resolution, 40.0 + i, None, "0123456789abcdef", 0, 1.0,
                       pair_key=f"0123456789abcdef:fp32:0:{i}"))
    with pytest.raises(RecipeError, match="the store holds pairs of 2 supernets: synthetic \\(20 pairs\\), "
                                          "0123456789abcdef \\(5 pairs\\)") as caught:
        PairsDataModule(str(path), SPACE).setup("fit")
    assert caught.value.key == "data.path"
    chosen = PairsDataModule(str(path), SPACE, checkpoint_hash="synthetic", val_fraction=0.25)
    chosen.setup("fit")
    assert len(chosen.train_set) + len(chosen.val_set) == 20
    with pytest.raises(RecipeError, match="no pairs of kind 'fp32' measured on this supernet") as caught:
        PairsDataModule(str(path), SPACE, checkpoint_hash="feedface").setup("fit")
    assert caught.value.key == "data.checkpoint_hash"


def test_quantized_pairs_need_an_elastic_space(tmp_path: Path) -> None:
    # per-block bit widths mean nothing on a cell space: a recipe error naming data.space
    with pytest.raises(RecipeError, match="must be elastic") as error:
        PairsDataModule(str(tmp_path / "pairs.sqlite"), {"name": "nb201"}, kind="quant")
    assert error.value.key == "data.space"
