"""The HDF5 feature store and the embed job: schema, refusals, resume, incremental reuse."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import alfk_cli.data.decode as images_mod
import alfk_cli.embed.job as embedding
import alfk_cli.embed.write as embedwrite
from alfk_cli.cli.console import make_progress
from alfk_cli.errors import AlfkError
from alfk_cli.features.montecarlo import MCConfig
from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.store.format import SCHEMA_VERSION
from alfk_cli.store.reader import check_compatible, open_store
from alfk_cli.util.atomic import partial_path
from conftest import make_labelled, write_images

CLASSES = ["cat", "dog", "eel"]
BS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_labelled(root / "val", CLASSES, 6)
    write_images(root / "pool", 40, seed=11)
    make_labelled(root / "simpool", CLASSES, 5)
    save_checkpoint(root / "m.pt", build_model("lenet", 3, seed=0), "lenet", CLASSES)
    save_checkpoint(root / "other.pt", build_model("lenet", 3, seed=1), "lenet", CLASSES)
    save_checkpoint(
        root / "rot.pt",
        build_model("lenet", 4, seed=0),
        "lenet",
        list(ROTATION_CLASSES),
        head="rotation",
    )
    s = embedding.embed_folder(
        root / "m.pt", root / "val", root / "val.h5", batch_size=BS, workers=0
    )
    assert s.pseudo_label == "true" and s.images == 18
    return root


def embed(env: Path, images: str, out: Path, **kw):
    kw.setdefault("batch_size", BS)
    kw.setdefault("workers", 0)
    model = kw.pop("model", env / "m.pt")
    return embedding.embed_folder(model, env / images, out, **kw)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("paths", "labels", "classes", "z", "g", "logits", "pseudo")}


def _is_utf8_str(dtype) -> bool:
    info = h5py.check_string_dtype(dtype)
    return info is not None and info.encoding == "utf-8"


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["val", "pool"])
def test_every_node_and_attribute_of_the_schema(env, tmp_path, which):
    if which == "val":
        path, n, pseudo = env / "val.h5", 18, "true"
    else:
        path, n, pseudo = tmp_path / "pool.h5", 40, "p_yz_knn"
        embed(env, "pool", path, reference=env / "val.h5")
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert (
            isinstance(a["schema_version"], np.integer)
            and a["schema_version"] == SCHEMA_VERSION == 1
        )
        assert isinstance(a["created"], str)  # empty: no wall-clock time (issue 9)
        assert _is_utf8_str(a.get_id("created").dtype)
        for key in (
            "alfk_version",
            "image_root",
            "arch",
            "checkpoint_sha256",
            "pseudo_label",
        ):
            assert isinstance(a[key], str) and a[key], key
            assert _is_utf8_str(a.get_id(key).dtype), key
        assert (
            a["arch"] == "lenet"
            and a["pseudo_label"] == pseudo
            and len(a["checkpoint_sha256"]) == 64
        )
        assert _is_utf8_str(a.get_id("taps").dtype) and list(a["taps"]) == ["conv1", "conv2", "fc1"]
        assert a["scale_dims"].dtype == np.int64 and list(a["scale_dims"]) == [10, 20, 50]
        assert f["paths"].shape == (n,) and _is_utf8_str(f["paths"].dtype)
        assert f["classes"].shape == (3,) and _is_utf8_str(f["classes"].dtype)
        assert [c.decode() for c in f["classes"][()]] == CLASSES
        for name, shape, dtype in (
            ("labels", (n,), np.int64),
            ("z", (n, 80), np.float32),
            ("g", (n, 80), np.float32),
            ("logits", (n, 3), np.float32),
            ("pseudo", (n,), np.int64),
        ):
            assert f[name].shape == shape and f[name].dtype == dtype, name
        paths = [p.decode() for p in f["paths"][()]]
        assert all("\\" not in p and not p.startswith("/") for p in paths)
        assert (Path(a["image_root"]) / paths[0]).is_file()
        assert "_done" not in f and "rows_done" not in f.attrs  # resume bookkeeping is gone
        labels, pseudo_ds = f["labels"][()], f["pseudo"][()]
        assert ((pseudo_ds >= 0) & (pseudo_ds < 3)).all()
        if which == "val":
            assert paths[0] == "cat/img0000.png" and (labels == pseudo_ds).all()
            assert sorted(set(labels.tolist())) == [0, 1, 2]
        else:
            assert (labels == -1).all()
        assert (f["z"][()] >= 0).all() and np.abs(f["g"][()]).sum() > 0
    with open_store(path) as st:
        assert len(st) == n and st.taps == ("conv1", "conv2", "fc1") and st.classes == CLASSES
        assert st.z[:2].shape == (2, 80) and st.scale_dims == [10, 20, 50]


def test_reader_refusals(env, tmp_path):
    with pytest.raises(AlfkError, match="does not exist"):
        open_store(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5\n")
    with pytest.raises(AlfkError, match="not an HDF5 file"):
        open_store(tmp_path / "text.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(AlfkError, match="not an alfk feature store"):
        open_store(tmp_path / "foreign.h5")
    shutil.copy(env / "val.h5", tmp_path / "v2.h5")
    with h5py.File(tmp_path / "v2.h5", "r+") as f:
        f.attrs["schema_version"] = np.int64(2)
    with pytest.raises(AlfkError, match="schema version 2") as exc:
        open_store(tmp_path / "v2.h5")
    assert "\n" not in str(exc.value)


def test_check_compatible_names_the_difference(env, tmp_path):
    embed(env, "val", tmp_path / "v_other.h5", model=env / "other.pt")
    embed(env, "val", tmp_path / "v_l20.h5", taps="L20")
    with (
        open_store(env / "val.h5") as v,
        open_store(tmp_path / "v_other.h5") as o,
        open_store(tmp_path / "v_l20.h5") as t,
    ):
        check_compatible(v, v)
        with pytest.raises(AlfkError, match="different checkpoints"):
            check_compatible(v, o)
        with pytest.raises(AlfkError, match=r"different taps \(conv2 vs conv1,conv2,fc1\)"):
            check_compatible(v, t)


# --- refusals leave no file ----------------------------------------------------------------------


def _no_files(out: Path) -> bool:
    return not out.exists() and not partial_path(out).exists()


def test_failures_leave_no_file(env, tmp_path):
    out = tmp_path / "x.h5"
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    embed(env, "val", tmp_path / "v_other.h5", model=env / "other.pt")
    embed(env, "val", tmp_path / "v_l20.h5", taps="L20")
    cases = [
        (dict(model=tmp_path / "bad.pt"), "pool", "not an alfk checkpoint"),
        (dict(model=tmp_path / "none.pt"), "pool", "does not exist"),
        (dict(reference=env / "val.h5"), "../empty_dir_missing", "does not exist"),
        (dict(reference=tmp_path / "v_other.h5"), "pool", "another checkpoint"),
        (
            dict(reference=tmp_path / "v_l20.h5", taps="L80"),
            "pool",
            "taps conv2, not conv1,conv2,fc1",
        ),
        (dict(), "pool", "p_yz_knn pseudo-labels need a reference"),
        (dict(pseudo_label="true", reference=env / "val.h5"), "pool", "needs class sub-folders"),
        (dict(pseudo_label="yhat", model=env / "rot.pt"), "pool", "rotation-pretrained"),
        (dict(pseudo_label="bogus"), "pool", "unknown pseudo-label estimator"),
        (dict(reference=tmp_path / "nope.h5"), "pool", "does not exist"),
    ]
    for kw, folder, message in cases:
        with pytest.raises(AlfkError, match=message):
            embed(env, folder, out, **kw)
        assert _no_files(out), (kw, folder)
    with pytest.raises(AlfkError, match="no images found"):
        embedding.embed_folder(env / "m.pt", tmp_path / "empty", out, reference=env / "val.h5")
    assert _no_files(out)
    with pytest.raises(AlfkError, match="does not exist"):
        embed(env, "pool", tmp_path / "no" / "such" / "dir.h5", reference=env / "val.h5")
    # a pool store is not a reference
    embed(env, "pool", tmp_path / "p.h5", reference=env / "val.h5")
    with pytest.raises(AlfkError, match="not a validation store"):
        embed(env, "pool", out, reference=tmp_path / "p.h5")
    assert _no_files(out)


def test_undecodable_image_is_skipped_and_listed(env, tmp_path, monkeypatch):
    real = images_mod.load_image

    def flaky(path, spec):
        if Path(path).name == "img0013.png":
            raise OSError("broken data stream")
        return real(path, spec)

    monkeypatch.setattr(images_mod, "load_image", flaky)
    out = tmp_path / "p.h5"
    with pytest.raises(AlfkError, match=r"pool/img0013\.png: unreadable image .*broken data"):
        embed(env, "pool", out, reference=env / "val.h5", strict=True)
    assert not out.exists()  # only the resumable partial may remain
    # without --strict: skipped and listed at decode time, as at scan time; the rest is stored
    s = embed(env, "pool", out, reference=env / "val.h5")
    assert ("img0013.png", "unreadable image (OSError: broken data stream)") in s.skipped
    stored = read_all(out)["paths"].astype(str).tolist()
    assert "img0013.png" not in stored and len(stored) == s.images
    assert not partial_path(out).exists()
    # the same rows as a store of the folder without that image
    clean = tmp_path / "clean"
    shutil.copytree(env / "pool", clean)
    (clean / "img0013.png").unlink()
    ref = tmp_path / "ref.h5"
    embedding.embed_folder(
        env / "m.pt", clean, ref, reference=env / "val.h5", batch_size=BS, workers=0
    )
    a, b = read_all(out), read_all(ref)
    for k in ("paths", "pseudo"):
        assert np.array_equal(a[k], b[k]), k
    for k in ("z", "g", "logits"):  # other batch boundaries: equal to float32 round-off
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # a second run is up to date and still lists the file, without decoding anything
    again = embed(env, "pool", out, reference=env / "val.h5")
    assert (
        again.computed == 0
        and ("img0013.png", "unreadable image (OSError: broken data stream)") in again.skipped
    )


# --- labels and estimators -----------------------------------------------------------------------


def test_simulation_pool_keeps_true_labels_and_estimators(env, tmp_path):
    s = embed(env, "simpool", tmp_path / "sim.h5", reference=env / "val.h5", pseudo_label="p_yz")
    assert s.pseudo_label == "p_yz" and s.pseudo_accuracy is not None
    d = read_all(tmp_path / "sim.h5")
    assert sorted(set(d["labels"].tolist())) == [0, 1, 2]
    # make_labelled draws the same random pixels per class in val/ and simpool/: the 1-NN finds them
    assert s.pseudo_accuracy == 1.0 and (d["pseudo"] == d["labels"]).all()
    t = embed(env, "simpool", tmp_path / "true.h5", reference=env / "val.h5", pseudo_label="true")
    assert t.pseudo_label == "true"
    y = embed(env, "pool", tmp_path / "yhat.h5", pseudo_label="yhat")  # task checkpoint's classes
    dy = read_all(tmp_path / "yhat.h5")
    assert y.classes == CLASSES and (dy["pseudo"] == dy["logits"].argmax(1)).all()
    for method in ("mc_trace", "mc_mi"):
        a = embed(
            env,
            "pool",
            tmp_path / f"{method}1.h5",
            reference=env / "val.h5",
            pseudo_label=method,
            mc=MCConfig(samples=4),
        )
        embed(
            env,
            "pool",
            tmp_path / f"{method}2.h5",
            reference=env / "val.h5",
            pseudo_label=method,
            mc=MCConfig(samples=4),
            batch_size=16,
        )
        p1, p2 = (
            read_all(tmp_path / f"{method}1.h5")["pseudo"],
            read_all(tmp_path / f"{method}2.h5")["pseudo"],
        )
        assert a.pseudo_label == method and (p1 == p2).all() and ((p1 >= 0) & (p1 < 3)).all()


# --- resume ------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _fail_after(monkeypatch, calls: int):
    real = embedwrite.describe_images  # one call per batch
    count = {"n": 0}

    def wrapper(*a, **kw):
        count["n"] += 1
        if count["n"] > calls:
            raise Boom("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(embedwrite, "describe_images", wrapper)


def test_interrupt_and_resume_matches_an_uninterrupted_run(env, tmp_path, monkeypatch):
    ref = env / "val.h5"
    full = embed(env, "pool", tmp_path / "full.h5", reference=ref)
    assert full.computed == 40 and full.resumed == 0
    out = tmp_path / "pool.h5"
    with monkeypatch.context() as m:
        _fail_after(m, 2)
        with pytest.raises(Boom):
            embed(env, "pool", out, reference=ref)
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as f:
        assert f.attrs["rows_done"] == 2 * BS and f["_done"][()].sum() == 2 * BS
    again = embed(env, "pool", out, reference=ref)
    assert again.resumed == 2 * BS and again.computed == 40 - 2 * BS
    assert out.exists() and not partial_path(out).exists()
    a, b = read_all(tmp_path / "full.h5"), read_all(out)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_changed_arguments_discard_the_partial(env, tmp_path, monkeypatch):
    ref = env / "val.h5"
    out = tmp_path / "pool.h5"
    with monkeypatch.context() as m:
        _fail_after(m, 2)
        with pytest.raises(Boom):
            embed(env, "pool", out, reference=ref)
    s = embed(env, "pool", out, reference=ref, pseudo_label="yhat")
    assert s.resumed == 0 and s.computed == 40
    # a damaged partial is started over too
    partial_path(out).write_bytes(b"\x89HDF junk")
    s = embed(env, "pool", out, reference=ref)
    assert s.resumed == 0 and s.computed == 40


# --- incremental reuse ---------------------------------------------------------------------------


def test_incremental_reuse_embeds_only_new_and_changed_images(env, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(env / "pool", pool)
    ref = env / "val.h5"
    first = tmp_path / "p1.h5"
    embedding.embed_folder(env / "m.pt", pool, first, reference=ref, batch_size=BS, workers=0)
    write_images(pool / "new", 5, seed=99)
    st = os.stat(pool / "img0003.png")
    os.utime(pool / "img0003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "changed"
    inc = embedding.embed_folder(
        env / "m.pt",
        pool,
        tmp_path / "p2.h5",
        reference=ref,
        batch_size=BS,
        workers=0,
        reuse=first,
    )
    assert inc.images == 45 and inc.reused == 39 and inc.computed == 6
    full = embedding.embed_folder(
        env / "m.pt", pool, tmp_path / "p3.h5", reference=ref, batch_size=BS, workers=0
    )
    assert full.computed == 45
    a, b = read_all(tmp_path / "p3.h5"), read_all(tmp_path / "p2.h5")
    for key in ("paths", "labels", "classes", "pseudo"):
        assert np.array_equal(a[key], b[key]), key
    for key in ("z", "g", "logits"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    # other options: nothing is reused
    other = embedding.embed_folder(
        env / "m.pt",
        pool,
        tmp_path / "p4.h5",
        reference=ref,
        batch_size=BS,
        workers=0,
        reuse=first,
        seed=3,
    )
    assert other.reused == 0 and other.computed == 45 and other.notes
    # the orchestrator's case: refresh a store in place from its own previous version
    same = embedding.embed_folder(
        env / "m.pt",
        pool,
        tmp_path / "p2.h5",
        reference=ref,
        batch_size=BS,
        workers=0,
        reuse=tmp_path / "p2.h5",
    )
    assert same.reused == 45 and same.computed == 0
    assert np.array_equal(read_all(tmp_path / "p2.h5")["z"], b["z"])


def test_progress_bar_on_stderr_with_worker_processes(env, tmp_path, capsys):
    with make_progress() as progress:
        s = embed(env, "pool", tmp_path / "p.h5", reference=env / "val.h5", workers=2,
                  progress=progress)  # fmt: skip
    assert s.computed == 40 and s.images_per_second > 0
    out, err = capsys.readouterr()
    assert out == "" and "embed" in err and "img/s" in err


class Recorder:
    """A ProgressSink that keeps every call."""

    def __init__(self):
        self.calls = []

    def add_task(self, description, total=None, **fields):
        self.calls.append(("add_task", description, total, fields))
        return 7

    def advance(self, task_id, advance=1):
        self.calls.append(("advance", task_id, advance))

    def update(self, task_id, **fields):
        self.calls.append(("update", task_id, fields))


def test_the_library_reports_progress_only_to_the_sink_it_is_given(env, tmp_path, capsys):
    embed(env, "pool", tmp_path / "quiet.h5", reference=env / "val.h5")
    assert capsys.readouterr() == ("", "")  # no sink: nothing drawn
    rec = Recorder()
    embed(env, "pool", tmp_path / "p.h5", reference=env / "val.h5", progress=rec)
    assert capsys.readouterr() == ("", "")
    assert rec.calls[0] == ("add_task", "embed pool", 40, {"completed": 0, "status": ""})
    steps = [c[2]["advance"] for c in rec.calls[1:-1]]
    assert sum(steps) == 40 and all(c[1] == 7 for c in rec.calls[1:])
    assert rec.calls[-1][2]["status"].endswith("img/s")


def test_reference_checksum_ignores_provenance_but_not_data(env, tmp_path):
    val2 = tmp_path / "v.h5"
    shutil.copy(env / "val.h5", val2)
    with h5py.File(val2, "r+") as f:
        f.attrs["created"] = "2000-01-01T00:00:00+00:00"
    with open_store(env / "val.h5") as a, open_store(val2) as b:
        assert a.sha256 != b.sha256 and a.data_sha256() == b.data_sha256()
    first = tmp_path / "p1.h5"
    embed(env, "pool", first, reference=env / "val.h5")
    assert embed(env, "pool", tmp_path / "p2.h5", reference=val2, reuse=first).reused == 40
    with h5py.File(val2, "r+") as f:
        f["z"][0] = f["z"][0] + 1.0
    again = embed(env, "pool", tmp_path / "p3.h5", reference=val2, reuse=first)
    assert again.reused == 0 and again.computed == 40


def test_pool_sub_folders_that_are_not_classes_are_unlabelled(env, tmp_path):
    write_images(tmp_path / "days" / "day1", 4, seed=1)
    write_images(tmp_path / "days" / "day2", 4, seed=2)
    s = embedding.embed_folder(
        env / "m.pt",
        tmp_path / "days",
        tmp_path / "d.h5",
        reference=env / "val.h5",
        workers=0,
    )
    assert s.images == 8 and not s.notes and (read_all(tmp_path / "d.h5")["labels"] == -1).all()
    with pytest.raises(AlfkError, match="'day1', which is not among the classes"):
        embedding.embed_folder(
            env / "m.pt",
            tmp_path / "days",
            tmp_path / "t.h5",
            reference=env / "val.h5",
            pseudo_label="true",
        )
    write_images(tmp_path / "mixed" / "dog", 3, seed=3)
    write_images(tmp_path / "mixed" / "misc", 2, seed=4)
    s = embedding.embed_folder(
        env / "m.pt",
        tmp_path / "mixed",
        tmp_path / "m.h5",
        reference=env / "val.h5",
        workers=0,
    )
    assert read_all(tmp_path / "m.h5")["labels"].tolist() == [1, 1, 1, -1, -1]
    assert any("misc" in n for n in s.notes)


def test_a_truncated_partial_is_started_over_not_reported_in_use(env, tmp_path, monkeypatch):
    ref, out = env / "val.h5", tmp_path / "pool.h5"
    with monkeypatch.context() as m:
        _fail_after(m, 2)
        with pytest.raises(Boom):
            embed(env, "pool", out, reference=ref)
    part = partial_path(out)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # as after a crash
    s = embed(env, "pool", out, reference=ref)
    assert s.resumed == 0 and s.computed == 40
    assert out.exists() and not part.exists()


def test_a_partial_locked_by_another_process_is_reported_in_use(env, tmp_path):
    import subprocess
    import sys

    ref, out = env / "val.h5", tmp_path / "pool.h5"
    part = partial_path(out)
    with h5py.File(part, "w") as f:
        f.attrs["x"] = 1
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import h5py, sys, time\nf = h5py.File({str(part)!r}, 'r+')\n"
         "print('open', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(AlfkError, match="is in use"):
            embed(env, "pool", out, reference=ref)
    finally:
        holder.kill()
        holder.wait()
    assert part.exists()  # another process's file is left alone
