"""Architectures with named feature taps (the timm ``feature_info`` idea, kept small).

Every network is a sequence of named *stages*; a tap is the output of a stage, taken after its
non-linearity (docs/algorithm.md §1). ``TapNet.forward_taps`` runs the stages once and returns the
logits plus the requested tap tensors, so descriptors need no hooks. When asked, the earliest
requested tap is cut from the graph and made a leaf that requires grad: a backward pass from the
loss then stops there and computes activation gradients only (docs/algorithm.md §2).

The built-in networks (``build_lenet``, ``build_resnet10``, ``build_resnet18``) are registered by
``archs``, with their inputs and presets, so that naming an architecture needs no torch; this
module knows nothing of the registry (``archs.build_model`` builds a registered architecture).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alfk_cli.errors import AlfkError


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


# --- LeNet (PyTorch MNIST example layout, as in the paper's code) -------------------------------


class _LeNetConv(nn.Module):
    def __init__(self, cin: int, cout: int, dropout2d: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=5)
        self.drop = nn.Dropout2d(dropout2d) if dropout2d else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.drop(self.conv(x)), 2))


def build_lenet(num_classes: int) -> TapNet:
    stages = [
        ("conv1", _LeNetConv(1, 10)),
        ("conv2", _LeNetConv(10, 20, dropout2d=0.5)),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(320, 50), nn.ReLU())),
    ]
    return TapNet(stages, nn.Dropout(0.5), nn.Linear(50, num_classes))


# --- ResNets (torchvision BasicBlock and ImageNet stem) -----------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` (torchvision/models/resnet.py, BSD-3-Clause): the same
    sub-modules, created in the same order (so the same seed draws the same weights) and the same
    state-dict keys, so torchvision's ResNet weights load unchanged (``backbones``). Written out
    because importing torchvision costs seconds (its ``ops`` import ``torch._dynamo``), which every
    command that builds a model paid; ``tests/unit/models/test_models.py`` checks it against torchvision's."""

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


def build_resnet10(num_classes: int) -> TapNet:
    return build_resnet((1, 1, 1, 1), 3, num_classes)


def build_resnet18(num_classes: int) -> TapNet:
    return build_resnet((2, 2, 2, 2), 3, num_classes)


_POOLING_HEAD = (nn.Sequential, nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd)


def only_pools(head: nn.Module) -> bool:
    """Whether ``head`` (between the last stage and the classifier) only pools globally,
    flattens or drops out: then the last stage's pooled tap is the classifier's input."""
    for m in head.modules():
        pools = isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
        if not (pools or isinstance(m, _POOLING_HEAD)):
            return False
    return True


__all__ = [
    "BasicBlock",
    "TapNet",
    "build_lenet",
    "build_resnet",
    "build_resnet10",
    "build_resnet18",
    "only_pools",
    "pool",
]
