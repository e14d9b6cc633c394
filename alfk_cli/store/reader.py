"""Reading feature stores: open one, check what it is, read its nodes (see ``store.format``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import h5py
import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.store.format import REQUIRED_ATTRS, REQUIRED_NODES, SCHEMA_VERSION, canonical_json


class FeatureStore:
    """A schema-1 store opened read-only. Datasets are h5py datasets (read lazily, slice them);
    the small metadata is decoded on first use. Close it (or use ``with``)."""

    def __init__(self, path: Path, file: h5py.File):
        self.path = path
        self.file = file
        self._paths: list[str] | None = None
        self._sha256: str | None = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __len__(self) -> int:
        return int(self.file["z"].shape[0])

    @property
    def attrs(self) -> h5py.AttributeManager:
        return self.file.attrs

    def _str_attr(self, key: str) -> str:
        v = self.file.attrs[key]
        return v.decode() if isinstance(v, bytes) else str(v)

    @property
    def schema_version(self) -> int:
        return int(self.file.attrs["schema_version"])

    @property
    def arch(self) -> str:
        return self._str_attr("arch")

    @property
    def checkpoint_sha256(self) -> str:
        return self._str_attr("checkpoint_sha256")

    @property
    def pseudo_label(self) -> str:
        return self._str_attr("pseudo_label")

    @property
    def image_root(self) -> str:
        return self._str_attr("image_root")

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(
            t.decode() if isinstance(t, bytes) else str(t) for t in self.file.attrs["taps"]
        )

    @property
    def scale_dims(self) -> list[int]:
        return [int(v) for v in self.file.attrs["scale_dims"]]

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.file["classes"].asstr()[:]]

    @property
    def paths(self) -> list[str]:
        """Every path, as a list (cached): ~200 B of memory per image while reading, ~90 B
        after; :meth:`path_view` reads them in blocks instead."""
        if self._paths is None:
            self._paths = [str(p) for p in self.file["paths"].asstr()[:]]
        return self._paths

    def path_view(self) -> StorePaths:
        """The paths as a sequence read from the file as it is used, a block at a time (the
        cached list when :attr:`paths` was already read): for passes over a big pool's paths."""
        return StorePaths(self.file["paths"], self._paths)

    @property
    def seed(self) -> int | None:
        return int(self.file.attrs["seed"]) if "seed" in self.file.attrs else None

    def get_attr(self, key: str, default: Any = None) -> Any:
        if key not in self.file.attrs:
            return default
        v = self.file.attrs[key]
        return v.decode() if isinstance(v, bytes) else v

    @property
    def labels(self) -> h5py.Dataset:
        return self.file["labels"]

    @property
    def z(self) -> h5py.Dataset:
        return self.file["z"]

    @property
    def g(self) -> h5py.Dataset:
        return self.file["g"]

    @property
    def logits(self) -> h5py.Dataset:
        return self.file["logits"]

    @property
    def pseudo(self) -> h5py.Dataset:
        return self.file["pseudo"]

    def data_sha256(self, block_rows: int = 65536) -> str:
        """Checksum of what a pool's p_yz labels depend on: checkpoint, taps, paths, labels,
        classes and z. Unlike ``sha256`` it ignores provenance such as ``created``, so a reference
        store rewritten with the same contents keeps its checksum (and pool caches stay valid)."""
        h = hashlib.sha256()
        h.update(
            canonical_json(
                [self.checkpoint_sha256, list(self.taps), self.classes, self.paths]
            ).encode()
        )
        h.update(np.ascontiguousarray(self.labels[()], dtype="<i8").tobytes())
        z = self.z
        for s in range(0, z.shape[0], block_rows):
            h.update(np.ascontiguousarray(z[s : s + block_rows], dtype="<f4").tobytes())
        return h.hexdigest()

    @property
    def sha256(self) -> str:
        """Checksum of the file's bytes (computed on first use)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256


class StorePaths(Sequence[str]):
    """A store's ``paths`` dataset as a read-only sequence of str that holds one block of rows
    at a time: iteration reads ``BLOCK`` rows per HDF5 read, ``at`` reads chosen rows."""

    #: Rows per read while iterating (~20 MiB of str objects).
    BLOCK = 1 << 18

    def __init__(self, ds: h5py.Dataset, cached: list[str] | None = None):
        self.ds, self.cached = ds, cached

    def __len__(self) -> int:
        return int(self.ds.shape[0])

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if self.cached is not None:
            return self.cached[i]
        if isinstance(i, slice):
            return [str(p) for p in self.ds.asstr()[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return str(self.ds.asstr()[i % len(self)])

    def __iter__(self) -> Iterator[str]:
        if self.cached is not None:
            yield from self.cached
            return
        for a in range(0, len(self), self.BLOCK):
            yield from self[a : a + self.BLOCK]

    def at(self, rows: np.ndarray) -> list[str]:
        """The paths of ``rows`` (any order, repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cached is not None:
            return [self.cached[r] for r in rows.tolist()]
        if rows.size == 0:
            return []
        uniq, inverse = np.unique(rows, return_inverse=True)
        got = self.ds.asstr()[uniq]  # h5py wants increasing indices
        return [str(got[j]) for j in inverse.tolist()]


def open_hdf5(path: Path, what: str) -> h5py.File:
    """Open ``path`` read-only; a one-line AlfkError naming ``what`` when it cannot be."""
    if not path.exists():
        raise AlfkError(f"{what} {path} does not exist")
    if not path.is_file():
        raise AlfkError(f"{what} {path} is not a file")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise AlfkError(f"{path} is not an HDF5 file (not an alfk {what})") from None


def open_store(path: str | os.PathLike) -> FeatureStore:
    """Open a complete schema-1 feature store read-only; AlfkError (one line) on anything else."""
    path = Path(path)
    f = open_hdf5(path, "feature store")
    try:
        if "schema_version" not in f.attrs:
            raise AlfkError(f"{path} is not an alfk feature store (no schema_version)")
        version = f.attrs["schema_version"]
        if isinstance(version, bytes):
            version = version.decode(errors="replace")
        if isinstance(version, np.generic):
            version = version.item()
        if (
            not isinstance(version, (int, np.integer))
            or isinstance(version, bool)
            or version != SCHEMA_VERSION
        ):
            raise AlfkError(
                f"{path} has feature-store schema version {version}; this alfk reads version {SCHEMA_VERSION}"
            )
        missing = [k for k in REQUIRED_ATTRS if k not in f.attrs] + [
            k for k in REQUIRED_NODES if k not in f
        ]
        if missing:
            raise AlfkError(f"{path} is not a complete alfk feature store (missing {missing[0]!r})")
        if "_done" in f:
            raise AlfkError(f"{path} is an unfinished feature store")
    except BaseException:
        f.close()
        raise
    return FeatureStore(path, f)


def check_compatible(val_store: FeatureStore, pool_store: FeatureStore) -> None:
    """A pool store and a validation store must come from the same checkpoint, taps and classes."""
    v, p = val_store, pool_store
    if v.checkpoint_sha256 != p.checkpoint_sha256:
        raise AlfkError(
            f"{p.path} and {v.path} were embedded with different checkpoints "
            f"(sha256 {p.checkpoint_sha256[:12]}… vs {v.checkpoint_sha256[:12]}…)"
        )
    if v.taps != p.taps:
        raise AlfkError(
            f"{p.path} and {v.path} were embedded with different taps ({','.join(p.taps)} vs {','.join(v.taps)})"
        )
    if v.classes != p.classes:
        raise AlfkError(
            f"{p.path} and {v.path} have different classes ({','.join(p.classes)} vs {','.join(v.classes)})"
        )


def check_label_range(store: FeatureStore) -> None:
    """A store's class indices must name its classes: ``labels`` in -1 (unlabelled) .. D-1 and
    ``pseudo`` (the label g was computed with) in 0 .. D-1. alfk never writes anything else, so a
    value out of range is a damaged or crafted file, refused in one line rather than scored."""
    n_classes = len(store.classes)
    for node, low in (("labels", -1), ("pseudo", 0)):
        values = np.asarray(store.file[node][:])
        bad = np.flatnonzero((values < low) | (values >= n_classes))
        if bad.size:
            row = int(bad[0])
            raise AlfkError(
                f"{store.path} is damaged: {node}[{row}] is {int(values[row])}, not a class index "
                f"({low}..{n_classes - 1}); embed the images again"
            )


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """ds[rows] for any row order (h5py wants strictly increasing fancy indices)."""
    if len(rows) == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 4 * len(rows):  # dense enough: one slab read
        return ds[lo:hi][rows - lo]
    uniq, inverse = np.unique(rows, return_inverse=True)
    return ds[uniq][inverse]


__all__ = [
    "FeatureStore",
    "StorePaths",
    "check_compatible",
    "check_label_range",
    "open_hdf5",
    "open_store",
    "read_rows",
]
