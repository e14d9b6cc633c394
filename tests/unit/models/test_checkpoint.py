import pathlib
import struct
import zipfile

import pytest
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import (
    file_sha256,
    init_from,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    task_model,
)
from alfk_cli.util.atomic import partial_path


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


def _count_torch_loads(monkeypatch, refuse: bool = False) -> list[int]:
    """Calls of torch.load from now on (``refuse``: each one fails the test)."""
    calls: list[int] = []
    real = torch.load

    def counted(*args, **kwargs):
        calls.append(1)
        if refuse:
            raise AssertionError("torch.load was called")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    return calls


@pytest.mark.parametrize(
    ("arch", "classes", "head"),
    [
        ("lenet", list(ROTATION_CLASSES), "rotation"),
        ("lenet", ["a", "b", "c"], "classifier"),
        ("resnet10", ["x", "y"], "classifier"),
    ],
)
def test_metadata_is_read_without_torch_as_torch_reads_it(
    tmp_path, monkeypatch, arch, classes, head
):
    path = tmp_path / "m.pt"
    model = build_model(arch, len(classes), seed=3)
    save_checkpoint(path, model, arch, classes, head=head, info={"epochs": 2, "val_accuracy": 0.5})
    full = load_checkpoint(path)
    calls = _count_torch_loads(monkeypatch, refuse=True)
    meta = read_checkpoint(path)
    assert calls == []
    assert (meta.arch, meta.classes, meta.head, meta.input, meta.info) == (
        full.arch, full.classes, full.head, full.input, full.info,
    )  # fmt: skip
    assert meta.sha256 == full.sha256 == file_sha256(path)
    monkeypatch.undo()
    weights = meta.load().state_dict  # from the bytes that were hashed
    assert weights.keys() == full.state_dict.keys()
    assert all(torch.equal(weights[k], full.state_dict[k]) for k in weights)


def _record_offset(path, name: str) -> int:
    """Where the data of the zip record ``name`` starts in the file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len


def test_what_the_reader_cannot_take_apart_goes_to_torch(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(
        path, build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), "rotation"
    )
    raw = torch.load(path, weights_only=True)
    calls = _count_torch_loads(monkeypatch)
    # torch's legacy (non-zip) format: read by torch
    legacy = tmp_path / "legacy.pt"
    torch.save(raw, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy).head == "rotation" and len(calls) == 1
    # a tensor record with a flipped byte fails its CRC: torch decides (this one reads it anyway)
    damaged = tmp_path / "damaged.pt"
    data = bytearray(path.read_bytes())
    data[_record_offset(path, "archive/data/0") + 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert read_checkpoint(damaged).sha256 == file_sha256(damaged) and len(calls) == 2
    # an object a state dict is not made of: refused here, and by torch's weights_only
    foreign = tmp_path / "foreign.pt"
    torch.save({**raw, "info": {"where": pathlib.PurePosixPath("x")}}, foreign)
    with pytest.raises(AlfkError, match=r"cannot read checkpoint .*foreign\.pt: not an alfk"):
        read_checkpoint(foreign)
    assert len(calls) == 3


class _Exploit:
    """Pickles as a call of os.system: what a hostile checkpoint would carry."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def test_a_hostile_pickle_is_never_executed(tmp_path):
    from alfk_cli.models.ckptreader import NotReadable, read_pickled

    sentinel = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    # torch's own archive layout, so the reader does unpickle it
    torch.save({"format": "alfk-checkpoint", "payload": _Exploit(f"touch {sentinel}")}, path)
    with pytest.raises(NotReadable, match=r"(posix|os)\.system"):
        read_pickled(path.read_bytes())
    with pytest.raises(AlfkError, match="not an alfk checkpoint"):
        read_checkpoint(path)  # torch's weights_only refuses it too
    assert not sentinel.exists()
