"""``alfk labels import``: the labelling tool's answers filed under labeled/<class>/ as links."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from alfk_cli.imagescan import LABELS_MARKER
from conftest import write_images


def _task(tid: int, path: str | None, label: str | None, cancelled: bool = False, **data) -> dict:
    """A task as Label Studio's JSON export writes it (https://labelstud.io/guide/task_format)."""
    if path is not None:
        data["alfk_path"] = path
    data.setdefault("image", f"/data/local-files/?d=pool/{tid}.png")
    annotations = []
    if label is not None or cancelled:
        result = [] if label is None else [_choice(label)]
        annotations.append({"id": 100 + tid, "result": result, "was_cancelled": cancelled})
    return {"id": tid, "data": data, "annotations": annotations}


def _choice(label: str) -> dict:
    return {
        "id": "r1",
        "type": "choices",
        "from_name": "choice",
        "to_name": "image",
        "value": {"choices": [label]},
    }


def _export(path: Path, tasks: list[dict]) -> Path:
    path.write_text(json.dumps(tasks))
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _files(folder: Path) -> list[str]:
    """The files under ``folder`` but the marker ``labels import`` leaves at its top."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p != folder / LABELS_MARKER
    )


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """tmp_path/pool with 6 images and val/ with classes cat and dog; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "pool", 6)
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
    return tmp_path / "pool"


def _standard_export(tmp_path: Path) -> Path:
    return _export(
        tmp_path / "export.json",
        [
            _task(1, "pool/img0000.png", "cat"),
            _task(2, "pool/img0001.png", "dog"),
            _task(3, "pool/img0002.png", "cat"),
            _task(4, "pool/img0003.png", None, cancelled=True),
            _task(5, "pool/img0004.png", None),
        ],
    )


def test_import_links_labelled_images_and_leaves_the_pool(cli, pool, tmp_path):
    before = _snapshot(pool)
    export = _standard_export(tmp_path)
    r = cli(
        "labels", "import", export, "--pool", pool, "--into", "labeled", "--classes-from", "val"
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "3 filed" in r.stderr and "2 skipped" in r.stderr
    labeled = tmp_path / "labeled"
    assert _files(labeled) == ["cat/img0000.png", "cat/img0002.png", "dog/img0001.png"]
    for rel in _files(labeled):
        filed = labeled / rel
        assert filed.stat().st_ino == (pool / filed.name).stat().st_ino
    assert _snapshot(pool) == before

    again = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert again.exit_code == 0, again.stderr
    assert "0 filed" in again.stderr and "3 already there" in again.stderr
    assert _files(labeled) == ["cat/img0000.png", "cat/img0002.png", "dog/img0001.png"]
    assert _snapshot(pool) == before


def test_unknown_class_fails_before_writing(cli, pool, tmp_path):
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(9, "pool/img0001.png", "bird")],
    )
    r = cli(
        "labels", "import", export, "--pool", pool, "--into", "labeled", "--classes-from", "val"
    )
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "'bird'" in lines[0] and "task 9" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "labeled").exists()


@pytest.mark.parametrize("label", ["..", "a/b", ".hidden", "tab\there"])
def test_unsafe_class_names_are_refused(cli, pool, tmp_path, label):
    (tmp_path / "l.csv").write_text(f'path,label\npool/img0000.png,"{label}"\n')
    r = cli("labels", "import", "l.csv", "--pool", pool, "--into", "labeled")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "line 2" in r.stderr
    assert not (tmp_path / "labeled").exists()


