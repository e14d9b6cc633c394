import multiprocessing as mp
import os

import pytest

from alfk_cli.errors import AlfkError
from alfk_cli.selection.workdir import default_workdir, locked, newest_checkpoint, read_exclude


def test_default_workdir_is_beside_the_pool_and_per_pool(tmp_path):
    assert default_workdir(tmp_path / "unlabeled") == tmp_path / ".alfk" / "unlabeled"
    assert default_workdir(tmp_path / "a") != default_workdir(tmp_path / "b")


def _try_lock(path, q):
    try:
        with locked(path):
            q.put("got it")
    except AlfkError as exc:
        q.put(str(exc))


def test_second_lock_fails_with_a_clear_message(tmp_path):
    q = mp.get_context("fork").Queue()
    with locked(tmp_path):
        p = mp.get_context("fork").Process(target=_try_lock, args=(tmp_path, q))
        p.start()
        p.join(20)
        msg = q.get(timeout=5)
    assert "another alfk select is running" in msg and f"pid {os.getpid()}" in msg
    # released afterwards
    p = mp.get_context("fork").Process(target=_try_lock, args=(tmp_path, q))
    p.start()
    p.join(20)
    assert q.get(timeout=5) == "got it"


def test_newest_checkpoint(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    os.utime(a, ns=(2_000_000_000, 2_000_000_000))
    os.utime(b, ns=(1_000_000_000, 1_000_000_000))
    assert newest_checkpoint(tmp_path) == a


def test_read_exclude_accepts_printed_and_relative_paths(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    pool.mkdir()
    paths = ["x/1.png", "x/2.png", "3.png", "4.png"]
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "done.txt"
    f.write_text(f"# sent last night\npool/x/1.png\n\n3.png\n{pool / '4.png'}\nother/9.png\n")
    assert read_exclude(f, pool, paths) == [0, 2, 3]
    with pytest.raises(AlfkError, match="does not exist"):
        read_exclude(tmp_path / "nope.txt", pool, paths)
