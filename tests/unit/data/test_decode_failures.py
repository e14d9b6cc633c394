"""Images that pass PIL's verify but fail to decode, files deleted mid-run, decompression bombs:
skipped and listed like scan-time skips (``--strict`` makes them errors), never a traceback."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import alfk_cli.embed.job as embedding
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.scan import scan_images
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import ROTATION_CLASSES, build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.simulate.data import load_folder
from alfk_cli.store.reader import open_store
from conftest import make_labelled, write_images

CLASSES = ["a", "b", "c"]
NODES = ("paths", "labels", "classes", "z", "g", "logits", "pseudo", "size", "mtime_ns")


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut at 90% of its bytes: PIL's verify passes, decoding fails."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    return path


def bad_idat_png(path: Path, seed: int = 0) -> Path:
    """A PNG whose IDAT data is garbage under a correct CRC: verify passes, decoding fails."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(path)
    b = bytearray(path.read_bytes())
    i = b.find(b"IDAT")
    n = struct.unpack(">I", b[i - 4 : i])[0]
    for k in range(i + 14, i + 4 + min(n, 50)):
        b[k] ^= 0x55
    b[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(b[i : i + 4 + n])))
    path.write_bytes(bytes(b))
    with Image.open(path) as im:
        im.verify()  # the premise of the test: the scan cannot see it
    return path


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in NODES}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """val/ (3 classes × 4), clean/ (12 good images), bad/ (the same plus two that fail to
    decode), a task checkpoint and the validation store."""
    root = tmp_path_factory.mktemp("decode")
    make_labelled(root / "val", CLASSES, 4)
    write_images(root / "clean", 12, seed=5)
    shutil.copytree(root / "clean", root / "bad", copy_function=shutil.copy2)
    truncated_jpeg(root / "bad" / "img0003b.jpg")
    bad_idat_png(root / "bad" / "img0007b.png")
    save_checkpoint(root / "m.pt", build_model("lenet", 3, seed=0), "lenet", CLASSES)
    embedding.embed_folder(root / "m.pt", root / "val", root / "val.h5", workers=0)
    return root


def _embed(cli, env: Path, images: str, out: Path, *extra: str):
    return cli(
        "embed", "-m", env / "m.pt", "-i", env / images, "-o", out,
        "-r", env / "val.h5", "--workers", "0", "--batch-size", "4", *extra,
    )  # fmt: skip


def test_strict_makes_a_decode_failure_an_error(cli, env, tmp_path):
    out = tmp_path / "bad.h5"
    r = _embed(cli, env, "bad", out, "--strict")
    assert r.exit_code == 1
    assert "error:" in r.stderr and "img0003b.jpg" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_decompression_bomb_is_skipped_at_scan_time(tmp_path):
    write_images(tmp_path / "p", 2)
    Image.new("1", (20000, 20000)).save(tmp_path / "p" / "huge.png")  # ~50 KB, 400 Mpixels
    found = scan_images(tmp_path / "p")
    assert found.paths == ["img0000.png", "img0001.png"]
    assert found.skipped[0][0] == "huge.png" and "too large" in found.skipped[0][1]


def test_decompression_bomb_in_train_and_embed_no_traceback(cli, env, tmp_path, monkeypatch):
    # 28x28 = 784 pixels decodes (under 2x the limit); 40x40 = 1600 is over 2x: an error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    data = make_labelled(tmp_path / "data", CLASSES, 3)
    write_images(data / "a", 1, size=40, prefix="huge")
    r = cli(
        "train", "--data", data, "--val", env / "val", "--out", tmp_path / "t.pt",
        "--epochs", "1", "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "a/huge0000.png" in r.stderr and "too large" in r.stderr
    assert "Traceback" not in r.stderr
    r = _embed(cli, env, "clean", tmp_path / "e.h5", "--strict")
    assert r.exit_code == 0, r.stderr
    r = cli("embed", "-m", env / "m.pt", "-i", data, "-o", tmp_path / "d.h5", "--workers", "0")
    assert r.exit_code == 0 and "too large" in r.stderr and "Traceback" not in r.stderr
    with open_store(tmp_path / "d.h5") as st:
        assert len(st) == 9 and "a/huge0000.png" not in st.paths


def test_select_skips_a_decompression_bomb(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), CLASSES, 3)
    write_images(Path("pool"), 12, seed=3)
    Image.new("1", (20000, 20000)).save("pool/huge.png")
    save_checkpoint(
        "init.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), head="rotation"
    )
    r = cli(
        "select", "--val", "val", "--pool", "pool", "--P", "3", "--model", "init.pt",
        "--device", "cpu", "--workers", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "huge.png" in r.stderr and "too large" in r.stderr and "Traceback" not in r.stderr
    assert "huge.png" not in r.stdout


def test_bomb_warning_never_reaches_stderr(env, tmp_path):
    """Between 1x and 2x PIL's limit the image decodes; its warning must not print (a real
    process: pytest itself captures warnings)."""
    out = tmp_path / "w.h5"
    code = (
        "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 500\n"  # 784: warning range
        "from alfk_cli.cli.main import main\n"
        f"sys.argv = ['alfk', 'embed', '-m', {str(env / 'm.pt')!r}, '-i', {str(env / 'clean')!r},"
        f" '-o', {str(out)!r}, '-r', {str(env / 'val.h5')!r}, '--workers', '1', '--quiet']\n"
        "main()\n"
    )
    p = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr, p.stderr
    with open_store(out) as st:
        assert len(st) == 12


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["held", "streamed"])
def test_simulate_loading_lists_images_that_fail_to_decode(env, tmp_path, budget):
    data = make_labelled(tmp_path / "d", CLASSES, 3)
    truncated_jpeg(data / "b" / "broken.jpg")
    spec = InputSpec(28, 1, (0.5,), (0.5,))
    folder = load_folder(data, spec, None, 0, "pool", budget)
    assert len(folder) == 9 and "b/broken.jpg" not in folder.images.paths
    assert [p for p, _ in folder.images.skipped] == ["b/broken.jpg"]
    assert (folder.x is None) == (budget == 0)
    # held or streamed, the same rows give the same uint8 batches in the same order
    held = load_folder(data, spec, None, 0, "pool")
    rows = np.array([8, 0, 4, 4, 2])
    for a, b in zip(folder.batches(rows, 2), held.batches(rows, 2), strict=True):
        assert torch.equal(a, b) and len(a) <= 2
    assert torch.equal(folder.source(rows, hold=True).labels, held.y[torch.from_numpy(rows)])


def test_simulate_stops_on_an_image_that_no_longer_decodes(env, tmp_path):
    """A streamed folder decodes its images again at each pass: one that decoded when the run
    started and fails later (rewritten meanwhile) is an error, never a row quietly dropped."""
    data = make_labelled(tmp_path / "d", CLASSES, 3)
    folder = load_folder(data, InputSpec(28, 1, (0.5,), (0.5,)), None, 0, "pool", budget=0)
    truncated_jpeg(data / folder.images.paths[4])
    with pytest.raises(AlfkError, match=r"img0001\.png: unreadable image .*when the run started"):
        list(folder.batches(None, 4))
