"""What the Fisher-kernel selection reads, and its checks: the validation and pool descriptor
sets (``acquisition.Descriptors``, a feature store or a dict), the rows left out, P.

Each input is checked before any search, and a bad one is an ``AlfkError`` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.features.standardize import check_dims

__all__ = [
    "DescriptorSource",
    "Exclude",
    "ValidationSource",
    "checked_descriptors",
    "field_of",
    "keep_mask",
    "positive_int",
]


class DescriptorSource(Protocol):
    """What ``acquisition.select`` reads of an embedded image set: ``z`` and ``g`` ``[N, L]`` (arrays, or
    h5py datasets read in chunks: h5py has no type stubs, hence ``Any``) and the scale widths.
    ``acquisition.Descriptors`` and ``store.reader.FeatureStore`` are two; so is a dict with those
    keys."""

    @property
    def z(self) -> Any: ...

    @property
    def g(self) -> Any: ...

    @property
    def scale_dims(self) -> Sequence[int]: ...


class ValidationSource(DescriptorSource, Protocol):
    """The validation set's descriptors, with the logits and true labels the centres come from."""

    @property
    def logits(self) -> Any: ...

    @property
    def labels(self) -> Any: ...


#: The rows left out of the search: a boolean mask over the pool, or pool row indices.
Exclude = np.ndarray | Sequence[int] | None


def field_of(obj: Any, name: str) -> Any:
    """``obj[name]`` of a mapping, else ``obj.name`` (None when missing)."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def positive_int(value: Any, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError) as exc:
        raise AlfkError(f"{name} must be a positive integer, got {value!r}") from exc
    if v != value or v < 1:
        raise AlfkError(f"{name} must be a positive integer, got {value!r}")
    return v


def keep_mask(exclude: Exclude, n: int) -> np.ndarray | None:
    """Boolean mask of pool rows to search, or None when nothing is excluded."""
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.dtype == bool:
        if ex.shape != (n,):
            raise AlfkError(f"exclude mask has shape {ex.shape}, expected ({n},)")
        keep = ~ex
    else:
        ex = ex.reshape(-1)
        if ex.size == 0:
            return None
        if not np.issubdtype(ex.dtype, np.integer):
            raise AlfkError("exclude must be a boolean mask or an array of pool row indices")
        if ex.min() < 0 or ex.max() >= n:
            raise AlfkError(f"exclude holds row indices outside the pool [0, {n})")
        keep = np.ones(n, dtype=bool)
        keep[ex] = False
    return None if keep.all() else keep


def matrix(x: Any, name: str, who: str) -> Any:
    if x is None:
        raise AlfkError(f"the {who} descriptors have no {name!r}")
    if len(getattr(x, "shape", ())) != 2:
        raise AlfkError(f"the {who} {name!r} must be 2-D, got shape {getattr(x, 'shape', None)}")
    return x


def checked_descriptors(
    val: ValidationSource | Mapping[str, Any], pool: DescriptorSource | Mapping[str, Any]
) -> tuple[Any, Any, Any, Any, Sequence[int]]:
    """The validation and pool z and g, and the scale widths, checked to agree."""
    vz = matrix(field_of(val, "z"), "z", "validation")
    vg = matrix(field_of(val, "g"), "g", "validation")
    pz = matrix(field_of(pool, "z"), "z", "pool")
    pg = matrix(field_of(pool, "g"), "g", "pool")
    width = vz.shape[1]
    dims = check_dims(field_of(val, "scale_dims"), width)
    pool_dims = field_of(pool, "scale_dims")
    if pool_dims is not None and check_dims(pool_dims, pz.shape[1]) != dims:
        raise AlfkError(
            f"validation scale_dims {list(dims)} and pool scale_dims {list(pool_dims)} differ"
        )
    if vg.shape != vz.shape or pg.shape != pz.shape or pz.shape[1] != width:
        raise AlfkError(
            f"shape mismatch: validation z {vz.shape}, g {vg.shape}; pool z {pz.shape}, "
            f"g {pg.shape}"
        )
    return vz, vg, pz, pg, dims
