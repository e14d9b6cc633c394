"""Scanning image folders: find the images, label them by class sub-folder, stat them.

Layout rules: a folder whose top level holds only sub-folders is *labelled* (the first-level
sub-folder is the class, images may sit at any depth below it); a folder with images at its top
level is *unlabelled* (images at any depth, label -1). Hidden files and folders are ignored, and
so is a sub-folder holding :data:`LABELS_MARKER` (``alfk labels import``'s output: its images are
labelled copies, never pool images), which is listed as skipped.
Files that are not images, that are not regular files (a FIFO, socket or device, or a symlink to
one: stat'ed, never opened), or that PIL cannot read (when asked to verify), are reported and
skipped (``strict`` makes that an error).

No torch here, and PIL only to verify: a run whose stores are up to date scans and stops
(decoding is ``images``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alfk_cli.data.imagefile import NotRegularFile, open_image, special_file
from alfk_cli.data.names import name_problem, printable
from alfk_cli.errors import AlfkError

# GIF: its first frame (``data.imagefile``), like an animated PNG's or a multi-page TIFF's
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
#: The file ``alfk labels import`` leaves in its output folder; a scan never walks into a
#: sub-folder holding it (the folder it starts from may hold it: ``train --data labeled/``).
LABELS_MARKER = ".alfk-labels"
LABELLED_FOLDER = f"a labelled folder (it holds {LABELS_MARKER}), not scanned"


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's or
    ``taskset``'s share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode: OSError (truncated, bad chunk), SyntaxError
    and ValueError from some plugins, and DecompressionBombError (an Exception of its own) for
    images over Image.MAX_IMAGE_PIXELS × 2."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class ImageSet:
    """Images found under ``root``: POSIX paths relative to it, labels, and what was skipped."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    classes: list[str]  # class names in label order; empty for an unlabelled folder
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    # st_size and st_mtime_ns of each path when it was scanned (None if not recorded)
    sizes: np.ndarray | None = None
    mtimes: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        return self.root / self.paths[i]


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every non-hidden file under ``root`` as a sorted POSIX path relative to it, following the
    folder structure only, and the labelled sub-folders left out, as (path, reason)."""
    found: list[str] = []
    left_out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if rel != "." and LABELS_MARKER in filenames:
            dirnames[:] = []
            left_out.append((rel + "/", LABELLED_FOLDER))
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = "" if rel == "." else rel + "/"
        found.extend(prefix + f for f in sorted(filenames) if not f.startswith("."))
    return found, left_out


def _only_folders(root: Path) -> bool:
    """Whether the top level of ``root`` holds (non-hidden) sub-folders and nothing else: stops at
    the first file, without a Path object per entry (a flat pool's top level holds them all)."""
    found = False
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                return False
            found = True
    return found


def _check(path: str | os.PathLike) -> str | None:
    """None when PIL can open and verify ``path``, else the reason it cannot."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(path) as im:
                im.verify()
    except Image.DecompressionBombError:
        return f"image too large (over PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
    except decode_errors() as exc:
        return unreadable(exc)
    return None


def unreadable(exc: BaseException) -> str:
    """The skip reason for a file PIL could not open or decode."""
    from PIL import Image

    if isinstance(exc, FileNotFoundError):
        return "file disappeared during the run"
    if isinstance(exc, NotRegularFile):
        return str(exc)
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large (over PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
    text = str(exc).splitlines()[0][:80] if str(exc) else ""
    return f"unreadable image ({type(exc).__name__}: {text})"


def walk_order(rel: str) -> str:
    """Sort key of a relative path in ``_walk``'s order: a folder's files (by name) before its
    sub-folders (by name), depth first. One string per path (a pool list may hold millions):
    each folder is ``\x02name\x00`` and the file ``\x01name``, so files sort before folders and
    a name before its extensions (``a`` before ``a-b``); names with control characters, which
    could tie, are skipped later anyway."""
    cut = rel.rfind("/")
    if cut < 0:
        return "\x01" + rel
    return "\x02" + rel[:cut].replace("/", "\x00\x02") + "\x00\x01" + rel[cut + 1 :]


def _scan_chunk(
    root: Path,
    rels: Sequence[str],
    verify: bool,
    trusted: dict[str, tuple[int, int]],
    listed: bool,
) -> list[tuple[str | None, int, int]]:
    """(reason or None, st_size, st_mtime_ns) of each file; one task per chunk of files, because a
    thread-pool future per file costs more than a stat (60k futures: seconds). ``listed``: the
    files come from a pool list, and a trusted one is taken as it was stored, unstat'ed."""
    out: list[tuple[str | None, int, int]] = []
    for rel in rels:
        if listed and (known := trusted.get(rel)) is not None:
            out.append((None, *known))
            continue
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError as exc:
            out.append((f"unreadable ({exc.strerror})", 0, 0))
            continue
        # a FIFO, socket or device is never opened: reading a FIFO waits for a writer forever
        if (special := special_file(st.st_mode)) is not None:
            reason: str | None = special
        elif os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            reason = "not an image file"
        elif (bad_name := name_problem(rel)) is not None:
            reason = bad_name
        elif verify and trusted.get(rel) != (st.st_size, st.st_mtime_ns):
            reason = _check(path)
        else:
            reason = None
        out.append((reason, st.st_size, st.st_mtime_ns))
    return out


def scan_images(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    verify: bool = True,
    threads: int = 8,
    trusted: dict[str, tuple[int, int]] | None = None,
    files: Sequence[str] | None = None,
) -> ImageSet:
    """Find the images under ``root``, with each one's size and mtime.

    ``classes`` fixes the class order (e.g. the validation set's); a labelled folder with a class
    outside it is an error. ``verify`` opens every file with PIL to catch corrupt ones early,
    except files listed in ``trusted`` (relative path -> (size, mtime_ns)) whose size and mtime
    are unchanged: they decoded fine when they were last embedded. Commands that decode every
    image anyway pass ``verify=False`` and list decode failures then (unless ``strict``).

    ``files``: the relative paths to consider instead of walking ``root`` (a pool list, see
    ``data.poollist``; rows in the walk's order); those in ``trusted`` are not stat'ed either: they
    keep the size and mtime recorded there. The folder is labelled when no file sits at its top.
    """
    root = Path(root)
    if not root.exists():
        raise AlfkError(f"folder {root} does not exist")
    if not root.is_dir():
        raise AlfkError(f"{root} is not a folder")
    listed = files is not None
    left_out: list[tuple[str, str]] = []
    if files is not None:
        files = sorted(files, key=walk_order)
        labelled = bool(files) and all("/" in f for f in files)
    else:
        labelled = _only_folders(root)
        files, left_out = _walk(root)
    trusted = trusted or {}
    chunk = max(64, -(-len(files) // (4 * max(1, threads))))
    parts = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = [
            r
            for part in pool.map(lambda p: _scan_chunk(root, p, verify, trusted, listed), parts)
            for r in part
        ]
    skipped = [(f, r[0]) for f, r in zip(files, results) if r[0] is not None]
    keep = [i for i, r in enumerate(results) if r[0] is None]
    good = [files[i] for i in keep]
    sizes = np.array([results[i][1] for i in keep], dtype=np.int64)
    mtimes = np.array([results[i][2] for i in keep], dtype=np.int64)
    if strict and skipped:
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise AlfkError(f"{printable(str(root / path))}: {reason}{more}")
    skipped = left_out + skipped  # a labelled folder is no bad file: listed, never --strict's
    if not good:
        raise AlfkError(f"no images found in {root}")

    if not labelled:
        labels = np.full(len(good), -1, dtype=np.int64)
        return ImageSet(root, good, labels, [], skipped, sizes, mtimes)
    found = sorted({p.split("/", 1)[0] for p in good})
    if classes is None:
        classes = found
    classes = list(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise AlfkError(
            f"{root} has class folder {unknown[0]!r}, which is not among the classes {','.join(classes)}"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[p.split("/", 1)[0]] for p in good], dtype=np.int64)
    return ImageSet(root, good, labels, classes, skipped, sizes, mtimes)


def align_classes(data: ImageSet, val: ImageSet) -> ImageSet:
    """``data`` with the validation set's classes and class indices, so that a model trained on
    it has ``val``'s classes (the stores and selections of a pool stay comparable). A labelled
    set may lack classes of ``val`` (a first batch of labels rarely holds every class); a class
    that ``val`` lacks is an error, since the model could never be validated on it."""
    for s in (data, val):
        if not s.labelled:
            raise AlfkError(f"{s.root} has no class sub-folders; it needs one folder per class")
    extra = [c for c in data.classes if c not in val.classes]
    if extra:
        raise AlfkError(
            f"class folders differ between {data.root} and {val.root} (only in {data.root}: "
            f"{','.join(extra)}); the classes are the validation set's"
        )
    if data.classes == val.classes:
        return data
    index = np.array([val.classes.index(c) for c in data.classes], dtype=np.int64)
    return dataclasses.replace(data, labels=index[data.labels], classes=list(val.classes))
