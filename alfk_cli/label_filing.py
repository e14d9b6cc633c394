"""File labelled pool images under ``INTO/<class>/`` for ``alfk train --data INTO``.

Each image becomes a hard link to the pool file (a copy when the two folders are on different file
systems); the pool image is never moved or modified. Everything is checked before the first file
is written: class names, known classes, missing images, images labelled twice differently, and
images already filed under another class. Rules:

- Only pool images: an image is filed only when its path, with every symbolic link followed
  (realpath), lies inside the pool folder, and it is what the pool scan would offer: a regular
  file (never a FIFO, device or folder, which are not opened) with an image suffix
  (``IMAGE_EXTENSIONS``), not hidden, with a name that can be carried. An export cannot file
  ``/etc/passwd``, ``../../etc/shadow``, another pool's image or a link out of the pool. The
  image is not decoded here: a file that does not decode is listed by ``train`` like any other.
- ``INTO`` lies outside the pool folder (a pool scan would offer its images again) and does not
  hold it. ``INTO`` may itself be a symbolic link (labels kept on another disk); a class folder
  under it may not (it would write outside ``INTO``). ``INTO`` gets ``imagescan.LABELS_MARKER``,
  so that a scan of a folder above it never takes its images for pool images.

- Same image, same class, already there (a re-import, or the same image in two exports): nothing
  is written; counted as already there. "Same image" is the same file (inode), or, for a copy,
  a file of the same name (or hash-suffixed name) with the same bytes.
- Another image with the same file name in that class: this one gets a short content-hash suffix
  (``cat.png`` -> ``cat-1a2b3c4d.png``), so both are kept, and a re-import finds it again.
- The image already filed under another class: an error, unless ``relabel``, which removes that
  link (or copy) from ``INTO`` before filing the image under its new class.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alfk_cli.atomic import disk_error, partial_path
from alfk_cli.errors import AlfkError
from alfk_cli.imagescan import IMAGE_EXTENSIONS, LABELS_MARKER
from alfk_cli.label_import import Labelled
from alfk_cli.names import name_problem, printable

# errors of os.link that mean "this file system cannot link here": copy instead
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
_MARKER_TEXT = (
    "Labelled images filed by `alfk labels import` (links to pool images). A pool scan never\n"
    "walks into a folder holding this file.\n"
)
_Ident = tuple[int, int]  # (st_dev, st_ino) of the pool file as checked


@dataclass
class ImportReport:
    """What ``file_labels`` did. Errors stop it before any file is written, so none are here."""

    linked: int = 0  # new hard links
    copied: int = 0  # new copies (the pool is on another file system)
    already: int = 0  # already filed under that class (re-import, or twice in the exports)
    relabelled: int = 0  # of the new files, those moved from another class
    skipped: int = 0  # cancelled or unlabelled tasks
    missing: list[str] = field(default_factory=list)  # images not found, skipped
    filed: list[Path] = field(default_factory=list)  # the new files under INTO


@dataclass
class _Step:
    source: Path
    ident: _Ident  # what source was when checked: a file swapped since is not filed
    dest: Path
    remove: list[Path]  # this image's files under other classes (relabel)


def class_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class folder, or None."""
    if not name.strip():
        return "is empty"
    if name in (".", "..") or "/" in name or "\\" in name:
        return "is not a folder name"
    if name.startswith("."):
        return "starts with a dot (a hidden folder, which training ignores)"
    if name_problem(name) is not None or not name.isprintable():
        return "has a control or unprintable character"
    return None


def known_classes(folder: str | Path) -> list[str]:
    """The class sub-folders of a labelled folder (e.g. the validation set)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AlfkError(f"folder {folder} does not exist")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise AlfkError(f"{folder} has no class sub-folders")
    return found


def file_labels(
    labelled: Sequence[Labelled],
    into: str | Path,
    *,
    pool: str | Path,
    classes: Collection[str] | None = None,
    relabel: bool = False,
    skip_missing: bool = False,
) -> ImportReport:
    """File every labelled image of the pool folder ``pool`` under ``into/<label>/``; see the
    module's rules."""
    into, pool = Path(into), Path(pool)
    pool_real = _pool_folder(pool)
    _check_into(into, pool, pool_real)
    report = ImportReport(skipped=sum(1 for item in labelled if item.label is None))
    chosen = _choose(labelled, pool, pool_real, classes, skip_missing, report)
    for label in sorted({label for label, _, _ in chosen.values()}):
        _check_class_folder(into / label)
    index = _Index(into)
    steps = []
    for source, (label, where, ident) in chosen.items():
        step = _plan(source, ident, label, where, into, index, relabel)
        if step is None:
            report.already += 1
        else:
            steps.append(step)
    if steps:
        _check_writable(into)
        _write_all(into, steps, report)
    elif into.is_dir():  # a re-import marks a folder filed before the marker existed
        with contextlib.suppress(OSError):  # a read-only one stays as it is
            _mark(into)
    return report


