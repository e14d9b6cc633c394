"""Find images under a folder, label them by class sub-folder, and load them for a network.

Layout rules: a folder whose top level holds only sub-folders is *labelled* (the first-level
sub-folder is the class, images may sit at any depth below it); a folder with images at its top
level is *unlabelled* (images at any depth, label -1). Hidden files and folders are ignored.
Files that are not images, or that PIL cannot read, are reported and skipped (``strict`` makes
that an error).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from alfk_cli.errors import AlfkError
from alfk_cli.models import InputSpec
from alfk_cli.names import name_problem, printable
from alfk_cli.reproducible import loader_generator

# What PIL raises for a file it cannot decode: OSError (truncated, bad chunk), SyntaxError and
# ValueError from some plugins, and DecompressionBombError (an Exception of its own) for images
# over Image.MAX_IMAGE_PIXELS × 2.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# Decoding worker processes when none are asked for: the cores this process may use, at most this
# many (more rarely help one loader, and each costs memory and start-up time).
MAX_AUTO_WORKERS = 16
# Decoding every image once for training is far faster than re-decoding each epoch; above this
# many bytes of decoded pixels, stream from disk instead.
PRELOAD_LIMIT_BYTES = 1 << 30


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


def _walk(root: Path) -> list[str]:
    """Every non-hidden file under ``root`` as a sorted POSIX path relative to it, following the
    folder structure only."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        found.extend(prefix + f for f in sorted(filenames) if not f.startswith("."))
    return found


def _check(path: str | os.PathLike) -> str | None:
    """None when PIL can open and verify ``path``, else the reason it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
    except Image.DecompressionBombError:
        return f"image too large (over PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
    except DECODE_ERRORS as exc:
        return unreadable(exc)
    return None


def unreadable(exc: BaseException) -> str:
    """The skip reason for a file PIL could not open or decode."""
    if isinstance(exc, FileNotFoundError):
        return "file disappeared during the run"
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
        if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            reason: str | None = "not an image file"
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
    ``poollist``; rows in the walk's order); those in ``trusted`` are not stat'ed either: they
    keep the size and mtime recorded there. The folder is labelled when no file sits at its top.
    """
    root = Path(root)
    if not root.exists():
        raise AlfkError(f"folder {root} does not exist")
    if not root.is_dir():
        raise AlfkError(f"{root} is not a folder")
    listed = files is not None
    if files is not None:
        files = sorted(files, key=walk_order)
        labelled = bool(files) and all("/" in f for f in files)
    else:
        top = [p for p in root.iterdir() if not p.name.startswith(".")]
        labelled = bool(top) and all(p.is_dir() for p in top)
        files = _walk(root)
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


def check_same_classes(data: ImageSet, val: ImageSet) -> None:
    """Training data and validation set must name the same classes."""
    for s in (data, val):
        if not s.labelled:
            raise AlfkError(f"{s.root} has no class sub-folders; it needs one folder per class")
    if data.classes != val.classes:
        only_d = sorted(set(data.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(data.classes))
        detail = "; ".join(
            x
            for x in (
                f"only in {data.root}: {','.join(only_d)}" if only_d else "",
                f"only in {val.root}: {','.join(only_v)}" if only_v else "",
            )
            if x
        )
        raise AlfkError(f"class folders differ between {data.root} and {val.root} ({detail})")


def load_image(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    """Decode one image into a uint8 tensor [C, size, size] (no normalisation yet).

    Raises one of ``DECODE_ERRORS`` when the file cannot be decoded; PIL's decompression-bomb
    warning (an image between 1× and 2× its pixel limit, which still decodes) is not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _load_image(path, spec)


def _load_image(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("L" if spec.channels == 1 else "RGB")
        if im.size != (spec.size, spec.size):
            im = im.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def normalizer(spec: InputSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [B, C, H, W] -> normalised float32, on whatever device the batch is on."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255.0)
        return (x - mean.to(x.device)) / std.to(x.device)

    return apply


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image, label, row index, ok)``; an image that fails to decode comes
    back as zeros with ``ok=False`` so the caller can drop it and report it, instead of a
    worker process dying with a traceback."""

    def __init__(self, images: ImageSet, spec: InputSpec, rows: Sequence[int] | None = None):
        self.images = images
        self.spec = spec
        self.rows = list(range(len(images))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            img, ok = load_image(self.images.absolute(row), self.spec), True
        except DECODE_ERRORS:
            img, ok = (
                torch.zeros(self.spec.channels, self.spec.size, self.spec.size, dtype=torch.uint8),
                False,
            )
        return img, int(self.images.labels[row]), row, ok


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's or
    ``taskset``'s share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def loader_workers(workers: int | None, batches: int) -> int:
    """Decoding worker processes for a loader of ``batches`` batches: ``workers`` when given,
    else the available cores (at most ``MAX_AUTO_WORKERS``) but no more than there are batches,
    and none for a single batch (starting a process costs more than decoding it). The images
    and their order never depend on this: the loaders keep row order."""
    if workers is not None:
        return max(0, workers)
    return min(available_cores(), MAX_AUTO_WORKERS, batches if batches > 1 else 0)


def decode_failure(path: str | os.PathLike, spec: InputSpec) -> str:
    """Why ``path`` failed to decode (tried again, for the listing; workers only say ``ok``)."""
    try:
        load_image(path, spec)
    except DECODE_ERRORS as exc:
        return unreadable(exc)
    return "could not be decoded (it decodes now: changed during the run?)"


def decoded_batches(
    images: ImageSet, spec: InputSpec, workers: int | None = None, batch: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every image of ``images`` decoded once, in row order: ``(uint8 [B, C, H, W], rows [B],
    ok [B])`` batches, so memory is one batch per worker. ``workers``: see ``loader_workers``."""
    ds = ImageDataset(images, spec)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        num_workers=loader_workers(workers, -(-len(ds) // batch)),
        generator=loader_generator(),
    )
    for img, _, rows, good in loader:
        yield img, rows, good


def preload(
    images: ImageSet, spec: InputSpec, workers: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every image once: (uint8 [N, C, H, W], ok mask). Used when it fits in memory.
    ``workers``: see ``loader_workers``."""
    out = torch.empty(len(images), spec.channels, spec.size, spec.size, dtype=torch.uint8)
    ok = np.zeros(len(images), dtype=bool)
    for img, rows, good in decoded_batches(images, spec, workers):
        out[rows] = img
        ok[rows.numpy()] = good.numpy()
    return out, ok


def decodable(images: ImageSet, spec: InputSpec, workers: int | None = None) -> np.ndarray:
    """Which images decode (ok mask), decoding each once and keeping none."""
    ok = np.zeros(len(images), dtype=bool)
    for _, rows, good in decoded_batches(images, spec, workers):
        ok[rows.numpy()] = good.numpy()
    return ok


def image_bytes(spec: InputSpec) -> int:
    """Bytes of one decoded uint8 image."""
    return spec.channels * spec.size * spec.size


def fits_in_memory(n: int, spec: InputSpec, limit: int = PRELOAD_LIMIT_BYTES) -> bool:
    return n * image_bytes(spec) <= limit
