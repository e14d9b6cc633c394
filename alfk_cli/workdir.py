"""The orchestrator's work folder: where it is, its lock, and what it holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from alfk_cli.errors import AlfkError


def default_workdir(pool: str | os.PathLike) -> Path:
    """``.alfk/<pool name>/`` beside the pool folder (DESIGN.md), one sub-folder per pool so two
    pools with the same parent never share caches."""
    pool = Path(pool).resolve()
    return pool.parent / ".alfk" / pool.name


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` for one acquisition; a second one fails at once.

    flock is released by the kernel when the process dies, so a killed run never leaves a stale
    lock behind.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "lock"
    fh = open(path, "a+")  # noqa: SIM115 -- held open for the lock's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise AlfkError(
            f"another alfk select is running in {workdir} ({who}); wait for it or use --workdir"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def newest_checkpoint(workdir: Path) -> Path | None:
    """The most recently written ``*.pt`` in the work folder, if any."""
    found = [p for p in workdir.glob("*.pt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def read_exclude(
    path: str | os.PathLike, pool_root: str | os.PathLike, pool_paths: list[str]
) -> list[int]:
    """Pool rows named in ``path`` (one image per line, as printed by ``select`` or relative to the
    pool folder; blank lines and ``#`` comments ignored). Names that are not in the pool are fine:
    an exclusion list usually covers more than one pool."""
    path = Path(path)
    if not path.is_file():
        raise AlfkError(f"exclude file {path} does not exist")
    root = Path(pool_root).resolve()
    rel_index = {p: i for i, p in enumerate(pool_paths)}
    rows = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        p = Path(name)
        candidates = [p.as_posix()]
        absolute = p if p.is_absolute() else Path.cwd() / p
        with contextlib.suppress(ValueError):
            candidates.append(absolute.resolve().relative_to(root).as_posix())
        for c in candidates:
            if c in rel_index:
                rows.add(rel_index[c])
                break
    return sorted(rows)
