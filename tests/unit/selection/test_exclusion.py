"""Exclusion round trips for file names that survive scanning but used to break the one-name-a-line
contract: the nightly job sends what ``select`` printed, and must never re-send it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alfk_cli.data.names import name_problem
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.selection.workdir import match_exclusions
from conftest import make_labelled, write_images


@pytest.fixture
def eco(tmp_path, monkeypatch):
    ex = tmp_path / "eco" / "ex"
    make_labelled(ex / "val", ["a", "b"], 3)
    write_images(ex / "unlabeled", 4, seed=5)
    save_checkpoint(
        ex / "init.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), "rotation"
    )
    monkeypatch.chdir(tmp_path)
    return ex


def _select(cli, P: int, *extra: str):
    return cli(
        "select", "--val", "eco/ex/val", "--pool", "eco/ex/unlabeled", "--P", str(P),
        "--model", "eco/ex/init.pt", "--device", "cpu", "--workers", "0", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("odd", ["next\x85line.png", "line\u2028sep.png", "para\u2029sep.png"])
def test_names_that_str_splitlines_breaks_are_skipped_and_listed(cli, eco, odd):
    # U+0085, U+2028 and U+2029 end a line for str.splitlines (and many readers): such a name
    # was printed as one line but read back from --exclude as two, so it was re-sent every night
    src = eco / "unlabeled" / "img0000.png"
    try:
        (eco / "unlabeled" / odd).write_bytes(src.read_bytes())
    except OSError:
        pytest.skip("this file system refuses the name")
    assert name_problem(odd) is not None
    r = _select(cli, 4)
    assert r.exit_code == 0, r.stderr
    assert not any(odd in line for line in r.stderr.splitlines() + r.stdout.splitlines())
    assert odd.encode("unicode_escape").decode("ascii") in r.stderr and "rename it" in r.stderr
    assert len(r.stdout.splitlines()) == 4  # the four good images, none of them the odd one


def test_names_with_outer_spaces_are_excluded_as_printed(cli, eco):
    src = (eco / "unlabeled" / "img0000.png").read_bytes()
    (eco / "unlabeled" / " lead.png").write_bytes(src)
    (eco / "unlabeled" / "trail ").mkdir()  # a folder name ending in a space
    (eco / "unlabeled" / "trail " / "x.png").write_bytes(src)
    first = _select(cli, 6)
    assert first.exit_code == 0, first.stderr
    Path("sent.txt").write_text(first.stdout)  # exactly what the job sent
    again = _select(cli, 1, "--exclude", "sent.txt")
    assert again.exit_code == 0 and again.stdout == "", again.stdout
    assert "excluded 6 pool image(s)" in again.stderr and "named no image" not in again.stderr


def test_exclude_lines_from_a_crlf_file_with_stray_spaces_match(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    pool.mkdir()
    monkeypatch.chdir(tmp_path)
    paths = ["a.png", "b.png", "c.png ", "d.png"]
    f = tmp_path / "sent.txt"
    # written on Windows (CRLF), one line hand-edited with spaces, one name ending in a space
    f.write_bytes(b"pool/a.png\r\n  pool/b.png \r\npool/c.png \r\n")
    found = match_exclusions(f, pool, paths)
    assert found.rows == [0, 1, 2] and found.unmatched == 0


def test_exclude_file_splits_on_newlines_only(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    f = tmp_path / "sent.txt"
    f.write_text("a\x0cb.png\nc.png\n", encoding="utf-8")  # a form feed is no line end here
    found = match_exclusions(f, pool, ["c.png"])
    assert found.rows == [0] and found.unmatched == 1


def test_non_utf8_exclude_file_is_read_not_a_traceback(cli, eco):
    first = _select(cli, 2)
    assert first.exit_code == 0, first.stderr
    Path("sent.txt").write_bytes(b"latin1-\xe9t\xe9.png\n" + os.fsencode(first.stdout))
    r = _select(cli, 2, "--exclude", "sent.txt")
    assert r.exit_code == 0, r.stderr
    assert not set(r.stdout.splitlines()) & set(first.stdout.splitlines())
    assert "excluded 2 pool image(s)" in r.stderr and "1 line(s) named no image" in r.stderr


def test_everything_excluded_is_an_empty_selection_in_every_format(cli, eco):
    first = _select(cli, 4)
    assert first.exit_code == 0, first.stderr
    Path("sent.txt").write_text(first.stdout)
    wd = eco / ".alfk" / "unlabeled"
    for fmt in ("txt", "csv", "jsonl"):
        r = _select(cli, 2, "--exclude", "sent.txt", "--format", fmt)
        assert r.exit_code == 0, r.stderr
        assert "warning: only 0 pool image(s) are left" in r.stderr
        assert len(r.stdout.splitlines()) <= 1  # nothing, or the csv header alone
    strict = _select(cli, 2, "--exclude", "sent.txt", "--exact-count")
    assert strict.exit_code == 1 and strict.stdout == ""
    assert strict.stderr.strip().splitlines()[-1].startswith("error: only 0 pool image(s)")
    # the empty scores file is read back: a short selection, then the strict error
    empty = cli("select", "--scores", str(wd / "scores.h5"), "--P", "2")
    assert empty.exit_code == 0 and empty.stdout == "" and "warning:" in empty.stderr
    assert (
        cli("select", "--scores", str(wd / "scores.h5"), "--P", "2", "--exact-count").exit_code == 1
    )
    scored = cli(
        "score", "--val", str(wd / "val.h5"), "--pool", str(wd / "pool.h5"), "--P", "2",
        "--out", "s.h5", "--exclude", "sent.txt", "--device", "cpu",
    )  # fmt: skip
    assert scored.exit_code == 0 and "only 0 pool image(s)" in scored.stderr, scored.stderr
    strict = cli(
        "score", "--val", str(wd / "val.h5"), "--pool", str(wd / "pool.h5"), "--P", "2",
        "--out", "s2.h5", "--exclude", "sent.txt", "--device", "cpu", "--exact-count",
    )  # fmt: skip
    assert strict.exit_code == 1 and not Path("s2.h5").exists()


def test_an_exclude_folder_is_named_as_a_folder(cli, eco):
    Path("sent").mkdir()
    r = _select(cli, 2, "--exclude", "sent")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "error: exclude file sent is a folder, not a file"
    with pytest.raises(AlfkError, match="is a folder"):
        match_exclusions("sent", eco / "unlabeled", [])
