"""What earlier runs left that an embed can use instead of recomputing it.

- ``trusted_files``: images that decoded before (a scan need not verify them again);
- ``up_to_date``: a complete store with this exact fingerprint: nothing to do;
- ``reusable_rows``: rows of a previous complete store (``reuse``) whose image is unchanged;
- ``set_aside_partial`` / ``resume_rows``: an interrupted run's partial file made with the same
  options but for another image list, whose finished rows are copied for unchanged images.

An image counts as unchanged when its relative path, file size and mtime are equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.store.reader import FeatureStore, check_label_range, open_store
from alfk_cli.store.writer import StoreHeader, StoreWriter
from alfk_cli.util.atomic import partial_path


def trusted_files(*stores: str | os.PathLike | None) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every image in existing complete stores: files that decoded before."""
    trusted: dict[str, tuple[int, int]] = {}
    for path in stores:
        if path is None or not Path(path).is_file():
            continue
        try:
            with open_store(path) as st:
                if "size" in st.file and "mtime_ns" in st.file:
                    trusted.update(
                        zip(
                            st.paths,
                            zip(st.file["size"][:].tolist(), st.file["mtime_ns"][:].tolist()),
                        )
                    )
        except AlfkError:
            continue
    return trusted


def up_to_date(
    out: Path, fingerprint: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """(pseudo-labels, labels, images that failed to decode) stored in ``out`` when it is a
    complete store with this exact fingerprint, else None."""
    if not out.is_file():
        return None
    try:
        with open_store(out) as existing:
            if existing.get_attr("fingerprint") != fingerprint:
                return None
            check_label_range(existing)  # a crafted or damaged store is embedded again
            f = existing.file
            failed = []
            if "skipped_paths" in f:
                failed = list(
                    zip(f["skipped_paths"].asstr()[:].tolist(), f["skipped_reasons"].asstr()[:])
                )
            return existing.pseudo[:], existing.labels[:], failed
    except AlfkError:
        return None


def reusable_rows(
    reuse: Path | None,
    cfg_fp: str,
    header: StoreHeader,
    done: np.ndarray,
    notes: list[str],
) -> tuple[FeatureStore | None, np.ndarray, np.ndarray]:
    """(store, source rows, destination rows) of images unchanged since the ``reuse`` store."""
    empty = np.empty(0, dtype=np.int64)
    if reuse is None:
        return None, empty, empty
    if not reuse.exists():  # a first run: nothing to say
        return None, empty, empty
    try:
        prev = open_store(reuse)
    except AlfkError as exc:
        notes.append(f"nothing reused: {exc}")
        return None, empty, empty
    try:
        check_label_range(prev)  # its rows would carry the bad labels into the new store
    except AlfkError as exc:
        prev.close()
        notes.append(f"nothing reused: {exc}")
        return None, empty, empty
    if (
        prev.get_attr("config_fingerprint") != cfg_fp
        or "size" not in prev.file
        or "mtime_ns" not in prev.file
    ):
        notes.append(
            f"nothing reused: {reuse} was made with other options, checkpoint or reference"
        )
        prev.close()
        return None, empty, empty
    where = {p: i for i, p in enumerate(prev.paths)}
    p_size, p_mtime = prev.file["size"][:], prev.file["mtime_ns"][:]
    sizes, mtimes = header.sizes, header.mtime_ns
    assert sizes is not None and mtimes is not None, "an embed header carries file stats"
    src, dst = [], []
    for i, path in enumerate(header.paths):
        j = where.get(path)
        if j is not None and not done[i] and p_size[j] == sizes[i] and p_mtime[j] == mtimes[i]:
            src.append(j)
            dst.append(i)
    if not dst:
        prev.close()
        return None, empty, empty
    return prev, np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def set_aside_partial(out: Path, fingerprint: str, cfg_fp: str) -> Path | None:
    """An interrupted run's partial file made with the same options but another image list (the
    folder changed before the re-run): renamed aside, so the new run copies its finished rows
    for the images that are unchanged instead of recomputing them. None when there is none."""
    tmp = partial_path(out)
    try:
        with h5py.File(tmp, "r") as f:
            usable = (
                f.attrs.get("fingerprint") != fingerprint
                and f.attrs.get("config_fingerprint") == cfg_fp
                and all(k in f for k in ("_done", "paths", "size", "mtime_ns", "z", "g"))
            )
    except OSError:  # none, locked by a running embed (StoreWriter.open says so), or damaged
        return None
    if not usable:
        return None
    aside = tmp.with_name(tmp.name.replace(".partial", ".earlier.partial"))
    os.replace(tmp, aside)
    return aside


def resume_rows(earlier: Path | None, writer: StoreWriter, header: StoreHeader) -> int:
    """Copy the finished rows of ``earlier`` (see ``set_aside_partial``) whose image has the
    same relative path, size and mtime into ``writer``; delete ``earlier``. Returns the count."""
    if earlier is None:
        return 0
    try:
        f = h5py.File(earlier, "r")
    except OSError:
        earlier.unlink(missing_ok=True)
        return 0
    try:
        done = f["_done"][:].astype(bool)
        old = {
            (p, int(sz), int(mt)): j
            for j, (p, sz, mt) in enumerate(
                zip(f["paths"].asstr()[:], f["size"][:], f["mtime_ns"][:])
            )
            if done[j]
        }
        sizes, mtimes = header.sizes, header.mtime_ns
        assert sizes is not None and mtimes is not None, "an embed header carries file stats"
        src, dst = [], []
        for i, key in enumerate(zip(header.paths, sizes.tolist(), mtimes.tolist())):
            j = old.get(key)
            if j is not None and not writer.done[i]:
                src.append(j)
                dst.append(i)
        if dst:
            writer.copy_rows(FeatureStore(earlier, f), np.asarray(src), np.asarray(dst))
    finally:
        f.close()
    earlier.unlink(missing_ok=True)
    return len(dst)


__all__ = ["resume_rows", "reusable_rows", "set_aside_partial", "trusted_files", "up_to_date"]
