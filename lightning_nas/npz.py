"""Image arrays read from ``.npz`` files (``x`` uint8 NHWC, ``y`` int), checked, without torch.

At the bottom of the layers because both the data modules and the zero-cost statistics (in
``predictors``, below ``data``) read such files; errors name the file, the recipe key and the layout.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import RecipeError

NPZ_LAYOUT = "an .npz with x (uint8, N x H x W x C, C = 1 or 3) and y (integer class labels >= 0, N)"


def load_npz(path: str | Path, what: str | None = "data",
             num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and check ``x``/``y`` of an ``.npz`` file; errors name the file, the key and the layout.

    ``num_classes``, when known, bounds the labels.
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays.files]
            if missing:
                raise RecipeError(f"the .npz file has no array {missing[0]!r}", key=what, given=str(path),
                                  allowed=NPZ_LAYOUT)
            images, labels = arrays["x"], arrays["y"]
    except FileNotFoundError:
        raise RecipeError("file not found", key=what, given=str(path)) from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:  # numpy's answers to a file it cannot read
        raise RecipeError(f"cannot read it as an .npz file ({type(error).__name__}: {error})", key=what,
                          given=str(path), allowed=NPZ_LAYOUT) from None
    check_image_arrays(images, labels, path, what, num_classes)
    return images, labels.astype(np.int64)


def check_image_arrays(images: np.ndarray, labels: np.ndarray, path: str | Path, key: str | None,
                       num_classes: int | None = None) -> None:
    """Layout, dtype and label range of an image set, with the fix in the message."""
    def fail(message: str, given: object) -> None:
        raise RecipeError(f"{message} in {path}", key=key, given=given, allowed=NPZ_LAYOUT)

    if images.ndim != 4:
        fail(f"x must have 4 dimensions (N x H x W x C), found shape {images.shape}", images.shape)
    if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        fail(f"x is laid out N x C x H x W {images.shape}; store it channels-last "
             "(x.transpose(0, 2, 3, 1))", images.shape)
    if images.shape[3] not in (1, 3):
        fail(f"x must have 1 or 3 channels last, found shape {images.shape}", images.shape)
    if images.shape[1] != images.shape[2]:
        fail(f"x must hold square images, found {images.shape[1]} x {images.shape[2]}", images.shape)
    if images.dtype != np.uint8:
        fail(f"x must be uint8 (0..255), found {images.dtype}", str(images.dtype))
    if labels.ndim != 1 or len(labels) != len(images):
        fail(f"y must be one label per image: {len(images)} images, y has shape {labels.shape}", labels.shape)
    if not np.issubdtype(labels.dtype, np.integer):
        fail(f"y must hold integer class labels, found {labels.dtype}", str(labels.dtype))
    if len(labels) and labels.min() < 0:
        fail(f"y holds negative labels (smallest {int(labels.min())})", int(labels.min()))
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        fail(f"y holds label {int(labels.max())}, but there are {num_classes} classes (0..{num_classes - 1})",
             int(labels.max()))
