"""The command line: verbs, exit codes, messages without tracebacks, config printing, ls, sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lightning_nas.cli import list_recipes, main, recipe_verb

SUPERNET = "recipes/ofa_supernet.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_nas.cli", *args], capture_output=True, text=True)


def test_help_lists_every_verb() -> None:
    out = cli("--help").stdout
    for verb in ("fit", "search", "export", "sweep", "config", "ls", "profile"):
        assert verb in out
    assert "--smoke" in cli("fit", "--help").stdout


def test_config_prints_resolved_recipe_with_override() -> None:
    result = cli("config", SUPERNET, "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["trainer"]["max_epochs"] == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainr.max_epochs=3", ["trainr", "did you mean 'trainer'?", SUPERNET]),
        ("trainer.max_epochs=abc", ["trainer.max_epochs", "'abc'", "int"]),
        ("data.root=/no/such/dir", ["data.root", "directory not found", "/no/such/dir"]),
    ],
)
def test_bad_recipes_exit_2_fast_without_traceback(override: str, expected: list[str]) -> None:
    started = time.perf_counter()
    result = cli("fit", SUPERNET, "data.name=cifar10", override) if override.startswith("data.root") \
        else cli("fit", SUPERNET, override)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    assert elapsed < 2.0


def test_ls_lists_every_recipe_with_description() -> None:
    rows = list_recipes("recipes")
    assert {Path(name).name for name, _, _ in rows} == {p.name for p in Path("recipes").glob("*.yaml")}
    assert all(description and not description.startswith("(") for _, _, description in rows)
    assert SUPERNET in cli("ls", "recipes").stdout


def test_ls_lists_the_packaged_recipes_by_name_from_any_directory(tmp_path: Path) -> None:
    rows = list_recipes()
    assert [name for name, _, _ in rows] == sorted(p.stem for p in Path("recipes").glob("*.yaml"))
    assert ("ofa_supernet", "fit") in {(name, verb) for name, verb, _ in rows}
    result = subprocess.run([sys.executable, "-m", "lightning_nas.cli", "ls"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# packaged recipes") and "lightning-nas cp NAME DEST" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [name for name, _, _ in rows]


def test_cp_copies_a_packaged_recipe_that_then_runs_from_its_new_place(tmp_path: Path, capsys) -> None:
    assert main(["cp", "ofa_supernet", str(tmp_path / "mine") + "/"]) == 0  # a new directory
    copy = tmp_path / "mine" / "ofa_supernet.yaml"
    assert copy.read_bytes() == Path("recipes/ofa_supernet.yaml").read_bytes()
    assert str(copy) in capsys.readouterr().out
    assert main(["cp", "quickstart", str(tmp_path / "mine" / "flow")]) == 0  # the suffix is added
    assert (tmp_path / "mine" / "flow.yaml").read_bytes() == Path("recipes/quickstart.yaml").read_bytes()
    assert main(["cp", "fragments/cifar10_space", str(tmp_path / "mine")]) == 0  # an existing directory
    assert (tmp_path / "mine" / "cifar10_space.yaml").is_file()
    assert main(["cp", "progressive_shrinking", str(tmp_path / "ps.yaml")]) == 0  # a callback preset
    assert (tmp_path / "ps.yaml").read_bytes() == Path("callbacks/progressive_shrinking.yaml").read_bytes()
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["cifar10_space.yaml", "flow.yaml",
                                                                    "ofa_supernet.yaml"]  # no partial file
    capsys.readouterr()
    assert main(["config", str(copy), "trainer.max_epochs=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_epochs"] == 2


def test_cp_never_overwrites_and_names_unknown_recipes(tmp_path: Path, capsys) -> None:
    target = tmp_path / "x.yaml"
    target.write_text("mine: true\n")
    assert main(["cp", "ofa_supernet", str(target)]) == 2
    assert "never overwritten" in capsys.readouterr().err and target.read_text() == "mine: true\n"
    assert main(["cp", "ofa_supernt", str(tmp_path / "y.yaml")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'ofa_supernet'?" in err and "Traceback" not in err
    assert not (tmp_path / "y.yaml").exists()


def test_a_recipe_name_runs_like_its_path(capsys) -> None:
    assert main(["config", "ofa_supernet", "trainer.max_epochs=3"]) == 0
    by_name = yaml.safe_load(capsys.readouterr().out)
    assert main(["config", SUPERNET, "trainer.max_epochs=3"]) == 0
    assert by_name == yaml.safe_load(capsys.readouterr().out)
    assert main(["fit", "ofa_supernt", "--smoke"]) == 2
    assert "did you mean 'ofa_supernet'?" in capsys.readouterr().err


def test_recipe_verb_from_sections() -> None:
    assert recipe_verb({"task": {}}) == "fit"
    assert recipe_verb({"search": {}}) == "search"
    assert recipe_verb({"export": {}}) == "export"
    assert recipe_verb({"profile": {}}) == "profile"
    assert recipe_verb({"spaceevo": {}}) == "search"  # SpaceEvo's search over spaces
    # a deploy: section alone is a target (every stage recipe may have one); naming a QAT subnet makes a deploy
    assert recipe_verb({"task": {}, "deploy": {"target": "auto"}}) == "fit"
    assert recipe_verb({"deploy": {"target": "auto", "qat_subnet": "runs/qat/qat_subnet.pt"}}) == "deploy"


def test_sweep_definition_runs_fit_with_flat_dotted_parameters(tmp_path: Path) -> None:
    out = tmp_path / "sweep.yaml"
    assert main(["sweep", "recipes/classify_timm.yaml", "--out", str(out)]) == 0
    definition = yaml.safe_load(out.read_text())
    assert definition["command"] == ["${env}", "lightning-nas", "fit", "recipes/classify_timm.yaml",
                                     "${args_no_hyphens}"]
    assert "task.lr" in definition["parameters"] and definition["method"] == "random"
    assert definition["metric"] == {"name": "val/acc", "goal": "maximize"}


def test_sweep_rejects_a_parameter_the_recipe_does_not_have(tmp_path: Path, capsys) -> None:
    code = main(["sweep", "recipes/classify_timm.yaml", "--out", str(tmp_path / "s.yaml"),
                 "sweep.parameters={task.lrr: {values: [0.1]}}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sweep.parameters.task.lrr" in err and "did you mean 'lr'" in err


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_when_idle_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch, given: str | None,
                                                             expected: str) -> None:
    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    assert main(["ls"]) == 0
    import os

    assert os.environ["OMP_WAIT_POLICY"] == expected
