"""The run ledger: nothing is sent twice without a hand-kept list (a night with nothing new sends
P new images), and ``alfk history`` shows (and prints again) every run."""

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


def test_every_night_sends_new_images_and_history_prints_a_run_again(cli, world):
    night1, err = _select(cli)
    assert "recorded as run 1" in err
    # annotators are slow: nothing changed, and night 2 still sends P images never sent before
    night2, err = _select(cli)
    assert "left out 5 pool image(s) sent in earlier runs (the ledger)" in err
    assert "recorded as run 2" in err and "selection again" not in err
    assert len(night2) == 5 and not set(night1) & set(night2)

    write_images(Path("pool"), 5, seed=11, prefix="new")  # the next night: the pool grew
    night3, err = _select(cli)
    assert "left out 10 pool image(s) sent in earlier runs (the ledger)" in err
    assert len(night3) == 5 and not (set(night1) | set(night2)) & set(night3)
    runs = _runs(cli)
    assert [r.split("\t")[0] for r in runs] == ["1", "2", "3"]
    assert all(r.split("\t")[2:5] == ["5", "5", "fk"] for r in runs)
    # looking again is explicit: a lost to_label.txt comes back from the ledger, as printed
    assert cli("history", "--pool", "pool", "--run", "1").stdout.splitlines() == night1
    assert cli("history", "--workdir", ".alfk/pool", "--run", "2").stdout.splitlines() == night2
    assert cli("history", "--pool", "pool", "--run", "last").stdout.splitlines() == night3
    assert len(_runs(cli)) == 3  # printing a run again records nothing

    with sqlite3.connect(LEDGER) as con:
        rows = con.execute(
            "SELECT rank, path, predicted, center FROM images WHERE run = 3"
        ).fetchall()
    assert [f"pool/{r[1]}" for r in sorted(rows)] == night3
    assert all(r[2] in ("a", "b", "c") and r[3].startswith("val") for r in rows)


def test_no_ledger_is_a_look_that_records_nothing_and_resends_nothing(cli, world):
    first, _ = _select(cli)
    peek, err = _select(cli, "--no-ledger")
    assert "recorded" not in err and not set(peek) & set(first)  # the ledger is still read
    again, _ = _select(cli, "--no-ledger")
    assert again == peek  # a look changes nothing
    assert len(_runs(cli)) == 1
    night2, _ = _select(cli)
    assert night2 == peek  # the look showed what the next recorded night sends
    assert len(_runs(cli)) == 2


def test_a_deleted_ledger_is_a_warning(cli, world):
    first, err = _select(cli)
    assert "warning" not in err
    LEDGER.unlink()
    again, err = _select(cli)
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: {Path('.alfk/pool').resolve()} has stores and scores but no ledger.sqlite: "
        "earlier sends are unknown, so every image may be sent again"
    ]
    assert again == first  # nothing is known to be sent: the same best images come back
    assert "recorded as run 1" in err and LEDGER.is_file()
    _, err = _select(cli)
    assert "warning" not in err


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
    for bad in ("0", "-1", "first", "99999999999999999999", "³"):
        r = cli("history", "--pool", "pool", "--run", bad)
        assert r.exit_code == 2 and "is not a run number" in r.stderr, (bad, r.stderr)
    r = cli("history", "--pool", "pool", "--workdir", ".alfk/pool")
    assert r.exit_code == 2
    LEDGER.write_bytes(b"this is not a database" * 100)
    write_images(Path("pool"), 1, seed=13, prefix="new")
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "5", "--model", "init.pt",
            "--device", "cpu", "--workers", "0")  # fmt: skip
    assert r.exit_code == 1 and "ledger" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
