"""Write files under a temporary name in the destination folder and rename them into place.

An interrupted run therefore never leaves a truncated checkpoint or store under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from alfk_cli.errors import AlfkError


def disk_error(exc: BaseException | None) -> str | None:
    """A one-line message for a write that failed for lack of room (this exception or one it
    arose from), else None. h5py and torch put the C library's error in their message."""
    seen = 0
    while exc is not None and seen < 10:
        text = str(exc)
        if (
            getattr(exc, "errno", None) == errno.ENOSPC
            or "No space left" in text
            or "errno = 28" in text
        ):
            where = getattr(exc, "filename", None) or _filename_in(text)
            return f"no space left on device{f' writing {where}' if where else ''}"
        if (
            getattr(exc, "errno", None) == errno.EFBIG
            or "File too large" in text
            or "errno = 27" in text
        ):
            return "file too large for this file system or size limit (EFBIG)"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _filename_in(text: str) -> str | None:
    found = re.search(r"filename = '([^']*)'", text)
    return found.group(1) if found else None


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
            raise AlfkError(
                f"the output {dest} is also an input ({src}); choose another output name"
            )


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
        commit(tmp, dest)
    except BaseException as exc:
        if not keep_partial:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and disk_error(exc):
            reason = str(disk_error(exc)).split(" writing ")[0]
            raise AlfkError(f"{reason} writing {dest}") from None
        raise
