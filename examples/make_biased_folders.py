#!/usr/bin/env python3
"""Build biased image-folder datasets (PNG files) from IDX digit/clothing collections.

The output mirrors the protocol of the paper: a labelled validation split, a labelled test
split, an optional labelled seed set, and a *biased* unlabelled pool in which the rare classes
are under-represented by a factor ``r``::

    <out>/val/<class>/*.png
    <out>/test/<class>/*.png
    <out>/labeled/<class>/*.png      (only with --labeled-per-class > 0)
    <out>/unlabeled/*.png            (--pool-layout flat, the default; neutral names)
    <out>/unlabeled/<class>/*.png    (--pool-layout classes, for the simulation harness)
    <out>/unlabeled-truth.csv        (flat layout only: path,label of every pool image)

Imbalance rule: every image left over after val/test/labeled of a *non-rare* class goes to the
pool; of the rare classes, taken together, ``floor(n_nonrare / r)`` images are drawn at random
(without replacement, capped at what is left), where ``n_nonrare`` is the number of non-rare
images in the pool. ``r = 1`` therefore means as many rare as non-rare images (no extra bias).

Sources: the bundled MNIST sample, Fashion-MNIST, a folder of IDX files, or any class-folder tree
(``<DIR>/<class>/**/*.jpg|png|...``, or ``<DIR>/train/<class>/...`` with ``<DIR>/test/<class>/...``
as the test set), such as CIFAR-10 unpacked from ``shared/data/cifar10`` or a user's own labelled
images. Class-folder images are copied byte for byte (same format, any size); IDX images are
written as PNG.

Only the standard library, numpy and pillow are used. Run ``python make_biased_folders.py -h``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import multiprocessing
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MNIST_SAMPLE_DIR = HERE / "data" / "mnist-sample"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGIT_NAMES = [str(i) for i in range(10)]
FASHION_NAMES = [
    "0-tshirt",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
]

SPLITS = ("val", "test", "labeled", "unlabeled")
TRUTH_CSV = "unlabeled-truth.csv"
STAGING = ".make_biased_folders.tmp"

# Per-class defaults, by kind of source.
#   single: one IDX pair (the bundled sample); test is drawn from the same images.
#   train-test: train-* and t10k-* pairs; test comes from the official t10k file.
DEFAULTS = {
    "single": {"val": 100, "test": 100, "labeled": 200},
    "train-test": {"val": 1000, "test": None, "labeled": 0},  # test None = whole t10k set
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class BuildError(Exception):
    """A problem the user can fix; reported as one line on stderr with exit status 1."""


# --------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BuildError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise BuildError(f"{path}: unsupported IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise BuildError(f"{path}: truncated or corrupt IDX file (shape {shape})")
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def write_idx(path: str | Path, array: np.ndarray, compresslevel: int = 9) -> None:
    """Write a uint8 array as a gzipped IDX file, byte-for-byte reproducibly (mtime 0)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError("write_idx only writes uint8 arrays")
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
        ) as f,
    ):
        f.write(header)
        f.write(array.tobytes())


# --------------------------------------------------------------------------------------------
# Sources


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Source:
    """Images to build from. ``test_*`` is None when test is drawn from ``images``.

    ``images`` is (N, H, W) uint8 for IDX sources, or an object array of N file paths for a
    class-folder source (copied as they are)."""

    name: str
    images: np.ndarray  # (N, H, W) uint8, or (N,) object: paths
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "single" if self.test_images is None else "train-test"


def _load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise BuildError(f"{images_path}: expected uint8 images of shape (N, H, W)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise BuildError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
    if len(labels) and labels.min() < 0:
        raise BuildError(f"{labels_path}: negative labels")
    return images, labels


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )


def _images_under(folder: Path) -> list[Path]:
    files = [
        f
        for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    ]
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


