"""The nightly job's reliability defects of issue 9, one regression test each, run as a user would:
from another working directory, with stderr to a file, on folders with odd files in them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

import alfk_cli.embed.job as embedding
import alfk_cli.embed.write as embedwrite
from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.util.atomic import partial_path
from conftest import make_labelled, write_images

ALFK = [sys.executable, "-c", "from alfk_cli.cli.main import main; main()"]


@pytest.fixture
def eco(tmp_path, monkeypatch):
    """eco/ex/{val, unlabeled, init.pt}; the tests run from tmp_path (outside eco/ex)."""
    ex = tmp_path / "eco" / "ex"
    make_labelled(ex / "val", ["a", "b", "c"], 4)
    write_images(ex / "unlabeled" / "d1", 12, seed=5)
    write_images(ex / "unlabeled" / "d2", 12, seed=6)
    save_checkpoint(
        ex / "init.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), "rotation"
    )
    monkeypatch.chdir(tmp_path)
    return ex


def _select(
    cli, pool: str, P: int, *extra: str, val: str = "eco/ex/val", model: str = "eco/ex/init.pt"
):
    return cli(
        "select", "--val", val, "--pool", pool, "--P", str(P), "--model", model,
        "--device", "cpu", "--workers", "0", *extra,
    )  # fmt: skip


def _in_pool(printed: str) -> str:
    return "/".join(Path(printed).parts[-2:])  # d1/img0004.png


def test_exclusions_match_by_identity_whatever_the_spelling(cli, eco, monkeypatch):
    # night 1, run from inside eco/ex: sent.txt holds paths as printed there (the hand-kept
    # list this test is about, so the work folder's ledger is off)
    monkeypatch.chdir(eco)
    first = _select(cli, "unlabeled/", 3, "--no-ledger", val="val", model="init.pt")
    assert first.exit_code == 0, first.stderr
    sent = first.stdout.splitlines()
    assert all(p.startswith("unlabeled/d") for p in sent)  # no doubled or trailing slash
    (eco / "sent.txt").write_text("\n".join(sent) + "\n# a comment\nother-pool/x.png\n")
    # night 2, from elsewhere, with the pool spelled in other ways: none of the 3 comes back
    monkeypatch.chdir(eco.parent.parent)
    os.symlink(eco / "unlabeled", eco.parent.parent / "linked")
    for pool in ("eco/ex/unlabeled/", "./eco/ex/unlabeled", str(eco / "unlabeled"), "linked"):
        r = _select(cli, pool, 21, "--exclude", "eco/ex/sent.txt", "--no-ledger")
        assert r.exit_code == 0, r.stderr
        chosen = [_in_pool(p) for p in r.stdout.splitlines()]
        assert len(chosen) == 21 and not set(chosen) & {_in_pool(p) for p in sent}, pool
        assert "excluded 3 pool image(s)" in r.stderr, r.stderr.replace("\n", " | ")[-900:]
        assert "1 line(s) named no image of this pool" in r.stderr
    # the printed paths do not depend on trivial spellings of --pool
    outs = {
        _select(cli, p, 4, "--no-ledger").stdout
        for p in ("eco/ex/unlabeled", "eco/ex/unlabeled/", "./eco/ex/unlabeled")
    }
    assert len(outs) == 1 and next(iter(outs)).startswith("eco/ex/unlabeled/d")
    # an absolute-path exclusion list written by another run matches too
    (eco / "abs.txt").write_text("\n".join(str(eco / p) for p in sent) + "\n")
    r = _select(cli, "linked", 21, "--exclude", "eco/ex/abs.txt", "--no-ledger")
    assert r.exit_code == 0 and "excluded 3 pool image(s)" in r.stderr, r.stderr + r.stdout


def test_odd_file_names_are_skipped_and_listed_escaped(cli, eco):
    pool = eco / "unlabeled" / "d1"
    src = (pool / "img0000.png").read_bytes()
    made = []
    for name in (b"new\nline.png", b"tab\tname.png", b"latin1-\xff.png"):
        try:
            with open(os.path.join(os.fsencode(pool), name), "wb") as fh:
                fh.write(src)
            made.append(name)
        except OSError:  # a file system that refuses such names
            pass
    assert made
    r = _select(cli, "eco/ex/unlabeled", 24, "--format", "jsonl")
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 24  # the 24 good images; none of the odd ones
    escaped = {b"new\nline.png": "new\\nline.png", b"tab\tname.png": "tab\\tname.png",
               b"latin1-\xff.png": "latin1-\\xff.png"}  # fmt: skip
    for name in made:
        assert escaped[name] in r.stderr
    assert "rename it" in r.stderr
    strict = _select(cli, "eco/ex/unlabeled", 3, "--strict")
    assert strict.exit_code == 1 and strict.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_file_deleted_during_the_run_is_skipped_and_listed(eco, tmp_path, monkeypatch):
    from alfk_cli.data.scan import scan_images

    found = scan_images(eco / "val")
    victim = eco / "val" / found.paths[5]
    victim.unlink()  # after the scan, before the decode
    s = embedding.embed_folder(
        eco / "init.pt", eco / "val", tmp_path / "v.h5", images=found, workers=0
    )
    assert (found.paths[5], "file disappeared during the run") in s.skipped
    assert s.images == 11 and not partial_path(tmp_path / "v.h5").exists()


def test_train_may_overwrite_its_own_init(cli, eco):
    ck = eco / "model.pt"
    shutil.copy(eco / "init.pt", ck)
    before = ck.read_bytes()
    r = cli("train", "--data", "eco/ex/val", "--val", "eco/ex/val", "--init", str(ck), "--out", str(ck),
            "--epochs", "1", "--device", "cpu", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert ck.read_bytes() != before


def test_quiet_is_quiet_even_with_skipped_files(cli, eco):
    (eco / "unlabeled" / "notes.txt").write_text("x")
    (eco / "unlabeled" / "broken.png").write_bytes(b"\x89PNG junk")
    r = _select(cli, "eco/ex/unlabeled", 3, "--quiet")
    assert r.exit_code == 0 and r.stderr == "" and len(r.stdout.splitlines()) == 3


def test_resume_copies_finished_rows_when_the_pool_changed(eco, tmp_path, monkeypatch):
    out = tmp_path / "pool.h5"
    args = dict(workers=0, batch_size=4, pseudo_label="yhat")
    task = tmp_path / "task.pt"
    save_checkpoint(task, build_model("lenet", 3, seed=1), "lenet", ["a", "b", "c"])
    calls = {"n": 0}
    real = embedwrite.describe_images

    def dies_after_three_batches(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(embedwrite, "describe_images", dies_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        embedding.embed_folder(task, eco / "unlabeled", out, **args)
    assert partial_path(out).exists() and not out.exists()
    monkeypatch.setattr(embedwrite, "describe_images", real)
    write_images(eco / "unlabeled" / "d3", 2, seed=9)  # the pool gained two images
    s = embedding.embed_folder(task, eco / "unlabeled", out, **args)
    assert s.resumed == 12 and s.computed == 26 - 12
    fresh = embedding.embed_folder(task, eco / "unlabeled", tmp_path / "fresh.h5", **args)
    with h5py.File(out) as a, h5py.File(tmp_path / "fresh.h5") as b:
        for k in ("paths", "z", "g", "logits", "pseudo"):
            assert (a[k][()] == b[k][()]).all(), k
    assert fresh.computed == 26


def test_bad_results_and_simulation_folders(cli, tmp_path):
    (tmp_path / "other.csv").write_text("name,value\nx,1\n")
    r = cli("plot", "--results", str(tmp_path / "other.csv"), "--out", str(tmp_path / "c.png"))
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "not a results file" in r.stderr
    (tmp_path / "afile").write_text("x")
    folder = str(make_labelled(tmp_path / "imgs", ["a", "b"], 2))  # --arch auto scans the pool
    sim = ["simulate", "--pool", folder, "--val", folder, "--test", folder, "--no-plot"]
    r = cli(*sim, "--out", str(tmp_path / "afile"))
    assert r.exit_code == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "config.json").write_text("{ not json")
    r = cli(*sim, "--out", str(tmp_path / "res"))
    assert r.exit_code == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr
    r = cli(*sim, "--strategies", "random,magic", "--out", str(tmp_path / "res2"))
    assert r.exit_code in (1, 2) and "magic" in r.stderr and "Traceback" not in r.stderr


# --- real processes: signals, logs, devices -------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.pop("ALFK_PROGRESS", None)
    return env


def test_logs_under_cron_are_plain_timestamped_lines(eco, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        rc = subprocess.run(
            [*ALFK, "pretrain", "--images", "eco/ex/unlabeled", "--out", "p.pt", "--epochs", "2",
             "--device", "cpu", "--workers", "0"],
            stderr=err, stdout=subprocess.PIPE, env=_env(), cwd=tmp_path, timeout=300,
        ).returncode  # fmt: skip
    text = log.read_text()
    assert rc == 0, text
    assert "\x1b[" not in text and not any(c in text for c in "━─│┃┏╇")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    progress = [ln for ln in lines if " pretrain: " in ln]
    assert len(progress) >= 3  # started, per epoch, done
    assert all(time.strptime(ln[:19], "%Y-%m-%d %H:%M:%S") for ln in progress)


def test_ctrl_c_says_interrupted(eco, tmp_path):
    write_images(eco / "big", 3000, seed=2)
    p = subprocess.Popen(
        [*ALFK, "pretrain", "--images", "eco/ex/big", "--out", "p.pt", "--epochs", "50",
         "--device", "cpu", "--workers", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(_env(), ALFK_PROGRESS="plain"),
        cwd=tmp_path, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "started" not in line:  # wait until it is training
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert not (tmp_path / "p.pt").exists() and not list(tmp_path.glob(".*partial"))


def _night(tmp_path, *extra: str, stdout=subprocess.PIPE, closed: bool = False):
    """``alfk select`` as cron runs it: from tmp_path, stderr to a file; (rc, stdout, stderr)."""
    cmd = [*ALFK, "select", "--val", "eco/ex/val", "--pool", "eco/ex/unlabeled", "--P", "5",
           "--model", "eco/ex/init.pt", "--device", "cpu", "--workers", "0", *extra]  # fmt: skip
    if closed:  # `alfk select ... >&-`
        cmd = ["sh", "-c", 'exec "$@" >&-', "sh", *cmd]
    log = tmp_path / "night.log"
    with open(log, "w") as err:
        r = subprocess.run(cmd, stdout=stdout, stderr=err, env=_env(), cwd=tmp_path, text=True,
                           timeout=300)  # fmt: skip
    return r.returncode, r.stdout or "", log.read_text()


def _history(tmp_path, *extra: str) -> list[str]:
    r = subprocess.run([*ALFK, "history", "--pool", "eco/ex/unlabeled", *extra], env=_env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_a_lost_stdout_records_nothing_and_the_next_night_sends_the_same(eco, tmp_path):
    rc, peek, err = _night(tmp_path, "--no-ledger")  # a look: what the first night will send
    assert rc == 0 and len(peek.splitlines()) == 5, err
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            rc, _, err = _night(tmp_path, "-q", stdout=full)
        assert rc == 1 and err.splitlines() == [
            "error: cannot write the selection to standard output: No space left on device "
            "(nothing recorded)"
        ]
    rc, _, err = _night(tmp_path, "-q", closed=True)
    assert rc == 1 and err.splitlines() == [
        "error: standard output is closed; redirect it to a file (or /dev/null)"
    ]
    with open(tmp_path / "hangup.log", "w") as log:  # a reader that is gone before the output
        reader = subprocess.Popen(
            [*ALFK, "select", "--val", "eco/ex/val", "--pool", "eco/ex/unlabeled", "--P", "5",
             "--model", "eco/ex/init.pt", "--device", "cpu", "--workers", "0", "-q"],
            stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        assert reader.stdout is not None
        reader.stdout.close()
        assert reader.wait(timeout=300) == 1
    assert (tmp_path / "hangup.log").read_text().splitlines() == [
        "error: cannot write the selection to standard output: Broken pipe (nothing recorded)"
    ]
    rc, night1, err = _night(tmp_path)
    assert rc == 0 and night1 == peek, err  # nothing was lost: the same five images
    assert "warning" not in err and "recorded as run 1" in err  # a failed night is no deletion
    # annotators are slow and nothing changed: the second night sends five new images
    rc, night2, err = _night(tmp_path, "-q")
    assert rc == 0 and len(night2.splitlines()) == 5, err
    assert not set(night1.splitlines()) & set(night2.splitlines())
    assert len(_history(tmp_path)) == 3  # the header and two runs
    assert _history(tmp_path, "--run", "1") == night1.splitlines()
    assert _history(tmp_path, "--run", "last") == night2.splitlines()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, where this machine lets the tests mount one (root, CAP_SYS_ADMIN)."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_is_a_one_line_error_and_keeps_nothing(eco, tmp_path, small_disk):
    with open(small_disk / "filler", "wb") as fh:  # fill it up
        try:
            fh.write(b"\0" * (3 << 20))
            fh.flush()
        except OSError:
            pass
    cases = [
        ["embed", "--model", "eco/ex/init.pt", "--images", "eco/ex/val", "--out", f"{small_disk}/v.h5"],
        ["pretrain", "--images", "eco/ex/val", "--out", f"{small_disk}/p.pt", "--epochs", "1"],
        ["train", "--data", "eco/ex/val", "--val", "eco/ex/val", "--out", f"{small_disk}/m.pt", "--epochs", "1"],
    ]  # fmt: skip
    for args in cases:
        r = subprocess.run([*ALFK, *args, "--device", "cpu", "--workers", "0"], capture_output=True,
                           text=True, env=_env(), cwd=tmp_path, timeout=300)  # fmt: skip
        assert r.returncode == 1, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: no space left on device writing"), r.stderr
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    r = subprocess.run(
        [*ALFK, "select", "--val", "eco/ex/val", "--pool", "eco/ex/unlabeled", "--P", "3",
         "--model", "eco/ex/init.pt", "--workdir", f"{small_disk}/wd", "--device", "cpu"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the lock file {small_disk}/wd/lock: No space left on device"
    )


def test_the_work_folder_lock_dies_with_its_owner(eco, tmp_path):
    from alfk_cli.selection.workdir import locked

    # resnet18 at 224 px keeps the embed busy for a while on a CPU: time to kill it mid-way
    write_images(eco / "many", 200, seed=4)
    save_checkpoint(tmp_path / "r18.pt", build_model("resnet18", 4, seed=0), "resnet18",
                    list(ROTATION_CLASSES), "rotation")  # fmt: skip
    p = subprocess.Popen(
        [*ALFK, "select", "--val", "eco/ex/val", "--pool", "eco/ex/many", "--P", "5",
         "--model", "r18.pt", "--device", "cpu", "--workers", "2", "--workdir", "wd"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=dict(_env(), ALFK_PROGRESS="plain"),
        cwd=tmp_path, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "embed many: 0/" not in line:  # lock held, loader starting
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            break
    time.sleep(1.0)  # let the loader fork its workers (they inherit the lock file's descriptor)
    assert p.poll() is None, "select finished before it could be killed"
    p.kill()
    p.wait()
    with locked(tmp_path / "wd"):  # at once: orphaned workers must not hold the lock
        pass
