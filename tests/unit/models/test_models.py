import pytest
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import ARCHITECTURES, build_model, resolve_taps, scale_dims
from alfk_cli.models.nets import pool

EXPECTED = {
    ("lenet", "L20"): [20],
    ("lenet", "L80"): [10, 20, 50],
    ("resnet10", "L256"): [256],
    ("resnet10", "L768"): [256, 512],
    ("resnet18", "L512"): [512],
    ("resnet18", "L768"): [256, 512],
}


@pytest.mark.parametrize("arch,preset", sorted(EXPECTED))
def test_tap_shapes_for_every_preset(arch, preset):
    spec = ARCHITECTURES[arch].input
    model = build_model(arch, 7, seed=0).eval()
    taps = resolve_taps(arch, preset)
    x = torch.randn(2, spec.channels, spec.size, spec.size)
    logits, feats = model.forward_taps(x, taps)
    assert logits.shape == (2, 7)
    assert [pool(f).shape[1] for f in feats] == EXPECTED[(arch, preset)] == scale_dims(arch, taps)
    assert sum(EXPECTED[(arch, preset)]) == int(preset[1:])
    # the tapped outputs are post-ReLU activations
    assert all((f >= 0).all() for f in feats)
    # tapping does not change the logits
    torch.testing.assert_close(logits, model(x))


def test_preset_names_are_the_papers():
    assert set(ARCHITECTURES["lenet"].presets) == {"L20", "L80"}
    assert set(ARCHITECTURES["resnet10"].presets) == {"L256", "L768"}
    assert set(ARCHITECTURES["resnet18"].presets) == {"L512", "L768"}


def test_free_tap_lists_and_errors():
    assert resolve_taps("resnet18", "layer2,layer4") == ("layer2", "layer4")
    assert resolve_taps("lenet", None) == ("conv1", "conv2", "fc1")
    with pytest.raises(AlfkError, match="unknown tap 'layer9'"):
        resolve_taps("resnet10", "layer9")
    with pytest.raises(AlfkError, match="repeat"):
        resolve_taps("lenet", "fc1,fc1")
    with pytest.raises(AlfkError, match="unknown architecture"):
        resolve_taps("vgg", None)


def test_leaf_first_tap_stops_backward_at_the_tap():
    model = build_model("lenet", 10, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 1, 28, 28)
    logits, feats = model.forward_taps(x, ("conv2", "fc1"), leaf_first_tap=True)
    assert feats[0].is_leaf and feats[0].requires_grad and not feats[1].is_leaf
    grads = torch.autograd.grad(logits.sum(), feats)
    assert [g.shape for g in grads] == [f.shape for f in feats]


def test_seeded_build_is_reproducible():
    a, b = build_model("resnet10", 3, seed=5), build_model("resnet10", 3, seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert ka == kb and torch.equal(va, vb)
    c = build_model("resnet10", 3, seed=6)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


@pytest.mark.parametrize("stride,down", [(1, False), (2, True)])
def test_basic_block_is_torchvisions(stride, down):
    """alfk's own BasicBlock (torchvision is not imported on the command path: seconds of start-up)
    draws the same weights from the same seed, has the same keys and computes the same output."""
    from torchvision.models.resnet import BasicBlock as Reference

    from alfk_cli.models.nets import BasicBlock

    def make(cls):
        torch.manual_seed(3)
        ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
        return cls(8, 16 if down else 8, stride, ds if down else None).eval()

    ours, ref = make(BasicBlock), make(Reference)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(2, 8, 12, 12)
    assert torch.equal(ours(x), ref(x))


def test_commands_do_not_import_torchvision():
    import subprocess
    import sys

    code = (
        "import sys, alfk_cli.cli.main, alfk_cli.models.nets, alfk_cli.selection.pipeline, alfk_cli.train.jobs\n"
        "alfk_cli.models.archs.build_model('resnet18', 3, seed=0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
