"""``--pool-list``: a pool's images named in a file (or on stdin) instead of found by a walk."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import alfk_cli.data.decode as images_mod
from alfk_cli.data.poollist import read_pool_list, scan_pool
from alfk_cli.data.scan import scan_images, walk_order
from alfk_cli.embed.job import embed_folder
from alfk_cli.errors import AlfkError
from conftest import make_labelled, write_images

NODES = ("paths", "labels", "classes", "z", "g", "logits", "pseudo", "size", "mtime_ns")


def _store(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in NODES}
        out["fingerprint"] = f.attrs["fingerprint"]
    return out


def _tree(root: Path) -> list[str]:
    """A folder whose walk order differs from plain sorting (files before sub-folders)."""
    write_images(root, 2, prefix="z")
    write_images(root / "a", 2, seed=1)
    write_images(root / "a" / "b", 1, seed=2)
    write_images(root / "a-b", 1, seed=3)
    write_images(root / "A", 1, seed=4)
    (root / ".hidden").mkdir()
    write_images(root / ".hidden", 1)
    return scan_images(root).paths


def test_walk_order_key_matches_the_walk(tmp_path):
    walked = _tree(tmp_path)
    shuffled = walked[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=walk_order) == walked
    assert walked != sorted(walked)  # the key matters: plain sorting differs


def test_walk_order_key_on_random_trees(tmp_path):
    rng = random.Random(5)
    alphabet = ["a", "b", "a-b", "a.b", "a b", "B", "0", "a0", "ab"]
    for _ in range(80):
        depth = rng.randint(0, 3)
        folder = tmp_path.joinpath(*(rng.choice(alphabet) for _d in range(depth)))
        if folder.is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        name = folder / f"{rng.choice(alphabet)}.png"
        if not name.is_dir():
            name.write_bytes(b"")  # only stat'ed: the scan does not open files
    walked = scan_images(tmp_path, verify=False).paths
    shuffled = walked[:]
    rng.shuffle(shuffled)
    assert sorted(shuffled, key=walk_order) == walked


def test_lines_relative_absolute_comments_hidden_and_duplicates(tmp_path):
    root = tmp_path / "pool"
    write_images(root, 3)
    lst = tmp_path / "list.txt"
    lines = [
        "img0001.png",
        "",
        "# a comment",
        f"{root.absolute()}/img0000.png\r",  # absolute inside the pool, CRLF
        "./img0002.png",
        ".hidden/x.png",
        "img0001.png",  # again
        "   ",
    ]
    lst.write_text("\n".join(lines))
    got = read_pool_list(lst, root)
    assert got.paths == ["img0001.png", "img0000.png", "img0002.png"]
    assert got.skipped == [("img0001.png", "listed again on line 7 (first on line 1)")]
    found = scan_pool(root, lst)
    assert found.paths == ["img0000.png", "img0001.png", "img0002.png"]
    assert [p for p, _ in found.skipped] == ["img0001.png"]
    with pytest.raises(AlfkError, match="listed again on line 7"):
        scan_pool(root, lst, strict=True)


@pytest.mark.parametrize("line", ["../other/x.png", "a/../../x.png", "/etc/passwd"])
def test_a_path_outside_the_pool_is_an_error(tmp_path, line):
    root = tmp_path / "pool"
    write_images(root, 1)
    lst = tmp_path / "list.txt"
    lst.write_text(f"img0000.png\n{line}\n")
    with pytest.raises(AlfkError, match=r"list\.txt line 2: .* is outside the pool folder"):
        read_pool_list(lst, root)


def test_missing_bad_names_and_non_images_are_skipped_and_listed(tmp_path):
    root = tmp_path / "pool"
    write_images(root, 2)
    (root / "tab\there.png").write_bytes((root / "img0000.png").read_bytes())
    (root / "notes.txt").write_text("x")
    with open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb") as fh:
        fh.write((root / "img0000.png").read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"img0000.png\nimg0001.png\ngone.png\ntab\there.png\nnotes.txt\nbad\xff.png\n")
    found = scan_pool(root, lst)
    assert found.paths == ["img0000.png", "img0001.png"]
    why = dict(found.skipped)
    assert why["gone.png"].startswith("unreadable")
    assert "control character" in why["tab\there.png"]
    assert why["notes.txt"] == "not an image file"
    assert "UTF-8" in why["bad\udcff.png"]
    with pytest.raises(AlfkError, match=r"bad\\xff\.png: file name is not valid UTF-8.*and 3 more"):
        scan_pool(root, lst, strict=True)
    with pytest.raises(AlfkError, match="does not exist"):
        read_pool_list(tmp_path / "nope.txt", root)
    with pytest.raises(AlfkError, match="is a folder"):
        read_pool_list(root, root)


@pytest.mark.parametrize("labelled", [False, True])
def test_embed_from_a_list_equals_the_walk(tmp_path, labelled):
    """Same files, listed in another order with mixed spellings: the same store, byte for byte
    in every row node, and the same fingerprint (so either can reuse the other's rows)."""
    from alfk_cli.models.archs import build_model
    from alfk_cli.models.checkpoint import save_checkpoint

    root = tmp_path / "pool"
    if labelled:
        make_labelled(root, ["a", "b"], 4)
        write_images(root / "b" / "deep", 2, seed=7)
    else:
        _tree(root)
    save_checkpoint(tmp_path / "m.pt", build_model("lenet", 2, seed=0), "lenet", ["a", "b"])
    walked = scan_images(root).paths
    listed = [p for p in walked if not p.startswith(".")]
    random.Random(1).shuffle(listed)
    listed = [str(root / p) if i % 2 else p for i, p in enumerate(listed)]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(listed) + "\n")
    kw = dict(workers=0, pseudo_label="yhat" if not labelled else None)
    a = embed_folder(tmp_path / "m.pt", root, tmp_path / "walk.h5", **kw)
    b = embed_folder(tmp_path / "m.pt", root, tmp_path / "list.h5", pool_list=lst, **kw)
    assert a.images == b.images == len(listed)
    sa, sb = _store(tmp_path / "walk.h5"), _store(tmp_path / "list.h5")
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_listed_paths_in_the_store_are_not_stated_again(tmp_path, monkeypatch):
    from alfk_cli.models.archs import ROTATION_CLASSES, build_model
    from alfk_cli.models.checkpoint import save_checkpoint

    root = tmp_path / "pool"
    write_images(root, 6)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES))
    make_labelled(tmp_path / "val", ["0", "90", "180", "270"], 2)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(f"img{i:04d}.png" for i in range(6)) + "\n")
    out = tmp_path / "pool.h5"
    kw = dict(workers=0, pseudo_label="yhat", pool_list=lst, reuse=out)
    first = embed_folder(ckpt, root, out, **kw)
    assert first.computed == 6
    write_images(root, 8)  # two new files (and the first six rewritten: not looked at)
    lst.write_text("\n".join(f"img{i:04d}.png" for i in range(8)) + "\n")
    stated: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(
        images_mod.os, "stat", lambda p, *a, **k: stated.append(str(p)) or real_stat(p, *a, **k)
    )
    second = embed_folder(ckpt, root, out, **kw)
    images = [Path(p).name for p in stated if p.startswith(f"{root}/")]
    assert sorted(images) == ["img0006.png", "img0007.png"]
    assert (second.reused, second.computed) == (6, 2)
    stated.clear()
    third = embed_folder(ckpt, root, out, **kw)
    assert third.notes == [f"{out} is up to date"]
    assert not [p for p in stated if p.startswith(f"{root}/")]


