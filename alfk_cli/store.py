"""The HDF5 feature store, schema version 1 (docs/design.md "The feature store").

One file per embedded image set:

==========================  =====================  ============================================
node                        shape, type            meaning
==========================  =====================  ============================================
attrs ``schema_version``    int64 scalar = 1
attrs ``alfk_version``,     UTF-8 str              provenance
``created``, ``image_root``,
``arch``, ``checkpoint_sha256``, ``pseudo_label``
attrs ``taps``              UTF-8 str array        tapped layer names, in order
attrs ``scale_dims``        int64 array            length of each scale; they sum to L
``paths``                   [N] UTF-8 str          relative to ``image_root``, POSIX separators
``labels``                  [N] int64              class index from the sub-folder, −1 unknown
``classes``                 [D] UTF-8 str          class names
``z``, ``g``                [N, L] float32         raw pooled features / Fisher scores
``logits``                  [N, D] float32         model outputs
``pseudo``                  [N] int64              the label g was computed with
==========================  =====================  ============================================

Extra nodes (allowed by the schema): ``size`` and ``mtime_ns`` ([N] int64, each image's file size
and modification time, for incremental reuse), attrs ``seed``, ``embed_config`` (JSON of what
determined the contents), ``config_fingerprint`` (hash of that config) and ``fingerprint`` (hash
of the config and the image list).

Writing is atomic and resumable. The writer works on ``atomic.partial_path(out)``
(``.NAME.partial`` beside ``out``) and renames it into place only when every row is written. The
partial file carries the ``fingerprint`` and a per-row ``_done`` mask (with its count in the
attribute ``rows_done``), updated only after the rows themselves are written and flushed; a re-run
with the same fingerprint continues where the last one stopped, a partial with any other
fingerprint (or one HDF5 cannot open) is deleted and started over. ``_done`` and ``rows_done``
are removed before the rename, so a complete store never has them.

Compression, measured through this writer (z, g and logits written batch by batch with a flush
each, then read back whole; size relative to the raw float32 bytes) on 10,000 MNIST test images
through a LeNet trained to 94% (L80, batches of 256) and 3,072 of them through ResNet-10 (L768,
batches of 128), 2 CPU cores:

=========  ===========  ===========  ==================  ==================
filter     LeNet L80    ResNet-10    write (ResNet-10)   read (ResNet-10)
=========  ===========  ===========  ==================  ==================
none       1.00         1.00         340 MB/s            2.9 GB/s
lzf        0.89         0.88         105 MB/s            680 MB/s
gzip (4)   0.82         0.80          36 MB/s            260 MB/s
=========  ===========  ===========  ==================  ==================

(gzip with the shuffle filter: 0.76–0.77; gzip level 1: 0.78.) z is post-ReLU (about 40% exact
zeros), g and the logits are dense floats. We use **lzf**: 11–12% smaller at ~100 MB/s, fast
enough never to hold back a GPU run (ResNet-18 L768 makes ~6 KB of z and g per image; gzip at
~35 MB/s, single-threaded under h5py's lock, would take a large share of the main thread at a
few thousand images/s), and 2.6× faster than gzip to read back when ``alfk score`` loads a
whole store. Chunks are ``chunk_rows`` rows (the embedding batch size) × L, so the batches of a
fresh run fill whole chunks and a flush never rewrites a compressed chunk.

The reference checksum in a pool store's fingerprint is ``FeatureStore.data_sha256()`` (the
reference's checkpoint, taps, paths, labels, classes and z), not the file's bytes, so a validation
store rewritten with identical contents (e.g. by the orchestrator) does not invalidate pool stores.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from alfk_cli import __version__
from alfk_cli.atomic import check_writable_dir, commit, partial_path
from alfk_cli.errors import AlfkError
from alfk_cli.reproducible import created_stamp

SCHEMA_VERSION = 1
COMPRESSION = "lzf"
REQUIRED_ATTRS = (
    "schema_version",
    "alfk_version",
    "created",
    "image_root",
    "arch",
    "checkpoint_sha256",
    "pseudo_label",
    "taps",
    "scale_dims",
)
REQUIRED_NODES = ("paths", "labels", "classes", "z", "g", "logits", "pseudo")
# nodes with one row per image (the rest are per store)
ROW_NODES = ("paths", "labels", "size", "mtime_ns", "z", "g", "logits", "pseudo")
STR = h5py.string_dtype("utf-8")


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_fingerprint(config: dict) -> str:
    """Hash of everything but the image list that determines a store's contents."""
    return hashlib.sha256(_json(config).encode()).hexdigest()


