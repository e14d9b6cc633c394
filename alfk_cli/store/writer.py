"""Writing feature stores: atomic, resumable, and stopping before the disk is full."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from alfk_cli import __version__
from alfk_cli.errors import AlfkError
from alfk_cli.store.format import (
    COMPRESSION,
    REQUIRED_NODES,
    ROW_NODES,
    SCHEMA_VERSION,
    STR,
    str_array,
)
from alfk_cli.store.reader import FeatureStore, read_rows
from alfk_cli.util.atomic import check_writable_dir, commit, partial_path
from alfk_cli.util.reproducible import created_stamp


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
        check_free(out.parent, header.n * per_row + names, out, f"{header.n} images")
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
        f.attrs.create("taps", data=str_array(h.taps), dtype=STR)
        f.attrs["scale_dims"] = np.asarray(h.scale_dims, dtype=np.int64)
        for key, value in h.extra_attrs.items():
            f.attrs[key] = value
        f.attrs["fingerprint"] = fingerprint
        f.attrs["rows_done"] = np.int64(0)
        f.create_dataset("paths", data=str_array(h.paths), dtype=STR)
        f.create_dataset("labels", data=np.asarray(h.labels, dtype=np.int64))
        f.create_dataset("classes", data=str_array(h.classes), dtype=STR)
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
        check_free(self.tmp.parent, rows * per_row, self.out, f"the next {rows} rows")

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
            got = [read_rows(source.file[name], src) for name in ("z", "g", "logits", "pseudo")]
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
                f.create_dataset(name, data=str_array(values), dtype=STR)
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
                        out[s : s + block] = read_rows(ds, keep[s : s + block])
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


def check_free(folder: Path, need: int, out: Path, what: str) -> None:
    """AlfkError when ``need`` bytes (plus ``RESERVE_BYTES``) for ``what`` do not fit in ``folder``."""
    free = shutil.disk_usage(folder).free
    need += RESERVE_BYTES
    if free < need:
        raise AlfkError(
            f"no space left on device writing {out}: {free / 2**20:.1f} MiB free, about "
            f"{need / 2**20:.1f} MiB needed for {what}; free some space and re-run (it resumes)"
        )


__all__ = ["RESERVE_BYTES", "StoreHeader", "StoreWriter", "check_free"]
