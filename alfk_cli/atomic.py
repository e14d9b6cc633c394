"""Write files under a temporary name in the destination folder and rename them into place.

An interrupted run therefore never leaves a truncated checkpoint or store under the real name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from alfk_cli.errors import AlfkError


def partial_path(dest: str | os.PathLike) -> Path:
    """The temporary name used while ``dest`` is being written (same folder, so rename is atomic)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.partial")


def check_writable_dir(dest: str | os.PathLike) -> None:
    """Fail early, with one line, when ``dest`` cannot be created (or is an existing folder)."""
    if Path(dest).is_dir():
        raise AlfkError(f"cannot write {dest}: it is a folder")
    parent = Path(dest).resolve().parent
    if not parent.is_dir():
        raise AlfkError(f"cannot write {dest}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise AlfkError(f"cannot write {dest}: folder {parent} is not writable")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (any spelling, through symlinks)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_output(dest: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Fail early, with one line, when ``dest`` cannot be written or would overwrite one of the
    command's input files."""
    check_writable_dir(dest)
    for src in inputs:
        if src is None:
            continue
        if same_file(dest, src):
            raise AlfkError(f"--out {dest} is also an input ({src}); choose another output name")


def commit(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk and rename it over ``dest``."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``dest``, on failure delete it.

    ``keep_partial`` leaves the temporary file behind on failure so a resumable writer
    (the HDF5 store) can continue from it on the next run.
    """
    check_writable_dir(dest)
    tmp = partial_path(dest)
    try:
        yield tmp
    except BaseException:
        if not keep_partial:
            tmp.unlink(missing_ok=True)
        raise
    commit(tmp, dest)
