"""Tests for the bundled MNIST sample and examples/make_biased_folders.py."""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "make_biased_folders.py"
SAMPLE = ROOT / "examples" / "data" / "mnist-sample"


def _load_module():
    name = "make_biased_folders"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so multiprocessing workers can pickle its functions
    spec.loader.exec_module(module)
    return module


mbf = _load_module()
DEFAULT_KW = {
    "val_per_class": 100,
    "test_per_class": 100,
    "labeled_per_class": 200,
    "rare": (5, 6, 7, 8, 9),
}


@pytest.fixture(scope="module")
def source():
    return mbf.load_source("mnist-sample")


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "folders"
    assert mbf.main(["--out", str(out)]) == 0
    return out


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im).copy()


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# the bundled sample


def test_bundled_sample_is_compact_and_stratified(source):
    size = sum(p.stat().st_size for p in SAMPLE.glob("*.gz"))
    assert size < 2_000_000
    assert (SAMPLE / "README.md").is_file()
    assert source.images.shape == (8000, 28, 28) and source.images.dtype == np.uint8
    assert np.bincount(source.labels).tolist() == [800] * 10
    assert source.kind == "single" and source.class_names == [str(i) for i in range(10)]


def test_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    mbf.write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    back = mbf.read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert back.dtype == np.uint8 and np.array_equal(back, arr)
    mbf.write_idx(tmp_path / "y.gz", arr)  # deterministic bytes (gzip mtime 0)
    assert (tmp_path / "y.gz").read_bytes() == (tmp_path / "x-idx3-ubyte.gz").read_bytes()


def test_png_roundtrip_is_lossless(tmp_path, source):
    for img in (source.images[0], np.arange(784, dtype=np.int64).reshape(28, 28) % 256):
        img = img.astype(np.uint8)
        mbf.save_png(tmp_path / "a.png", img)
        back = _read_png(tmp_path / "a.png")
        assert back.shape == (28, 28) and back.dtype == np.uint8
        assert np.array_equal(back, img)


# --------------------------------------------------------------------------------------------
# planning


def test_default_plan_counts_and_disjointness(source):
    plan = mbf.plan_splits(source.labels, imbalance=10, seed=0, **DEFAULT_KW)
    labels = source.labels
    assert np.bincount(labels[plan.val], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels[plan.test], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels[plan.labeled], minlength=10).tolist() == [200] * 10
    pool_counts = np.bincount(labels[plan.pool], minlength=10)
    assert pool_counts[:5].tolist() == [400] * 5
    assert pool_counts[5:].sum() == 200
    assert (plan.n_pool_nonrare, plan.n_pool_rare) == (2000, 200)
    assert not plan.test_separate

    splits = {"val": plan.val, "test": plan.test, "labeled": plan.labeled, "pool": plan.pool}
    for name, idx in splits.items():
        assert len(np.unique(idx)) == len(idx), f"{name} has repeated indices"
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(splits[a].tolist()) & set(splits[b].tolist()), (a, b)


@pytest.mark.parametrize(
    "imbalance, n_rare", [(1, 2000), (2, 1000), (3, 666), (7.5, 266), (10, 200), (1000, 2)]
)
def test_pool_imbalance_is_floor_of_ratio(source, imbalance, n_rare):
    plan = mbf.plan_splits(source.labels, imbalance=imbalance, seed=3, **DEFAULT_KW)
    pool_labels = source.labels[plan.pool]
    nonrare = int(np.isin(pool_labels, [0, 1, 2, 3, 4]).sum())
    rare = len(pool_labels) - nonrare
    assert nonrare == 2000
    assert rare == n_rare == math.floor(nonrare / imbalance)
    assert plan.n_pool_rare == rare


