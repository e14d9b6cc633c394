"""timm backbones (``--arch timm:NAME``): taps, z and g against per-image autograd, weights from
local files, never a download, torch-free metadata, and the whole nightly path through the CLI.

Every model is randomly initialised and small (32 px inputs, a few images), so the file runs in
seconds."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from alfk_cli.archs import ARCHITECTURES, get_arch, resolve_taps, scale_dims
from alfk_cli.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from alfk_cli.descriptors import describe_batch
from alfk_cli.errors import AlfkError
from alfk_cli.models import ROTATION_CLASSES, build_model, penultimate_tap
from alfk_cli.storereader import open_store
from alfk_cli.timm_backbones import from_timm_file
from conftest import make_labelled, per_image_reference, randomise_batch_norm, write_images

RESNET = "timm:resnet10t@32"
ARCHS = [RESNET, "timm:mobilenetv3_small_050@32", "timm:vit_tiny_patch16_224@32"]
D = 4


def _model(arch: str) -> torch.nn.Module:
    return randomise_batch_norm(build_model(arch, D, seed=0))


def _pooled(t: torch.Tensor, channels: int) -> torch.Tensor:
    """The mean over positions of a raw stage output, whatever its layout (channels last or
    second): the reference's own φ, independent of the NCHW views the network hands on."""
    if t.dim() == 4 and t.shape[1] == channels:
        return t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1, channels).mean(dim=1)  # NHWC or tokens [B, N, C]


def _reference(model, arch: str, x: torch.Tensor, taps, labels):
    """z, g, logits per image alone, with hooks on the timm modules themselves (conftest)."""
    record = get_arch(arch).record
    mods = {t: model.body.get_submodule(record["modules"][t]) for t in taps}
    return per_image_reference(model, x, labels, mods, lambda t, a: _pooled(a, record["dims"][t]))


@pytest.mark.parametrize("arch", ARCHS)
def test_z_and_g_equal_per_image_autograd(arch):
    spec = get_arch(arch)
    model = _model(arch)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1])
    for preset, taps in spec.presets.items():
        z, g, logits, _ = describe_batch(model, x, taps, labels=labels)
        rz, rg, rlogits = _reference(model, arch, x, taps, labels)
        assert z.shape[1] == sum(scale_dims(arch, taps)) == int(preset[1:])
        np.testing.assert_allclose(logits.numpy(), rlogits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(z.numpy(), rz, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g.numpy(), rg, rtol=1e-3, atol=1e-6)
        assert np.abs(rg).sum() > 0
    assert not any(p.grad is not None for p in model.parameters())


def test_taps_widths_and_presets_come_from_feature_info():
    spec = get_arch(RESNET)
    body = timm.create_model("resnet10t", features_only=True)
    assert list(spec.tap_dims) == body.feature_info.module_name()
    assert list(spec.tap_dims.values()) == body.feature_info.channels()
    # the paper's naming: L by total length; the default is the last two stages (as L768)
    assert spec.presets == {
        "L512": ("layer4",), "L768": ("layer3", "layer4"),
        "L896": ("layer2", "layer3", "layer4"),
        "L1024": ("act1", "layer1", "layer2", "layer3", "layer4"),
    }  # fmt: skip
    assert spec.default_preset == "L768" and penultimate_tap(RESNET) == "layer4"
    cfg = timm.get_pretrained_cfg("resnet10t")
    assert (spec.input.mean, spec.input.std) == (tuple(cfg.mean), tuple(cfg.std))
    assert spec.input.size == 32 and get_arch("timm:resnet10t").input.size == cfg.input_size[1]
    vit = get_arch("timm:vit_tiny_patch16_224@32")
    assert vit.record["kwargs"] == {"img_size": 32} and vit.record["layouts"]["blocks.11"] == "NLC"


def test_no_registration_is_needed_and_the_list_stays_short(cli):
    assert "timm:resnet10t" in ARCHITECTURES and "timm:no_such_net" not in ARCHITECTURES
    assert ARCHITECTURES.names() == ("lenet", "resnet10", "resnet18")
    r = cli("list", "architectures")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[:3] == ["lenet", "resnet10", "resnet18"] and len(lines) == 4
    assert lines[3].startswith("timm:NAME[@SIZE] — any timm model with features_only")
    assert f"lists {len(timm.list_models())}" in lines[3] and "timm:resnet10t" in lines[3]
    assert "architectures: lenet, resnet10, resnet18, timm:NAME" in cli("list").stdout


def test_seeded_build_is_reproducible_and_checkpoints_rebuild(tmp_path):
    a, b = build_model(RESNET, 3, seed=5), build_model(RESNET, 3, seed=5)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    save_checkpoint(tmp_path / "m.pt", a, RESNET, ["x", "y", "z"])
    again = load_checkpoint(tmp_path / "m.pt").build().eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), a.eval()(x))


