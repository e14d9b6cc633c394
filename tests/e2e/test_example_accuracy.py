"""Acceptance on the bundled example: LeNet on ~2,000 labelled digits reaches ≥ 95% validation
accuracy, and rotation pretraining on the biased pool is far above chance (25%)."""

import subprocess
import sys
from pathlib import Path

import pytest

from alfk_cli.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_biased_folders.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.slow
def test_pretrain_and_train_on_bundled_example(cli, example):
    init, model = example / "init.pt", example / "model.pt"
    r = cli("pretrain", "--images", example / "unlabeled", "--out", init, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(init).info["rotation_accuracy"] > 0.8
    r = cli(
        "train",
        "--data",
        example / "labeled",
        "--val",
        example / "val",
        "--init",
        init,
        "--out",
        model,
        "--device",
        "cpu",
        "-q",
    )
    assert r.exit_code == 0, r.stderr
    ck = load_checkpoint(model)
    assert ck.info["train_images"] == 2000
    assert ck.info["val_accuracy"] >= 0.95
