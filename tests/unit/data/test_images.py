import os

import numpy as np
import pytest
import torch
from PIL import Image

from alfk_cli.data.decode import ImageDataset, load_image
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.scan import align_classes, scan_images
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import ARCHITECTURES
from conftest import fifo_deadline, make_labelled, write_images


def test_labelled_folder_gives_sorted_classes_and_labels(tmp_path):
    make_labelled(tmp_path, ["cat", "ant", "bee"], 2)
    (tmp_path / "bee" / "deeper").mkdir()
    write_images(tmp_path / "bee" / "deeper", 1, prefix="x")
    s = scan_images(tmp_path)
    assert s.classes == ["ant", "bee", "cat"]
    assert s.paths[:2] == ["ant/img0000.png", "ant/img0001.png"]
    assert "bee/deeper/x0000.png" in s.paths
    assert list(s.labels) == [0, 0, 1, 1, 1, 2, 2]


def test_flat_folder_is_unlabelled_at_any_depth(tmp_path):
    write_images(tmp_path, 2)
    write_images(tmp_path / "2026" / "11", 2, prefix="n")
    s = scan_images(tmp_path)
    assert not s.labelled and len(s) == 4 and (s.labels == -1).all()


def test_all_extensions_found_and_hidden_ignored(tmp_path):
    arr = np.zeros((8, 8, 3), np.uint8)
    for ext in ["png", "jpg", "jpeg", "bmp", "webp", "tif"]:
        Image.fromarray(arr).save(tmp_path / f"a.{ext}")
    Image.fromarray(arr).save(tmp_path / "B.PNG")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(arr).save(tmp_path / ".hidden" / "h.png")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    s = scan_images(tmp_path)
    assert len(s) == 7 and not s.skipped