def test_csv_and_json_min(cli, pool, tmp_path):
    (tmp_path / "labels.csv").write_text(
        f"path,label\npool/img0000.png,cat\npool/img0001.png,\n{pool / 'img0002.png'},dog\n"
    )
    r = cli("labels", "import", "labels.csv", "--pool", pool, "--into", "labeled",
            "--classes", "cat,dog")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png", "dog/img0002.png"]
    assert "1 skipped" in r.stderr
    records = [
        {"id": 1, "image": "pool/img0003.png", "choice": "dog", "annotator": 1},
        {"id": 2, "alfk_path": "pool/img0004.png", "image": "s3://b/4.png", "choice": "cat"},
    ]
    _export(tmp_path / "min.json", records)
    r = cli("labels", "import", "min.json", "--pool", pool, "--into", "labeled")
    assert r.exit_code == 0, r.stderr
    assert "cat/img0004.png" in _files(tmp_path / "labeled")
    assert "dog/img0003.png" in _files(tmp_path / "labeled")


def test_same_file_name_from_two_folders_keeps_both(cli, pool, tmp_path):
    write_images(tmp_path / "pool" / "sub", 1, seed=7)  # pool/sub/img0000.png, other pixels
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(2, "pool/sub/img0000.png", "cat")],
    )
    r = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 0, r.stderr
    files = _files(tmp_path / "labeled")
    assert len(files) == 2 and "cat/img0000.png" in files
    other = next(f for f in files if f != "cat/img0000.png")
    assert other.startswith("cat/img0000-") and other.endswith(".png")
    assert os.path.samefile(tmp_path / "labeled" / other, pool / "sub" / "img0000.png")
    again = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert "2 already there" in again.stderr and len(_files(tmp_path / "labeled")) == 2


