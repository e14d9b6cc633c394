"""``alfk select --format label-studio``: Label Studio's documented task import format
(https://labelstud.io/guide/predictions), through the real entry point and on the library."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from alfk_cli.checkpoint import save_checkpoint
from alfk_cli.label_studio import tasks
from alfk_cli.models import ROTATION_CLASSES, build_model
from alfk_cli.scores import Scores
from conftest import make_labelled, write_images

ODD = "new batch/día 1.png"  # a space and a non-ASCII letter, in a folder and a file name


@pytest.fixture
def world(tmp_path, monkeypatch):
    """val/ (3 classes × 4), a pool of 12 images (one with an odd name), a rotation checkpoint."""
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool") / "day1", 10, seed=10)
    write_images(Path("pool") / "new batch", 2, seed=11)
    Path("pool/new batch/img0000.png").rename(Path("pool") / ODD)
    save_checkpoint(
        "init.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), head="rotation"
    )
    return tmp_path


SELECT = ("select", "--val", "val", "--pool", "pool", "--model", "init.pt", "--device", "cpu")


def _tasks(r) -> list[dict]:
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # one JSON document, nothing else on stdout
    assert isinstance(doc, list)
    return doc


def assert_task_format(doc: list[dict], from_name: str = "choice", to_name: str = "image"):
    """Every task as Label Studio's import format has it: data.image a string; predictions a list
    of {model_version, score (a float in [0, 1], which Label Studio 1.23 checks), result:
    [{from_name, to_name, type, value}]}; the score orders the tasks as the selection does."""
    for task in doc:
        assert set(task) == {"data", "predictions"}
        assert isinstance(task["data"]["image"], str) and task["data"]["image"]
        assert {"alfk_path", "alfk_rank", "alfk_center"} <= set(task["data"])
        assert set(task["data"]) <= {"image", "alfk_path", "alfk_rank", "alfk_score", "alfk_center"}
        assert isinstance(task["predictions"], list) and len(task["predictions"]) == 1
        for pred in task["predictions"]:
            assert set(pred) == {"model_version", "score", "result"}
            assert isinstance(pred["model_version"], str) and len(pred["model_version"]) == 12
            assert isinstance(pred["score"], float) and 0.0 <= pred["score"] <= 1.0
            assert pred["score"] == (task["data"]["alfk_rank"] - 1) / len(doc)
            assert isinstance(pred["result"], list) and len(pred["result"]) == 1
            for res in pred["result"]:
                assert res["from_name"] == from_name and res["to_name"] == to_name
                assert res["type"] == "choices"
                choices = res["value"]["choices"]
                assert isinstance(choices, list) and len(choices) == 1
                assert choices[0] in {"a", "b", "c"}


def test_tasks_follow_the_format_and_match_the_txt_output(cli, world):
    txt = cli(*SELECT, "--P", "5", "--no-ledger")  # looks: the same selection in two formats
    assert txt.exit_code == 0, txt.stderr
    doc = _tasks(cli(*SELECT, "--P", "5", "--no-ledger", "--format", "label-studio"))
    assert len(doc) == 5
    assert_task_format(doc)
    paths = txt.stdout.splitlines()
    assert [t["data"]["alfk_path"] for t in doc] == paths
    assert [t["data"]["image"] for t in doc] == paths  # no --url-prefix: the printed path
    assert [t["data"]["alfk_rank"] for t in doc] == [1, 2, 3, 4, 5]
    assert all(t["data"]["alfk_center"].startswith("val/") for t in doc)  # fk has centres
    assert all(math.isfinite(t["data"]["alfk_score"]) for t in doc)  # fk's kernel score
    jsonl = [
        json.loads(line)
        for line in cli(*SELECT, "--P", "5", "--no-ledger", "-f", "jsonl").stdout.splitlines()
    ]
    assert [t["data"]["alfk_score"] for t in doc] == [row["score"] for row in jsonl]
    assert (
        cli(*SELECT, "--P", "5", "--no-ledger").stdout == txt.stdout
    )  # the txt output is unchanged


def test_scores_file_gives_the_same_tasks(cli, world):
    prefix = ("--format", "label-studio", "--url-prefix", "s3://bucket/pool/")
    full = _tasks(cli(*SELECT, "--P", "4", *prefix, "--ls-from-name", "cls"))
    again = _tasks(
        cli("select", "--scores", ".alfk/pool/scores.h5", *prefix, "--ls-from-name", "cls")
    )
    assert again == full
    assert_task_format(full, from_name="cls")
    # the scores file's checkpoint hash is the model version
    import h5py

    with h5py.File(".alfk/pool/scores.h5") as f:
        sha = str(f.attrs["checkpoint_sha256"])
    assert {t["predictions"][0]["model_version"] for t in full} == {sha[:12]}


def test_url_prefix_quotes_the_path_inside_the_pool(cli, world):
    r = cli(
        *SELECT, "--P", "12", "--format", "label-studio", "--url-prefix",
        "/data/local-files/?d=unlabeled/", "--ls-to-name", "img",
    )  # fmt: skip
    doc = _tasks(r)
    assert_task_format(doc, to_name="img")
    by_path = {t["data"]["alfk_path"]: t["data"]["image"] for t in doc}
    assert by_path["pool/" + ODD] == "/data/local-files/?d=unlabeled/new%20batch/d%C3%ADa%201.png"
    assert by_path["pool/day1/img0003.png"] == "/data/local-files/?d=unlabeled/day1/img0003.png"


def test_random_has_no_kernel_score_and_no_centre(cli, world):
    doc = _tasks(cli(*SELECT, "--P", "3", "--strategy", "random", "--format", "label-studio"))
    assert len(doc) == 3
    assert_task_format(doc)
    assert all("alfk_score" not in t["data"] for t in doc)
    assert [t["predictions"][0]["score"] for t in doc] == [0.0, 1 / 3, 2 / 3]
    assert all(t["data"]["alfk_center"] == "" for t in doc)
    assert (
        "NaN" not in cli(*SELECT, "--P", "3", "--strategy", "random", "-f", "label-studio").stdout
    )


def test_empty_selection_is_an_empty_array(cli, world):
    first = cli(*SELECT, "--P", "12")
    assert first.exit_code == 0, first.stderr
    Path("sent.txt").write_text(first.stdout)
    r = cli(*SELECT, "--P", "2", "--exclude", "sent.txt", "--format", "label-studio")
    assert _tasks(r) == [] and r.stdout == "[]\n"


def test_label_studio_options_need_the_format(cli, world):
    for opt in (("--url-prefix", "s3://b/"), ("--ls-from-name", "x"), ("--ls-to-name", "y")):
        r = cli("select", "--scores", "missing.h5", *opt)
        assert r.exit_code == 2 and opt[0] in r.stderr and r.stdout == ""
    r = cli("select", "--scores", "missing.h5", "-f", "label-studio", "--ls-to-name", " ")
    assert r.exit_code == 2 and "--ls-to-name" in r.stderr


def _scores(score: list[float]) -> Scores:
    n = len(score)
    return Scores(
        selected=np.arange(n),
        score=np.asarray(score, dtype=np.float32),
        center=np.full(n, -1),
        centers=np.empty(0, dtype=np.int64),
        paths=[f"sub dir/ñ{i}.png" for i in range(n)],
        predicted=["cat"] * n,
        center_paths=[""] * n,
        image_root="/abs/pool",
        attrs={"checkpoint_sha256": "0123456789abcdef" * 4},
    )


def test_library_tasks():
    doc = tasks(_scores([0.5, float("nan"), float("inf")]), url_prefix="https://h/x/")
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON: no NaN, no Infinity
    assert [("alfk_score" in t["data"]) for t in doc] == [True, False, False]
    assert [t["predictions"][0]["score"] for t in doc] == [0.0, 1 / 3, 2 / 3]
    assert doc[0] == {
        "data": {
            "image": "https://h/x/sub%20dir/%C3%B10.png",
            "alfk_path": "/abs/pool/sub dir/ñ0.png",
            "alfk_rank": 1,
            "alfk_score": 0.5,
            "alfk_center": "",
        },
        "predictions": [
            {
                "model_version": "0123456789ab",
                "score": 0.0,
                "result": [
                    {
                        "from_name": "choice",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["cat"]},
                    }
                ],
            }
        ],
    }
    assert tasks(_scores([]).head(0)[0]) == []
    # Scores.lines renders the same document with the default names
    assert json.loads("\n".join(_scores([0.5]).lines("label-studio"))) == tasks(_scores([0.5]))
