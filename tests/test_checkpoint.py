import pytest
import torch

from alfk_cli.atomic import partial_path
from alfk_cli.checkpoint import init_from, load_checkpoint, save_checkpoint, task_model
from alfk_cli.errors import AlfkError
from alfk_cli.models import ROTATION_CLASSES, build_model


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = build_model("lenet", 3, seed=1)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "lenet", ["a", "b", "c"], info={"val_accuracy": 0.5})
    ck = load_checkpoint(path)
    assert (ck.arch, ck.classes, ck.head) == ("lenet", ["a", "b", "c"], "classifier")
    assert ck.input.size == 28 and ck.input.channels == 1
    assert ck.info["val_accuracy"] == 0.5 and len(ck.sha256) == 64
    rebuilt = ck.build()
    for k, v in model.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k])
    assert not partial_path(path).exists()


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("lenet", 3), "lenet", ["a", "b", "c"])
    with pytest.raises(AlfkError, match="made for lenet, not resnet18"):
        load_checkpoint(path, arch="resnet18")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(AlfkError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AlfkError, match="not an alfk checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(AlfkError, match="not an alfk checkpoint"):
        load_checkpoint(other)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"

    def boom(obj, f):
        f.write(b"half")  # a file object (reproducible.save_torch)
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, build_model("lenet", 2), "lenet", ["a", "b"])
    assert not path.exists() and not partial_path(path).exists()


def test_unwritable_destination(tmp_path):
    with pytest.raises(AlfkError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "m.pt", build_model("lenet", 2), "lenet", ["a", "b"])


def test_init_from_rotation_loads_all_but_classifier(tmp_path):
    rot = build_model("lenet", 4, seed=3)
    path = tmp_path / "rot.pt"
    save_checkpoint(path, rot, "lenet", list(ROTATION_CLASSES), head="rotation")
    task = build_model("lenet", 4, seed=9)  # 4 classes: same head shape, must still be skipped
    before = task.classifier.weight.clone()
    skipped = init_from(task, load_checkpoint(path))
    assert skipped == ["classifier.weight", "classifier.bias"]
    assert torch.equal(task.classifier.weight, before)
    for k, v in rot.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(task.state_dict()[k], v)


def test_init_from_task_checkpoint_with_other_classes(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("lenet", 3, seed=0), "lenet", ["a", "b", "c"])
    same = build_model("lenet", 3, seed=1)
    assert init_from(same, load_checkpoint(path)) == []  # same shape: classifier loads too
    bigger = build_model("lenet", 5, seed=1)
    assert init_from(bigger, load_checkpoint(path)) == ["classifier.weight", "classifier.bias"]


def test_task_model_from_rotation_and_task_checkpoints(tmp_path):
    rot_path, task_path = tmp_path / "rot.pt", tmp_path / "task.pt"
    save_checkpoint(
        rot_path, build_model("lenet", 4), "lenet", list(ROTATION_CLASSES), head="rotation"
    )
    save_checkpoint(task_path, build_model("lenet", 2), "lenet", ["x", "y"])
    assert task_model(load_checkpoint(rot_path), ["p", "q", "r"]).num_classes == 3
    assert task_model(load_checkpoint(task_path), ["x", "y"]).num_classes == 2
    with pytest.raises(AlfkError, match="trained on classes x,y"):
        task_model(load_checkpoint(task_path), ["p", "q"])