def test_relabel_refused_then_allowed(cli, pool, tmp_path):
    first = _export(tmp_path / "a.json", [_task(1, "pool/img0000.png", "cat")])
    assert cli("labels", "import", first, "--pool", pool, "--into", "labeled").exit_code == 0
    second = _export(tmp_path / "b.json", [_task(1, "pool/img0000.png", "dog")])
    r = cli("labels", "import", second, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "cat" in r.stderr
    assert "--relabel" not in r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png"]
    r = cli("labels", "import", second, "--pool", pool, "--into", "labeled", "--relabel")
    assert r.exit_code == 0, r.stderr
    assert _files(tmp_path / "labeled") == ["dog/img0000.png"]
    assert (pool / "img0000.png").is_file()
    assert os.path.samefile(tmp_path / "labeled" / "dog" / "img0000.png", pool / "img0000.png")


def test_conflicting_labels_across_exports_are_an_error(cli, pool, tmp_path):
    a = _export(tmp_path / "a.json", [_task(1, "pool/img0000.png", "cat")])
    b = _export(tmp_path / "b.json", [_task(2, "pool/img0000.png", "dog")])
    r = cli("labels", "import", a, b, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 1 and "a.json task 1" in r.stderr and "b.json task 2" in r.stderr
    same = _export(tmp_path / "c.json", [_task(3, "pool/img0000.png", "cat")])
    r = cli("labels", "import", a, same, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 0 and "1 filed" in r.stderr and "1 already there" in r.stderr


def test_missing_image(cli, pool, tmp_path):
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(2, "pool/gone.png", "cat")],
    )
    r = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 1 and "gone.png" in r.stderr and "task 2" in r.stderr
    assert not (tmp_path / "labeled").exists()
    r = cli("labels", "import", export, "--pool", pool, "--into", "labeled", "--skip-missing")
    assert r.exit_code == 0 and "1 missing" in r.stderr and "missing: pool/gone.png" in r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png"]


def test_root_from_another_directory_and_url_prefix(cli, pool, tmp_path, monkeypatch):
    export = _standard_export(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = cli("labels", "import", export, "--pool", pool, "--into", tmp_path / "labeled")
    assert r.exit_code == 1 and "elsewhere/pool/img0000.png, is outside the pool folder" in r.stderr
    r = cli("labels", "import", export, "--pool", pool, "--into", tmp_path / "labeled",
            "--root", tmp_path)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert len(_files(tmp_path / "labeled")) == 3

    url = _export(
        tmp_path / "url.json", [_task(7, None, "cat", image="/data/local-files/?d=x.png")]
    )
    r = cli("labels", "import", url, "--pool", pool, "--into", tmp_path / "labeled")
    assert r.exit_code == 1 and "task 7" in r.stderr and "URL" in r.stderr
    url = _export(
        tmp_path / "url.json",
        [_task(7, None, "dog", image="/data/local-files/?d=pool/img0005.png")],
    )
    r = cli(
        "labels", "import", url, "--pool", pool, "--into", tmp_path / "labeled",
        "--root", tmp_path, "--url-prefix", "/data/local-files/?d=",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "dog/img0005.png" in _files(tmp_path / "labeled")


def test_bad_export_files(cli, pool, tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "bad.csv").write_text("file,class\na,b\n")
    for name in ("bad.json", "bad.csv", "nothing.json"):
        r = cli("labels", "import", name, "--pool", pool, "--into", "labeled")
        assert r.exit_code == 1 and r.stderr.startswith("error:") and name in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "labeled").exists()


def test_copies_when_links_cannot_cross_file_systems(cli, pool, tmp_path, monkeypatch):
    import errno

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    export = _standard_export(tmp_path)
    r = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert r.exit_code == 0 and "3 copied" in r.stderr, r.stderr
    filed = tmp_path / "labeled" / "cat" / "img0000.png"
    assert filed.read_bytes() == (pool / "img0000.png").read_bytes()
    assert not os.path.samefile(filed, pool / "img0000.png")
    again = cli("labels", "import", export, "--pool", pool, "--into", "labeled")
    assert "3 already there" in again.stderr
    assert [p.name for p in (tmp_path / "labeled").rglob(".*")] == [LABELS_MARKER]


def test_a_failed_write_is_a_one_line_error(cli, pool, tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    r = cli("labels", "import", _standard_export(tmp_path), "--pool", pool, "--into", "labeled")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot file {Path('labeled/cat/img0000.png')}: no space left on device"
    ]


# --- only pool images, only under INTO (issue 19 items 1, 3, 4 and 13) ---------------------------


@pytest.fixture
def outside(pool, tmp_path):
    """Files an export must never reach: secret/s.png (a valid image outside the pool), another
    pool's image, links from inside the pool to them; each with its link count before."""
    write_images(tmp_path / "secret", 1, prefix="s")
    write_images(tmp_path / "other", 1)
    (pool / "out.png").symlink_to(tmp_path / "secret" / "s0000.png")
    (pool / "sub").symlink_to(tmp_path / "secret", target_is_directory=True)
    secrets = [tmp_path / "secret" / "s0000.png", tmp_path / "other" / "img0000.png"]
    return {p: p.stat().st_nlink for p in secrets}


def _assert_nothing_filed(r, outside, *folders: Path) -> None:
    assert r.exit_code == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
    for folder in folders:
        assert not os.path.lexists(folder), f"{folder} was written"
    assert {p: p.stat().st_nlink for p in outside} == outside  # never linked from anywhere


@pytest.mark.parametrize(
    "path",
    [
        "pool/../secret/s0000.png",  # ../ out of the pool
        "SECRET",  # an absolute path
        "other/img0000.png",  # another pool's image
        "pool/out.png",  # a link in the pool to a file outside it
        "pool/sub/s0000.png",  # a linked folder in the pool
    ],
)
def test_an_export_cannot_file_a_file_outside_the_pool(cli, pool, tmp_path, outside, path):
    path = path.replace("SECRET", str(tmp_path / "secret" / "s0000.png"))
    json_export = _export(tmp_path / "e.json", [_task(1, "pool/img0000.png", "cat"),
                                                _task(2, path, "cat")])  # fmt: skip
    min_export = _export(tmp_path / "m.json", [{"id": 3, "image": path, "choice": "dog"}])
    (tmp_path / "c.csv").write_text(f"path,label\npool/img0001.png,cat\n{path},dog\n")
    for export, where in ((json_export, "task 2"), (min_export, "task 3"), ("c.csv", "line 3")):
        r = cli("labels", "import", export, "--pool", "pool", "--into", "labeled")
        _assert_nothing_filed(r, outside, tmp_path / "labeled")
        assert where in r.stderr and "outside the pool folder pool" in r.stderr


def test_a_url_decoded_path_cannot_leave_the_pool(cli, pool, tmp_path, outside):
    image = "/data/local-files/?d=pool/%2e%2e/secret/s0000.png"
    export = _export(tmp_path / "u.json", [_task(4, None, "cat", image=image)])
    r = cli("labels", "import", export, "--pool", "pool", "--into", "labeled",
            "--url-prefix", "/data/local-files/?d=")  # fmt: skip
    _assert_nothing_filed(r, outside, tmp_path / "labeled")
    assert "task 4: image pool/../secret/s0000.png" in r.stderr and "outside the pool" in r.stderr


def test_only_regular_image_files_are_filed_and_none_is_opened(cli, pool, tmp_path):
    (pool / "notes.txt").write_text("not an image\n")
    (pool / ".hidden.png").write_bytes((pool / "img0000.png").read_bytes())
    (pool / ".cache").mkdir()
    (pool / ".cache" / "a.png").write_bytes((pool / "img0000.png").read_bytes())
    (pool / "folder.png").mkdir()
    cases = {
        "pool/notes.txt": "is not an image file",
        "pool/.hidden.png": "is hidden in the pool folder",
        "pool/.cache/a.png": "is hidden in the pool folder",
        "pool/folder.png": "is not a regular file (a folder)",
    }
    if hasattr(os, "mkfifo"):  # a FIFO is stat'ed, never opened (opening it would hang)
        os.mkfifo(pool / "fifo.png")
        cases["pool/fifo.png"] = "is not a regular file (a FIFO)"
    for path, says in cases.items():
        (tmp_path / "c.csv").write_text(f"path,label\npool/img0001.png,cat\n{path},cat\n")
        r = cli("labels", "import", "c.csv", "--pool", "pool", "--into", "labeled",
                "--skip-missing")  # fmt: skip
        _assert_nothing_filed(r, {}, tmp_path / "labeled")
        assert f"c.csv line 3: {path} {says}" in r.stderr, r.stderr


def test_the_pool_is_required(cli, pool, tmp_path):
    export = _standard_export(tmp_path)
    r = cli("labels", "import", export, "--into", "labeled")
    assert r.exit_code == 2 and "--pool" in r.stderr
    for bad, says in (("nope", "pool folder nope does not exist"), (export, "is not a folder")):
        r = cli("labels", "import", export, "--pool", bad, "--into", "labeled")
        assert r.exit_code == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "labeled").exists()


def test_into_inside_the_pool_or_holding_it_is_refused(cli, pool, tmp_path):
    export = _standard_export(tmp_path)
    (tmp_path / "link").symlink_to(pool, target_is_directory=True)
    before = _snapshot(pool)
    for into, says in (
        ("pool/lab", "is inside the pool folder pool"),
        ("pool", "is inside the pool folder pool"),
        ("link/lab", "is inside the pool folder pool"),  # the same folder through a link
        (".", "holds the pool folder pool"),
    ):
        r = cli("labels", "import", export, "--pool", "pool", "--into", into)
        _assert_nothing_filed(r, {})
        assert says in r.stderr, r.stderr
    assert _snapshot(pool) == before and not (pool / "lab").exists()


def test_a_symlinked_class_folder_is_refused_a_symlinked_into_is_followed(cli, pool, tmp_path):
    export = _standard_export(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "labeled").mkdir()
    (tmp_path / "labeled" / "cat").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    r = cli("labels", "import", export, "--pool", "pool", "--into", "labeled")
    assert r.exit_code == 1 and "class folder labeled/cat is a symbolic link" in r.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "labeled").iterdir()) == ["cat"]  # no dog/, marker
    # INTO itself may be a link (labels kept on another disk): the files land in its target
    (tmp_path / "disk").mkdir()
    (tmp_path / "lab").symlink_to(tmp_path / "disk", target_is_directory=True)
    r = cli("labels", "import", export, "--pool", "pool", "--into", "lab")
    assert r.exit_code == 0, r.stderr
    assert _files(tmp_path / "disk") == ["cat/img0000.png", "cat/img0002.png", "dog/img0001.png"]
    assert (tmp_path / "disk" / LABELS_MARKER).is_file()


