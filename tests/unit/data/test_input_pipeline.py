"""The input pipeline: each image decoded once (the scan only stats), decode failures listed once,
decoding workers defaulting to the cores available without changing any result."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import alfk_cli.data.decode as images_mod
from alfk_cli.data.decode import MAX_AUTO_WORKERS, loader_workers
from alfk_cli.data.scan import available_cores
from alfk_cli.embed.job import embed_folder
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model
from alfk_cli.models.checkpoint import save_checkpoint
from conftest import make_labelled, write_images

CLASSES = ["a", "b", "c"]


@pytest.fixture
def world(tmp_path):
    make_labelled(tmp_path / "val", CLASSES, 3)
    write_images(tmp_path / "pool", 10, seed=4)
    data = tmp_path / "pool" / "img0003.png"
    jpeg = tmp_path / "pool" / "trunc.jpg"  # passes PIL's verify, fails to decode
    Image.open(data).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    (tmp_path / "pool" / "fake.png").write_text("not a PNG")  # fails PIL's verify too
    save_checkpoint(tmp_path / "m.pt", build_model("lenet", 3, seed=0), "lenet", CLASSES)
    embed_folder(tmp_path / "m.pt", tmp_path / "val", tmp_path / "val.h5", workers=0)
    return tmp_path


def _count_opens(monkeypatch) -> Counter:
    opened: Counter = Counter()
    real_open = Image.open

    def counting(fp, *a, **k):
        opened[Path(getattr(fp, "name", fp)).name] += 1  # a path, or a file opened by imagefile
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def test_each_image_is_opened_once_and_failures_are_listed_once(world, monkeypatch):
    opened = _count_opens(monkeypatch)
    out = world / "pool.h5"
    kw = dict(reference=world / "val.h5", reuse=out, workers=0, batch_size=4)
    s = embed_folder(world / "m.pt", world / "pool", out, **kw)
    good = [f"img{i:04d}.png" for i in range(10)]
    assert {n: opened[n] for n in good} == dict.fromkeys(good, 1)  # the scan opened none
    # a failure is opened once more, only to say why
    assert opened["trunc.jpg"] == 2 and opened["fake.png"] == 2
    assert sorted(p for p, _ in s.skipped) == ["fake.png", "trunc.jpg"]
    assert all(why.startswith("unreadable image") for _, why in s.skipped)
    with h5py.File(out, "r") as f:
        assert len(f["paths"]) == 10
    opened.clear()
    again = embed_folder(world / "m.pt", world / "pool", out, **kw)
    assert not opened  # up to date: nothing decoded, the failures come from the store
    assert sorted(p for p, _ in again.skipped) == ["fake.png", "trunc.jpg"]


def test_strict_still_checks_before_any_model_pass(world):
    out = world / "strict.h5"
    with pytest.raises(AlfkError, match=r"fake\.png: unreadable image"):
        embed_folder(world / "m.pt", world / "pool", out, reference=world / "val.h5", strict=True)
    assert not out.exists() and not (world / ".strict.h5.partial").exists()
    (world / "pool" / "fake.png").unlink()
    with pytest.raises(AlfkError, match=r"trunc\.jpg: unreadable image"):  # at decode time
        embed_folder(
            world / "m.pt", world / "pool", out, reference=world / "val.h5", strict=True, workers=0
        )
    assert not out.exists()


def test_a_folder_of_only_undecodable_images_is_an_error(world):
    bad = world / "bad"
    bad.mkdir()
    shutil.copy(world / "pool" / "trunc.jpg", bad)
    with pytest.raises(AlfkError, match=r"no readable images in .*bad: all 1 failed to decode"):
        embed_folder(world / "m.pt", bad, world / "b.h5", reference=world / "val.h5", workers=0)
    assert not (world / "b.h5").exists()


def test_workers_default_to_the_available_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert available_cores() == 3
    assert loader_workers(None, 100) == 3
    assert loader_workers(None, 2) == 2  # no more than there are batches
    assert loader_workers(None, 1) == 0  # one batch: decoded in the main process
    assert loader_workers(0, 100) == 0 and loader_workers(7, 100) == 7  # given: as given,
    assert loader_workers(7, 2) == 2 and loader_workers(1000, 1) == 1  # but at most the batches
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert loader_workers(None, 1000) == MAX_AUTO_WORKERS
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert available_cores() == 5


def test_default_workers_give_the_same_store_as_none(world, monkeypatch):
    monkeypatch.setattr(images_mod, "available_cores", lambda: 2)
    kw = dict(reference=world / "val.h5", batch_size=4)
    embed_folder(world / "m.pt", world / "pool", world / "auto.h5", **kw)
    embed_folder(world / "m.pt", world / "pool", world / "zero.h5", workers=0, **kw)
    with h5py.File(world / "auto.h5", "r") as a, h5py.File(world / "zero.h5", "r") as b:
        for k in ("paths", "z", "g", "logits", "pseudo", "skipped_paths"):
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)
