"""The one helper that sets torch's intra-op thread count for a block and restores it afterwards.

Latency figures are comparable only at a fixed thread count, and a timing that leaves the process
at another count changes every later computation; every place that sets the count for a while
(measurements, profilers, tests) goes through :func:`torch_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (``None``: keep the current count), then
    restore the count found on entry, also when the block raises. Yields the count in force."""
    if threads is None:
        yield torch.get_num_threads()
        return
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(before)
