"""``--init`` from torchvision ResNet-18 weights: a state-dict file or ``torchvision:resnet18``."""

from urllib.error import URLError

import pytest
import torch
import torchvision

from alfk_cli.errors import AlfkError
from alfk_cli.models import backbones
from alfk_cli.models.backbones import alfk_key, from_torchvision, load_start
from alfk_cli.models.checkpoint import load_checkpoint, task_model
from conftest import make_labelled


def _torchvision(arch: str = "resnet18", seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).eval()


@pytest.fixture(scope="module")
def tv18() -> torch.nn.Module:
    net = _torchvision()
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so they must map
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


@pytest.fixture
def tiny_rgb(tmp_path):
    data = make_labelled(tmp_path / "data", ["a", "b"], 2, size=16, mode="RGB")
    val = make_labelled(tmp_path / "val", ["a", "b"], 1, size=16, mode="RGB")
    return data, val


def test_key_mapping():
    assert alfk_key("conv1.weight") == "stages.stem.0.weight"
    assert alfk_key("bn1.running_var") == "stages.stem.1.running_var"
    assert alfk_key("layer1.0.conv1.weight") == "stages.layer1.0.conv1.weight"
    assert alfk_key("layer3.0.downsample.1.bias") == "stages.layer3.0.downsample.1.bias"
    assert alfk_key("fc.bias") == "classifier.bias"


def test_mapped_network_gives_torchvision_logits(tv18):
    ckpt = from_torchvision(tv18.state_dict(), "resnet18")
    assert ckpt.head == "imagenet" and len(ckpt.classes) == 1000
    net = ckpt.build().eval()  # the whole network, fc included as the classifier
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net(x), tv18(x), atol=1e-5, rtol=0)
    # a task model keeps the trunk and gets a fresh classifier; with torchvision's fc put back
    # it is torchvision's network again
    model = task_model(ckpt, ["a", "b", "c"], seed=0).eval()
    assert model.classifier.out_features == 3
    model.classifier = tv18.fc
    with torch.no_grad():
        assert torch.allclose(model(x), tv18(x), atol=1e-5, rtol=0)


def test_old_files_without_batch_counters_load(tv18):
    state = {k: v for k, v in tv18.state_dict().items() if "num_batches_tracked" not in k}
    ckpt = from_torchvision(state, "resnet18")
    assert int(ckpt.state_dict["stages.stem.1.num_batches_tracked"]) == 0


def test_train_from_state_dict_file(cli, tiny_rgb, tmp_path, tv18):
    data, val = tiny_rgb
    weights = tmp_path / "resnet18.pth"
    torch.save(tv18.state_dict(), weights)
    out = tmp_path / "m.pt"
    args = ("--epochs", "1", "--batch-size", "2", "--device", "cpu", "--workers", "0")
    r = cli("train", "--data", data, "--val", val, "--init", weights, "--out", out, *args)
    assert r.exit_code == 0, r.stderr
    assert "torchvision ImageNet weights" in r.stderr and "classifier.weight" in r.stderr
    ck = load_checkpoint(out)
    assert ck.arch == "resnet18" and ck.classes == ["a", "b"] and ck.head == "classifier"
    assert ck.info["init"] == str(weights) and len(ck.info["init_sha256"]) == 64


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_other_resnets_are_refused_naming_the_key(cli, tiny_rgb, tmp_path, arch):
    data, val = tiny_rgb
    weights = tmp_path / f"{arch}.pth"
    torch.save(_torchvision(arch).state_dict(), weights)
    r = cli("train", "--data", data, "--val", val, "--init", weights, "--out", tmp_path / "m.pt")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit resnet18" in lines[0]
    key = "layer1.2.conv1.weight" if arch == "resnet34" else "layer1.0.conv1.weight"
    assert key in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_unknown_and_pickled_files_are_refused(cli, tiny_rgb, tmp_path, tv18):
    data, val = tiny_rgb
    random_dict = tmp_path / "random.pth"
    torch.save({"a": torch.zeros(3), "b.weight": torch.ones(2, 2)}, random_dict)
    pickled = tmp_path / "model.pth"
    torch.save(tv18, pickled)  # a whole nn.Module: loading it would run arbitrary pickle code
    for init, words in (
        (random_dict, "neither an alfk checkpoint nor a torchvision resnet18 state dict"),
        (pickled, "weights_only=True"),
    ):
        r = cli("train", "--data", data, "--val", val, "--init", init, "--out", tmp_path / "m.pt")
        assert r.exit_code == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr


def test_wrong_arch_for_torchvision_weights(tmp_path, tv18):
    weights = tmp_path / "resnet18.pth"
    torch.save(tv18.state_dict(), weights)
    with pytest.raises(AlfkError, match="fit --arch resnet18, not lenet"):
        load_start(weights, "lenet")
    with pytest.raises(AlfkError, match="does not fit resnet10"):
        load_start(weights, "resnet10")


def test_named_weights_without_network_is_one_line(cli, tiny_rgb, tmp_path, monkeypatch):
    def offline(name):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(backbones, "download_state_dict", offline)
    data, val = tiny_rgb
    r = cli(
        "train",
        "--data",
        data,
        "--val",
        val,
        "--init",
        "torchvision:resnet18",
        "--out",
        tmp_path / "m.pt",
    )
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "cannot download" in lines[0] and "URLError" in lines[0]
    assert "--init resnet18.pth" in lines[0]


def test_named_weights_through_the_loader(monkeypatch, tv18):
    monkeypatch.setattr(backbones, "download_state_dict", lambda name: tv18.state_dict())
    ckpt = load_start("torchvision:resnet18")
    assert ckpt.arch == "resnet18" and ckpt.head == "imagenet"
    assert str(ckpt.path) == "torchvision:resnet18"
    with pytest.raises(AlfkError, match="unknown backbone torchvision:vgg16"):
        load_start("torchvision:vgg16")