def test_seed_controls_the_pool(source):
    a = mbf.plan_splits(source.labels, imbalance=10, seed=0, **DEFAULT_KW)
    b = mbf.plan_splits(source.labels, imbalance=10, seed=0, **DEFAULT_KW)
    c = mbf.plan_splits(source.labels, imbalance=10, seed=1, **DEFAULT_KW)
    for split in ("val", "test", "labeled", "pool"):
        assert np.array_equal(getattr(a, split), getattr(b, split))
    assert set(a.pool.tolist()) != set(c.pool.tolist())


def test_pool_per_class_caps_the_pool_and_leaves_the_other_splits(source):
    full = mbf.plan_splits(source.labels, imbalance=1, seed=0, **DEFAULT_KW)
    capped = mbf.plan_splits(source.labels, imbalance=1, seed=0, pool_per_class=150, **DEFAULT_KW)
    for split in ("val", "test", "labeled"):
        assert np.array_equal(getattr(full, split), getattr(capped, split))
    assert np.bincount(source.labels[capped.pool], minlength=10).tolist() == [150] * 10
    assert set(capped.pool.tolist()) < set(full.pool.tolist())
    biased = mbf.plan_splits(source.labels, imbalance=10, seed=0, pool_per_class=150, **DEFAULT_KW)
    assert (biased.n_pool_nonrare, biased.n_pool_rare) == (750, 75)
    with pytest.raises(mbf.BuildError, match="pool-per-class"):
        mbf.plan_splits(source.labels, imbalance=1, seed=0, pool_per_class=0, **DEFAULT_KW)


def test_plan_rejects_bad_requests(source):
    with pytest.raises(mbf.BuildError, match="fewer than"):
        mbf.plan_splits(
            source.labels, imbalance=10, seed=0, **{**DEFAULT_KW, "labeled_per_class": 700}
        )
    with pytest.raises(mbf.BuildError, match="imbalance"):
        mbf.plan_splits(source.labels, imbalance=0.5, seed=0, **DEFAULT_KW)
    with pytest.raises(mbf.BuildError, match="every class"):
        mbf.plan_splits(
            source.labels, imbalance=10, seed=0, **{**DEFAULT_KW, "rare": tuple(range(10))}
        )


# --------------------------------------------------------------------------------------------
# building folders


def test_default_build_layout_and_counts(default_build, source):
    out = default_build
    for split, per_class in (("val", 100), ("test", 100), ("labeled", 200)):
        dirs = sorted(p.name for p in (out / split).iterdir())
        assert dirs == [str(i) for i in range(10)]
        for d in dirs:
            assert len(_pngs(out / split / d)) == per_class, (split, d)
    pool = out / "unlabeled"
    assert all(p.is_file() and p.suffix == ".png" for p in pool.iterdir())  # flat
    assert len(list(pool.iterdir())) == 2200
    assert not (out / "unlabeled" / "unlabeled-truth.csv").exists()
    assert not list(out.glob(".*"))  # no staging folder left behind

    # labelled files hold images of their folder's class, named by source index
    plan = mbf.plan_splits(source.labels, imbalance=10, seed=0, **DEFAULT_KW)
    for split in ("val", "test", "labeled"):
        idx = sorted(int(p.stem) for p in _pngs(out / split))
        assert idx == sorted(getattr(plan, split).tolist())
    for p in _pngs(out / "val")[::37]:
        assert source.labels[int(p.stem)] == int(p.parent.name)
        assert np.array_equal(_read_png(p), source.images[int(p.stem)])


def test_truth_csv_matches_source(default_build, source):
    out = default_build
    plan = mbf.plan_splits(source.labels, imbalance=10, seed=0, **DEFAULT_KW)
    with open(out / "unlabeled-truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan.pool) == 2200
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in (out / "unlabeled").iterdir())
    for pos, row in enumerate(rows):
        src = plan.pool[pos]
        assert row["path"] == f"{pos:06d}.png"
        assert row["label"] == str(source.labels[src])
        if pos % 11 == 0:
            assert np.array_equal(_read_png(out / "unlabeled" / row["path"]), source.images[src])
    counts = np.bincount([int(r["label"]) for r in rows], minlength=10)
    assert counts[:5].tolist() == [400] * 5 and counts[5:].sum() == 200


