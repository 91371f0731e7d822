"""`lightning-nas pipeline RECIPE data=PATH`: one image data section for every image-reading stage,
with the classes and resolutions following from it; a copied pipeline still finds its stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from lightning_nas.cli import main
from lightning_nas.errors import RecipeError
from lightning_nas.stages.pipeline import data_section, load_with_stage_overrides, plan

CLASSES, SIZE = 7, 20  # neither digits nor CIFAR-10


def write_npz(path: Path, count: int = 900) -> Path:
    """A learnable toy set: each class brightens its own band of rows in one colour channel."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, count)
    images = rng.integers(0, 60, (count, SIZE, SIZE, 3))
    for c in range(CLASSES):
        images[labels == c, 2 * c:2 * c + 6, :, c % 3] += 150
    np.savez(path, x=images.astype(np.uint8), y=labels)
    return path


def planned(overrides: list[str]) -> dict[str, dict]:
    _, _, stages = plan(load_with_stage_overrides(REPO / "recipes" / "quickstart.yaml", overrides, smoke=True))
    return {path.stem: loaded.config for path, _, loaded, _, _ in stages}


def test_one_data_argument_reaches_every_image_stage_with_its_classes_and_size(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "mine.npz")
    stages = planned([f"pipeline.data={data}", f"run_dir={tmp_path / 'runs'}"])
    for name in ("ofa_supernet", "pairs_fp32", "pairs_quant", "qat_finetune"):
        section = stages[name]["data"]
        assert section["name"] == "npz" and section["train_path"] == str(data.resolve()), name
        assert section["resolutions"] == [SIZE], name
    assert stages["deploy_int8"]["data"] is None  # the deploy stage reads the QAT run's data (its config.yaml)
    # the stages keep their own batch sizes and held-out splits (after their smoke blocks)
    assert stages["ofa_supernet"]["data"]["batch_size"] == 16 and stages["pairs_fp32"]["data"]["holdout_size"] == 400
    for name in ("ofa_supernet", "pairs_fp32", "predictor_fp32", "pairs_quant", "apq_int8"):
        assert stages[name]["space"]["num_classes"] == CLASSES and stages[name]["space"]["resolutions"] == [SIZE]
    assert stages["ofa_supernet"]["task"]["space"]["num_classes"] == CLASSES  # ${space} follows
    assert stages["apq_int8"]["search"]["cost_models"][0]["space"]["resolutions"] == [SIZE]
    # the predictors' pair stores are not image data
    assert stages["predictor_fp32"]["data"]["name"] == "pairs"
    assert stages["predictor_fp32"]["data"]["space"]["num_classes"] == CLASSES


def test_the_pipeline_may_choose_the_resolutions_and_a_data_yaml_or_folder(tmp_path: Path) -> None:
    data = write_npz(tmp_path / "mine.npz")
    (tmp_path / "data.yaml").write_text(f"data:\n  name: npz\n  train_path: {data}\n  resolutions: [16, 20]\n")
    stages = planned([f"pipeline.data={tmp_path / 'data.yaml'}", f"run_dir={tmp_path / 'runs'}"])
    assert stages["ofa_supernet"]["data"]["resolutions"] == [16, 20]
    assert stages["apq_int8"]["space"]["resolutions"] == [16, 20]
    for split in ("train", "val"):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
    assert data_section(str(tmp_path / "images")) == {
        "name": "image_folder", "train_dir": str((tmp_path / "images" / "train").resolve()),
        "val_dir": str((tmp_path / "images" / "val").resolve())}


@pytest.mark.parametrize(("given", "message"), [
    ("missing.npz", "file not found"),
    ("no_such_folder", "not a data file or folder"),
    ("bare", "needs train/<class>/ and val/<class>/"),
    ("plain.yaml", "holds no data section"),
])
def test_bad_data_is_a_recipe_error(tmp_path: Path, given: str, message: str) -> None:
    (tmp_path / "bare").mkdir()
    (tmp_path / "plain.yaml").write_text("batch_size: 3\n")
    with pytest.raises(RecipeError, match=message) as error:
        data_section(str(tmp_path / given))
    assert error.value.key == "pipeline.data"


def test_pair_data_is_refused_as_pipeline_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["pipeline", "recipes/quickstart.yaml", f"run_dir={tmp_path}",
                 "data={name: pairs, path: x.sqlite, space: {name: ofa_mbv3_cifar}}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pipeline.data.name" in err and "not image data" in err and "npz" in err
    assert main(["pipeline", "recipes/quickstart.yaml", f"run_dir={tmp_path}", "data=missing.npz"]) == 2
    err = capsys.readouterr().err
    assert "recipes/quickstart.yaml: pipeline.data: file not found (from the command line)" in err


@pytest.mark.slow  # the quickstart's seven stages at smoke size: about 1.5 min on 2 shared cores
def test_a_copied_quickstart_runs_on_the_users_npz_to_the_int8_network(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime
    import torch

    shutil.copy(REPO / "recipes" / "quickstart.yaml", tmp_path / "quickstart.yaml")  # outside the repository
    write_npz(tmp_path / "mine.npz")
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "quickstart.yaml", "--smoke", "data=mine.npz", "run_dir=runs"]) == 0

    runs = tmp_path / "runs"
    supernet = torch.load(runs / "ofa_supernet" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert supernet["hyper_parameters"]["space"]["num_classes"] == CLASSES
    from lightning_nas.predictors.pair_store import PairStore

    for kind in ("fp32", "quant"):
        pairs = PairStore(runs / f"pairs_{kind}" / "pairs.sqlite").pairs(kind=kind)
        assert pairs and {p.resolution for p in pairs} == {SIZE}
    top = json.loads((runs / "apq_int8" / "search" / "topk.json").read_text())["topk"][0]
    assert top["config"]["r"] == SIZE
    latency = json.loads((runs / "deploy_int8" / "latency.json").read_text())  # the pipeline's data, via the QAT run
    assert latency["input_shape"] == [3, SIZE, SIZE]
    session = onnxruntime.InferenceSession(str(runs / "deploy_int8" / "model_int8.onnx"),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, SIZE, SIZE), np.float32)})
    assert logits.shape == (1, CLASSES)


def test_a_copied_pipeline_takes_the_stages_beside_it_else_the_packaged_ones(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["cp", "quickstart", str(tmp_path)]) == 0
    (tmp_path / "pairs_fp32.yaml").write_text((REPO / "recipes" / "pairs_fp32.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    _, _, stages = plan(load_with_stage_overrides("quickstart.yaml", [], smoke=True))
    paths = {path.stem: path.resolve() for path, *_ in stages}
    assert paths["pairs_fp32"] == tmp_path / "pairs_fp32.yaml"  # the copy beside the pipeline wins
    assert paths["ofa_supernet"] == REPO / "recipes" / "ofa_supernet.yaml"
    assert paths["qat_finetune"] == REPO / "recipes" / "qat_finetune.yaml"
    assert paths["deploy_int8"] == REPO / "recipes" / "deploy_int8.yaml" and len(paths) == 7