def _pool_folder(pool: Path) -> Path:
    if not pool.is_dir():
        what = "is not a folder" if pool.exists() else "does not exist"
        raise AlfkError(f"pool folder {printable(str(pool))} {what}")
    return Path(os.path.realpath(pool))


def _check_into(into: Path, pool: Path, pool_real: Path) -> None:
    """``into`` is a folder (or is to be made) that neither lies in the pool folder nor holds it."""
    if into.exists() and not into.is_dir():
        raise AlfkError(f"{into} is not a folder")
    into_real = Path(os.path.realpath(into))
    if into_real == pool_real or pool_real in into_real.parents:
        raise AlfkError(
            f"the labelled folder {into} is inside the pool folder {pool}: select would offer "
            "its images again; file the labels outside the pool"
        )
    if into_real in pool_real.parents:
        raise AlfkError(f"the labelled folder {into} holds the pool folder {pool}")


def _check_class_folder(folder: Path) -> None:
    """A class folder that exists is a real folder: a link would file images outside INTO."""
    if os.path.islink(folder):
        raise AlfkError(
            f"class folder {printable(str(folder))} is a symbolic link; a class folder must be "
            "a real folder (images are never filed through a link)"
        )
    if os.path.lexists(folder) and not folder.is_dir():
        raise AlfkError(f"{printable(str(folder))} is not a folder")


def _mark(into: Path) -> None:
    """Leave LABELS_MARKER in ``into`` (never through a link, never over an existing file)."""
    marker = into / LABELS_MARKER
    if os.path.lexists(marker):
        return
    into.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(marker, flags, 0o644), "w", encoding="utf-8") as fh:
        fh.write(_MARKER_TEXT)


def _check_writable(into: Path) -> None:
    """Fail before the first file when ``into`` (or the folder it will be made in) is read-only."""
    folder = into
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise AlfkError(f"cannot write under {into}: {folder} is not a writable folder")


def _choose(
    labelled: Sequence[Labelled],
    pool: Path,
    pool_real: Path,
    classes: Collection[str] | None,
    skip_missing: bool,
    report: ImportReport,
) -> dict[Path, tuple[str, str, _Ident]]:
    """Each distinct pool image (resolved) with its class, where it was labelled and its identity."""
    chosen: dict[Path, tuple[str, str, _Ident]] = {}
    for item in labelled:
        if item.label is None or item.source is None:
            continue
        label, where = item.label, item.where
        problem = class_problem(label)
        if problem:
            raise AlfkError(f"{where}: the class {printable(label)!r} {problem}")
        if classes is not None and label not in classes:
            raise AlfkError(
                f"{where}: unknown class {printable(label)!r} (known: {', '.join(classes)})"
            )
        found = _pool_image(item.source, where, pool, pool_real)
        if found is None:
            if not skip_missing:
                raise AlfkError(f"{where}: image {printable(str(item.source))} does not exist")
            report.missing.append(str(item.source))
            continue
        source, ident = found
        if source in chosen and chosen[source][0] != label:
            raise AlfkError(
                f"{printable(str(item.source))} is labelled {chosen[source][0]!r} in "
                f"{chosen[source][1]} and {label!r} in {where}"
            )
        if source in chosen:
            report.already += 1
        chosen.setdefault(source, (label, where, ident))
    return chosen


def _pool_image(path: Path, where: str, pool: Path, pool_real: Path) -> tuple[Path, _Ident] | None:
    """``path`` resolved, with its (st_dev, st_ino), when it is an image the pool scan would
    offer from the pool folder (``pool_real`` is its realpath); None when it does not exist; an
    error naming ``where`` for anything else. Nothing is opened: a FIFO is only stat'ed."""
    shown = printable(str(path))
    real = Path(os.path.realpath(path))
    if pool_real not in real.parents:
        plain = path.is_absolute() and real == Path(os.path.abspath(path))
        via = "" if plain else f", which is {printable(str(real))},"  # relative, or a link
        raise AlfkError(
            f"{where}: image {shown}{via} is outside the pool folder {printable(str(pool))}"
        )
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise AlfkError(f"{where}: cannot read image {shown}: {exc.strerror}") from None
    problem = _not_an_image(st.st_mode, real.relative_to(pool_real).as_posix())
    if problem is not None:
        raise AlfkError(f"{where}: {shown} {problem}")
    return real, (st.st_dev, st.st_ino)


