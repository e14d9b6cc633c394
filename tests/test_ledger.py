"""The run ledger: nothing is sent twice without a hand-kept list, a retry re-prints the same
selection, and ``alfk history`` shows (and reproduces) every run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import write_images

LEDGER = Path(".alfk/pool/ledger.sqlite")


@pytest.fixture
def world(small_world):
    return small_world


def _select(cli, *args: str) -> tuple[list[str], str]:
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "5", "--model", "init.pt",
            "--device", "cpu", "--workers", "0", *args)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines(), r.stderr


def _runs(cli) -> list[str]:
    r = cli("history", "--pool", "pool")
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()[1:]


def test_nights_never_resend_and_a_retry_prints_the_same(cli, world):
    night1, err = _select(cli)
    assert "recorded as run 1" in err
    retry, err = _select(cli)
    assert retry == night1 and "the inputs of run 1: its selection again" in err
    assert len(_runs(cli)) == 1  # the retry is not recorded

    write_images(Path("pool"), 5, seed=11, prefix="new")  # the next night: the pool grew
    night2, err = _select(cli)
    assert "left out 5 pool image(s) sent in earlier runs (the ledger)" in err
    assert "recorded as run 2" in err
    assert len(night2) == 5 and not set(night1) & set(night2)
    runs = _runs(cli)
    assert [r.split("\t")[0] for r in runs] == ["1", "2"]
    assert all(r.split("\t")[2:5] == ["5", "5", "fk"] for r in runs)
    # a lost to_label.txt comes back from the ledger, exactly as printed
    assert cli("history", "--pool", "pool", "--run", "1").stdout.splitlines() == night1
    assert cli("history", "--workdir", ".alfk/pool", "--run", "2").stdout.splitlines() == night2

    with sqlite3.connect(LEDGER) as con:
        rows = con.execute(
            "SELECT rank, path, predicted, center FROM images WHERE run = 2"
        ).fetchall()
    assert [f"pool/{r[1]}" for r in sorted(rows)] == night2
    assert all(r[2] in ("a", "b", "c") and r[3].startswith("val") for r in rows)


def test_no_ledger_neither_records_nor_leaves_out(cli, world):
    first, _ = _select(cli)
    peek, err = _select(cli, "--no-ledger")
    assert peek == first and "recorded" not in err
    write_images(Path("pool"), 5, seed=11, prefix="new")
    again, _ = _select(cli, "--no-ledger")
    assert set(again) & set(first)  # nothing left out: the same best images come back
    assert len(_runs(cli)) == 1


def test_the_ledger_and_an_exclude_list_both_apply(cli, world):
    first, _ = _select(cli)
    Path("extra.txt").write_text(
        "".join(p + "\n" for p in ["pool/img0000.png", "pool/img0001.png"])
    )
    write_images(Path("pool"), 2, seed=12, prefix="new")
    second, err = _select(cli, "--exclude", "extra.txt")
    assert not set(second) & (set(first) | {"pool/img0000.png", "pool/img0001.png"})
    assert "excluded" in err and "the ledger" in err


def test_ledger_and_history_errors_are_one_line(cli, world):
    r = cli("history", "--pool", "pool")
    assert (
        r.exit_code == 1
        and r.stderr.startswith("error: no ledger in")
        and "Traceback" not in r.stderr
    )
    _select(cli)
    r = cli("history", "--pool", "pool", "--run", "7")
    assert r.exit_code == 1 and "has no run 7" in r.stderr
    r = cli("history", "--pool", "pool", "--workdir", ".alfk/pool")
    assert r.exit_code == 2
    LEDGER.write_bytes(b"this is not a database" * 100)
    write_images(Path("pool"), 1, seed=13, prefix="new")
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "5", "--model", "init.pt",
            "--device", "cpu", "--workers", "0")  # fmt: skip
    assert r.exit_code == 1 and "ledger" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
