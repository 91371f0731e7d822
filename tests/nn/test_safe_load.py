"""Loading torch files without pickle: what is refused, what loads, and the allow_pickle escape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_nas.errors import RecipeError
from lightning_nas.nn.safe_load import load_torch_file, needs_pickle, require_mapping, set_allow_pickle


@pytest.fixture(autouse=True)
def no_pickle():
    set_allow_pickle(False)
    yield
    set_allow_pickle(False)


def test_plain_data_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "config": {"r": [24, 32]}, "name": "x"}, path)
    loaded = load_torch_file(path, key="k", what="a file")
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(3.0))
    assert loaded["config"] == {"r": [24, 32]}


def test_a_file_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path, code_payload) -> None:
    target = tmp_path / "created_by_unpickling"
    path = code_payload(tmp_path / "evil.ckpt", target)
    assert needs_pickle(path)
    with pytest.raises(RecipeError) as caught:
        load_torch_file(path, key="export.checkpoint", what="a supernet checkpoint")
    assert not target.exists()
    text = caught.value.render()
    assert "export.checkpoint" in text and str(path) in text and "allow_pickle: true" in text


def test_allow_pickle_loads_it_with_a_warning(tmp_path: Path, code_payload) -> None:
    # The payload is live: with pickle allowed, loading does create the file.
    target = tmp_path / "created_by_unpickling"
    path = code_payload(tmp_path / "trusted.ckpt", target)
    set_allow_pickle(True)
    with pytest.warns(UserWarning, match="allow_pickle: loading .* with pickle"):
        loaded = load_torch_file(path, key="ckpt_path", what="a checkpoint")
    assert target.exists() and loaded["epoch"] == 0


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello, this is a text file\n" * 20, b""],
                         ids=["random-bytes", "text", "empty"])
def test_files_that_are_not_torch_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    assert not needs_pickle(path)
    with pytest.raises(RecipeError, match="cannot read it as a torch file") as caught:
        load_torch_file(path, key="ckpt_path", what="a checkpoint")
    assert caught.value.key == "ckpt_path" and caught.value.given == str(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(RecipeError, match="cannot read it as a torch file"):
        load_torch_file(cut, key="k", what="a checkpoint")


def test_missing_file_and_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="file not found"):
        load_torch_file(tmp_path / "nope.pt", key="k", what="a checkpoint")
    with pytest.raises(RecipeError, match="found a file holding a list"):
        require_mapping([1, 2], ("state_dict",), path="x.pt", key="k", what="a checkpoint")
    with pytest.raises(RecipeError, match="the file has no 'state_dict'") as caught:
        require_mapping({"epoch": 1}, ("state_dict",), path="x.pt", key="k", what="a checkpoint")
    assert "found: epoch" in caught.value.render()
