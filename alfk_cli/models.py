"""Architectures with named feature taps (the timm ``feature_info`` idea, kept small).

Every network is a sequence of named *stages*; a tap is the output of a stage, taken after its
non-linearity (docs/algorithm.md §1). ``TapNet.forward_taps`` runs the stages once and returns the
logits plus the requested tap tensors, so descriptors need no hooks. When asked, the earliest
requested tap is cut from the graph and made a leaf that requires grad: a backward pass from the
loss then stops there and computes activation gradients only (docs/algorithm.md §2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from alfk_cli.errors import AlfkError
from alfk_cli.registry import Registry

ROTATION_CLASSES = ("0", "90", "180", "270")


@dataclass(frozen=True)
class InputSpec:
    """What the network eats: images are resized to ``size`` and normalised per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: how to build it, what it eats, its tap presets."""

    name: str
    build: Callable[[int], TapNet]  # number of classes -> a freshly initialised TapNet
    input: InputSpec
    presets: dict[str, tuple[str, ...]]  # paper presets, named by total length L
    default_preset: str
    train_defaults: dict[str, float] = field(default_factory=dict)

    @cached_property
    def tap_dims(self) -> dict[str, int]:
        """Tap name -> its length after global average pooling, read off the built network.

        One forward pass of a blank image through a throw-away copy (seeded: no RNG is used
        outside it), so no width is ever typed by hand.
        """
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            net = self.build(2).eval()
            x = torch.zeros(1, self.input.channels, self.input.size, self.input.size)
            _, feats = net.forward_taps(x, net.stage_names)
        return {name: pool(f).shape[1] for name, f in zip(net.stage_names, feats, strict=True)}


class TapNet(nn.Module):
    """A chain of named stages followed by a linear classifier (``self.classifier``)."""

    def __init__(
        self, stages: Sequence[tuple[str, nn.Module]], head: nn.Module, classifier: nn.Linear
    ):
        super().__init__()
        self.stage_names = [name for name, _ in stages]
        self.stages = nn.ModuleDict(dict(stages))
        self.head = head  # pooling / flattening / dropout between the last stage and the classifier
        self.classifier = classifier

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x, ())[0]

    def forward_taps(
        self, x: torch.Tensor, taps: Sequence[str], leaf_first_tap: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the network; return logits and the requested stage outputs, in ``taps`` order.

        ``leaf_first_tap`` detaches the earliest requested tap and marks it as requiring grad,
        so ``autograd.grad(loss, taps)`` with frozen parameters computes activation gradients
        from the loss back to that tap and no further.
        """
        unknown = [t for t in taps if t not in self.stages]
        if unknown:
            raise AlfkError(
                f"unknown tap {unknown[0]!r}; this model has {', '.join(self.stage_names)}"
            )
        wanted = set(taps)
        got: dict[str, torch.Tensor] = {}
        h = x
        for name in self.stage_names:
            h = self.stages[name](h)
            if name in wanted:
                if leaf_first_tap and not got:
                    h = h.detach().requires_grad_(True)
                got[name] = h
        return self.classifier(self.head(h)), [got[t] for t in taps]


def pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pooling φ: [B, C, H, W] -> [B, C]; vectors pass through unchanged."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", "alfk.architectures")
ARCHS = ARCHITECTURES  # the short name the rest of the code and the tests use


def register_arch(
    name: str,
    *,
    input: InputSpec,
    presets: dict[str, tuple[str, ...]],
    default_preset: str,
    train_defaults: dict[str, float] | None = None,
) -> Callable[[Callable[[int], TapNet]], Callable[[int], TapNet]]:
    """Decorator: register ``build(num_classes) -> TapNet`` as architecture ``name``."""
    if default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} is not one of {', '.join(presets)}")

    def add(build: Callable[[int], TapNet]) -> Callable[[int], TapNet]:
        spec = ArchSpec(name, build, input, dict(presets), default_preset, train_defaults or {})
        ARCHITECTURES.register(name)(spec)
        return build

    return add


# --- LeNet (PyTorch MNIST example layout, as in the paper's code) -------------------------------


class _LeNetConv(nn.Module):
    def __init__(self, cin: int, cout: int, dropout2d: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=5)
        self.drop = nn.Dropout2d(dropout2d) if dropout2d else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.drop(self.conv(x)), 2))