def _scan_classes(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    paths: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(names):
        sub = folder / name
        files = _images_under(sub) if sub.is_dir() else []
        paths += [str(f) for f in files]
        labels += [c] * len(files)
    arr = np.empty(len(paths), dtype=object)
    arr[:] = paths
    return arr, np.asarray(labels, dtype=np.int64)


def load_class_folders(folder: Path, class_names: str | None = None) -> Source | None:
    """A class-folder tree as a source, or None when ``folder`` has no image in class folders.

    ``folder/train/<class>/`` with ``folder/test/<class>/`` is a train-test source (the classes
    are train's); otherwise ``folder/<class>/`` is a single source. Images are found
    recursively under each class folder and ordered by relative path; class indices follow
    the sorted folder names.
    """
    if class_names:
        raise BuildError("--class-names: a class-folder source takes its names from the folders")
    train, test = folder / "train", folder / "test"
    separate = train.is_dir() and test.is_dir() and bool(_class_folders(train))
    top = train if separate else folder
    names = [d.name for d in _class_folders(top)]
    if not names:
        return None
    images, labels = _scan_classes(top, names)
    if not len(images):
        return None
    test_images = test_labels = None
    if separate:
        extra = sorted({d.name for d in _class_folders(test)} - set(names))
        if extra:
            raise BuildError(f"{test}: class folder(s) {extra} are not in {train}")
        test_images, test_labels = _scan_classes(test, names)
    return Source(str(folder), images, labels, names, test_images, test_labels)


def load_source(source: str, class_names: str | None = None) -> Source:
    """Load ``mnist-sample``, ``fashion-mnist``, a folder of IDX files with standard names, or a
    class-folder tree (:func:`load_class_folders`).

    A folder with ``train-*`` and ``t10k-*`` pairs is a train-test source (test from t10k);
    a folder with one pair (``images-idx3-ubyte.gz``/``labels-idx1-ubyte.gz``, or only the
    train or only the t10k pair) is a single source.
    """
    if source == "mnist-sample":
        folder, name = MNIST_SAMPLE_DIR, "mnist-sample"
        if _find(folder, "images-idx3-ubyte") is None:
            raise BuildError(f"bundled MNIST sample missing from {folder}")
        default_names = "digits"
    elif source == "fashion-mnist":
        folder, name = FASHION_MNIST_DIR, "fashion-mnist"
        if _find(folder, "train-images-idx3-ubyte") is None:
            raise BuildError(
                f"Fashion-MNIST not found in {folder}; install it with "
                "`sudo apt-get install -y dataset-fashion-mnist` (or pass --source DIR)"
            )
        default_names = "fashion"
    else:
        folder, name = Path(source), str(source)
        if not folder.is_dir():
            raise BuildError(
                f"--source {source!r}: not 'mnist-sample', 'fashion-mnist' or an existing folder"
            )
        default_names = "digits"

    pairs = {
        prefix: (
            _find(folder, f"{prefix}images-idx3-ubyte"),
            _find(folder, f"{prefix}labels-idx1-ubyte"),
        )
        for prefix in ("train-", "t10k-", "")
    }
    complete = {p: v for p, v in pairs.items() if v[0] is not None and v[1] is not None}
    if not complete and name not in ("mnist-sample", "fashion-mnist"):
        tree = load_class_folders(folder, class_names)
        if tree is not None:
            return tree
    test_images = test_labels = None
    if "train-" in complete and "t10k-" in complete:
        images, labels = _load_pair(*complete["train-"])
        test_images, test_labels = _load_pair(*complete["t10k-"])
        if test_images.shape[1:] != images.shape[1:]:
            raise BuildError(f"{folder}: train and t10k images differ in size")
    elif len(complete) == 1:
        images, labels = _load_pair(*next(iter(complete.values())))
    elif not complete:
        raise BuildError(
            f"{folder}: neither class folders of images nor IDX files with standard names "
            "(train-images-idx3-ubyte.gz + train-labels-idx1-ubyte.gz, t10k-..., or "
            "images-idx3-ubyte.gz + labels-idx1-ubyte.gz)"
        )
    else:
        raise BuildError(f"{folder}: ambiguous IDX files {sorted(complete)}; keep one set")

    n_classes = int(max(labels.max(), -1 if test_labels is None else test_labels.max())) + 1
    names = resolve_class_names(class_names or default_names, n_classes)
    return Source(name, images, labels, names, test_images, test_labels)


def resolve_class_names(spec: str, n_classes: int) -> list[str]:
    """``digits`` (0, 1, ...), ``fashion`` (0-tshirt, ...), or a comma-separated list."""
    if spec == "digits":
        return [str(i) for i in range(n_classes)]
    names = FASHION_NAMES if spec == "fashion" else [s.strip() for s in spec.split(",")]
    if len(names) != n_classes:
        raise BuildError(f"--class-names: {len(names)} names given for {n_classes} classes")
    for n in names:
        if not n or n in (".", "..") or "/" in n or "\\" in n:
            raise BuildError(f"--class-names: {n!r} is not usable as a folder name")
    if len(set(names)) != len(names):
        raise BuildError("--class-names: names must be distinct")
    return list(names)


# --------------------------------------------------------------------------------------------
# Planning the splits


@dataclass
class SplitPlan:
    """Source indices of each split.

    ``val``, ``labeled`` and ``pool`` index ``Source.images``; ``test`` indexes
    ``Source.test_images`` when ``test_separate`` and ``Source.images`` otherwise. ``pool`` is
    in file order: pool image ``i`` is written as ``unlabeled/<i:06d>.png``.
    """

    val: np.ndarray
    test: np.ndarray
    labeled: np.ndarray
    pool: np.ndarray
    test_separate: bool
    rare: tuple[int, ...]
    imbalance: float
    n_pool_nonrare: int
    n_pool_rare: int


def rare_quota(n_nonrare: int, imbalance: float) -> int:
    """Number of rare-class images in the pool: ``floor(n_nonrare / imbalance)``.

    The division is exact on the decimal value of ``imbalance`` (no float rounding surprises).
    """
    return math.floor(Fraction(n_nonrare) / Fraction(repr(float(imbalance))))


def plan_splits(
    labels: np.ndarray,
    *,
    val_per_class: int,
    test_per_class: int | None,
    labeled_per_class: int,
    rare: tuple[int, ...],
    imbalance: float,
    seed: int,
    test_labels: np.ndarray | None = None,
    pool_per_class: int | None = None,
) -> SplitPlan:
    """Draw the splits. ``test_per_class`` None means the whole separate test set;
    ``pool_per_class`` caps each class's images left for the pool (before the rare draw; None:
    all of them), a random subset drawn from the same permutation, so the other splits do not
    change with it.

    Randomness comes from three independent streams spawned from ``seed`` (val/test/labeled
    per class; the separate test set; the rare draw and pool order), so e.g. changing the
    separate test size leaves val and the pool unchanged.
    """
    if imbalance < 1:
        raise BuildError(f"--imbalance must be >= 1 (got {imbalance})")
    for name, n in (("val", val_per_class), ("labeled", labeled_per_class)):
        if n < 0:
            raise BuildError(f"--{name}-per-class must be >= 0")
    if test_per_class is not None and test_per_class < 0:
        raise BuildError("--test-per-class must be >= 0")
    if pool_per_class is not None and pool_per_class < 1:
        raise BuildError("--pool-per-class must be >= 1")
    separate = test_labels is not None
    if test_per_class is None and not separate:
        raise BuildError("--test-per-class all needs a source with a separate t10k test set")

    split_ss, test_ss, pool_ss = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(split_ss)
    classes = np.unique(labels)
    rare_set = set(rare)
    class_set = {int(c) for c in classes}
    unknown = rare_set - class_set
    if unknown:
        raise BuildError(f"--rare: no images of class(es) {sorted(unknown)} in the source")
    if not class_set - rare_set:
        raise BuildError("--rare lists every class; at least one class must be non-rare")

    n_test_here = 0 if separate else test_per_class
    val, test, labeled, left_nonrare, left_rare = [], [], [], [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        need = val_per_class + n_test_here + labeled_per_class
        if need > len(idx):
            raise BuildError(
                f"class {c} has {len(idx)} images, fewer than val+test+labeled = {need} per class"
            )
        val.append(idx[:val_per_class])
        test.append(idx[val_per_class : val_per_class + n_test_here])
        labeled.append(idx[val_per_class + n_test_here : need])
        left = idx[need:] if pool_per_class is None else idx[need : need + pool_per_class]
        (left_rare if int(c) in rare_set else left_nonrare).append(left)

    if separate:
        test = []
        trng = np.random.default_rng(test_ss)
        for c in np.unique(test_labels):
            idx = trng.permutation(np.flatnonzero(test_labels == c))
            if test_per_class is not None and test_per_class > len(idx):
                raise BuildError(
                    f"class {c} has {len(idx)} test images, fewer than --test-per-class "
                    f"{test_per_class}"
                )
            test.append(idx if test_per_class is None else idx[:test_per_class])

    prng = np.random.default_rng(pool_ss)
    nonrare = np.concatenate(left_nonrare) if left_nonrare else np.empty(0, np.int64)
    rare_left = np.concatenate(left_rare) if left_rare else np.empty(0, np.int64)
    n_rare = min(rare_quota(len(nonrare), imbalance), len(rare_left))
    rare_pick = prng.choice(rare_left, size=n_rare, replace=False) if n_rare else rare_left[:0]
    pool = prng.permutation(np.concatenate([nonrare, rare_pick]))

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)

    return SplitPlan(
        val=cat(val),
        test=cat(test),
        labeled=cat(labeled),
        pool=pool.astype(np.int64),
        test_separate=separate,
        rare=tuple(sorted(rare_set)),
        imbalance=float(imbalance),
        n_pool_nonrare=len(nonrare),
        n_pool_rare=int(n_rare),
    )


# --------------------------------------------------------------------------------------------
# Writing


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Save a 2-D uint8 array as an 8-bit greyscale PNG (lossless)."""
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, optimize=False)


def _save_chunk(job: tuple[list[str], np.ndarray]) -> int:
    paths, images = job
    for p, im in zip(paths, images):
        if isinstance(im, str):  # a class-folder source: the file as it is
            shutil.copyfile(im, p)
        else:
            save_png(p, im)
    return len(paths)


def _suffix(images: np.ndarray, i: int) -> str:
    """The output file suffix of image ``i``: the source file's, or .png for arrays."""
    return Path(images[i]).suffix.lower() if images.dtype == object else ".png"


def _write_pngs(paths: list[str], images: np.ndarray, workers: int, chunk: int = 2000) -> None:
    jobs = [(paths[i : i + chunk], images[i : i + chunk]) for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _save_chunk(job)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        for _ in pool.imap_unordered(_save_chunk, jobs):
            pass


def output_paths(out: Path, plan: SplitPlan, pool_layout: str) -> list[Path]:
    """The top-level entries under ``out`` that a build with this plan writes."""
    names = ["val", "test", "unlabeled"]
    if len(plan.labeled):
        names.insert(2, "labeled")
    paths = [out / n for n in names]
    if pool_layout == "flat":
        paths.append(out / TRUTH_CSV)
    return paths


def _replaced_paths(out: Path, plan: SplitPlan, pool_layout: str) -> list[Path]:
    """What a build replaces: its outputs plus a truth CSV that would describe an old pool."""
    paths = output_paths(out, plan, pool_layout)
    if pool_layout != "flat":
        paths.append(out / TRUTH_CSV)
    return paths


def _index_width(n: int) -> int:
    return max(5, len(str(max(n - 1, 0))))


def build(
    source: Source,
    out: str | Path,
    plan: SplitPlan,
    *,
    pool_layout: str = "flat",
    force: bool = False,
    workers: int = 2,
) -> dict[str, dict[str, int]]:
    """Write the PNG folders for ``plan``. Returns ``{split: {class_name: count}}``.

    Everything is written into a staging folder inside ``out`` first and moved into place at
    the end, so an interrupted build leaves no half-written split behind.
    """
    if pool_layout not in ("flat", "classes"):
        raise BuildError(f"--pool-layout must be 'flat' or 'classes' (got {pool_layout!r})")
    out = Path(out)
    targets = output_paths(out, plan, pool_layout)
    existing = [p for p in _replaced_paths(out, plan, pool_layout) if p.exists() or p.is_symlink()]
    if existing and not force:
        listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in existing)
        raise BuildError(f"{out} already contains {listing}; pass --force to replace them")
    if not len(plan.labeled) and (out / "labeled").exists():
        print(
            f"warning: {out / 'labeled'} is left as it is but was not written by this build "
            "(--labeled-per-class 0); it may overlap the new pool",
            file=sys.stderr,
        )

    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    names = source.class_names
    counts: dict[str, dict[str, int]] = {}
    paths: list[str] = []
    images: list[np.ndarray] = []

    def labelled_split(split: str, idx: np.ndarray, imgs: np.ndarray, labs: np.ndarray) -> None:
        width = _index_width(len(imgs))
        counts[split] = {n: 0 for n in names}
        for c in range(len(names)):
            (staging / split / names[c]).mkdir(parents=True)
        for i in idx:
            name = names[labs[i]]
            counts[split][name] += 1
            paths.append(str(staging / split / name / f"{i:0{width}d}{_suffix(imgs, i)}"))
        images.append(imgs[idx])

    labelled_split("val", plan.val, source.images, source.labels)
    if plan.test_separate:
        labelled_split("test", plan.test, source.test_images, source.test_labels)
    else:
        labelled_split("test", plan.test, source.images, source.labels)
    if len(plan.labeled):
        labelled_split("labeled", plan.labeled, source.images, source.labels)

    pool_dir = staging / "unlabeled"
    pool_dir.mkdir()
    width = max(6, len(str(max(len(plan.pool) - 1, 0))))
    counts["unlabeled"] = {n: 0 for n in names}
    truth: list[tuple[str, str]] = []
    if pool_layout == "classes":
        for n in names:
            (pool_dir / n).mkdir()
    for pos, i in enumerate(plan.pool):
        name = names[source.labels[i]]
        counts["unlabeled"][name] += 1
        fname = f"{pos:0{width}d}{_suffix(source.images, i)}"
        if pool_layout == "classes":
            paths.append(str(pool_dir / name / fname))
        else:
            paths.append(str(pool_dir / fname))
            truth.append((fname, name))
    images.append(source.images[plan.pool])

    if source.images.dtype == object:
        all_images = np.concatenate(images) if images else np.empty(0, dtype=object)
    else:
        all_images = np.concatenate(images) if images else np.empty((0, 1, 1), np.uint8)
    _write_pngs(paths, all_images, workers)
    if pool_layout == "flat":
        with open(staging / TRUTH_CSV, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "label"])
            w.writerows(truth)

    for target in existing:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    for target in targets:
        (staging / target.name).rename(target)
    shutil.rmtree(staging)
    return counts


