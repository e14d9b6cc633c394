"""``--arch auto``: the architecture chosen from a folder's headers, said on stderr and recorded
in the checkpoint; a warning when an explicit architecture does not fit the folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alfk_cli.data.scan import ImageSet, scan_images
from alfk_cli.errors import AlfkError
from alfk_cli.models.archauto import SAMPLE, choose_arch, look, pick_arch
from alfk_cli.models.checkpoint import read_checkpoint
from conftest import make_labelled, write_images


def _palette(folder: Path, n: int, grey: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 4, (20, 20), dtype=np.uint8), "L").convert("P")
        colours = [(v, v, v) if grey else (v, 255 - v, 0) for v in (0, 80, 160, 240)]
        im.putpalette([c for rgb in colours for c in rgb])
        im.save(folder / f"p{i}.png")


@pytest.mark.parametrize(
    ("mode", "size", "arch"),
    [("L", 28, "lenet"), ("RGB", 32, "resnet10"), ("RGB", 64, "resnet10"),
     ("RGB", 100, "resnet18"), ("L", 100, "resnet18")],
)  # fmt: skip
def test_the_choice_follows_colour_and_size(tmp_path, mode, size, arch):
    write_images(tmp_path / "f", 5, size=size, mode=mode)
    seen = look(scan_images(tmp_path / "f"))
    assert (seen.colour, seen.size, seen.sampled) == (mode == "RGB", size, 5)
    assert choose_arch(seen) == arch


def test_palettes_mixed_folders_and_what_cannot_be_opened(tmp_path):
    _palette(tmp_path / "grey", 3, grey=True)
    _palette(tmp_path / "colour", 3, grey=False)
    assert not look(scan_images(tmp_path / "grey")).colour
    assert look(scan_images(tmp_path / "colour")).colour
    # one colour image among grey ones makes the folder colour; the size is the median
    write_images(tmp_path / "mixed", 4, size=28)
    write_images(tmp_path / "mixed", 1, size=300, mode="RGB", prefix="z")
    seen = look(scan_images(tmp_path / "mixed"))
    assert seen.colour and seen.size == 28 and choose_arch(seen) == "resnet10"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # as scanned
    junk = ImageSet(tmp_path / "junk", ["a.png"], np.array([-1]), [])
    with pytest.raises(AlfkError, match="none of the 1 images looked at could be opened"):
        look(junk)


def test_the_sample_is_spread_and_deterministic(tmp_path, monkeypatch):
    write_images(tmp_path / "f", 100, size=8)
    images = scan_images(tmp_path / "f")
    opened: list[str] = []
    real = Image.open

    def name(p) -> str:  # a path, or a file opened by imagefile
        return Path(getattr(p, "name", p)).name

    monkeypatch.setattr(Image, "open", lambda p, *a: opened.append(name(p)) or real(p, *a))
    look(images)
    first = list(opened)
    assert len(first) == SAMPLE and first[0] == "img0000.png" and first[-1] == "img0096.png"
    opened.clear()
    look(images)
    assert opened == first


def test_explicit_architectures_win_and_a_misfit_is_a_warning(tmp_path):
    write_images(tmp_path / "photos", 3, size=224, mode="RGB")
    photos = scan_images(tmp_path / "photos")
    arch, said = pick_arch("lenet", photos)
    assert arch == "lenet" and said is not None and said.startswith("warning: --arch lenet")
    assert "colour" in said and "shrunk to 28 px" in said and "auto would choose resnet18" in said
    assert pick_arch("resnet18", photos) == ("resnet18", None)
    write_images(tmp_path / "digits", 3, size=28)
    arch, said = pick_arch("resnet18", scan_images(tmp_path / "digits"))
    assert arch == "resnet18" and "enlarged to 224 px" in (said or "")
    arch, said = pick_arch("auto", photos)
    assert arch == "resnet18" and said is not None and said.startswith("--arch auto: resnet18")


def test_select_on_colour_photos_pretrains_a_colour_network_and_says_so(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 3, size=32, mode="RGB")
    write_images(Path("pool"), 20, size=32, mode="RGB", seed=10)
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--device", "cpu",
            "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "--arch auto" in line]
    assert notes == ["note: --arch auto: resnet10 (32×32 colour) for pool: colour images of "
                     "about 32 px, from 20 headers"]  # fmt: skip
    ckpt = read_checkpoint(".alfk/pool/init.pt")
    assert ckpt.arch == "resnet10" and ckpt.input.channels == 3
    assert ckpt.info["arch_auto"] == notes[0].removeprefix("note: ")  # recorded: which and why
    # cached: the next night neither chooses nor says anything about it
    again = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--device", "cpu")
    assert again.exit_code == 0 and "--arch auto" not in again.stderr


def test_pretrain_train_and_simulate_choose_too(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(Path("grey"), 8, size=28)
    make_labelled(Path("colour"), ["a", "b"], 4, size=32, mode="RGB")
    fast = ("--epochs", "1", "--device", "cpu", "--workers", "0")
    r = cli("pretrain", "--images", "grey", "--out", "g.pt", *fast)
    assert r.exit_code == 0 and "note: --arch auto: lenet" in r.stderr
    assert read_checkpoint("g.pt").arch == "lenet"
    r = cli("train", "--data", "colour", "--val", "colour", "--out", "c.pt", *fast)
    assert r.exit_code == 0 and "note: --arch auto: resnet10" in r.stderr
    assert read_checkpoint("c.pt").arch == "resnet10"
    # with --init the checkpoint's architecture is used: nothing is chosen
    r = cli(
        "train", "--data", "colour", "--val", "colour", "--init", "c.pt", "--out", "d.pt", *fast
    )
    assert r.exit_code == 0 and "--arch auto" not in r.stderr
    r = cli("pretrain", "--images", "colour", "--arch", "lenet", "--out", "l.pt", *fast)
    assert r.exit_code == 0 and "warning: --arch lenet does not fit colour" in r.stderr
    r = cli("simulate", "--pool", "colour", "--val", "colour", "--test", "colour", "--out", "sim",
            "--rounds", "1", "--P", "2", "--strategies", "random", "--epochs", "1",
            "--pretrain-epochs", "1", "--rare", "b", "--no-plot", "--device", "cpu",
            "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "note: --arch auto: resnet10" in r.stderr
    assert '"arch": "resnet10"' in Path("sim/config.json").read_text()


def test_the_greyscale_default_is_still_lenet_and_its_stores_unchanged(cli, tmp_path, monkeypatch):
    """auto on greyscale digits builds the same LeNet as ``--arch lenet`` (the old default): the
    same weights and the same z, g and logits in the stores; only the auto checkpoint's info says
    why (``arch_auto``), and an explicit architecture's checkpoint keeps the old info keys."""
    import h5py
    import torch

    monkeypatch.chdir(tmp_path)
    make_labelled(Path("grey"), ["a", "b"], 6, size=28)  # labelled: embed needs no reference
    fast = ("--epochs", "1", "--device", "cpu", "--workers", "0")
    for name, extra in (("auto", ()), ("lenet", ("--arch", "lenet"))):
        r = cli("pretrain", "--images", "grey", "--out", f"{name}.pt", *extra, *fast)
        assert r.exit_code == 0, r.stderr
        r = cli("embed", "--model", f"{name}.pt", "--images", "grey", "--out", f"{name}.h5",
                *fast[2:])  # fmt: skip
        assert r.exit_code == 0, r.stderr
    auto, lenet = read_checkpoint("auto.pt"), read_checkpoint("lenet.pt")
    assert auto.arch == lenet.arch == "lenet"
    assert auto.info.pop("arch_auto").startswith("--arch auto: lenet (28×28 greyscale) for grey")
    assert auto.info == lenet.info and set(lenet.info) == {
        "task", "images", "images_count", "epochs", "lr", "batch_size", "seed", "balance",
        "best_epoch", "rotation_accuracy",
    }  # fmt: skip
    a, b = auto.load().state_dict, lenet.load().state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "arch_spec" not in torch.load("lenet.pt", weights_only=True)
    with h5py.File("auto.h5") as fa, h5py.File("lenet.h5") as fb:
        names = sorted(fa)
        assert names == sorted(fb) and {"z", "g"} <= set(names)
        for key in names:
            if isinstance(fa[key], h5py.Dataset):
                np.testing.assert_array_equal(fa[key][()], fb[key][()], err_msg=key)
