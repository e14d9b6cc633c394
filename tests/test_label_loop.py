"""The nightly round trip on the bundled example, two nights: select → Label Studio tasks →
(annotators) → labels import → train → select, with no hand-kept list and no image sent twice."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/data/local-files/?d=unlabeled/"


def _annotate(tasks: list[dict], truth: dict[str, str]) -> list[dict]:
    """What Label Studio's JSON export holds after annotators labelled every task (its shape:
    https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks)."""
    out = []
    for i, task in enumerate(tasks):
        label = truth[Path(task["data"]["alfk_path"]).name]
        result = {"from_name": "choice", "to_name": "image", "type": "choices",
                  "value": {"choices": [label]}}  # fmt: skip
        out.append({**task, "id": i + 1, "annotations": [{"id": i + 1, "result": [result],
                    "was_cancelled": False}]})  # fmt: skip
    return out


def test_two_nights_round_trip_on_the_example(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_biased_folders.py"), "--out", "ex",
         "--force"], check=True, capture_output=True,
    )  # fmt: skip
    with open("ex/unlabeled-truth.csv", newline="") as fh:
        truth = {r["path"]: r["label"] for r in csv.DictReader(fh)}
    wd = Path("ex/.alfk/unlabeled")
    wd.mkdir(parents=True)
    quick = ("--device", "cpu", "--workers", "0", "-q")
    r = cli(
        "pretrain", "--images", "ex/unlabeled", "--epochs", "1", "--out", wd / "init.pt", *quick
    )
    assert r.exit_code == 0, r.stderr
    labelled_before = sum(1 for _ in Path("ex/labeled").rglob("*.png"))
    sent: list[str] = []
    for night in (1, 2):
        r = cli("select", "--val", "ex/val", "--pool", "ex/unlabeled", "--P", "20",
                "--format", "label-studio", "--url-prefix", PREFIX, *quick)  # fmt: skip
        assert r.exit_code == 0, r.stderr
        tasks = json.loads(r.stdout)
        paths = [t["data"]["alfk_path"] for t in tasks]
        assert len(tasks) == 20 and all(t["data"]["image"].startswith(PREFIX) for t in tasks)
        assert not set(paths) & set(sent), f"night {night} re-sent an image"
        sent += paths
        Path(f"export{night}.json").write_text(json.dumps(_annotate(tasks, truth)))
        r = cli("labels", "import", f"export{night}.json", "--into", "ex/labeled",
                "--classes-from", "ex/val")  # fmt: skip
        assert r.exit_code == 0, r.stderr
        r = cli("train", "--data", "ex/labeled", "--val", "ex/val", "--init", wd / "init.pt",
                "--out", wd / "model.pt", "--epochs", "1", *quick)  # fmt: skip
        assert r.exit_code == 0, r.stderr
    # every sent image is filed once, under its annotated class, as a link to the pool file
    filed = [p for p in Path("ex/labeled").rglob("*.png")]
    assert len(filed) == labelled_before + 40
    pool_inodes = {Path(p).stat().st_ino: truth[Path(p).name] for p in sent}
    linked = {p.stat().st_ino: p.parent.name for p in filed if p.stat().st_ino in pool_inodes}
    assert linked == pool_inodes
    # a re-import changes nothing; the ledger lists both nights
    assert cli("labels", "import", "export1.json", "--into", "ex/labeled").exit_code == 0
    assert sum(1 for _ in Path("ex/labeled").rglob("*.png")) == labelled_before + 40
    runs = cli("history", "--pool", "ex/unlabeled").stdout.splitlines()[1:]
    assert [r.split("\t")[0] for r in runs] == ["1", "2"]
