"""The import-linter contracts of pyproject.toml: layers import downwards only, the core is torch-free.

Each check runs ``lint-imports`` in a subprocess, because the analysed package is found on the
import path: the copy in ``tmp_path`` must be the one analysed, not the package this process imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers import downwards only KEPT" in result.stdout
    assert "The core imports neither torch nor Lightning KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract", "edge"),
    [
        # An upward import inside a function (a lazy one) counts as much as one at the top.
        ("spaces/nb201.py", "import lightning_nas.cli", "Layers import downwards only",
         "lightning_nas.spaces.nb201 -> lightning_nas.cli"),
        ("nn/static.py", "from lightning_nas.tasks import supernet", "Layers import downwards only",
         "lightning_nas.nn.static -> lightning_nas.tasks.supernet"),
        ("recipe/loader.py", "import torch", "The core imports neither torch nor Lightning",
         "lightning_nas.recipe.loader -> torch"),
    ],
)
def test_an_added_import_breaks_a_contract(tmp_path: Path, module: str, statement: str, contract: str,
                                           edge: str) -> None:
    shutil.copytree(ROOT / "lightning_nas", tmp_path / "lightning_nas",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "lightning_nas" / module).open("a", encoding="utf-8") as file:
        file.write(f"\n\ndef _added_for_the_test() -> None:\n    {statement}\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract} BROKEN" in result.stdout
    assert edge in result.stdout
