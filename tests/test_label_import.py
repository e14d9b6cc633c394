"""``alfk labels import``: the labelling tool's answers filed under labeled/<class>/ as links."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

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
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


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
    r = cli("labels", "import", export, "--into", "labeled", "--classes-from", "val")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "3 filed" in r.stderr and "2 skipped" in r.stderr
    labeled = tmp_path / "labeled"
    assert _files(labeled) == ["cat/img0000.png", "cat/img0002.png", "dog/img0001.png"]
    for rel in _files(labeled):
        filed = labeled / rel
        assert filed.stat().st_ino == (pool / filed.name).stat().st_ino
    assert _snapshot(pool) == before

    again = cli("labels", "import", export, "--into", "labeled")
    assert again.exit_code == 0, again.stderr
    assert "0 filed" in again.stderr and "3 already there" in again.stderr
    assert _files(labeled) == ["cat/img0000.png", "cat/img0002.png", "dog/img0001.png"]
    assert _snapshot(pool) == before


def test_unknown_class_fails_before_writing(cli, pool, tmp_path):
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(9, "pool/img0001.png", "bird")],
    )
    r = cli("labels", "import", export, "--into", "labeled", "--classes-from", "val")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "'bird'" in lines[0] and "task 9" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "labeled").exists()


@pytest.mark.parametrize("label", ["..", "a/b", ".hidden", "tab\there"])
def test_unsafe_class_names_are_refused(cli, pool, tmp_path, label):
    (tmp_path / "l.csv").write_text(f'path,label\npool/img0000.png,"{label}"\n')
    r = cli("labels", "import", "l.csv", "--into", "labeled")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "line 2" in r.stderr
    assert not (tmp_path / "labeled").exists()


def test_csv_and_json_min(cli, pool, tmp_path):
    (tmp_path / "labels.csv").write_text(
        f"path,label\npool/img0000.png,cat\npool/img0001.png,\n{pool / 'img0002.png'},dog\n"
    )
    r = cli("labels", "import", "labels.csv", "--into", "labeled", "--classes", "cat,dog")
    assert r.exit_code == 0, r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png", "dog/img0002.png"]
    assert "1 skipped" in r.stderr
    records = [
        {"id": 1, "image": "pool/img0003.png", "choice": "dog", "annotator": 1},
        {"id": 2, "alfk_path": "pool/img0004.png", "image": "s3://b/4.png", "choice": "cat"},
    ]
    _export(tmp_path / "min.json", records)
    r = cli("labels", "import", "min.json", "--into", "labeled")
    assert r.exit_code == 0, r.stderr
    assert "cat/img0004.png" in _files(tmp_path / "labeled")
    assert "dog/img0003.png" in _files(tmp_path / "labeled")


def test_same_file_name_from_two_folders_keeps_both(cli, pool, tmp_path):
    write_images(tmp_path / "pool" / "sub", 1, seed=7)  # pool/sub/img0000.png, other pixels
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(2, "pool/sub/img0000.png", "cat")],
    )
    r = cli("labels", "import", export, "--into", "labeled")
    assert r.exit_code == 0, r.stderr
    files = _files(tmp_path / "labeled")
    assert len(files) == 2 and "cat/img0000.png" in files
    other = next(f for f in files if f != "cat/img0000.png")
    assert other.startswith("cat/img0000-") and other.endswith(".png")
    assert os.path.samefile(tmp_path / "labeled" / other, pool / "sub" / "img0000.png")
    again = cli("labels", "import", export, "--into", "labeled")
    assert "2 already there" in again.stderr and len(_files(tmp_path / "labeled")) == 2


def test_relabel_refused_then_allowed(cli, pool, tmp_path):
    first = _export(tmp_path / "a.json", [_task(1, "pool/img0000.png", "cat")])
    assert cli("labels", "import", first, "--into", "labeled").exit_code == 0
    second = _export(tmp_path / "b.json", [_task(1, "pool/img0000.png", "dog")])
    r = cli("labels", "import", second, "--into", "labeled")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "cat" in r.stderr
    assert "--relabel" not in r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png"]
    r = cli("labels", "import", second, "--into", "labeled", "--relabel")
    assert r.exit_code == 0, r.stderr
    assert _files(tmp_path / "labeled") == ["dog/img0000.png"]
    assert (pool / "img0000.png").is_file()
    assert os.path.samefile(tmp_path / "labeled" / "dog" / "img0000.png", pool / "img0000.png")


def test_conflicting_labels_across_exports_are_an_error(cli, pool, tmp_path):
    a = _export(tmp_path / "a.json", [_task(1, "pool/img0000.png", "cat")])
    b = _export(tmp_path / "b.json", [_task(2, "pool/img0000.png", "dog")])
    r = cli("labels", "import", a, b, "--into", "labeled")
    assert r.exit_code == 1 and "a.json task 1" in r.stderr and "b.json task 2" in r.stderr
    same = _export(tmp_path / "c.json", [_task(3, "pool/img0000.png", "cat")])
    r = cli("labels", "import", a, same, "--into", "labeled")
    assert r.exit_code == 0 and "1 filed" in r.stderr and "1 already there" in r.stderr


def test_missing_image(cli, pool, tmp_path):
    export = _export(
        tmp_path / "export.json",
        [_task(1, "pool/img0000.png", "cat"), _task(2, "pool/gone.png", "cat")],
    )
    r = cli("labels", "import", export, "--into", "labeled")
    assert r.exit_code == 1 and "gone.png" in r.stderr and "task 2" in r.stderr
    assert not (tmp_path / "labeled").exists()
    r = cli("labels", "import", export, "--into", "labeled", "--skip-missing")
    assert r.exit_code == 0 and "1 missing" in r.stderr and "missing: pool/gone.png" in r.stderr
    assert _files(tmp_path / "labeled") == ["cat/img0000.png"]


def test_root_from_another_directory_and_url_prefix(cli, pool, tmp_path, monkeypatch):
    export = _standard_export(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = cli("labels", "import", export, "--into", tmp_path / "labeled")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = cli("labels", "import", export, "--into", tmp_path / "labeled", "--root", tmp_path)
    assert r.exit_code == 0, r.stderr
    assert len(_files(tmp_path / "labeled")) == 3

    url = _export(
        tmp_path / "url.json", [_task(7, None, "cat", image="/data/local-files/?d=x.png")]
    )
    r = cli("labels", "import", url, "--into", tmp_path / "labeled")
    assert r.exit_code == 1 and "task 7" in r.stderr and "URL" in r.stderr
    url = _export(
        tmp_path / "url.json",
        [_task(7, None, "dog", image="/data/local-files/?d=pool/img0005.png")],
    )
    r = cli(
        "labels", "import", url, "--into", tmp_path / "labeled",
        "--root", tmp_path, "--url-prefix", "/data/local-files/?d=",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "dog/img0005.png" in _files(tmp_path / "labeled")


def test_bad_export_files(cli, pool, tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "bad.csv").write_text("file,class\na,b\n")
    for name in ("bad.json", "bad.csv", "nothing.json"):
        r = cli("labels", "import", name, "--into", "labeled")
        assert r.exit_code == 1 and r.stderr.startswith("error:") and name in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "labeled").exists()


def test_copies_when_links_cannot_cross_file_systems(cli, pool, tmp_path, monkeypatch):
    import errno

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    export = _standard_export(tmp_path)
    r = cli("labels", "import", export, "--into", "labeled")
    assert r.exit_code == 0 and "3 copied" in r.stderr, r.stderr
    filed = tmp_path / "labeled" / "cat" / "img0000.png"
    assert filed.read_bytes() == (pool / "img0000.png").read_bytes()
    assert not os.path.samefile(filed, pool / "img0000.png")
    again = cli("labels", "import", export, "--into", "labeled")
    assert "3 already there" in again.stderr
    assert not [p for p in (tmp_path / "labeled").rglob(".*")]


def test_a_failed_write_is_a_one_line_error(cli, pool, tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    r = cli("labels", "import", _standard_export(tmp_path), "--into", "labeled")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot file {Path('labeled/cat/img0000.png')}: no space left on device"
    ]