def test_a_pool_file_replaced_while_filing_is_not_filed(cli, pool, tmp_path, monkeypatch):
    import errno

    real_link = os.link
    write_images(tmp_path / "secret", 1, prefix="s")
    secret = tmp_path / "secret" / "s0000.png"

    def swap_then(fail: bool):
        def link(src, dst):
            os.replace(pool / "img0000.png", tmp_path / "moved.png")
            os.symlink(secret, pool / "img0000.png")  # checked as a file, now a link out
            if fail:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_link(src, dst)

        return link

    export = _export(tmp_path / "e.json", [_task(1, "pool/img0000.png", "cat")])
    for fail in (False, True):  # linked, then copied
        monkeypatch.setattr(os, "link", swap_then(fail))
        r = cli("labels", "import", export, "--pool", "pool", "--into", "labeled")
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
        assert _files(tmp_path / "labeled") == [] and secret.stat().st_nlink == 1
        (pool / "img0000.png").unlink()
        os.replace(tmp_path / "moved.png", pool / "img0000.png")


def test_a_json_object_is_one_task_or_an_error(cli, pool, tmp_path):
    for text in ('{"tasks": []}', "{}", '{"id": 1, "image": "pool/img0000.png", "choice": "cat"}'):
        (tmp_path / "o.json").write_text(text)
        r = cli("labels", "import", "o.json", "--pool", "pool", "--into", "labeled")
        assert r.exit_code == 1 and "o.json is a JSON object, not a Label Studio export" in r.stderr
        assert not (tmp_path / "labeled").exists()
    # one task, as Label Studio's task API (GET /api/tasks/<id>) returns it
    (tmp_path / "o.json").write_text(json.dumps(_task(1, "pool/img0000.png", "cat")))
    r = cli("labels", "import", "o.json", "--pool", "pool", "--into", "labeled")
    assert r.exit_code == 0 and _files(tmp_path / "labeled") == ["cat/img0000.png"], r.stderr


