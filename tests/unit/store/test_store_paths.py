"""A big pool's paths read a block at a time (issue 12): ``StorePaths``, ``PathIndex`` and an
``alfk score`` that never holds the pool's paths as a list (10M of them took ~2 GiB to read)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.selection.workdir import PathIndex, match_exclusions
from alfk_cli.store.format import STR, str_array
from alfk_cli.store.reader import FeatureStore, StorePaths
from conftest import make_labelled, write_images

NAMES = [f"d{i % 4}/img{i:03d}.png" for i in range(23)]


@pytest.fixture
def lazy(tmp_path, monkeypatch):
    """NAMES in an HDF5 ``paths`` dataset, read 5 rows per block."""
    monkeypatch.setattr(StorePaths, "BLOCK", 5)
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.create_dataset("paths", data=str_array(NAMES), dtype=STR)
    f = h5py.File(tmp_path / "p.h5", "r")
    yield StorePaths(f["paths"])
    f.close()


def test_store_paths_read_like_the_list(lazy):
    assert len(lazy) == 23 and list(lazy) == NAMES
    assert lazy[0] == NAMES[0] and lazy[-1] == NAMES[-1] and lazy[7:12] == NAMES[7:12]
    with pytest.raises(IndexError):
        lazy[23]
    rows = np.array([9, 2, 9, 22, 0])
    assert lazy.at(rows) == [NAMES[r] for r in rows] and lazy.at(np.array([], int)) == []
    cached = StorePaths(lazy.ds, NAMES)
    assert list(cached) == NAMES and cached.at(rows) == lazy.at(rows) and cached[3] == NAMES[3]


def test_path_index_answers_by_hash_and_confirms_by_path(lazy, monkeypatch):
    index = PathIndex(lazy)
    assert [index.get(p) for p in NAMES] == list(range(23)) and index.confirmed()
    assert index.get("d0/img999.png") is None and index.get("") is None and index.confirmed()
    twice = PathIndex(["a.png", "b.png", "a.png"])  # as a dict in row order: the last row
    assert twice.get("a.png") == 2 and twice.get("b.png") == 1 and twice.confirmed()
    # every path in one of three hash buckets: answers by hash go wrong, and it is noticed
    monkeypatch.setattr(PathIndex, "hash_of", staticmethod(lambda s: len(s) % 3))
    colliding = PathIndex(lazy)
    assert colliding.get("d1/img001.png") == 22 and not colliding.confirmed()


def test_exclusions_match_alike_from_a_list_and_from_a_store(lazy, tmp_path, monkeypatch):
    pool = tmp_path / "eco" / "unlabeled"
    for name in NAMES:
        (pool / name).parent.mkdir(parents=True, exist_ok=True)
        (pool / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "eco")
    lines = [
        NAMES[1],
        f"unlabeled/{NAMES[4]}",
        str(pool / NAMES[8]),
        f"/else/unlabeled/{NAMES[20]}",
    ]
    sent = tmp_path / "sent.txt"
    sent.write_text("\n".join([*lines, "unlabeled/d9/none.png"]) + "\n")
    from_list = match_exclusions(sent, "unlabeled", NAMES)
    assert from_list.rows == [1, 4, 8, 20] and from_list.unmatched == 1
    assert match_exclusions(sent, "unlabeled", lazy) == from_list
    # hash collisions everywhere: the answers fail their check and the paths decide instead
    monkeypatch.setattr(PathIndex, "hash_of", staticmethod(lambda s: len(s) % 3))
    assert match_exclusions(sent, "unlabeled", lazy) == from_list


def test_score_never_reads_the_pool_paths_as_a_list(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b"], 3)
    write_images(Path("pool"), 30, seed=3)
    model = build_model("lenet", len(ROTATION_CLASSES), seed=0)
    save_checkpoint("init.pt", model, "lenet", list(ROTATION_CLASSES), head="rotation")
    embed = ("embed", "--model", "init.pt", "--device", "cpu", "--workers", "0")
    assert cli(*embed, "--images", "val", "--out", "val.h5").exit_code == 0
    assert (
        cli(*embed, "--images", "pool", "--reference", "val.h5", "--out", "pool.h5").exit_code == 0
    )
    Path("sent.txt").write_text("pool/img0003.png\nimg0011.png\n")
    every_path = FeatureStore.paths

    def guarded(self: FeatureStore) -> list[str]:
        assert self.path.name != "pool.h5", "score held every pool path in a list"
        return every_path.fget(self)

    monkeypatch.setattr(FeatureStore, "paths", property(guarded))
    r = cli("score", "--val", "val.h5", "--pool", "pool.h5", "--P", "28", "--exclude", "sent.txt",
            "--out", "s.h5")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "excluded 2 pool image(s)" in r.stderr
    printed = cli("select", "--scores", "s.h5").stdout.splitlines()
    want = {f"pool/img{i:04d}.png" for i in range(30)} - {"pool/img0003.png", "pool/img0011.png"}
    assert sorted(printed) == sorted(want)  # the paths of the selected rows, read row by row
