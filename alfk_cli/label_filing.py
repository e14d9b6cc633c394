"""File labelled pool images under ``INTO/<class>/`` for ``alfk train --data INTO``.

Each image becomes a hard link to the pool file (a copy when the two folders are on different file
systems); the pool image is never moved or modified. Everything is checked before the first file
is written: class names, known classes, missing images, images labelled twice differently, and
images already filed under another class. Rules:

- Same image, same class, already there (a re-import, or the same image in two exports): nothing
  is written; counted as already there. "Same image" is the same file (inode), or, for a copy,
  a file of the same name (or hash-suffixed name) with the same bytes.
- Another image with the same file name in that class: this one gets a short content-hash suffix
  (``cat.png`` -> ``cat-1a2b3c4d.png``), so both are kept, and a re-import finds it again.
- The image already filed under another class: an error, unless ``relabel``, which removes that
  link (or copy) from ``INTO`` before filing the image under its new class.
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import os
import re
import shutil
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alfk_cli.atomic import disk_error, partial_path
from alfk_cli.errors import AlfkError
from alfk_cli.label_import import Labelled
from alfk_cli.names import name_problem, printable

# errors of os.link that mean "this file system cannot link here": copy instead
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


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
    classes: Collection[str] | None = None,
    relabel: bool = False,
    skip_missing: bool = False,
) -> ImportReport:
    """File every labelled image under ``into/<label>/``; see the module's rules."""
    into = Path(into)
    if into.exists() and not into.is_dir():
        raise AlfkError(f"{into} is not a folder")
    report = ImportReport(skipped=sum(1 for item in labelled if item.label is None))
    chosen = _choose(labelled, into, classes, skip_missing, report)
    index = _Index(into)
    steps = []
    for source, (label, where) in chosen.items():
        step = _plan(source, label, where, into, index, relabel)
        if step is None:
            report.already += 1
        else:
            steps.append(step)
    if steps:
        _check_writable(into)
    for step in steps:  # each file appears whole (a link, or a renamed copy): a re-run resumes
        try:
            _write(step, report)
        except OSError as exc:
            reason = disk_error(exc) or exc.strerror or str(exc)
            raise AlfkError(f"cannot file {step.dest}: {reason}") from None
    return report


def _check_writable(into: Path) -> None:
    """Fail before the first file when ``into`` (or the folder it will be made in) is read-only."""
    folder = into
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise AlfkError(f"cannot write under {into}: {folder} is not a writable folder")


def _choose(
    labelled: Sequence[Labelled],
    into: Path,
    classes: Collection[str] | None,
    skip_missing: bool,
    report: ImportReport,
) -> dict[Path, tuple[str, str]]:
    """Each distinct pool image (resolved) with its class and where it was labelled."""
    inside = into.resolve()
    chosen: dict[Path, tuple[str, str]] = {}
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
        if not item.source.is_file():
            if not skip_missing:
                raise AlfkError(f"{where}: image {printable(str(item.source))} does not exist")
            report.missing.append(str(item.source))
            continue
        source = item.source.resolve()
        if inside == source or inside in source.parents:
            raise AlfkError(f"{where}: image {item.source} is inside the output folder {into}")
        if source in chosen and chosen[source][0] != label:
            raise AlfkError(
                f"{printable(str(item.source))} is labelled {chosen[source][0]!r} in "
                f"{chosen[source][1]} and {label!r} in {where}"
            )
        if source in chosen:
            report.already += 1
        chosen.setdefault(source, (label, where))
    return chosen


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
    source: Path, label: str, where: str, into: Path, index: _Index, relabel: bool
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
        return _Step(source, here[0], elsewhere) if elsewhere else None
    dest = into / label / source.name
    if index.taken(dest):  # another image of that name: keep both
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
        dest = dest.with_name(f"{source.stem}-{digest}{source.suffix}")
        if index.taken(dest):
            raise AlfkError(f"{where}: {dest} exists and is another image")
    index.planned.add(dest)
    return _Step(source, dest, elsewhere)


def _write(step: _Step, report: ImportReport) -> None:
    for old in step.remove:  # only files under INTO: links or copies alfk made
        old.unlink(missing_ok=True)
    if step.remove:
        report.relabelled += 1
    if os.path.lexists(step.dest):  # relabel back to where a copy already was
        return
    step.dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(step.source, step.dest)
        report.linked += 1
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        tmp = partial_path(step.dest)
        try:
            shutil.copy2(step.source, tmp)
            os.replace(tmp, step.dest)
        finally:
            tmp.unlink(missing_ok=True)
        report.copied += 1
    report.filed.append(step.dest)
