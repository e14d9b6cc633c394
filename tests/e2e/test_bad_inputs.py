"""Every command over a corpus of bad inputs, as a cron job would meet them.

For each case: the exit code, a one-line ``error:`` (or the bad file listed as skipped), never a
traceback, and never a file under any output name the failing command was given.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from conftest import fifo_deadline, make_labelled, write_images

# file name -> what it is; each must be listed as skipped and never selected
BAD_FILES = {
    "trunc.jpg": "a JPEG cut at 90% (passes PIL's verify, fails to decode)",
    "badidat.png": "a PNG whose IDAT data is garbage with a valid CRC",
    "bomb.png": "a 20000×20000 PNG of 60 KB (over PIL's decompression-bomb limit)",
    "notes.txt": "not an image",
    "empty.png": "zero bytes",
    "fake.jpg": "text with an image extension",
    "dangling.png": "a symlink to nothing",
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def write_corpus(folder: Path) -> None:
    """The bad files of BAD_FILES, plus odd names, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "JPEG")
    jpeg = buf.getvalue()
    (folder / "trunc.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.9)])
    garbage = bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    (folder / "badidat.png").write_bytes(_png(28, 28, 8, 0, garbage))
    row = b"\x00" + bytes(20000 // 8)
    (folder / "bomb.png").write_bytes(_png(20000, 20000, 1, 0, zlib.compress(row * 20000, 9)))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("GIF89a? no.\n")
    os.symlink(folder / "missing-target.png", folder / "dangling.png")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden")


def _odd_names(folder: Path) -> list[str]:
    """Valid images whose names cannot be printed as one line of UTF-8 (where the OS allows)."""
    made = []
    good = folder.parent / "_good.png"
    Image.new("L", (28, 28), 128).save(good)
    for name in (b"new\nline.png", b"latin1-\xff.png"):
        try:
            with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
                fh.write(good.read_bytes())
            made.append(os.fsdecode(name))
        except OSError:  # a file system that refuses such names
            pass
    good.unlink()
    return made


def assert_clean_failure(r, code: int = 1) -> None:
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr
    if code == 1:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: "), r.stderr
        assert sum(ln.startswith("error:") for ln in lines) == 1
        assert r.stderr.startswith("error:") or "\n\n" not in r.stderr  # no blank line before it


def assert_listed(r, names) -> None:
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stderr
    for name in names:
        assert name in r.stderr, f"{name} not listed as skipped:\n{r.stderr}"


def _embed_val_and_pool(cli, d: str):
    """Embed d/val, then d/pool against it; the pool's result (the val embed must succeed)."""
    r = cli("embed", "--model", f"{d}/init.pt", "--images", f"{d}/val", "--out", f"{d}/val.h5",
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return cli(
        "embed", "--model", f"{d}/init.pt", "--images", f"{d}/pool", "--reference", f"{d}/val.h5",
        "--out", f"{d}/pool.h5", "--device", "cpu",
    )  # fmt: skip


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """val/ (3 classes), a pool of good images with every bad file among them, a labelled train/
    folder with bad files in a class folder, and a rotation checkpoint; run from another cwd."""
    root = tmp_path / "data"
    make_labelled(root / "val", ["a", "b", "c"], 4)
    make_labelled(root / "train", ["a", "b", "c"], 6)
    write_images(root / "pool", 30, seed=3)
    write_corpus(root / "pool")
    write_corpus(root / "train" / "b")
    odd = _odd_names(root / "pool")
    save_checkpoint(
        root / "init.pt",
        build_model("lenet", 4, seed=0),
        "lenet",
        list(ROTATION_CLASSES),
        "rotation",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return root, odd


def test_every_stage_skips_and_lists_the_bad_files(cli, corpus):
    root, odd = corpus
    d = str(root)
    r = cli(
        "pretrain",
        "--images",
        f"{d}/pool",
        "--out",
        f"{d}/pre.pt",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert_listed(r, BAD_FILES)
    r = _embed_val_and_pool(cli, d)
    assert_listed(r, BAD_FILES)
    with h5py.File(root / "pool.h5") as f:
        stored = [p.decode() for p in f["paths"][:]]
    assert len(stored) == 30 and all(p.startswith("img") for p in stored)
    assert not list(root.glob(".*.partial"))
    r = cli(
        "score", "--val", f"{d}/val.h5", "--pool", f"{d}/pool.h5", "--P", "5", "--out", f"{d}/s.h5"
    )
    assert r.exit_code == 0, r.stderr
    r = cli(
        "train", "--data", f"{d}/train", "--val", f"{d}/val", "--out", f"{d}/model.pt",
        "--epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert_listed(r, BAD_FILES)
    for fmt in ("txt", "csv", "jsonl"):  # looks at the whole pool (a recorded run sends it all)
        r = cli(
            "select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "30", "--model",
            f"{d}/init.pt", "--device", "cpu", "--format", fmt, "--no-ledger",
        )  # fmt: skip
        assert_listed(r, BAD_FILES)
        lines = r.stdout.splitlines()
        assert len(lines) == 30 + (fmt == "csv")
        for bad in [*BAD_FILES, *odd]:
            assert not any(bad in ln for ln in lines[fmt == "csv" :])


def test_folders_that_cannot_be_used(cli, corpus, tmp_path):
    root, _ = corpus
    d = str(root)
    (root / "empty").mkdir()
    write_corpus(root / "allbad")
    for folder in ("nope", "empty", "allbad", "init.pt"):
        out = root / f"{folder}.out.pt"
        r = cli("pretrain", "--images", f"{d}/{folder}", "--out", str(out), "--device", "cpu")
        assert_clean_failure(r)
        assert not out.exists()
        r = cli(
            "select",
            "--val",
            f"{d}/val",
            "--pool",
            f"{d}/{folder}",
            "--P",
            "3",
            "--model",
            f"{d}/init.pt",
        )
        assert_clean_failure(r)
        assert r.stdout == ""


def test_bad_checkpoints_stores_and_outputs(cli, corpus, monkeypatch):
    import alfk_cli.train.loops as training

    def no_training(*a, **k):
        raise AssertionError("a bad output must be refused before training starts")

    monkeypatch.setattr(training, "fit", no_training)  # none of these cases may train
    root, _ = corpus
    d = str(root)
    (root / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip")
    (root / "outdir.pt").mkdir()
    ckpt_bytes = (root / "init.pt").read_bytes()
    ok = cli(
        "embed",
        "--model",
        f"{d}/init.pt",
        "--images",
        f"{d}/val",
        "--out",
        f"{d}/val.h5",
        "--device",
        "cpu",
    )
    assert ok.exit_code == 0, ok.stderr
    val_bytes = (root / "val.h5").read_bytes()
    cases = [
        (
            ["embed", "--model", f"{d}/garbage.pt", "--images", f"{d}/val", "--out", f"{d}/x.h5"],
            "x.h5",
        ),
        (
            ["embed", "--model", f"{d}/init.pt", "--images", f"{d}/val", "--out", f"{d}/init.pt"],
            None,
        ),
        (
            [
                "embed",
                "--model",
                f"{d}/init.pt",
                "--images",
                f"{d}/pool",
                "--reference",
                f"{d}/val.h5",
                "--out",
                f"{d}/val.h5",
            ],
            None,
        ),
        (
            ["embed", "--model", f"{d}/init.pt", "--images", f"{d}/val", "--out", f"{d}/outdir.pt"],
            None,
        ),
        (
            [
                "embed",
                "--model",
                f"{d}/init.pt",
                "--images",
                f"{d}/val",
                "--out",
                f"{d}/no/such/x.h5",
            ],
            "no",
        ),
        (
            [
                "score",
                "--val",
                f"{d}/val.h5",
                "--pool",
                f"{d}/val.h5",
                "--P",
                "2",
                "--out",
                f"{d}/val.h5",
            ],
            None,
        ),
        (
            [
                "score",
                "--val",
                f"{d}/garbage.pt",
                "--pool",
                f"{d}/val.h5",
                "--P",
                "2",
                "--out",
                f"{d}/s.h5",
            ],
            "s.h5",
        ),
        (["train", "--data", f"{d}/train", "--val", f"{d}/val", "--out", f"{d}/outdir.pt"], None),
        (["train", "--data", f"{d}/train", "--val", f"{d}/val", "--out", f"{d}/no/m.pt"], "no"),
        (["train", "--data", f"{d}/val", "--val", f"{d}/pool", "--out", f"{d}/m.pt"], "m.pt"),
        (["pretrain", "--images", f"{d}/pool", "--out", f"{d}/outdir.pt"], None),
        (
            [
                "select",
                "--val",
                f"{d}/val",
                "--pool",
                f"{d}/pool",
                "--P",
                "500",
                "--model",
                f"{d}/init.pt",
            ],
            None,
        ),
        (["select", "--scores", f"{d}/val.h5"], None),
    ]
    for args, must_not_exist in cases:
        r = cli(*args)
        assert_clean_failure(r)
        assert r.stdout == ""
        if must_not_exist:
            assert not (root / must_not_exist).exists(), args
    assert (root / "init.pt").read_bytes() == ckpt_bytes
    assert (root / "val.h5").read_bytes() == val_bytes
    assert (root / "outdir.pt").is_dir()


def test_invalid_option_values_are_usage_errors(cli, corpus, monkeypatch):
    root, _ = corpus
    d = str(root)
    import alfk_cli.train.loops as training

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(training, "fit", no_work)
    base = ["select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3"]
    for extra in (
        ["--kernel", "foo"],
        ["--pseudo-label", "guess"],
        ["--device", "tpu"],
        ["--arch", "vgg"],
        ["--arch", "timm:no such"],
        ["--taps", "nonsense"],
        ["--workers", "-1"],
        ["--P", "0"],
        ["--seed", "-1"],  # issue 19: these failed after embedding, with a traceback
        ["--seed", "99999999999999999999"],
        ["--seed", str(2**32)],
    ):
        r = cli(*base, *extra)
        assert_clean_failure(r, code=2)
        assert not (root / ".alfk").exists()
    r = cli(
        "train",
        "--data",
        f"{d}/train",
        "--val",
        f"{d}/val",
        "--out",
        f"{d}/m.pt",
        "--workers",
        "-1",
    )
    assert_clean_failure(r, code=2)
    for seeds in ("-1", "0,99999999999999999999"):
        r = cli("simulate", "--pool", f"{d}/pool", "--val", f"{d}/val", "--test", f"{d}/val",
                "--seeds", seeds, "--out", f"{d}/sim")  # fmt: skip
        assert_clean_failure(r, code=2)
        assert not (root / "sim").exists()
    for freeze in ("layer4", "fc1,conv1", ""):  # lenet has conv1, conv2, fc1
        r = cli("train", "--data", f"{d}/train", "--val", f"{d}/val", "--out", f"{d}/m.pt",
                "--freeze", freeze)  # fmt: skip
        assert_clean_failure(r, code=2)
        assert not (root / "m.pt").exists()


def test_damaged_work_files_do_not_block_the_next_run(cli, corpus):
    root, _ = corpus
    d = str(root)
    (root / ".pool.h5.partial").write_bytes(
        b"\x89HDF\r\n\x1a\n" + b"\x00" * 100
    )  # a crash's leftover
    (root / "sent.txt").write_bytes(b"pool/img0001.png\n\xff\xfe not utf-8\n")
    (root / "bad-version.h5").write_bytes(b"")
    with h5py.File(root / "bad-version.h5", "w") as f:
        f.attrs["schema_version"] = "one"
    r = _embed_val_and_pool(cli, d)
    assert r.exit_code == 0, r.stderr
    assert not (root / ".pool.h5.partial").exists()
    r = cli("select", "--scores", f"{d}/bad-version.h5")
    assert_clean_failure(r)
    r = cli(
        "select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3", "--model", f"{d}/init.pt",
        "--exclude", f"{d}/sent.txt", "--device", "cpu",
    )  # fmt: skip
    assert "Traceback" not in r.stderr
    assert r.exit_code in (0, 1)
    if r.exit_code == 0:
        assert "img0001.png" not in r.stdout
    else:
        assert_clean_failure(r)


LS_CSV = "alfk_path,choice,annotator,annotation_id,id\n"  # Label Studio's CSV export header


def test_labels_import_files_only_pool_images_and_only_under_into(cli, corpus):
    """Hostile exports (issue 19): each is one error before anything is written, and no file
    outside the pool is ever linked or copied, nor anything written outside --into."""
    root, _ = corpus
    d = str(root)
    (root / "pool" / "out.png").symlink_to(root / "init.pt")
    (root / "target").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pool" / "fifo.png")
    links = {p: p.stat().st_nlink for p in (root / "init.pt", root / "train" / "a" / "img0000.png")}
    url = "/data/local-files/?d=pool/%2e%2e/init.pt"

    def task(path: str, key: str = "alfk_path") -> str:
        result = [{"type": "choices", "value": {"choices": ["a"]}}]
        return json.dumps([{"id": 1, "data": {key: path}, "annotations": [{"result": result}]}])

    cases = [
        ("t.json", task("pool/../init.pt"), []),
        ("t.json", task(f"{d}/init.pt"), []),
        ("t.json", task("pool/../train/a/img0000.png", "image"), []),
        ("t.json", task("pool/out.png"), []),
        ("t.json", task(url, "image"), ["--url-prefix", "/data/local-files/?d="]),
        ("t.csv", f"path,label\n{d}/init.pt,a\n", []),
        ("t.csv", "path,label\npool/notes.txt,a\n", []),
        ("t.csv", "path,label\npool/.hidden.png,a\n", []),
        ("t.csv", "path,label\npool/fifo.png,a\n", ["--skip-missing"]),
        ("t.json", '{"tasks": [{"data": {"alfk_path": "pool/img0000.png"}}]}', []),
        # Label Studio's JSON_MIN and CSV exports (issue 18): the same checks
        ("t.json", json.dumps([{"id": 1, "alfk_path": f"{d}/init.pt", "choice": "a"}]), []),
        ("t.csv", f"{LS_CSV}pool/../init.pt,a,1,1,1\n", []),
        ("t.csv", f'{LS_CSV}pool/img0000.png,"{{""choices"": [""a"", ""b""]}}",1,1,1\n', []),
        ("t.csv", "path,label\npool/img0000.png,a\n", ["--into", f"{d}/pool/lab"]),
        ("t.csv", "path,label\npool/img0000.png,a\n", ["--into", d]),
    ]
    for name, text, extra in cases:
        (root / name).write_text(text)
        into = ["--into", f"{d}/labeled"] if "--into" not in extra else []
        r = cli("labels", "import", f"{d}/{name}", "--pool", f"{d}/pool", "--root", d,
                "--classes-from", f"{d}/val", *into, *extra)  # fmt: skip
        assert_clean_failure(r)
        assert not (root / "labeled").exists() and not (root / "pool" / "lab").exists(), text
        assert not (root / ".alfk-labels").exists()
    (root / "labeled").mkdir()
    (root / "labeled" / "a").symlink_to(root / "target", target_is_directory=True)
    (root / "t.csv").write_text("path,label\npool/img0000.png,a\n")
    r = cli("labels", "import", f"{d}/t.csv", "--pool", f"{d}/pool", "--root", d,
            "--into", f"{d}/labeled")  # fmt: skip
    assert_clean_failure(r)
    assert list((root / "target").iterdir()) == [] and len(list((root / "labeled").iterdir())) == 1
    assert {p: p.stat().st_nlink for p in links} == links


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files_in_the_pool_are_listed_never_opened(cli, corpus):
    """Issue 19: ``mkfifo pool/x.png`` hung select forever at "embed pool: 0/..."."""
    root, _ = corpus
    d = str(root)
    os.mkfifo(root / "pool" / "x.png")
    (root / "pool" / "to-fifo.png").symlink_to(root / "pool" / "x.png")
    with fifo_deadline(60, root / "pool" / "x.png"):
        r = cli("select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3", "--model",
                f"{d}/init.pt", "--device", "cpu", "--workers", "0", "--no-ledger")  # fmt: skip
    assert_listed(r, ["x.png: not a regular file (a FIFO)", "to-fifo.png: not a regular file"])
    assert "x.png" not in r.stdout and len(r.stdout.splitlines()) == 3


def test_a_closed_standard_input_for_pool_list(cli, corpus, monkeypatch):
    """Issue 19: ``--pool-list - <&-`` (Python's sys.stdin is then None) was a traceback."""
    root, _ = corpus
    d = str(root)
    monkeypatch.setattr("sys.stdin", None)
    r = cli("select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3", "--model",
            f"{d}/init.pt", "--pool-list", "-")  # fmt: skip
    assert_clean_failure(r, code=2)
    assert "standard input, which is closed" in r.stderr and not (root / ".alfk").exists()
    r = cli("embed", "--model", f"{d}/init.pt", "--images", f"{d}/pool", "--out", f"{d}/p.h5",
            "--pool-list", "-")  # fmt: skip
    assert_clean_failure(r, code=2)
    assert not (root / "p.h5").exists()


def test_options_files_that_would_redirect_or_mislead(cli, corpus, monkeypatch, tmp_path):
    """Issue 19: a work folder's alfk.toml moved the work folder (``workdir = "/etc"``);
    ``P = true`` ran with P = 1; ``ALFK_CONFIG=/dev/zero`` said "does not exist"."""
    root, _ = corpus
    d = str(root)
    work = root / ".alfk" / "pool"
    work.mkdir(parents=True)
    elsewhere = tmp_path / "moved"
    select = ["select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--model", f"{d}/init.pt",
              "--device", "cpu"]  # fmt: skip
    for text, says in [
        (f'[select]\nworkdir = "{elsewhere}"\n', "'workdir' chooses where alfk writes"),
        (f'workdir = "{elsewhere}"\n', "'workdir' chooses where alfk writes"),
        (f'[select]\nreport = "{elsewhere}/r.html"\n', "'report' chooses where alfk writes"),
        ("[select]\nP = true\n", "P must be an integer, not true"),
        ("[select]\nP = 2.5\n", "P must be an integer, not 2.5"),
    ]:
        (work / "alfk.toml").write_text(text)
        r = cli(*select)
        assert_clean_failure(r)
        assert says in r.stderr and str(work / "alfk.toml") in r.stderr, r.stderr
        assert not elsewhere.exists() and sorted(os.listdir(work)) == ["alfk.toml"]
    (work / "alfk.toml").unlink()
    (root / "mine.toml").write_text(f'[select]\nworkdir = "{elsewhere}"\nP = 2\n')
    r = cli("--config", f"{d}/mine.toml", *select, "--no-ledger")  # the user's own file may
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    assert (elsewhere / "pool.h5").exists()
    for special, says in [("/dev/zero", "is not a regular file"), (d, "is a folder")]:
        monkeypatch.setenv("ALFK_CONFIG", special)
        r = cli(*select, "--P", "2")
        assert_clean_failure(r)
        assert f"options file {special} {says}" in r.stderr and "does not exist" not in r.stderr


def test_a_busy_ledger_is_busy_not_damaged(cli, corpus, monkeypatch, tmp_path):
    """A ledger another process holds (issue 19): a bounded wait, then "busy", never the advice to
    move a healthy ledger aside; the holder named where the work folder's lock tells who."""
    import sqlite3
    import subprocess
    import sys

    root, _ = corpus
    d, wd = str(root), root / "wd"
    select = ("select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3", "--model",
              f"{d}/init.pt", "--workdir", str(wd), "--device", "cpu", "--workers", "0")  # fmt: skip
    assert cli(*select, "-q").exit_code == 0 and cli(*select, "-q").exit_code == 0  # two runs
    before = (wd / "ledger.sqlite").read_bytes()
    monkeypatch.setenv("ALFK_LEDGER_TIMEOUT", "0.2")
    con = sqlite3.connect(wd / "ledger.sqlite", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")  # as a `sqlite3 ledger.sqlite` session may hold it
    try:
        for args in (select, ("history", "--workdir", str(wd)), ("history", "--workdir", str(wd),
                                                                 "--run", "last")):  # fmt: skip
            r = cli(*args)
            assert_clean_failure(r)
            assert r.stderr.strip().splitlines()[-1] == (
                f"error: the ledger {wd}/ledger.sqlite is busy: another alfk or sqlite session "
                "holds it; try again when it is done"
            )
            assert "damaged" not in r.stderr and "move it aside" not in r.stderr and not r.stdout
        # a select holding the work folder (its lock says who): named
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from pathlib import Path; "
             "from alfk_cli.selection.workdir import locked\nwith locked(Path(sys.argv[1])):\n"
             " print('held', flush=True); time.sleep(60)", str(wd)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            r = cli("history", "--workdir", str(wd))
            assert_clean_failure(r)
            assert f"is busy: alfk select (pid {holder.pid}) holds it" in r.stderr
        finally:
            holder.kill()
            holder.wait()
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert (wd / "ledger.sqlite").read_bytes() == before  # nothing recorded, nothing lost
    monkeypatch.setenv("ALFK_LEDGER_TIMEOUT", "soon")
    r = cli("history", "--workdir", str(wd))
    assert_clean_failure(r)
    assert "ALFK_LEDGER_TIMEOUT='soon' is not a number of seconds" in r.stderr


def test_crafted_store_values_are_one_error_and_select_embeds_again(cli, corpus):
    """Issue 19: pseudo-labels 999 / -5 in a crafted store were scored silently; g = 3e38 leaked
    numpy's "overflow encountered in reduce" RuntimeWarning before the error."""
    import shutil
    import warnings

    root, _ = corpus
    d = str(root)
    assert _embed_val_and_pool(cli, d).exit_code == 0
    cases = [
        ("pool.h5", "pseudo", 0, 999, "pseudo[0] is 999, not a class index (0..2)"),
        ("pool.h5", "pseudo", 1, -5, "pseudo[1] is -5, not a class index (0..2)"),
        ("val.h5", "labels", 2, 999, "labels[2] is 999, not a class index (-1..2)"),
        ("pool.h5", "g", 0, 3e38, "non-finite values in the descriptors"),
        ("pool.h5", "g", 1, 1e37, "non-finite values in the descriptors"),
        ("pool.h5", "g", 2, -3e38, "non-finite values in the descriptors"),
    ]
    for store, node, row, value, says in cases:
        for name in ("val.h5", "pool.h5"):
            shutil.copy(root / name, root / f"c-{name}")
        with h5py.File(root / f"c-{store}", "r+") as f:
            f[node][row] = value
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = cli("score", "--val", f"{d}/c-val.h5", "--pool", f"{d}/c-pool.h5", "--P", "3",
                    "--out", f"{d}/s.h5")  # fmt: skip
        assert_clean_failure(r)
        assert says in r.stderr, (node, value, r.stderr)
        assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
        assert not (root / "s.h5").exists()
    # a work folder's store with a crafted pseudo-label: embedded again, nothing of it reused
    select = ("select", "--val", f"{d}/val", "--pool", f"{d}/pool", "--P", "3", "--model",
              f"{d}/init.pt", "--device", "cpu", "--workers", "0", "--no-ledger")  # fmt: skip
    first = cli(*select)
    assert first.exit_code == 0, first.stderr
    pool_store = root / ".alfk" / "pool" / "pool.h5"
    with h5py.File(pool_store, "r+") as f:
        f["pseudo"][0] = 999
    r = cli(*select)
    assert r.exit_code == 0 and r.stdout == first.stdout, r.stderr
    assert "nothing reused: " in r.stderr and "pseudo[0] is 999" in r.stderr
    with h5py.File(pool_store) as f:
        assert 0 <= int(f["pseudo"][0]) < 3


def test_workers_beyond_the_cores_are_capped_with_a_note(cli, corpus, monkeypatch):
    """Issue 19: an explicit ``--workers 1000`` started 1000 decoding processes (85 s for 100
    images); it is capped at the cores this process may use, and says so."""
    import alfk_cli.data.decode as images
    import alfk_cli.data.scan as imagescan

    root, _ = corpus
    d = str(root)
    monkeypatch.setattr(imagescan, "available_cores", lambda: 2)
    asked = []
    real = images.loader_workers
    monkeypatch.setattr(images, "loader_workers", lambda w, b: asked.append(w) or real(w, b))
    r = cli("embed", "--model", f"{d}/init.pt", "--images", f"{d}/val", "--out", f"{d}/v.h5",
            "--device", "cpu", "--workers", "1000")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "note: --workers 1000: using 2, the CPU cores this process may use" in r.stderr
    assert asked and set(asked) == {2}
    r = cli("embed", "--model", f"{d}/init.pt", "--images", f"{d}/val", "--out", f"{d}/w.h5",
            "--device", "cpu", "--workers", "1000", "-q")  # fmt: skip
    assert r.exit_code == 0 and "note:" not in r.stderr, r.stderr
