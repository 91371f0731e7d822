"""Crash-safe files: atomic replacement, the run-directory lock, and a pause point for kill tests.

Every output of a stage is written to a temporary name in its own directory, flushed to disk and
renamed over the target (:func:`replacing`), so a process killed at any instant leaves either the
previous file or the new one, never half of one. A temporary left by a killed process is hidden
(``.<name>.<pid>.<random>.tmp``) and removed by the next write of the same file.

:class:`RunDirectoryLock` keeps two pipelines off one run directory. It is an advisory ``flock``
on ``<run_dir>/pipeline.lock``, which the kernel releases when its holder dies however it dies,
so a lock left by a killed pipeline is taken over by the next one; the file holds the holder's pid
for the message the second pipeline prints.

Pause point (for tests only): with ``LIGHTNING_NAS_PAUSE_AT=<point>`` (or ``<point>@<n>``: its
n-th pass, counting from 1) a process that reaches ``<point>`` creates the file named by
``LIGHTNING_NAS_PAUSE_FILE`` and sleeps, so that a test can SIGKILL it at a known place. The
points are ``replace:<file name>`` (a file is complete under its temporary name, not yet renamed).

Torch-free: imported by every layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RecipeError

PAUSE_AT_ENV = "LIGHTNING_NAS_PAUSE_AT"
PAUSE_FILE_ENV = "LIGHTNING_NAS_PAUSE_FILE"
LOCK_FILE = "pipeline.lock"
_passes: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Sleep here when a test asked for it (see the module docstring); a no-op otherwise."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != (int(nth) if nth else 1):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n", encoding="utf-8")
    time.sleep(3600)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    for temporary in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temporary.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            temporary.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` on success,
    removed on an exception. Writers that infer a format from the suffix must be told the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        _fsync(temporary)
        pause_point(f"replace:{path.name}")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], value: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n")


class RunDirectoryLock:
    """Exclusive use of a run directory by one pipeline (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "pipeline") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._descriptor: int | None = None

    def holder(self) -> int | None:
        try:
            text = self.path.read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return None
        return int(text[0]) if text and text[0].isdigit() else None

    def acquire(self) -> RunDirectoryLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = self.holder()
            raise RecipeError(
                f"another {self.what} is running in this run directory"
                + (f" (pid {holder})" if holder is not None else ""),
                key="run_dir", given=str(self.path.parent),
                allowed="wait for it to finish, or choose another run_dir") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        os.fsync(descriptor)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a log of lines; a line torn by a kill (no newline at the end) is dropped
    first, so the log never holds a broken line before a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as stream:
        size = stream.seek(0, os.SEEK_END)
        if size:
            stream.seek(max(0, size - 1))
            if stream.read(1) != b"\n":
                stream.seek(0)
                data = stream.read()
                stream.truncate(data.rfind(b"\n") + 1)
        stream.write(line.rstrip("\n").encode("utf-8") + b"\n")


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a hidden ``.<name>.lock`` beside it) for a
    read-modify-write of the file by several processes; waits for the current holder."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def save_png(figure: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG at ``path`` (laid out, temporary name then rename), then closed."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)
    return Path(path)
