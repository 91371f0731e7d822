"""Read torch files (checkpoints, predictors, subnets) without running code from them.

``torch.load`` with ``weights_only=False`` unpickles arbitrary objects, and unpickling can call
any function: a shared checkpoint could run a shell command when it is opened. Every file this
package reads goes through :func:`load_torch_file`, which loads with ``weights_only=True``
(tensors, numbers, strings, lists, tuples, dicts). What used to be stored as Python objects (a
teacher network, an exported subnet) is stored as its config and state dict and rebuilt.

A file that only pickle can read (written by an older version, or holding objects) is refused
with a :class:`~lightning_nas.errors.RecipeError` that names the file and the recipe key
``allow_pickle: true``; a user who trusts the file sets it, and the file is then loaded with
pickle after a warning. The choice is process-wide (:func:`set_allow_pickle`), set by each stage
from its recipe.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import RecipeError

ALLOW_PICKLE_KEY = "allow_pickle"
_allow_pickle = False


def set_allow_pickle(allowed: bool) -> None:
    """Whether files that need pickle may be loaded (the recipe's ``allow_pickle``)."""
    global _allow_pickle
    _allow_pickle = bool(allowed)


def pickle_allowed() -> bool:
    return _allow_pickle


def _pickle_member(path: Path) -> bytes | None:
    """The pickle of a ``torch.save`` zip archive, or None when the file is not one."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError, KeyError):
        return None


def needs_pickle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a well-formed ``torch.save`` archive (its pickle parses; nothing is
    executed, :mod:`pickletools` only reads the opcodes). Used after a weights-only load failed, to
    tell a file that holds objects from one that is not a torch file at all."""
    data = _pickle_member(Path(path))
    if data is None:
        return False
    try:
        for _ in pickletools.genops(data):
            pass
    except (ValueError, EOFError, pickle.UnpicklingError):
        return False
    return True


def load_torch_file(path: str | os.PathLike[str], *, key: str | None, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with recipe errors for files that are
    missing, are not torch files, or need pickle (unless ``allow_pickle`` is set).

    ``key`` is the recipe key that named the file, ``what`` describes the file expected there.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError("file not found", key=key, given=str(path), allowed=what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the bytes make torch raise: the file decides, not the code
        if not (isinstance(error, pickle.UnpicklingError) and needs_pickle(path)):
            if zipfile.is_zipfile(path):
                first_line = (str(error).strip().splitlines() or [""])[0]
                reason = f"a damaged torch archive: {type(error).__name__}: {first_line[:120]}"
            else:
                reason = "not written by torch.save"
            raise RecipeError(f"cannot read it as a torch file ({reason})", key=key, given=str(path),
                              allowed=what) from None
    if not _allow_pickle:
        raise RecipeError(
            "this file holds Python objects, and loading it would run code from it (pickle); "
            "re-create it with this version, or set `allow_pickle: true` in the recipe if you trust "
            "where it came from",
            key=key, given=str(path), allowed=f"{what}, holding only tensors and plain data")
    warnings.warn(f"allow_pickle: loading {path} with pickle, which runs any code the file holds",
                  UserWarning, stacklevel=2)
    return torch.load(path, map_location="cpu", weights_only=False)


def require_mapping(saved: Any, keys: Iterable[str], *, path: str | os.PathLike[str], key: str | None,
                    what: str) -> Mapping[str, Any]:
    """``saved`` as a mapping holding ``keys``, or a recipe error saying which key is missing."""
    keys = list(keys)
    if not isinstance(saved, Mapping):
        raise RecipeError(f"expected {what}, found a file holding a {type(saved).__name__}", key=key,
                          given=str(path), allowed=f"a file with the keys {', '.join(keys)}")
    missing = [k for k in keys if k not in saved]
    if missing:
        raise RecipeError(f"expected {what}, but the file has no {missing[0]!r}", key=key, given=str(path),
                          allowed=f"a file with the keys {', '.join(keys)} (found: {', '.join(map(str, saved))})")
    return saved