def test_same_seed_same_output_and_refusal_without_force(default_build, tmp_path):
    again = tmp_path / "again"
    assert mbf.main(["--out", str(again), "--workers", "1"]) == 0
    assert _tree(again) == _tree(default_build)

    # a second run into the same folder is refused with exit status 1 (real CLI) ...
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(again)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "--force" in proc.stderr
    # ... and --force replaces the folders: a different seed gives a different pool
    assert mbf.main(["--out", str(again), "--seed", "1", "--force"]) == 0
    pool_a = {_read_png(p).tobytes() for p in _pngs(default_build / "unlabeled")}
    pool_b = {_read_png(p).tobytes() for p in _pngs(again / "unlabeled")}
    assert pool_a != pool_b
    assert len(pool_b) == len(_pngs(again / "unlabeled")) == 2200


def test_pool_layout_classes(tmp_path, source):
    out = tmp_path / "cls"
    (out / "unrelated").mkdir(parents=True)  # other content is allowed and kept
    argv = ["--out", str(out), "--pool-layout", "classes", "--imbalance", "4", "--workers", "1"]
    assert mbf.main(argv) == 0
    pool = out / "unlabeled"
    assert sorted(p.name for p in pool.iterdir()) == [str(i) for i in range(10)]
    counts = [len(_pngs(pool / str(c))) for c in range(10)]
    assert counts[:5] == [400] * 5 and sum(counts[5:]) == 500
    assert not (out / "unlabeled-truth.csv").exists()
    assert (out / "unrelated").is_dir()
    labels_of = {}
    for img, lab in zip(source.images, source.labels):
        labels_of.setdefault(img.tobytes(), set()).add(int(lab))
    for p in _pngs(pool)[::7]:
        assert int(p.parent.name) in labels_of[_read_png(p).tobytes()]


def test_no_labeled_folder_when_zero(tmp_path):
    out = tmp_path / "o"
    assert mbf.main(["--out", str(out), "--labeled-per-class", "0", "--workers", "1"]) == 0
    assert not (out / "labeled").exists()
    assert len(_pngs(out / "unlabeled")) == 5 * 600 + 300