# --------------------------------------------------------------------------------------------
# Command line


def _parse_rare(spec: str, class_names: list[str]) -> tuple[int, ...]:
    out = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok in class_names:
            out.append(class_names.index(tok))
        elif tok.isdigit() and int(tok) < len(class_names):
            out.append(int(tok))
        else:
            raise BuildError(f"--rare: {tok!r} is neither a class index nor a class name")
    return tuple(sorted(set(out)))


def _per_class(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def _nonneg_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_biased_folders.py",
        description=(
            "Build val/, test/, optional labeled/ and a class-imbalanced unlabeled/ pool of "
            "images from MNIST-style IDX files (written as PNG) or from any class-folder tree "
            "(files copied as they are). The pool keeps every remaining image of the "
            "non-rare classes and floor(n_nonrare / r) images drawn at random from the rare "
            "classes taken together."
        ),
    )
    p.add_argument(
        "--source",
        default="mnist-sample",
        help="'mnist-sample' (bundled 8,000-digit sample, default), 'fashion-mnist' "
        f"({FASHION_MNIST_DIR}, Debian package dataset-fashion-mnist), a folder with IDX "
        "files of standard names, or any class-folder tree DIR/<class>/... (or DIR/train/<class>/"
        " with DIR/test/<class>/ as the test set, e.g. unpacked CIFAR-10); its files are copied",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--val-per-class",
        type=_nonneg_int,
        help="labelled validation images per class (default: 100 for a single IDX pair such as "
        "mnist-sample, 1000 for train+t10k sources such as fashion-mnist)",
    )
    p.add_argument(
        "--test-per-class",
        type=_per_class,
        help="test images per class, or 'all' (default: 100 for single sources; 'all' of the "
        "official t10k set for train+t10k sources, where test is drawn from t10k)",
    )
    p.add_argument(
        "--labeled-per-class",
        type=_nonneg_int,
        help="labelled seed images per class written to labeled/ (default: 200 for single "
        "sources, 0 = not written for train+t10k sources)",
    )
    p.add_argument(
        "--pool-per-class",
        type=int,
        metavar="N",
        help="at most N images of each class left for the pool, drawn at random, before the "
        "rare draw (default: all; the other splits do not change with it)",
    )
    p.add_argument(
        "--rare",
        default="5,6,7,8,9",
        help="comma-separated rare classes, by index or folder name (default: 5,6,7,8,9)",
    )
    p.add_argument(
        "--imbalance",
        type=float,
        default=10.0,
        metavar="R",
        help="pool holds floor(n_nonrare / R) rare images in total (default 10; 1 = none)",
    )
    p.add_argument(
        "--pool-layout",
        choices=("flat", "classes"),
        default="flat",
        help="flat: unlabeled/000123.png plus unlabeled-truth.csv (default); "
        "classes: unlabeled/<class>/000123.png",
    )
    p.add_argument(
        "--class-names",
        help="'digits', 'fashion' or a comma-separated list (default: fashion for "
        "fashion-mnist, digits otherwise)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--workers", type=int, default=2, help="processes writing PNGs (default 2; 1 = none)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace the output sub-folders if they exist"
    )
    return p


