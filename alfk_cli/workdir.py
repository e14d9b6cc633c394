"""The orchestrator's work folder: where it is, its lock, and what it holds."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alfk_cli.errors import AlfkError


def default_workdir(pool: str | os.PathLike) -> Path:
    """``.alfk/<pool name>/`` beside the pool folder (docs/design.md), one sub-folder per pool so two
    pools with the same parent never share caches."""
    pool = Path(pool).resolve()
    return pool.parent / ".alfk" / pool.name


_HELD: set[str] = set()  # work folders locked by this process (POSIX locks do not see those)


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` for one acquisition; a second one fails at once.

    A POSIX record lock (``lockf``), not ``flock``: the kernel drops it the moment its process
    dies, and fork()ed children (DataLoader workers) do not inherit it, so a ``kill -9`` of select
    never leaves the folder locked by orphaned workers for the seconds they take to notice.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "lock"
    key = str(path.resolve())
    fh = open(path, "a+")  # noqa: SIM115 -- held open for the lock's lifetime
    try:
        if key in _HELD:
            raise BlockingIOError
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if not isinstance(exc, BlockingIOError) and exc.errno not in (errno.EACCES, errno.EAGAIN):
            fh.close()
            raise
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise AlfkError(
            f"another alfk select is running in {workdir} ({who}); wait for it or give another work folder"
        ) from None
    _HELD.add(key)
    try:
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
        except OSError as exc:  # a full disk: say which file
            raise AlfkError(f"cannot write the lock file {path}: {exc.strerror}") from None
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):  # a full disk already reported
            fh.close()  # releases the lock


def lock_holder(workdir: Path) -> str | None:
    """``alfk select (pid N)`` when another process holds ``workdir``'s lock, else None.

    Probed with a shared lock on a new descriptor, never where this process holds the lock:
    closing any descriptor of the file would drop that lock (POSIX record locks)."""
    path = workdir / "lock"
    if str(path.resolve()) in _HELD or not path.is_file():
        return None
    try:
        with open(path) as fh:
            try:
                fcntl.lockf(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    return None
                return f"alfk select ({fh.read().strip() or 'another process'})"
    except OSError:
        return None
    return None


def newest_checkpoint(workdir: Path) -> Path | None:
    """The most recently written ``*.pt`` in the work folder, if any."""
    found = [p for p in workdir.glob("*.pt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


@dataclass
class Exclusions:
    """Pool rows named by an exclusion list, and how many of its lines named no pool image."""

    rows: list[int]
    unmatched: int


def match_exclusions(
    path: str | os.PathLike, pool_root: str | os.PathLike, pool_paths: Sequence[str]
) -> Exclusions:
    """Pool rows named in ``path``: one image per line (as printed by ``select``, or relative to
    the pool folder); blank lines and ``#`` comments are ignored.

    An image is matched by its identity inside the pool, not by spelling: a line matches pool image
    ``rel`` when it is ``rel`` itself, or resolves (from the working directory, or from the exclude
    file's folder, following symlinks) to the pool's file ``rel``, or ends with ``<pool folder
    name>/rel`` (a path printed by a run from another directory). Lines that match nothing are
    counted, not errors: an exclusion list usually covers more than one pool.

    ``pool_paths``: a list, or a lazy sequence such as ``FeatureStore.path_view()`` (then the
    paths are looked up through :class:`PathIndex`, never all held)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise AlfkError(f"exclude file {path} {what}")
    # Non-UTF-8 bytes are kept as surrogate escapes: such a line cannot name a pool image (those
    # are skipped at scan time), so it simply matches nothing.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if isinstance(pool_paths, list):  # held anyway: a dict is the fastest look-up
        return _match_lines(text, path, Path(pool_root), {p: i for i, p in enumerate(pool_paths)})
    index = PathIndex(pool_paths)
    found = _match_lines(text, path, Path(pool_root), index)
    if index.confirmed():
        return found
    # a 64-bit hash collision (odds ~ pool size x lines / 2**64): match by the paths themselves
    return _match_lines(text, path, Path(pool_root), {p: i for i, p in enumerate(pool_paths)})


def _match_lines(
    text: str, path: Path, root: Path, rel_index: dict[str, int] | PathIndex
) -> Exclusions:
    real_root = root.resolve()
    bases = [Path.cwd(), path.resolve().parent]
    names = {root.absolute().name, real_root.name} - {""}  # a symlinked pool has two
    rows: set[int] = set()
    unmatched = 0
    _resolved.cache_clear()  # folders may have changed since an earlier call
    # Lines end at "\n" only, as select prints them (str.splitlines would also split at \x0c,
    # \x85, U+2028...); a "\r" from a file saved on Windows is dropped.
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        # the line as written first: a name may begin or end with a space; then without the
        # spaces a hand-edited list may have around a name
        row = _match_line(line, rel_index, real_root, bases, names)
        if row is None and name != line:
            row = _match_line(name, rel_index, real_root, bases, names)
        if row is None:
            unmatched += 1
        else:
            rows.add(row)
    return Exclusions(sorted(rows), unmatched)


@functools.lru_cache(maxsize=65536)
def _resolved(folder: str) -> Path:
    return Path(folder).resolve()


class PathIndex:
    """The row of a path in a sequence of paths, without holding them: the paths' 64-bit
    hashes, sorted (16 B per path, against ~160 B for a list and a dict of 10M). A look-up
    answers by hash alone and remembers the answer; :meth:`confirmed` then checks every answer
    against the paths in one batched read (one read per hit cost more than the search). As a
    dict built in row order, a path listed twice gives its last row."""

    #: str -> int64; Python's own (salted per process, which is all an index in memory needs)
    hash_of: Callable[[str], int] = hash

    def __init__(self, paths: Sequence[str]):
        self.paths = paths
        hashes = np.fromiter(map(self.hash_of, paths), dtype=np.int64, count=len(paths))
        self.order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.order]
        self.answers: dict[str, int] = {}

    def get(self, key: str) -> int | None:
        """The last row whose path has ``key``'s hash, or None (then no path is ``key``)."""
        h = self.hash_of(key)
        hi = int(np.searchsorted(self.hashes, h, "right"))
        if hi == 0 or self.hashes[hi - 1] != h:
            return None
        self.answers[key] = row = int(self.order[hi - 1])
        return row

    def confirmed(self) -> bool:
        """Whether every answer given so far is the row of that very path (False only after a
        hash collision)."""
        keys = list(self.answers)
        rows = np.array([self.answers[k] for k in keys], dtype=np.int64)
        at = getattr(self.paths, "at", None)
        got = at(rows) if at is not None else [self.paths[r] for r in rows.tolist()]
        return list(got) == keys