def test_corrupt_and_non_image_files_are_listed_and_skipped(tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = tmp_path / "img0000.png"
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    s = scan_images(tmp_path)
    assert len(s) == 3
    skipped = dict(s.skipped)
    assert skipped["notes.txt"] == "not an image file"
    assert skipped["broken.png"].startswith("unreadable image")
    assert skipped["truncated.png"].startswith("unreadable image")
    with pytest.raises(AlfkError, match=r"broken\.png: unreadable image.*and 2 more"):
        scan_images(tmp_path, strict=True)


def test_empty_missing_and_file_arguments(tmp_path):
    with pytest.raises(AlfkError, match="no images found"):
        scan_images(tmp_path)
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(AlfkError, match="no images found"):
        scan_images(tmp_path)
    with pytest.raises(AlfkError, match="does not exist"):
        scan_images(tmp_path / "nope")
    with pytest.raises(AlfkError, match="is not a folder"):
        scan_images(tmp_path / "only.txt")


def test_class_mapping_and_mismatch(tmp_path):
    a = make_labelled(tmp_path / "a", ["x", "y"], 1)
    b = make_labelled(tmp_path / "b", ["x", "z"], 1)
    with pytest.raises(AlfkError, match=r"only in .*a: y\)"):
        align_classes(scan_images(a), scan_images(b))
    mapped = scan_images(a, classes=["y", "x"])
    assert list(mapped.labels) == [1, 0]
    with pytest.raises(AlfkError, match="class folder 'z'"):
        scan_images(b, classes=["x", "y"])
    flat = tmp_path / "flat"
    write_images(flat, 1)
    with pytest.raises(AlfkError, match="no class sub-folders"):
        align_classes(scan_images(flat), scan_images(a))


@pytest.mark.parametrize("arch", ["lenet", "resnet10"])
def test_load_image_converts_channels_and_size(tmp_path, arch):
    spec = ARCHITECTURES[arch].input
    write_images(tmp_path, 1, size=40, mode="RGB")
    t = load_image(tmp_path / "img0000.png", spec)
    assert t.dtype == torch.uint8 and t.shape == (spec.channels, spec.size, spec.size)


def test_load_image_keeps_pixels_at_native_size(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert np.array_equal(
        load_image(tmp_path / "d.png", ARCHITECTURES["lenet"].input)[0].numpy(), arr
    )


def test_dataset_flags_images_that_fail_to_decode(tmp_path):
    write_images(tmp_path, 2)
    s = scan_images(tmp_path)
    (tmp_path / s.paths[1]).write_bytes(b"gone bad after the scan")
    ds = ImageDataset(s, ARCHITECTURES["lenet"].input)
    assert ds[0][3] is True and ds[1][3] is False and ds[1][0].shape == (1, 28, 28)


@pytest.mark.parametrize("threads", [1, 3])
def test_scan_records_size_and_mtime_and_keeps_order_across_chunks(tmp_path, threads):
    # more files than one chunk (64), a dangling link, and a trusted corrupt file
    write_images(tmp_path / "a", 150, size=8)
    (tmp_path / "a" / "img0007.png").write_bytes(b"corrupt")
    (tmp_path / "a" / "img0100.png").write_bytes(b"corrupt too")
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    st = (tmp_path / "a" / "img0100.png").stat()
    trusted = {"a/img0100.png": (st.st_size, st.st_mtime_ns)}
    s = scan_images(tmp_path, threads=threads, trusted=trusted)
    expected = sorted(p.name for p in (tmp_path / "a").iterdir())
    expected = [f"a/{n}" for n in expected if n not in ("img0007.png", "gone.png")]
    assert s.paths == expected  # the trusted file is not re-verified
    assert [p for p, _ in s.skipped] == ["a/gone.png", "a/img0007.png"]
    assert "unreadable" in dict(s.skipped)["a/gone.png"]
    stats = [os.stat(tmp_path / p) for p in s.paths]
    np.testing.assert_array_equal(s.sizes, [x.st_size for x in stats])
    np.testing.assert_array_equal(s.mtimes, [x.st_mtime_ns for x in stats])


# issue 19: decoding as the annotators see the files (alfk_cli/data/imagefile.py)


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped_to_white(tmp_path):
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, (28, 28), dtype=np.uint16)
    deep[0, :4] = [0, 255, 256, 65535]  # the edges: 255 is black-ish, 65535 white
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    want = (deep.astype(np.int64) // 256).astype(np.uint8)  # the high byte
    assert want[0, :4].tolist() == [0, 0, 1, 255]
    grey = load_image(tmp_path / "deep.png", ARCHITECTURES["lenet"].input)
    assert np.array_equal(grey[0].numpy(), want)
    rgb = load_image(tmp_path / "deep.png", InputSpec(28, 3, (0.0,) * 3, (1.0,) * 3))
    assert all(np.array_equal(rgb[c].numpy(), want) for c in range(3))


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: the stored pixels are to be turned 90° clockwise to be seen upright."""
    raw = np.zeros((28, 28), np.uint8)
    raw[2:8, 3:20] = 250  # a bar near the top: not symmetric under any rotation
    raw[10:26, 22:25] = 120
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "phone.jpg") as im:
        stored = np.asarray(im.convert("L"))  # as the sensor wrote it
    upright = np.rot90(stored, k=-1)  # 90° clockwise
    got = load_image(tmp_path / "phone.jpg", ARCHITECTURES["lenet"].input)[0].numpy()
    assert np.array_equal(got, upright) and not np.array_equal(got, stored)


def test_embed_config_names_the_decoding_rule():
    from alfk_cli.data.imagefile import DECODE_VERSION
    from alfk_cli.embed.options import EmbedOptions

    assert DECODE_VERSION >= 2  # 1 was PIL's plain convert, before issue 19
    options = EmbedOptions(taps=("conv1",), pseudo_label="true")
    assert options.fingerprint_dict()["decode"] == DECODE_VERSION


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (28, 28), v) for v in (40, 200, 90)]
    frames[0].paste(255, (0, 0, 10, 10))
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    s = scan_images(tmp_path)
    assert s.paths == ["anim.gif"] and not s.skipped
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 3
        first = np.asarray(im.convert("L"))
    assert np.array_equal(
        load_image(tmp_path / "anim.gif", ARCHITECTURES["lenet"].input)[0].numpy(), first
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_never_opened_for_reading(tmp_path):
    """Listed by the scan without opening it; refused at decode time without waiting for a
    writer (a file replaced by a FIFO after the scan)."""
    from alfk_cli.data.imagefile import NotRegularFile

    write_images(tmp_path, 1)
    os.mkfifo(tmp_path / "x.png")

    with fifo_deadline(20, tmp_path / "x.png"):
        s = scan_images(tmp_path, verify=True)
        assert s.paths == ["img0000.png"]
        assert s.skipped == [("x.png", "not a regular file (a FIFO)")]
        with pytest.raises(NotRegularFile, match="a FIFO"):
            load_image(
                tmp_path / "x.png", ARCHITECTURES["lenet"].input
            )  # blocks without O_NONBLOCK