def summary(counts: dict[str, dict[str, int]], plan: SplitPlan, class_names: list[str]) -> str:
    lines = []
    for split, per in counts.items():
        lines.append(f"{split:>10}: {sum(per.values()):6d} images")
    pool = counts["unlabeled"]
    lines.append("  pool per class: " + ", ".join(f"{k}={v}" for k, v in pool.items()))
    rare = ",".join(class_names[c] for c in plan.rare) or "-"
    ratio = plan.n_pool_nonrare / plan.n_pool_rare if plan.n_pool_rare else float("inf")
    lines.append(
        f"  pool non-rare={plan.n_pool_nonrare}, rare={plan.n_pool_rare} (rare classes {rare}; "
        f"ratio {ratio:.3g}, asked {plan.imbalance:g})"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    t0 = time.perf_counter()
    source = load_source(args.source, args.class_names)
    d = DEFAULTS[source.kind]
    val = d["val"] if args.val_per_class is None else args.val_per_class
    test = d["test"] if args.test_per_class is None else args.test_per_class
    test = None if test == "all" else test
    labeled = d["labeled"] if args.labeled_per_class is None else args.labeled_per_class
    plan = plan_splits(
        source.labels,
        val_per_class=val,
        test_per_class=test,
        labeled_per_class=labeled,
        rare=_parse_rare(args.rare, source.class_names),
        imbalance=args.imbalance,
        seed=args.seed,
        test_labels=source.test_labels,
        pool_per_class=args.pool_per_class,
    )
    counts = build(
        source, args.out, plan, pool_layout=args.pool_layout, force=args.force, workers=args.workers
    )
    print(f"{source.name} -> {args.out} (seed {args.seed})", file=sys.stderr)
    print(summary(counts, plan, source.class_names), file=sys.stderr)
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