def _match_line(
    name: str,
    rel_index: dict[str, int] | PathIndex,
    real_root: Path,
    bases: list[Path],
    pool_names: set[str],
) -> int | None:
    posix = name.replace(os.sep, "/")
    if posix.startswith("./"):
        posix = os.path.normpath(posix).replace(os.sep, "/")
    if (row := rel_index.get(posix)) is not None:
        return row
    p = Path(name)
    for base in [Path("/")] if p.is_absolute() else bases:
        with contextlib.suppress(ValueError, OSError):
            # the folder is resolved (symlinks followed) once per distinct folder: lists of
            # thousands of lines share a few folders, and resolve() is the expensive step
            folder = _resolved(str(base / p.parent))
            rel = (folder / p.name).relative_to(real_root).as_posix()
            if (row := rel_index.get(rel)) is not None:
                return row
    parts = posix.split("/")
    for i, part in enumerate(parts[:-1]):  # .../<pool name>/<rel>, printed elsewhere
        if part in pool_names:
            rel = "/".join(parts[i + 1 :])
            if (row := rel_index.get(rel)) is not None:
                return row
    return None


def read_exclude(
    path: str | os.PathLike, pool_root: str | os.PathLike, pool_paths: Sequence[str]
) -> list[int]:
    """The pool rows of :func:`match_exclusions` (kept for callers that need only the rows)."""
    return match_exclusions(path, pool_root, pool_paths).rows
