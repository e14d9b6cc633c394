"""The ``train`` and ``pretrain`` commands end to end, and the CLI's error contract."""

import pytest

from alfk_cli.atomic import partial_path
from alfk_cli.checkpoint import load_checkpoint
from conftest import make_labelled, write_images


@pytest.fixture
def folders(tmp_path):
    data = make_labelled(tmp_path / "data", ["a", "b"], 6)
    val = make_labelled(tmp_path / "val", ["a", "b"], 3)
    return data, val


def test_help_lists_commands_and_examples(cli):
    r = cli("--help")
    assert r.exit_code == 0
    for cmd in ("pretrain", "train", "embed", "score", "select", "simulate", "plot"):
        assert f" {cmd} " in r.stdout
    for cmd in ("train", "pretrain", "embed", "score", "select", "simulate", "plot"):
        h = cli(cmd, "--help")
        assert h.exit_code == 0 and "Example" in h.stdout and f"alfk {cmd} --" in h.stdout


def test_train_writes_checkpoint_with_metadata(cli, folders, tmp_path):
    data, val = folders
    out = tmp_path / "m.pt"
    r = cli("train", "--data", data, "--val", val, "--out", out, "--epochs", "2", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""  # stdout is for data only
    assert "overall" in r.stderr and "validation accuracy" in r.stderr
    ck = load_checkpoint(out)
    assert ck.arch == "lenet" and ck.classes == ["a", "b"] and ck.head == "classifier"
    assert ck.info["epochs"] == 2 and 1 <= ck.info["best_epoch"] <= 2


def test_pretrain_then_train_init(cli, folders, tmp_path):
    data, val = folders
    pool = tmp_path / "pool"
    write_images(pool, 12)
    init = tmp_path / "init.pt"
    r = cli("pretrain", "--images", pool, "--out", init, "--epochs", "1", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "rotation accuracy" in r.stderr
    ck = load_checkpoint(init)
    assert ck.head == "rotation" and ck.classes == ["0", "90", "180", "270"]
    out = tmp_path / "m.pt"
    r = cli(
        "train",
        "--data",
        data,
        "--val",
        val,
        "--init",
        init,
        "--out",
        out,
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.stderr
    assert "fresh: classifier.weight, classifier.bias" in r.stderr
    assert load_checkpoint(out).info["init_sha256"] == ck.sha256


def _one_line_error(r, needle):
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1]
    assert "Traceback" not in r.stderr


def test_missing_folder(cli, folders, tmp_path):
    _, val = folders
    out = tmp_path / "m.pt"
    _one_line_error(
        cli("train", "--data", tmp_path / "nope", "--val", val, "--out", out), "does not exist"
    )
    assert not out.exists()


def test_empty_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "init.pt"
    _one_line_error(
        cli("pretrain", "--images", tmp_path / "empty", "--out", out), "no images found"
    )
    assert not out.exists() and not partial_path(out).exists()


def test_mismatched_classes(cli, folders, tmp_path):
    data, _ = folders
    other = make_labelled(tmp_path / "other", ["a", "c"], 2)
    _one_line_error(
        cli("train", "--data", data, "--val", other, "--out", tmp_path / "m.pt"),
        "class folders differ",
    )


@pytest.mark.parametrize("balance", ["none", "reweight", "sample", "auto"])
def test_labels_covering_a_subset_of_the_classes_train_on_vals_classes(cli, tmp_path, balance):
    """A first batch of labels rarely holds every class (issue 18): train takes val's class list
    and indices, so the checkpoint's classes are val's; an absent class gives no NaN or error."""
    import math

    import torch

    from alfk_cli.images import align_classes, scan_images

    data = make_labelled(tmp_path / "data", ["dog", "bird"], 4)  # two of val's four, out of order
    (tmp_path / "data" / "cat").mkdir()  # an empty class folder changes nothing
    val = make_labelled(tmp_path / "val", ["ant", "bird", "cat", "dog"], 2)
    aligned = align_classes(scan_images(data), scan_images(val))
    assert aligned.classes == ["ant", "bird", "cat", "dog"]
    assert [aligned.classes[i] for i in aligned.labels] == [p.split("/")[0] for p in aligned.paths]
    out = tmp_path / "m.pt"
    r = cli("train", "--data", data, "--val", val, "--out", out, "--epochs", "2",
            "--balance", balance, "--device", "cpu", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "nan" not in r.stderr.lower() and "Warning" not in r.stderr
    ck = load_checkpoint(out)
    assert ck.classes == ["ant", "bird", "cat", "dog"] and ck.build().num_classes == 4
    assert math.isfinite(ck.info["val_accuracy"])
    assert all(torch.isfinite(t).all() for t in ck.state_dict.values() if t.is_floating_point())


def test_init_of_another_architecture(cli, folders, tmp_path):
    data, val = folders
    init = tmp_path / "init.pt"
    assert (
        cli(
            "train", "--data", data, "--val", val, "--out", init, "--epochs", "1", "--device", "cpu"
        ).exit_code
        == 0
    )
    r = cli(
        "train",
        "--data",
        data,
        "--val",
        val,
        "--init",
        init,
        "--arch",
        "resnet10",
        "--out",
        tmp_path / "x.pt",
    )
    _one_line_error(r, "made for lenet, not resnet10")


def test_corrupt_file_skipped_or_strict(cli, folders, tmp_path):
    data, val = folders
    (data / "a" / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "m.pt"
    r = cli("train", "--data", data, "--val", val, "--out", out, "--epochs", "1", "--device", "cpu")
    assert r.exit_code == 0 and "skipped 1 file" in r.stderr and "bad.png" in r.stderr
    out2 = tmp_path / "m2.pt"
    _one_line_error(
        cli("train", "--data", data, "--val", val, "--out", out2, "--strict"), "bad.png"
    )
    assert not out2.exists()


def test_unwritable_output_and_usage_errors(cli, folders, tmp_path):
    data, val = folders
    _one_line_error(
        cli(
            "train",
            "--data",
            data,
            "--val",
            val,
            "--out",
            tmp_path / "no" / "m.pt",
            "--epochs",
            "1",
        ),
        "does not exist",
    )
    assert (
        cli("train", "--data", data).exit_code == 2
    )  # missing required options: Typer's usage error
    assert (
        cli(
            "train", "--data", data, "--val", val, "--out", tmp_path / "m.pt", "--epochs", "0"
        ).exit_code
        == 2
    )
    bad_device = cli(
        "train", "--data", data, "--val", val, "--out", tmp_path / "m.pt", "--device", "tpu"
    )
    assert bad_device.exit_code == 2 and "use auto, cpu, cuda or cuda:N" in bad_device.stderr
    bad_arch = cli("pretrain", "--images", data, "--out", tmp_path / "m.pt", "--arch", "vgg")
    assert bad_arch.exit_code == 2 and "not one of lenet, resnet10, resnet18" in bad_arch.stderr
