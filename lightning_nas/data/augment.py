"""Training augmentation on whole uint8 batches: one gather per batch, no Python per-image work."""

from __future__ import annotations

import torch


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside ``[0, size)`` mirrored back inside, without repeating the edge pixel."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class BatchCropFlip:
    """Random crop of a padded image and optional horizontal flip, on an NCHW uint8 batch.

    The same draw as torchvision's ``RandomCrop(size, padding, padding_mode)`` followed by
    ``RandomHorizontalFlip``, done as one advanced-indexing gather: every image gets its own shift
    in ``[-padding, padding]`` per axis and, with ``flip``, a coin for mirroring.
    """

    def __init__(self, padding: int, padding_mode: str = "reflect", flip: bool = True) -> None:
        if padding_mode not in ("reflect", "constant"):
            raise ValueError(f"padding_mode must be 'reflect' or 'constant', got {padding_mode!r}")
        self.padding = int(padding)
        self.padding_mode = padding_mode
        self.flip = flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        shifts = torch.randint(-self.padding, self.padding + 1, (2, batch, 1), generator=generator)
        rows = torch.arange(height).view(1, -1) + shifts[0]
        cols = torch.arange(width).view(1, -1) + shifts[1]
        if self.flip:
            mirrored = torch.rand(batch, generator=generator) < 0.5
            cols = torch.where(mirrored.view(-1, 1), cols.flip(-1), cols)
        if self.padding_mode == "reflect":
            rows, cols = _reflect(rows, height), _reflect(cols, width)
            outside = None
        else:
            outside = (rows < 0) | (rows >= height)
            outside = outside.view(batch, -1, 1) | ((cols < 0) | (cols >= width)).view(batch, 1, -1)
            rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        picked = images[torch.arange(batch).view(-1, 1, 1), :, rows.view(batch, -1, 1), cols.view(batch, 1, -1)]
        if outside is not None:
            picked = picked.masked_fill(outside.unsqueeze(-1), 0)
        # advanced indexing put the channel axis last
        return picked.permute(0, 3, 1, 2).contiguous()