def _not_an_image(mode: int, rel: str) -> str | None:
    """Why the pool scan would not offer the file at ``rel`` (in the pool) of this mode, or None."""
    if not stat.S_ISREG(mode):
        kind = (
            "a folder" if stat.S_ISDIR(mode)
            else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a plain file"
        )  # fmt: skip
        return f"is not a regular file ({kind})"
    if any(part.startswith(".") for part in rel.split("/")):
        return "is hidden in the pool folder (the pool scan never offers it)"
    if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
        return f"is not an image file (not {'/'.join(sorted(IMAGE_EXTENSIONS))})"
    problem = name_problem(rel)
    return None if problem is None else f"is refused: {problem}"


class _Index:
    """The files already under INTO: by inode, and by class and name."""

    def __init__(self, into: Path):
        self.into = into
        self.by_inode: dict[tuple[int, int], list[Path]] = {}
        self.by_name: dict[str, list[Path]] = {}
        self.planned: set[Path] = set()
        if not into.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(into):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                self.by_inode.setdefault((st.st_dev, st.st_ino), []).append(path)
                for key in {name, _base_name(name)}:
                    self.by_name.setdefault(key, []).append(path)

    def copies_of(self, source: Path) -> list[Path]:
        """The files under INTO that are this pool image: links to it, or copies of it."""
        st = source.stat()
        found = list(self.by_inode.get((st.st_dev, st.st_ino), []))
        for path in self.by_name.get(source.name, []):
            if path not in found and _same_bytes(source, path, st.st_size):
                found.append(path)
        return found

    def class_of(self, path: Path) -> str:
        return path.relative_to(self.into).parts[0]

    def taken(self, dest: Path) -> bool:
        return dest in self.planned or os.path.lexists(dest)


def _base_name(name: str) -> str:
    """``cat-1a2b3c4d.png`` -> ``cat.png``: the name a hash-suffixed file was filed for."""
    return re.sub(r"-[0-9a-f]{8}(\.[^.]*)?$", r"\1", name)


def _same_bytes(a: Path, b: Path, size: int) -> bool:
    try:
        return b.stat().st_size == size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _plan(
    source: Path, ident: _Ident, label: str, where: str, into: Path, index: _Index, relabel: bool
) -> _Step | None:
    """What filing ``source`` under ``label`` takes; None when it is there already."""
    existing = index.copies_of(source)
    here = [p for p in existing if index.class_of(p) == label]
    elsewhere = [p for p in existing if index.class_of(p) != label]
    if elsewhere and not relabel:
        raise AlfkError(
            f"{where}: {printable(source.name)} is labelled {label!r}, but it is already filed "
            f"as {printable(str(elsewhere[0]))}; relabelling it must be asked for"
        )
    if here:
        return _Step(source, ident, here[0], elsewhere) if elsewhere else None
    dest = into / label / source.name
    if index.taken(dest):  # another image of that name: keep both
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
        dest = dest.with_name(f"{source.stem}-{digest}{source.suffix}")
        if index.taken(dest):
            raise AlfkError(f"{where}: {dest} exists and is another image")
    index.planned.add(dest)
    return _Step(source, ident, dest, elsewhere)


def _write_all(into: Path, steps: list[_Step], report: ImportReport) -> None:
    try:
        _mark(into)
    except OSError as exc:
        raise AlfkError(f"cannot write under {into}: {_reason(exc)}") from None
    for step in steps:  # each file appears whole (a link, or a renamed copy): a re-run resumes
        try:
            _write(step, report)
        except OSError as exc:
            raise AlfkError(f"cannot file {step.dest}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return disk_error(exc) or exc.strerror or str(exc)


def _write(step: _Step, report: ImportReport) -> None:
    for old in step.remove:  # only files under INTO: links or copies alfk made
        old.unlink(missing_ok=True)
    if step.remove:
        report.relabelled += 1
    if os.path.lexists(step.dest):  # relabel back to where a copy already was
        return
    step.dest.parent.mkdir(exist_ok=True)  # the class folder; INTO exists (_mark)
    _check_class_folder(step.dest.parent)  # still no link: checked again just before writing
    try:
        os.link(step.source, step.dest)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        _copy(step)
        report.copied += 1
    else:
        st = os.lstat(step.dest)
        if (st.st_dev, st.st_ino) != step.ident:
            step.dest.unlink()
            raise AlfkError(f"{printable(str(step.source))} was replaced while it was being filed")
        report.linked += 1
    report.filed.append(step.dest)


def _copy(step: _Step) -> None:
    """Copy the pool file to ``step.dest`` through a temporary name, reading it through a handle
    that is checked to be the file checked before (no link followed, a FIFO never read)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    tmp = partial_path(step.dest)
    try:
        with os.fdopen(os.open(step.source, flags), "rb") as src:
            st = os.fstat(src.fileno())
            if (st.st_dev, st.st_ino) != step.ident or not stat.S_ISREG(st.st_mode):
                raise AlfkError(
                    f"{printable(str(step.source))} was replaced while it was being filed"
                )
            with open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, step.dest)
    finally:
        tmp.unlink(missing_ok=True)
