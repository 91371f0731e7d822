"""A non-editable install runs the packaged recipes by name from a directory that holds nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

#: What the wheel is built from; copied so that no stale build/ of the checkout can leak into it.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "lightning_nas", "recipes", "callbacks")


@pytest.mark.slow  # a venv, a wheel build and a supernet smoke: about a minute on 2 shared cores
def test_an_installed_wheel_lists_and_runs_packaged_recipes_from_an_empty_directory(tmp_path: Path) -> None:
    # offline, the wheel is built with this environment's setuptools (pyproject.toml asks >= 68)
    pytest.importorskip("setuptools", minversion="70.1", reason="building a wheel offline needs setuptools here")
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist")], check=True)
    (wheel,) = (tmp_path / "dist").glob("lightning_nas-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment; a path in a .pth file does not run that
    # directory's own .pth files, so this environment's editable lightning_nas stays invisible.
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(python), "-c", "import lightning_nas.recipe.packaged as p; print(p.recipes_dir())")
    assert Path(where.stdout.strip()) == site / "lightning_nas" / "recipes", where.stderr
    listed = run(str(venv / "bin" / "lightning-nas"), "ls")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    # its fragments (fragments/cifar10_space, fragments/cifar10_data) and presets from the package
    config = run(str(venv / "bin" / "lightning-nas"), "config", "ofa_supernet_cifar10", "data.root=.")
    assert config.returncode == 0, config.stderr
    assert "name: ofa_mbv3_cifar\n" in config.stdout and "progressive_shrinking:" in config.stdout
    fit = run(str(venv / "bin" / "lightning-nas"), "fit", "ofa_supernet", "--smoke")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "run directory: runs/ofa_supernet" in fit.stdout
    assert (empty / "runs" / "ofa_supernet" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing else was needed or written here
