"""The object a ``torch.save`` file holds, read without importing torch; tensors are left out.

A checkpoint's metadata (architecture, classes, head, input size) decides whether the cached
stores are up to date, and importing torch costs seconds, so a run with nothing to compute reads
it here: the file is torch's zip archive (``<folder>/data.pkl`` plus one record per storage), and
the pickle is loaded with every tensor and storage replaced by a placeholder. Only what a state
dict is made of is accepted (``collections.OrderedDict``, torch's tensor rebuilders and storage
types); anything else, an old (non-zip) file or a damaged archive (every record's CRC is checked)
raises ``NotReadable``, and the caller asks torch instead. Nothing in the file is executed.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any

from alfk_cli.errors import AlfkError


class NotReadable(ValueError):
    """The bytes are not a ``torch.save`` archive this reader can take apart without torch."""


class Placeholder:
    """Stands for a torch object (a tensor, a storage and its type): any arguments, no data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return Placeholder()

    def __setstate__(self, state: Any) -> None:
        pass


def _allowed(module: str, name: str) -> bool:
    """The globals a pickled state dict refers to (what ``torch.load(weights_only=True)`` needs
    for tensors): tensor rebuilders and storage types."""
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    return module == "torch" and name.endswith("Storage")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if _allowed(module, name):
            return Placeholder
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def persistent_load(self, pid: Any) -> Any:
        return Placeholder()


def read_pickled(data: bytes) -> Any:
    """The object pickled in ``data`` (a ``torch.save`` file's bytes), tensors as placeholders.

    Raises :class:`NotReadable` for anything else (see the module docstring)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [
                n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")
            ]
            if len(pickles) != 1:
                raise NotReadable("not a torch.save archive")
            if archive.testzip() is not None:
                raise NotReadable("a damaged record")
            return _Unpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except NotReadable:
        raise
    except Exception as exc:  # a truncated or foreign file: whatever zipfile or pickle raised
        raise NotReadable(f"{type(exc).__name__}: {exc}") from None


def read_torch_file(path: str | os.PathLike) -> Any:
    """What a ``torch.save`` file holds, read with ``weights_only=True`` (never a pickled model)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled model, a truncated file, something else entirely
        raise AlfkError(
            f"cannot read {path} ({type(exc).__name__}): not an alfk checkpoint or a plain "
            "state dict; files are loaded with weights_only=True, so save "
            "model.state_dict() rather than the model"
        ) from None


__all__ = [
    "NotReadable",
    "Placeholder",
    "read_pickled",
    "read_torch_file",
]