def test_directory_source_with_train_and_t10k(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    train_labels = np.repeat(np.arange(3, dtype=np.uint8), 40)
    test_labels = np.repeat(np.arange(3, dtype=np.uint8), 10)
    for prefix, labels in (("train-", train_labels), ("t10k-", test_labels)):
        imgs = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        mbf.write_idx(src / f"{prefix}images-idx3-ubyte.gz", imgs)
        mbf.write_idx(src / f"{prefix}labels-idx1-ubyte.gz", labels)
    out = tmp_path / "out"
    argv = ["--source", str(src), "--out", str(out), "--val-per-class", "5", "--rare", "2"]
    assert mbf.main([*argv, "--imbalance", "8", "--class-names", "a,b,c", "--workers", "1"]) == 0
    assert [len(_pngs(out / "val" / c)) for c in "abc"] == [5, 5, 5]
    assert [len(_pngs(out / "test" / c)) for c in "abc"] == [10, 10, 10]  # all of t10k
    assert not (out / "labeled").exists()
    with open(out / "unlabeled-truth.csv", newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert labels.count("a") == labels.count("b") == 35 and labels.count("c") == 70 // 8


def test_fashion_missing_gives_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mbf, "FASHION_MNIST_DIR", tmp_path / "nope")
    assert mbf.main(["--source", "fashion-mnist", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install -y dataset-fashion-mnist" in err and err.count("\n") == 1


@pytest.mark.skipif(
    not (mbf.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed",
)
def test_fashion_mnist_default_plan():
    src = mbf.load_source("fashion-mnist")
    assert src.class_names[0] == "0-tshirt" and src.class_names[9] == "9-ankle-boot"
    d = mbf.DEFAULTS[src.kind]
    plan = mbf.plan_splits(
        src.labels,
        val_per_class=d["val"],
        test_per_class=d["test"],
        labeled_per_class=d["labeled"],
        rare=(5, 6, 7, 8, 9),
        imbalance=1,
        seed=0,
        test_labels=src.test_labels,
    )
    assert plan.test_separate and len(plan.test) == 10_000
    assert len(plan.val) == 10_000 and len(plan.labeled) == 0
    assert len(plan.pool) == 50_000 and not set(plan.val.tolist()) & set(plan.pool.tolist())


def _class_tree(root: Path, per_class: dict[str, int], seed: int) -> dict[str, list[Path]]:
    """RGB images of varying sizes, PNG and JPEG, some in nested folders."""
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {}
    for c, n in per_class.items():
        files[c] = []
        for i in range(n):
            sub = root / c / ("nested" if i % 5 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(8, 20)), int(rng.integers(8, 20)), 3)
            img = Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "RGB")
            path = sub / f"{c}{i:03d}.{'jpg' if i % 2 else 'png'}"
            img.save(path)
            files[c].append(path)
    (root / "notes.txt").write_text("not an image")
    return files


def test_class_folder_tree_with_train_and_test_is_copied_byte_for_byte(tmp_path):
    src = tmp_path / "tree"
    train = _class_tree(src / "train", {"cat": 30, "dog": 30, "owl": 30}, 0)
    test = _class_tree(src / "test", {"cat": 4, "dog": 4, "owl": 4}, 1)
    out = tmp_path / "out"
    argv = ["--source", str(src), "--out", str(out), "--val-per-class", "5", "--rare", "owl",
            "--imbalance", "10", "--workers", "1", "--pool-layout", "classes"]  # fmt: skip
    assert mbf.main(argv) == 0
    originals = {p.read_bytes(): c for c, ps in train.items() for p in ps}
    test_bytes = {p.read_bytes(): c for c, ps in test.items() for p in ps}
    for split, ref, n in (("val", originals, 5), ("test", test_bytes, 4)):
        for c in ("cat", "dog", "owl"):
            got = sorted((out / split / c).iterdir())
            assert len(got) == n
            assert all(ref[p.read_bytes()] == c and p.suffix in (".png", ".jpg") for p in got)
    pool = {c: sorted((out / "unlabeled" / c).iterdir()) for c in ("cat", "dog", "owl")}
    assert [len(pool[c]) for c in ("cat", "dog")] == [25, 25] and len(pool["owl"]) == 50 // 10
    all_out = [p.read_bytes() for d in ("val", "unlabeled") for p in (out / d).rglob("*.*")]
    assert len(set(all_out)) == len(all_out)  # no image in two places
    assert all(originals[b] for b in all_out)
    again = tmp_path / "again"
    assert mbf.main([*argv[:2], "--out", str(again), *argv[4:]]) == 0
    assert _tree(again) == _tree(out)  # same seed, same files


def test_single_class_folder_tree_and_its_errors(tmp_path, capsys):
    src = tmp_path / "mine"
    _class_tree(src, {"a": 12, "b": 12}, 2)
    out = tmp_path / "out"
    argv = ["--source", str(src), "--out", str(out), "--val-per-class", "2", "--test-per-class",
            "2", "--labeled-per-class", "1", "--rare", "b", "--imbalance", "2", "--workers", "1"]  # fmt: skip
    assert mbf.main(argv) == 0
    assert [len(list((out / "test" / c).iterdir())) for c in "ab"] == [2, 2]
    with open(out / "unlabeled-truth.csv", newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert labels.count("a") == 7 and labels.count("b") == 3
    assert mbf.main([*argv, "--force", "--class-names", "x,y"]) == 1
    assert "takes its names from the folders" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    assert mbf.main(["--source", str(empty), "--out", str(tmp_path / "o2")]) == 1
    assert "neither class folders of images nor IDX files" in capsys.readouterr().err