def content_fingerprint(
    config: dict,
    paths: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray | None,
    mtime_ns: np.ndarray | None,
) -> str:
    """Hash of the config and the image list (paths, labels, file sizes and mtimes)."""
    h = hashlib.sha256(config_fingerprint(config).encode())
    sizes = np.full(len(paths), -1) if sizes is None else sizes
    mtime_ns = np.full(len(paths), -1) if mtime_ns is None else mtime_ns
    for p, lab, s, m in zip(paths, labels.tolist(), sizes.tolist(), mtime_ns.tolist()):
        h.update(f"\n{p}\0{lab}\0{s}\0{m}".encode())
    return h.hexdigest()


# --- writing -------------------------------------------------------------------------------------


@dataclass
class StoreHeader:
    """Everything known about a store before its rows are computed."""

    image_root: str
    arch: str
    checkpoint_sha256: str
    pseudo_label: str
    taps: Sequence[str]
    scale_dims: Sequence[int]
    classes: Sequence[str]
    paths: Sequence[str]
    labels: np.ndarray
    sizes: np.ndarray | None = None
    mtime_ns: np.ndarray | None = None
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(sum(self.scale_dims))


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted rows -> [(offset in rows, first row, count)] of contiguous runs."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends)]


class StoreWriter:
    """Writes one store into its ``.partial`` file; ``finish()`` renames it into place.

    Use ``StoreWriter.open``. ``done`` is the per-row mask of rows already written (non-empty
    when a previous run with the same fingerprint was interrupted).
    """

    def __init__(self, file: h5py.File, tmp: Path, out: Path, done: np.ndarray, resumed: int):
        self.file, self.tmp, self.out = file, tmp, out
        self.done = done
        self.resumed = resumed

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        out: str | os.PathLike,
        header: StoreHeader,
        fingerprint: str,
        chunk_rows: int = 256,
        compression: str | None = COMPRESSION,
    ) -> StoreWriter:
        out = Path(out)
        check_writable_dir(out)
        tmp = partial_path(out)
        if tmp.exists():
            resumed = cls._try_resume(tmp, out, header, fingerprint)
            if resumed is not None:
                return resumed
            tmp.unlink()
        per_row = 4 * (2 * header.dim + len(header.classes)) + 33  # z, g, logits, pseudo, stats
        names = sum(len(p.encode()) + 16 for p in header.paths)
        _check_free(out.parent, header.n * per_row + names, out, f"{header.n} images")
        f = h5py.File(tmp, "w")
        try:
            cls._create(f, header, fingerprint, chunk_rows, compression)
            f.flush()
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(f, tmp, out, np.zeros(header.n, dtype=bool), 0)

    @classmethod
    def _try_resume(
        cls, tmp: Path, out: Path, header: StoreHeader, fingerprint: str
    ) -> StoreWriter | None:
        try:
            f = h5py.File(tmp, "r+")
        except BlockingIOError:  # HDF5's file lock (errno EAGAIN/EWOULDBLOCK): another writer
            raise AlfkError(f"{tmp} is in use (another alfk embed writing {out}?)") from None
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in str(exc):
                raise AlfkError(f"{tmp} is in use (another alfk embed writing {out}?)") from None
            return None  # not HDF5, truncated, damaged: start over
        try:
            ok = (
                f.attrs.get("fingerprint") == fingerprint
                and "_done" in f
                and f["_done"].shape == (header.n,)
                and all(k in f for k in REQUIRED_NODES)
            )
            if ok:
                done = f["_done"][:].astype(bool)
                return cls(f, tmp, out, done, int(done.sum()))
        except Exception:
            pass
        f.close()
        return None

    @staticmethod
    def _create(
        f: h5py.File, h: StoreHeader, fingerprint: str, chunk_rows: int, compression: str | None
    ) -> None:
        n, dim, d = h.n, h.dim, len(h.classes)
        rows = max(1, min(int(chunk_rows), n)) if n else 1
        f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
        f.attrs["alfk_version"] = __version__
        f.attrs["created"] = ""
        f.attrs["image_root"] = str(h.image_root)
        f.attrs["arch"] = h.arch
        f.attrs["checkpoint_sha256"] = h.checkpoint_sha256
        f.attrs["pseudo_label"] = h.pseudo_label
        f.attrs.create("taps", data=_str_array(h.taps), dtype=STR)
        f.attrs["scale_dims"] = np.asarray(h.scale_dims, dtype=np.int64)
        for key, value in h.extra_attrs.items():
            f.attrs[key] = value
        f.attrs["fingerprint"] = fingerprint
        f.attrs["rows_done"] = np.int64(0)
        f.create_dataset("paths", data=_str_array(h.paths), dtype=STR)
        f.create_dataset("labels", data=np.asarray(h.labels, dtype=np.int64))
        f.create_dataset("classes", data=_str_array(h.classes), dtype=STR)
        if h.sizes is not None:
            f.create_dataset("size", data=np.asarray(h.sizes, dtype=np.int64))
        if h.mtime_ns is not None:
            f.create_dataset("mtime_ns", data=np.asarray(h.mtime_ns, dtype=np.int64))
        kw = {"compression": compression} if compression else {}
        f.create_dataset("z", shape=(n, dim), dtype=np.float32, chunks=(rows, max(dim, 1)), **kw)
        f.create_dataset("g", shape=(n, dim), dtype=np.float32, chunks=(rows, max(dim, 1)), **kw)
        f.create_dataset("logits", shape=(n, d), dtype=np.float32, chunks=(rows, max(d, 1)), **kw)
        f.create_dataset("pseudo", shape=(n,), dtype=np.int64, chunks=(rows,), fillvalue=-1)
        f.create_dataset("_done", shape=(n,), dtype=np.uint8, chunks=(rows,), fillvalue=0)

    # -- writing -----------------------------------------------------------------------------

    @property
    def rows_done(self) -> int:
        return int(self.done.sum())

    def check_space(self, rows: int) -> None:
        """AlfkError when writing ``rows`` more rows could fill the output's file system."""
        f = self.file
        per_row = 4 * (f["z"].shape[1] + f["g"].shape[1] + f["logits"].shape[1]) + 9
        _check_free(self.tmp.parent, rows * per_row, self.out, f"the next {rows} rows")

    def write_rows(
        self,
        rows: np.ndarray,
        z: np.ndarray,
        g: np.ndarray,
        logits: np.ndarray,
        pseudo: np.ndarray,
    ) -> None:
        """Write the rows (ascending indices), flush, then mark them done and flush again."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        self.check_space(len(rows))
        order = np.argsort(rows, kind="stable")
        if not np.array_equal(order, np.arange(len(rows))):
            rows, z, g, logits, pseudo = (
                rows[order],
                z[order],
                g[order],
                logits[order],
                pseudo[order],
            )
        runs = _runs(rows)
        f = self.file
        for name, values in (("z", z), ("g", g), ("logits", logits), ("pseudo", pseudo)):
            ds = f[name]
            for off, first, count in runs:
                ds[first : first + count] = values[off : off + count]
        f.flush()
        self.done[rows] = True
        for _off, first, count in runs:
            f["_done"][first : first + count] = 1
        f.attrs["rows_done"] = np.int64(self.rows_done)
        f.flush()

    def copy_rows(
        self, source: FeatureStore, src_rows: np.ndarray, dst_rows: np.ndarray, block: int = 4096
    ) -> None:
        """Copy z, g, logits and pseudo of ``source``'s ``src_rows`` into ``dst_rows``."""
        src_rows = np.asarray(src_rows, dtype=np.int64)
        dst_rows = np.asarray(dst_rows, dtype=np.int64)
        order = np.argsort(dst_rows, kind="stable")
        src_rows, dst_rows = src_rows[order], dst_rows[order]
        for s in range(0, len(dst_rows), block):
            src, dst = src_rows[s : s + block], dst_rows[s : s + block]
            got = [_read_rows(source.file[name], src) for name in ("z", "g", "logits", "pseudo")]
            self.write_rows(dst, *got)

    # -- finishing ---------------------------------------------------------------------------

    def finish(self, skipped: Sequence[tuple[int, str]] = ()) -> Path:
        """Check every row is written, drop the resume bookkeeping and rename into place.

        ``skipped``: (row, reason) of images that failed to decode. Their rows are left out of
        the final store (copied, without them, into a fresh file) and recorded as the nodes
        ``skipped_paths`` and ``skipped_reasons``, so an unchanged folder is still up to date and
        the listing can be repeated without decoding the files again."""
        drop = np.zeros(len(self.done), dtype=bool)
        for row, _ in skipped:
            drop[int(row)] = True
        if not (self.done | drop).all():
            missing = int((~(self.done | drop)).sum())
            raise RuntimeError(f"{missing} rows of {self.out} were never written")
        f = self.file
        f.attrs["created"] = created_stamp()  # no wall-clock time: equal runs, equal bytes
        del f["_done"]
        del f.attrs["rows_done"]
        paths = f["paths"].asstr()[:] if drop.any() else []
        for name, values in (
            ("skipped_paths", [paths[r] for r, _ in skipped]),
            ("skipped_reasons", [reason for _, reason in skipped]),
        ):
            if name in f:
                del f[name]
            if len(values):
                f.create_dataset(name, data=_str_array(values), dtype=STR)
        f.flush()
        if drop.any():
            self._write_without(np.flatnonzero(~drop))
            f.close()
            self.tmp.unlink()
        else:
            f.close()
            commit(self.tmp, self.out)
        return self.out

    def _write_without(self, keep: np.ndarray, block: int = 4096) -> None:
        """Commit a copy of the partial file holding only the rows ``keep`` (every per-row node)."""
        src = self.file
        tmp = self.tmp.with_name(self.tmp.name.replace(".partial", ".compact.partial"))
        try:
            with h5py.File(tmp, "w") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for name, ds in src.items():
                    if name not in ROW_NODES:
                        src.copy(ds, dst, name=name)
                        continue
                    kw = {"compression": ds.compression} if ds.compression else {}
                    if ds.chunks:
                        kw["chunks"] = (max(1, min(ds.chunks[0], len(keep))), *ds.chunks[1:])
                    out = dst.create_dataset(
                        name, shape=(len(keep), *ds.shape[1:]), dtype=ds.dtype, **kw
                    )
                    for s in range(0, len(keep), block):
                        out[s : s + block] = _read_rows(ds, keep[s : s + block])
            commit(tmp, self.out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Close without finishing: the partial file stays for the next run to resume."""
        if self.file.id.valid:
            self.file.close()

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


#: Free space kept on an output's file system: HDF5 cannot recover from a failed write (its clean-up
#: after ENOSPC crashes the process), so alfk stops before the disk is full, with one line.
RESERVE_BYTES = 4 << 20


def _check_free(folder: Path, need: int, out: Path, what: str) -> None:
    free = shutil.disk_usage(folder).free
    need += RESERVE_BYTES
    if free < need:
        raise AlfkError(
            f"no space left on device writing {out}: {free / 2**20:.1f} MiB free, about "
            f"{need / 2**20:.1f} MiB needed for {what}; free some space and re-run (it resumes)"
        )


def _read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """ds[rows] for any row order (h5py wants strictly increasing fancy indices)."""
    if len(rows) == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 4 * len(rows):  # dense enough: one slab read
        return ds[lo:hi][rows - lo]
    uniq, inverse = np.unique(rows, return_inverse=True)
    return ds[uniq][inverse]


# --- reading -------------------------------------------------------------------------------------


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
        if self._paths is None:
            self._paths = [str(p) for p in self.file["paths"].asstr()[:]]
        return self._paths

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
            _json([self.checkpoint_sha256, list(self.taps), self.classes, self.paths]).encode()
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


__all__ = [
    "COMPRESSION",
    "SCHEMA_VERSION",
    "FeatureStore",
    "StoreHeader",
    "StoreWriter",
    "check_compatible",
    "config_fingerprint",
    "content_fingerprint",
    "open_store",
]
