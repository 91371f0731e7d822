"""Every verb that reads a torch file refuses one whose unpickling would run code: exit 2, a
message naming the key, the file and `allow_pickle`, and nothing created. Bad files of other
kinds (random bytes, another space) are refused the same way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED

from lightning_nas.cli import main
from lightning_nas.nn.safe_load import set_allow_pickle


@pytest.fixture(autouse=True)
def no_pickle():
    yield
    set_allow_pickle(False)


def verbs(evil: str, run_dir: Path, tmp_path: Path) -> dict[str, list[str]]:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "description": "one export stage reading the file",
        "run_dir": str(run_dir / "pipeline"),
        "pipeline": {"stages": [{"recipe": str(Path("recipes/ofa_export.yaml").resolve()),
                                 "overrides": [f"export.checkpoint={evil}"]}]},
    }))
    return {
        "fit ckpt_path": ["fit", "recipes/ofa_supernet.yaml", "--smoke", f"ckpt_path={evil}"],
        "fit task.init_checkpoint": ["fit", "recipes/pairs_fp32.yaml", "--smoke", f"task.init_checkpoint={evil}"],
        "export": ["export", "recipes/ofa_export.yaml", f"export.checkpoint={evil}"],
        "search predictor": ["search", "recipes/apq_int8.yaml", "--smoke", f"search.predictor={evil}"],
        "qat supernet_checkpoint": ["fit", "recipes/qat_finetune.yaml", "--smoke",
                                    f"task.supernet_checkpoint={evil}"],
        "qat exported_subnet": ["fit", "recipes/qat_finetune.yaml", "--smoke", "~task.supernet_checkpoint",
                                "~task.subnet", f"task.exported_subnet={evil}"],
        "rank parzc": ["rank", "recipes/rank_nb201.yaml", f"rank.ranker={evil}", "rank.limit=2"],
        "pipeline": ["pipeline", str(pipeline)],
    }


@pytest.mark.parametrize("verb", ["fit ckpt_path", "fit task.init_checkpoint", "export", "search predictor",
                                  "qat supernet_checkpoint", "qat exported_subnet", "rank parzc", "pipeline"])
def test_a_file_that_runs_code_is_refused_by_every_verb(verb: str, tmp_path: Path, capsys, code_payload) -> None:
    if verb == "rank parzc" and not SHARED.is_dir():
        pytest.skip("recipes/rank_nb201.yaml reads ../shared/benchdata (beside the repository)")
    target = tmp_path / "created_by_unpickling"
    evil = code_payload(tmp_path / "evil.ckpt", target)
    run_dir = tmp_path / "run"
    argv = verbs(str(evil), run_dir, tmp_path)[verb]
    code = main([*argv, f"run_dir={run_dir}"] if verb != "pipeline" else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert not target.exists()
    assert str(evil) in err and "allow_pickle: true" in err and "Traceback" not in err


def test_allow_pickle_lets_a_trusted_old_file_through(tmp_path: Path, capsys, code_payload) -> None:
    # The same file with allow_pickle: it is unpickled (the payload runs), with a warning, and then
    # refused for what it is not (a supernet checkpoint), still with exit 2.
    target = tmp_path / "created_by_unpickling"
    evil = code_payload(tmp_path / "old.ckpt", target)
    with pytest.warns(UserWarning, match="allow_pickle"):
        code = main(["export", "recipes/ofa_export.yaml", f"export.checkpoint={evil}", "allow_pickle=true",
                     f"run_dir={tmp_path / 'run'}"])
    assert code == 2 and target.exists()
    assert "not a supernet checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["random", "list", "other_space"])
def test_bad_checkpoints_exit_2(content: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.ckpt"
    if content == "random":
        path.write_bytes(os.urandom(2048))
    elif content == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {"space": {"name": "ofa_mbv3", "num_classes": 1000}},
                    "epoch": 0, "global_step": 0}, path)
    code = main(["fit", "recipes/ofa_supernet.yaml", "--smoke", f"ckpt_path={path}", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "ckpt_path" in err and str(path) in err and "Traceback" not in err
    expected = {"random": "cannot read it as a torch file", "list": "found a file holding a list",
                "other_space": "trained on another space"}[content]
    assert expected in err