def test_the_marker_keeps_a_labelled_folder_out_of_a_pool_scan(cli, tmp_path, monkeypatch):
    from alfk_cli.imagescan import scan_images
    from alfk_cli.poollist import scan_pool

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "top" / "pool", 3)
    export = _export(tmp_path / "e.json", [_task(1, "top/pool/img0000.png", "cat")])
    r = cli("labels", "import", export, "--pool", "top/pool", "--into", "top/labeled")
    assert r.exit_code == 0 and (tmp_path / "top" / "labeled" / LABELS_MARKER).is_file()
    # a scan of the folder above both never takes the labelled copies for pool images
    found = scan_images(tmp_path / "top", strict=True)
    assert found.paths == ["pool/img0000.png", "pool/img0001.png", "pool/img0002.png"]
    assert [p for p, _ in found.skipped] == ["labeled/"]
    (tmp_path / "list.txt").write_text("labeled/cat/img0000.png\npool/img0001.png\n")
    listed = scan_pool(tmp_path / "top", tmp_path / "list.txt", strict=True)
    assert listed.paths == ["pool/img0001.png"]
    assert [p for p, _ in listed.skipped] == ["labeled/"]
    # the labelled folder itself scans as usual (train --data labeled/)
    assert scan_images(tmp_path / "top" / "labeled").paths == ["cat/img0000.png"]
