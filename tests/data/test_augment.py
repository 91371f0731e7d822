import pytest
import torch
import torch.nn.functional as F

from lightning_nas.data.augment import BatchCropFlip


def _crops(padded: torch.Tensor, size: int) -> list[torch.Tensor]:
    windows = []
    for dy in range(padded.shape[-2] - size + 1):
        for dx in range(padded.shape[-1] - size + 1):
            window = padded[:, dy:dy + size, dx:dx + size]
            windows += [window, window.flip(-1)]
    return windows


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_every_image_is_a_crop_of_its_padded_self(mode: str) -> None:
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    out = BatchCropFlip(2, mode, flip=True)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    padded = F.pad(images.float(), (2, 2, 2, 2), mode=mode).to(torch.uint8)
    for image, source in zip(out, padded):
        assert any(torch.equal(image, window) for window in _crops(source, 8))


def test_shifts_and_flips_vary_and_repeat_with_the_generator() -> None:
    images = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(200, 3, 1, 1)
    augment = BatchCropFlip(2, "reflect", flip=True)
    out = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    distinct = {tuple(image[0].flatten().tolist()) for image in out}
    assert len(distinct) > 30  # 25 shifts x 2 mirrors
    mirrored = sum(int(image[0, 4, 3]) > int(image[0, 4, 4]) for image in out)  # columns decrease
    assert 60 < mirrored < 140


def test_without_flip_columns_keep_their_order() -> None:
    images = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(50, 1, 1, 1)
    out = BatchCropFlip(2, "constant", flip=False)(images, torch.Generator().manual_seed(1))
    centre = out[:, 0, 4, 2:6].long()
    assert bool((centre.diff(dim=-1) >= 0).all())