def test_cli_select_and_embed_read_the_list_from_stdin(cli, small_world, monkeypatch):
    names = sorted(os.listdir("pool"))
    random.Random(2).shuffle(names)
    common = ("--P", "5", "--model", "init.pt", "--device", "cpu", "--workers", "0")
    walk = cli("select", "--val", "val", "--pool", "pool", "-w", "wd1", *common)
    assert walk.exit_code == 0, walk.stderr
    data = ("\n".join(names) + "\n").encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    listed = cli(
        "select", "--val", "val", "--pool", "pool", "-w", "wd2", "--pool-list", "-", *common
    )
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout == walk.stdout and len(walk.stdout.splitlines()) == 5
    Path("list.txt").write_text("\n".join(names[:10]) + "\n")
    r = cli(
        "embed", "-m", "init.pt", "-i", "pool", "-o", "p.h5", "--pool-list", "list.txt",
        "-r", "wd1/val.h5", "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    with h5py.File("p.h5", "r") as f:
        assert sorted(f["paths"].asstr()[:]) == sorted(names[:10])
    Path("bad.txt").write_text("img0000.png\n../val/a/img0000.png\n")
    r = cli("select", "--val", "val", "--pool", "pool", "--pool-list", "bad.txt", *common)
    assert r.exit_code == 1 and r.stderr.startswith("error: pool list bad.txt line 2")
    r = cli("select", "--scores", "x.h5", "--pool-list", "bad.txt")
    assert r.exit_code == 2


def test_scan_images_files_argument_keeps_the_walk_rules(tmp_path):
    root = tmp_path / "p"
    make_labelled(root, ["x", "y"], 2)
    full = scan_images(root)
    listed = scan_images(root, files=list(reversed(full.paths)), verify=False)
    assert listed.paths == full.paths and listed.classes == full.classes
    np.testing.assert_array_equal(listed.labels, full.labels)
    flat = scan_images(root, files=["x/img0000.png", "top.png"], verify=False)
    assert not flat.labelled  # a listed file at the top level: unlabelled, like the walk
