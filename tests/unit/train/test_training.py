"""The training library on its own: options objects, progress callbacks, typed errors, no output."""

import dataclasses

import pytest
import torch

from alfk_cli.data.scan import scan_images
from alfk_cli.errors import AlfkError
from alfk_cli.models.checkpoint import load_checkpoint
from alfk_cli.train.jobs import TrainOptions, pretrain_checkpoint, train_checkpoint
from alfk_cli.train.loops import ROTNET_MILESTONES, TrainConfig, default_config
from conftest import make_labelled, write_images

CPU = torch.device("cpu")


class Recorder:
    """A ProgressSink that remembers what it was told."""

    def __init__(self):
        self.calls = []

    def add_task(self, description, total=None, **fields):
        self.calls.append(("add", description, total))
        return len(self.calls)

    def advance(self, task_id, advance=1):
        self.calls.append(("advance", task_id))

    def update(self, task_id, **fields):
        self.calls.append(("update", task_id, sorted(fields)))


def test_configs_are_frozen_and_keyword_only():
    cfg = default_config("lenet", epochs=3, lr=0.01, seed=2)
    assert (cfg.epochs, cfg.lr, cfg.seed, cfg.batch_size) == (3, 0.01, 2, 25)
    assert cfg.milestones == TrainConfig().milestones
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1
    with pytest.raises(TypeError):
        default_config("lenet", 3, 0.01)  # positional floats are too easy to swap
    with pytest.raises(TypeError):
        TrainConfig(3)
    assert default_config("lenet", epochs=8, milestones=ROTNET_MILESTONES).milestones == (
        ROTNET_MILESTONES
    )
    assert TrainOptions(epochs=3, lr=0.01, seed=2).config("lenet") == cfg


def test_train_checkpoint_reports_and_prints_nothing(tmp_path, capsys):
    data = scan_images(make_labelled(tmp_path / "data", ["a", "b"], 4))
    val = scan_images(make_labelled(tmp_path / "val", ["a", "b"], 2))
    init = tmp_path / "init.pt"
    pretrain_checkpoint(
        scan_images(write_images(tmp_path / "pool", 6)[0].parent),
        init,
        TrainOptions(epochs=1, workers=0),
        device=CPU,
    )
    starts, sink = [], Recorder()
    report = train_checkpoint(
        data,
        val,
        tmp_path / "m.pt",
        TrainOptions(epochs=2, batch_size=3, workers=0),
        device=CPU,
        init=load_checkpoint(init),
        progress=sink,
        on_start=starts.append,
    )
    assert capsys.readouterr() == ("", "")
    (start,) = starts
    assert (start.arch, start.train_images, start.val_images) == ("lenet", 8, 4)
    assert start.fresh == ["classifier.weight", "classifier.bias"]
    assert sink.calls[0] == ("add", "train", 2 * 3)
    assert [c[0] for c in sink.calls].count("update") == 2
    assert report.arch == "lenet" and report.classes == ["a", "b"] and report.config.epochs == 2
    info = load_checkpoint(tmp_path / "m.pt").info
    # no "freeze" key when nothing is frozen: a checkpoint trained in full keeps its bytes
    assert list(info) == [
        "task", "data", "val", "init", "init_sha256", "epochs", "lr", "momentum",
        "weight_decay", "batch_size", "seed", "balance", "best_epoch", "val_accuracy",
        "train_images",
    ]  # fmt: skip
    assert info["init"] == str(init) and info["data"] == str(tmp_path / "data")
    assert info["best_epoch"] == report.result.best_epoch


def test_train_checkpoint_raises_typed_errors(tmp_path):
    data = scan_images(make_labelled(tmp_path / "data", ["a", "b"], 2))
    val = scan_images(make_labelled(tmp_path / "val", ["a", "c"], 2))
    with pytest.raises(AlfkError, match="only in"):
        train_checkpoint(data, val, tmp_path / "m.pt", TrainOptions(epochs=1), device=CPU)
    assert not (tmp_path / "m.pt").exists()