@register_arch(
    "lenet",
    input=InputSpec(28, 1, (0.1307,), (0.3081,)),
    presets={"L20": ("conv2",), "L80": ("conv1", "conv2", "fc1")},
    default_preset="L80",
    train_defaults={"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 25},
)
def build_lenet(num_classes: int) -> TapNet:
    stages = [
        ("conv1", _LeNetConv(1, 10)),
        ("conv2", _LeNetConv(10, 20, dropout2d=0.5)),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(320, 50), nn.ReLU())),
    ]
    return TapNet(stages, nn.Dropout(0.5), nn.Linear(50, num_classes))


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --- ResNets (torchvision BasicBlock and ImageNet stem) -----------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (torchvision/models/resnet.py, BSD-3-Clause): the same
    sub-modules, created in the same order (so the same seed draws the same weights) and the same
    state-dict keys, so torchvision's ResNet weights load unchanged (``backbones``). Written out
    because importing torchvision costs seconds (its ``ops`` import ``torch._dynamo``), which every
    command that builds a model paid; ``tests/test_models.py`` checks it against torchvision's."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _resnet_layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    layers = [BasicBlock(cin, cout, stride, down)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build_resnet(blocks: Sequence[int], in_channels: int, num_classes: int) -> TapNet:
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    widths = (64, 128, 256, 512)
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    cin = 64
    for i, (w, n) in enumerate(zip(widths, blocks, strict=False)):
        stages.append((f"layer{i + 1}", _resnet_layer(cin, w, n, 1 if i == 0 else 2)))
        cin = w
    net = TapNet(
        stages, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(512, num_classes)
    )
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


@register_arch(
    "resnet10",
    input=InputSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    presets={"L256": ("layer3",), "L768": ("layer3", "layer4")},
    default_preset="L768",
    train_defaults={"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128},
)
def build_resnet10(num_classes: int) -> TapNet:
    return build_resnet((1, 1, 1, 1), 3, num_classes)


@register_arch(
    "resnet18",
    input=InputSpec(224, 3, *_IMAGENET),
    presets={"L512": ("layer4",), "L768": ("layer3", "layer4")},
    default_preset="L768",
    train_defaults={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64},
)
def build_resnet18(num_classes: int) -> TapNet:
    return build_resnet((2, 2, 2, 2), 3, num_classes)


def get_arch(name: str) -> ArchSpec:
    """The registered architecture ``name``; an unknown name is an error naming the known ones."""
    return ARCHITECTURES[name]


def resolve_taps(arch: str, taps: str | Sequence[str] | None) -> tuple[str, ...]:
    """A preset name (``L80``), a comma-separated list of tap names, or None for the default."""
    spec = get_arch(arch)
    if taps is None or taps == "":
        return spec.presets[spec.default_preset]
    if isinstance(taps, str):
        if taps in spec.presets:
            return spec.presets[taps]
        taps = [t.strip() for t in taps.split(",") if t.strip()]
    names = tuple(taps)
    bad = [t for t in names if t not in spec.tap_dims]
    if bad or not names:
        raise AlfkError(
            f"unknown tap {bad[0] if bad else '(none)'!r} for {arch}; presets: "
            f"{', '.join(spec.presets)}; taps: {', '.join(spec.tap_dims)}"
        )
    if len(set(names)) != len(names):
        raise AlfkError(f"taps repeat a name: {','.join(names)}")
    return names


def scale_dims(arch: str, taps: Sequence[str]) -> list[int]:
    spec = get_arch(arch)
    return [spec.tap_dims[t] for t in taps]


def build_model(arch: str, num_classes: int, seed: int | None = None) -> TapNet:
    """A freshly initialised network; ``seed`` makes the initial weights reproducible."""
    spec = get_arch(arch)
    if seed is None:
        return spec.build(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(num_classes)


_POOLING_HEAD = (nn.Sequential, nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd)


def penultimate_tap(arch: str) -> str | None:
    """The tap whose pooled output z-slice is exactly the classifier's input in eval mode: the
    last stage, when the head between it and the classifier only pools, flattens or drops out;
    None for an architecture whose head computes something else."""
    with torch.random.fork_rng(devices=[]):
        net = get_arch(arch).build(2)
    for m in net.head.modules():
        pools = isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
        if not (pools or isinstance(m, _POOLING_HEAD)):
            return None
    return net.stage_names[-1]
