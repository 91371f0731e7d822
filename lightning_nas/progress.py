"""One progress bar for every long loop of the package (rich, on stderr: stdout carries each
stage's report, so a piped report stays clean).

This module must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def progress_bar(label: str, enabled: bool, *, fields: Sequence[str] = (), elapsed: bool = True,
                 remaining: bool = True) -> Any:
    """A ``rich.progress.Progress`` showing ``label``, a bar, done/total, then each of ``fields``
    (rich format strings such as ``"best {task.fields[best]}"``) and the elapsed and remaining
    time; ``enabled=False`` gives the same object, silent."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(field) for field in fields]
    if elapsed:
        columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), refresh_per_second=2, disable=not enabled)
