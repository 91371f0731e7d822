"""The package's one progress bar: on stderr, silent when disabled, fields rendered."""

from __future__ import annotations

import pytest

from lightning_nas.progress import progress_bar


def test_progress_bar_draws_label_count_and_fields_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("scoring", True, fields=["best {task.fields[best]}"]) as bar:
        task = bar.add_task("x", total=4, best="-")
        bar.update(task, advance=3, best="0.91")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "scoring" in captured.err and "3/4" in captured.err and "best 0.91" in captured.err


def test_disabled_progress_bar_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("scoring", False, fields=["{task.fields[note]}"]) as bar:
        task = bar.add_task("x", total=2, note="n")
        bar.update(task, advance=2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
