"""Label Studio's JSON_MIN and CSV exports as Label Studio 1.23.2 writes them (records copied from
a real export, tests/test_label_studio_server.py): one record per annotation, so a relabelled
task has several; the latest annotation wins, as in the JSON export."""

import csv
import io
import json
from pathlib import Path

import pytest

from alfk_cli.errors import AlfkError
from alfk_cli.label_import import read_labels
from conftest import write_images

FIELDS = ["alfk_center", "alfk_path", "alfk_rank", "alfk_score", "annotation_id", "annotator"]
FIELDS += ["choice", "created_at", "id", "image", "lead_time", "updated_at"]  # LS's CSV header


def record(task: int, annotation: int, choice: str, when: str) -> dict:
    path = f"pool/img{task:04d}.png"
    return {
        "image": f"/data/local-files/?d={path}",
        "alfk_path": path,
        "alfk_rank": task + 1,
        "alfk_score": 135.37132263183594,
        "alfk_center": "val/a/img0001.png",
        "id": task + 1,
        "choice": choice,
        "annotator": 1,
        "annotation_id": annotation,
        "created_at": f"2026-12-04T18:55:{when}Z",
        "updated_at": f"2026-12-04T18:55:{when}Z",
        "lead_time": 1.0,
    }


# task 0 labelled a, relabelled b, then c (later records need not come later in the file);
# task 1 labelled once
RECORDS = [
    record(0, 3, "b", "43.100000"),
    record(1, 2, "a", "42.500000"),
    record(0, 7, "c", "44.000001"),
    record(0, 1, "a", "42.094999"),
]


def as_csv(records: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, quoting=csv.QUOTE_NONNUMERIC)
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def labels(path: Path) -> dict[str, str | None]:
    """Source → label, one entry per task (a relabelled task is one image, one label)."""
    read = read_labels(path, root=".")
    assert len({r.source for r in read}) == len(read), [r.where for r in read]
    return {str(r.source): r.label for r in read}


def test_json_min_latest_annotation_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("min.json").write_text(json.dumps(RECORDS))
    assert labels(Path("min.json")) == {"pool/img0000.png": "c", "pool/img0001.png": "a"}


def test_json_min_same_time_later_annotation_id_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    twins = [record(0, 9, "b", "42.000000"), record(0, 4, "a", "42.000000")]
    Path("min.json").write_text(json.dumps(twins))
    assert labels(Path("min.json")) == {"pool/img0000.png": "b"}


def test_label_studio_csv_export_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("export.csv").write_text(as_csv(RECORDS))
    assert labels(Path("export.csv")) == {"pool/img0000.png": "c", "pool/img0001.png": "a"}


def test_label_studio_csv_several_choices_in_one_cell_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{**record(0, 1, "a", "42.0"), "choice": json.dumps({"choices": ["a", "b"]})}]
    Path("export.csv").write_text(as_csv(rows))
    with pytest.raises(AlfkError, match=r"^export\.csv task 1 has several choices \(a, b\)"):
        read_labels("export.csv", root=".")


def test_labels_import_files_the_csv_export(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(Path("pool"), 2)
    Path("export.csv").write_text(as_csv(RECORDS))
    args = ("labels", "import", "export.csv", "--pool", "pool", "--into", "labeled")
    r = cli(*args, "--classes", "a,b,c")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.relative_to("labeled").as_posix() for p in Path("labeled").glob("*/*")) == [
        "a/img0001.png",
        "c/img0000.png",
    ]
    again = cli(*args, "--classes", "a,b,c")
    assert again.exit_code == 0 and again.stderr.startswith("0 filed"), again.stderr