# --- torch-free metadata ---------------------------------------------------------------------

NO_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "timm", "torchvision"):
            raise ImportError("no " + name)
sys.meta_path.insert(0, Refuse())
from alfk_cli.archs import get_arch, resolve_taps, scale_dims
from alfk_cli.checkpoint import read_checkpoint
meta = read_checkpoint(sys.argv[1])
taps = resolve_taps(meta.arch, None)
print(meta.arch, meta.head, meta.input.size, ",".join(taps), scale_dims(meta.arch, taps),
      resolve_taps(meta.arch, "L512"), get_arch(meta.arch).input == meta.input)
"""


def test_checkpoint_metadata_and_taps_are_read_without_torch(tmp_path):
    path = tmp_path / "m.pt"
    model = build_model(RESNET, len(ROTATION_CLASSES), seed=0)
    save_checkpoint(path, model, RESNET, list(ROTATION_CLASSES), head="rotation")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(path)], capture_output=True, text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        RESNET, "rotation", "32", "layer3,layer4", "[256,", "512]", "('layer4',)", "True"
    ]  # fmt: skip
    assert read_checkpoint(path).arch == RESNET


# --- weights from local files, never a download ------------------------------------------------


def _timm_weights(tmp_path: Path, suffix: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full resnet10t (random, seeded) saved as a timm state dict, as HF ships them."""
    torch.manual_seed(7)
    full = timm.create_model("resnet10t").state_dict()
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(full, str(path))
    else:
        torch.save({"state_dict": full}, path)
    return path, full


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file_fill_the_trunk(tmp_path, suffix):
    path, full = _timm_weights(tmp_path, suffix)
    start = from_timm_file(path, RESNET)
    assert start.head == "backbone" and not any(
        k.startswith("classifier.") for k in start.state_dict
    )
    for key in ("conv1.0.weight", "layer4.0.conv2.weight", "layer2.0.bn1.running_var"):
        assert torch.equal(start.state_dict[f"body.{key}"], full[key])


