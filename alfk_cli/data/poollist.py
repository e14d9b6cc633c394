"""A pool list (``--pool-list FILE``): the images of a pool named in a file instead of found by
walking the folder, so a pool of millions of files is neither re-walked nor re-stat'ed each night.

One path per line, relative to the pool folder (an absolute path inside the pool folder is
accepted); ``-`` reads the list from standard input. Lines end at ``\\n`` (a ``\\r`` before it is
dropped), exactly as ``select`` prints paths; blank lines and lines starting with ``#`` are
ignored (write ``./#name.png`` for such a file). The list may be a pipe (``<(find ...)``), not
a device or socket. The rules of the folder walk apply to what is listed (``data.scan``): hidden
files and folders are ignored, files that are not images, that are not regular files (a FIFO:
never opened), or whose names cannot be carried (``names``) are skipped and listed, labels come from the first path
component when no listed file sits at the top level, and rows are in the walk's order whatever
the list's order. A path outside the pool folder is an error; a path listed twice is skipped and
listed the second time; paths in a labelled sub-folder (one holding ``data.scan.LABELS_MARKER``,
``alfk labels import``'s output) are left out and the folder listed, as the walk does.

Identity: a listed path that a cached store already holds is trusted unchanged, with the size
and mtime the store recorded (it is not stat'ed); only new paths are stat'ed. So a pool list
assumes that an image is not rewritten in place under the same name: run once without
``--pool-list`` (the walk stats every file) to pick up such changes. Files listed but missing
are skipped and listed (when new) or keep their stored rows (when trusted). No torch import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alfk_cli.data.imagefile import check_named_file
from alfk_cli.data.names import printable
from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    from alfk_cli.data.scan import ImageSet

STDIN = "-"


@dataclass
class PoolList:
    """The pool-relative paths a list names (each once, in the list's order) and the lines
    skipped as (path, reason)."""

    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _describe(source: str | os.PathLike) -> str:
    return "standard input" if str(source) == STDIN else f"pool list {source}"


def _read_text(source: str | os.PathLike) -> str:
    if str(source) == STDIN:
        if sys.stdin is None or sys.stdin.closed:
            raise AlfkError("the pool list is standard input, which is closed")
        data = sys.stdin.buffer.read()
    else:
        path = Path(source)
        check_named_file(path, "pool list", pipe=True)  # a pipe: --pool-list <(find ...)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AlfkError(f"cannot read pool list {path}: {exc.strerror}") from None
    # bytes that are not UTF-8 become surrogate escapes: such a name is skipped like the walk's
    return data.decode("utf-8", errors="surrogateescape")


def read_pool_list(source: str | os.PathLike, root: str | os.PathLike) -> PoolList:
    """The images of the pool folder ``root`` named by the list ``source`` (``-``: stdin)."""
    text = _read_text(source)
    root_abs = os.path.abspath(root)
    prefixes = {root_abs.rstrip(os.sep) + os.sep, os.path.realpath(root).rstrip(os.sep) + os.sep}
    seen: dict[str, int] = {}
    out = PoolList([])
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        rel = _relative(line, prefixes)
        if rel is None:
            raise AlfkError(
                f"{_describe(source)} line {number}: {printable(line)} is outside the pool "
                f"folder {root}"
            )
        if rel == "" or "/." in "/" + rel:
            continue  # hidden, as in the walk (or the folder itself)
        first = seen.setdefault(rel, number)
        if first != number:
            out.skipped.append((rel, f"listed again on line {number} (first on line {first})"))
        else:
            out.paths.append(rel)
    return out


def _relative(line: str, prefixes: set[str]) -> str | None:
    """``line`` as a POSIX path relative to the pool folder, "" for the folder itself, or None
    when it lies outside. Lines already in that form (the common case) are taken as they are."""
    if line[0] != "/" and "/." not in "/" + line and "//" not in line:
        return line.removesuffix("/")
    if os.path.isabs(line):
        norm = os.path.normpath(line)
        for prefix in prefixes:
            if (norm + os.sep).startswith(prefix):
                rel = norm[len(prefix) :]
                return rel.replace(os.sep, "/")
        return None
    norm = os.path.normpath(line).replace(os.sep, "/")
    if norm == ".." or norm.startswith("../"):
        return None
    return "" if norm == "." else norm


def _outside_labelled(listed: PoolList, root: str | os.PathLike) -> PoolList:
    """``listed`` less the paths under a labelled sub-folder, each such folder listed once: one
    lstat per folder named, none for a flat list."""
    from alfk_cli.data.scan import LABELLED_FOLDER, LABELS_MARKER

    marked: dict[str, bool] = {}

    def labelled_folder(rel: str) -> str | None:
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder not in marked:
                marked[folder] = os.path.lexists(os.path.join(root, folder, LABELS_MARKER))
            if marked[folder]:
                return folder
        return None

    keep = [rel for rel in listed.paths if "/" not in rel or labelled_folder(rel) is None]
    if len(keep) == len(listed.paths):
        return listed
    left_out = [(f + "/", LABELLED_FOLDER) for f, yes in marked.items() if yes]
    return PoolList(keep, listed.skipped + left_out)


def scan_pool(
    root: str | os.PathLike,
    pool_list: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    trusted: dict[str, tuple[int, int]] | None = None,
) -> ImageSet:
    """``data.scan.scan_images`` over the images a pool list names (see the module docstring):
    paths in ``trusted`` keep its size and mtime unstat'ed, the rest are stat'ed. ``strict``:
    any skipped line or file is an error."""
    from alfk_cli.data.scan import scan_images

    listed = read_pool_list(pool_list, root)
    if strict and listed.skipped:
        path, reason = listed.skipped[0]
        raise AlfkError(f"{printable(str(Path(root) / path))}: {reason}")
    listed = _outside_labelled(listed, root)
    found = scan_images(
        root, classes=classes, strict=strict, verify=strict, trusted=trusted, files=listed.paths
    )
    found.skipped = sorted(listed.skipped + found.skipped)
    return found


__all__ = ["STDIN", "PoolList", "read_pool_list", "scan_pool"]
