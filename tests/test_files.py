"""Crash-safe writes, the line log, the pause point and the run-directory lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lightning_nas.errors import RecipeError
from lightning_nas.files import (
    PAUSE_AT_ENV,
    PAUSE_FILE_ENV,
    RunDirectoryLock,
    append_line,
    locked,
    replacing,
    write_json,
    write_text,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(ZeroDivisionError), replacing(target) as temporary:
        temporary.write_text("{half", encoding="utf-8")
        1 / 0  # noqa: B018
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_write_killed_before_its_rename_leaves_the_old_file(tmp_path: Path) -> None:
    target, marker = tmp_path / "table.csv", tmp_path / "paused"
    write_text(target, "old\n")
    code = f"from lightning_nas.files import write_text; write_text({str(target)!r}, 'new\\n')"
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_AT_ENV: "replace:table.csv", PAUSE_FILE_ENV: str(marker)}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        for _ in range(600):
            if marker.exists() or process.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert marker.exists()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert target.read_text() == "old\n"
    stale = list(tmp_path.glob(".table.csv.*.tmp"))
    assert len(stale) == 1 and stale[0].read_text() == "new\n"  # complete, but never renamed
    write_text(target, "newer\n")  # the next write of the file removes the dead writer's temporary
    assert target.read_text() == "newer\n" and not list(tmp_path.glob("*.tmp")) + list(tmp_path.glob(".*.tmp"))


def test_temporaries_of_live_processes_are_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    mine = tmp_path / f".x.txt.{os.getppid()}.abcd.tmp"  # the parent (pytest's launcher) is alive
    mine.write_text("in progress")
    write_text(target, "done")
    assert mine.exists()


def test_append_line_drops_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_line(log, '{"a": 1}')
    with log.open("ab") as stream:
        stream.write(b'{"b": ')  # a kill in the middle of a write
    append_line(log, '{"c": 3}\n')
    assert log.read_text() == '{"a": 1}\n{"c": 3}\n'


def test_locked_serialises_read_modify_write(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    code = ("import sys; from pathlib import Path; from lightning_nas.files import locked, write_text\n"
            "p = Path(sys.argv[1])\n"
            "for _ in range(100):\n"
            "    with locked(p):\n"
            "        write_text(p, str(int(p.read_text()) + 1))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", code, str(counter)], env=env) for _ in range(2)]
    assert [w.wait(120) for w in workers] == [0, 0]
    assert counter.read_text() == "200"
    with locked(counter):  # not held by anyone now
        pass


def test_run_directory_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with RunDirectoryLock(tmp_path) as lock:
        assert lock.holder() == os.getpid()
        with pytest.raises(RecipeError, match=f"pid {os.getpid()}"):
            RunDirectoryLock(tmp_path).acquire()  # a second open file description: refused
    RunDirectoryLock(tmp_path).acquire().release()
