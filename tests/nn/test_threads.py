from __future__ import annotations

import pytest
import torch

from lightning_nas.nn.threads import torch_threads


def test_torch_threads_sets_and_restores_the_count_also_on_error() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other) as inside:
        assert inside == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None) as kept:
        assert kept == before == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads must be >= 1"), torch_threads(0):
        pass
    assert torch.get_num_threads() == before