def test_train_and_pretrain_start_from_a_weights_file(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, full = _timm_weights(tmp_path, ".safetensors")
    make_labelled(Path("data"), ["a", "b"], 3, size=32, mode="RGB")
    common = ("--epochs", "1", "--device", "cpu", "--workers", "0", "--lr", "0")
    r = cli("train", "--data", "data", "--val", "data", "--arch", RESNET, "--init", path,
            "--out", "m.pt", *common)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "initialised from" in r.stderr and "a weights file" in r.stderr
    trained = load_checkpoint("m.pt")
    # lr 0: the trunk is the file's (batch-norm statistics move in training mode)
    assert torch.equal(
        trained.state_dict["body.layer3.0.conv1.weight"], full["layer3.0.conv1.weight"]
    )
    assert trained.info["init_sha256"] and trained.arch == RESNET
    r = cli("pretrain", "--images", "data", "--arch", RESNET, "--init", path, "--out", "p.pt",
            *common)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    pre = load_checkpoint("p.pt")
    assert pre.head == "rotation" and pre.info["init"] == str(path)
    assert torch.equal(pre.state_dict["body.conv1.0.weight"], full["conv1.0.weight"])


def test_weights_that_do_not_fit_and_named_weights_are_one_line_errors(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("data"), ["a", "b"], 2, size=32, mode="RGB")
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), "mnv3.pth")
    torch.save(torch.nn.Linear(2, 2), "pickled.pth")  # a whole module: refused, never run
    base = ("train", "--data", "data", "--val", "data", "--out", "m.pt", "--device", "cpu",
            "--epochs", "1")  # fmt: skip

    def connect(*_a, **_k):
        raise AssertionError("alfk went to the network")

    monkeypatch.setattr(socket.socket, "connect", connect)
    for init, arch, words in (
        ("mnv3.pth", RESNET, "cannot load these weights"),
        ("pickled.pth", RESNET, "weights_only=True"),
        ("timm:resnet10t", RESNET, "alfk does not download timm weights"),
        ("mnv3.pth", None, "(timm weights: give --arch timm:NAME)"),
    ):
        r = cli(*base, "--init", init, *(("--arch", arch) if arch else ()))
        assert r.exit_code == 1, r.stderr
        assert r.stderr.startswith("error: ") and words in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert not Path("m.pt").exists()


def test_unknown_timm_names_are_usage_errors_or_one_line(cli, small_world):
    r = cli("pretrain", "--images", "pool", "--arch", "timm:no_such_net", "--out", "p.pt")
    assert r.exit_code == 2 and "unknown timm model 'no_such_net'" in r.stderr
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "2", "--arch", "timm:a b")
    assert r.exit_code == 2 and "is not timm:NAME" in r.stderr
    # select checks the form only (a warm run must not import timm); timm says no at pretraining
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "2", "--arch", "timm:no_such_net")
    assert r.exit_code == 1 and r.stderr.startswith("error: unknown timm model 'no_such_net'")
    assert not Path(".alfk/pool/init.pt").exists()
    with pytest.raises(AlfkError, match="unknown tap 'layer9'"):
        resolve_taps(RESNET, "layer9")


# --- the nightly path ---------------------------------------------------------------------------


def test_pretrain_train_embed_select_end_to_end(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 3, size=32, mode="RGB")
    make_labelled(Path("labeled"), ["a", "b", "c"], 3, size=32, mode="RGB")
    write_images(Path("pool"), 16, size=32, mode="RGB", seed=10)
    cpu = ("--device", "cpu", "--workers", "0")
    r = cli(
        "pretrain", "--images", "pool", "--arch", RESNET, "--epochs", "1", "--out", "init.pt", *cpu
    )
    assert r.exit_code == 0, r.stderr
    assert "warning" not in r.stderr and f"rotation pretraining {RESNET}" in r.stderr
    r = cli("train", "--data", "labeled", "--val", "val", "--init", "init.pt", "--epochs", "1",
            "--out", "model.pt", *cpu)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("embed", "--model", "model.pt", "--images", "val", "--out", "val.h5", *cpu)
    assert r.exit_code == 0, r.stderr
    with open_store("val.h5") as store:
        assert store.arch == RESNET and store.scale_dims == [256, 512] and store.z.shape == (9, 768)
    select = ("select", "--val", "val", "--pool", "pool", "--P", "4", *cpu)
    r = cli(*select, "--model", "model.pt", "--taps", "L896")
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.split()) == 4
    # and select pretraining a timm backbone itself, twice with the same seed
    first = cli(*select, "--arch", RESNET, "--workdir", "w1", "--no-ledger")
    second = cli(*select, "--arch", RESNET, "--workdir", "w2", "--no-ledger")
    assert first.exit_code == 0 and first.stdout == second.stdout, first.stderr
    assert read_checkpoint("w1/init.pt").arch == RESNET
    assert Path("w1/init.pt").read_bytes() == Path("w2/init.pt").read_bytes()
