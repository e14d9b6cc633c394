"""The architecture registry: names, inputs and tap presets, read without importing torch.

What an architecture is called, what it eats and which taps it offers is decided from the command
line and from the files before any model pass (a warm ``select`` never builds a network), so it
lives here; the networks themselves are built by ``models`` (torch), imported only when one is
built or a tap width is needed (``ArchSpec.tap_dims`` runs one blank image through a throw-away
copy, so no width is ever typed by hand).

Besides the registered names, ``timm:NAME`` names any timm backbone (``timm_backbones``): its
spec is made when the name is first looked up, which imports timm (and torch), or from the
record a checkpoint of it carries (:func:`remember_arch`), which imports nothing, so a warm
``select`` on a timm checkpoint stays torch-free.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from alfk_cli.errors import AlfkError
from alfk_cli.registry import Registry

if TYPE_CHECKING:
    from alfk_cli.models import TapNet

ROTATION_CLASSES = ("0", "90", "180", "270")
AUTO = "auto"  # --arch auto: chosen from the images (archauto)
TIMM_PREFIX = "timm:"


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
    # a family's spec (timm:NAME) knows its widths and carries a torch-free record of itself,
    # which checkpoints keep (checkpoint.py) so that reading one rebuilds the spec without timm
    dims: dict[str, int] | None = None
    record: dict[str, Any] | None = None

    @cached_property
    def tap_dims(self) -> dict[str, int]:
        """Tap name -> its length after global average pooling, read off the built network.

        One forward pass of a blank image through a throw-away copy (seeded: no RNG is used
        outside it), so no width is ever typed by hand.
        """
        if self.dims is not None:
            return dict(self.dims)
        import torch

        from alfk_cli.models import pool

        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            net = self.build(2).eval()
            x = torch.zeros(1, self.input.channels, self.input.size, self.input.size)
            _, feats = net.forward_taps(x, net.stage_names)
        return {name: pool(f).shape[1] for name, f in zip(net.stage_names, feats, strict=True)}


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


def get_arch(name: str) -> ArchSpec:
    """The registered architecture ``name``; an unknown name is an error naming the known ones."""
    return ARCHITECTURES[name]


def resolve_taps(arch: str, taps: str | Sequence[str] | None) -> tuple[str, ...]:
    """A preset name (``L80``), a comma-separated list of tap names, or None for the default.

    Presets, and lists that spell one out, need no network; other names are checked against
    the stages of the built network (which imports torch)."""
    spec = get_arch(arch)
    if taps is None or taps == "":
        return spec.presets[spec.default_preset]
    if isinstance(taps, str):
        if taps in spec.presets:
            return spec.presets[taps]
        taps = [t.strip() for t in taps.split(",") if t.strip()]
    names = tuple(taps)
    if names in spec.presets.values():
        return names
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


# --- timm:NAME, resolved when looked up (networks in ``timm_backbones``) -------------------------

_FAMILY: dict[str, ArchSpec] = {}  # timm:NAME specs met in this process


_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")


def timm_name(arch: str) -> tuple[str, int | None]:
    """``timm:NAME[@SIZE]`` -> (NAME, SIZE or None); NAME may carry a pretrained tag
    (``resnet10t.c3_in1k``). Only the form is checked here (no timm import)."""
    rest = arch[len(TIMM_PREFIX) :] if arch.startswith(TIMM_PREFIX) else ""
    name, at, size = rest.partition("@")
    if not _TIMM_NAME.fullmatch(name) or (at and not (size.isdigit() and 8 <= int(size) <= 4096)):
        raise AlfkError(
            f"{arch!r} is not timm:NAME or timm:NAME@SIZE (a timm model name, SIZE in pixels, "
            "8 to 4096)"
        )
    return name, int(size) if at else None


def _build_timm(name: str, num_classes: int) -> TapNet:
    from alfk_cli.timm_backbones import build_timm

    return build_timm(name, num_classes)


def spec_from_record(name: str, record: dict[str, Any]) -> ArchSpec:
    """The spec of ``name`` from its torch-free record (what ``timm_backbones`` measured)."""
    try:
        inp = record["input"]
        presets = {str(k): tuple(str(t) for t in v) for k, v in record["presets"].items()}
        spec = ArchSpec(
            name,
            functools.partial(_build_timm, name),
            InputSpec(
                int(inp["size"]), int(inp["channels"]), tuple(inp["mean"]), tuple(inp["std"])
            ),
            presets,
            str(record["default_preset"]),
            {str(k): float(v) for k, v in record["train_defaults"].items()},
            dims={str(k): int(v) for k, v in record["dims"].items()},
            record=dict(record),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AlfkError(f"the architecture record of {name} is damaged ({exc!r})") from None
    if spec.default_preset not in presets or any(t not in spec.tap_dims for t in record["taps"]):
        raise AlfkError(f"the architecture record of {name} is damaged (taps and presets differ)")
    return spec


def known_family(name: str) -> bool:
    """Whether ``name`` (``timm:NAME``) is known in this process without importing timm."""
    return name in _FAMILY


def remember_arch(name: str, record: dict[str, Any]) -> ArchSpec:
    """Make ``name`` known from a checkpoint's record, unless this process knows it already."""
    if name not in _FAMILY:
        _FAMILY[name] = spec_from_record(name, record)
    return _FAMILY[name]


def _resolve_timm(name: str) -> ArchSpec:
    if name not in _FAMILY:
        from alfk_cli.timm_backbones import timm_record  # imports torch and timm

        _FAMILY[name] = spec_from_record(name, timm_record(name))
    return _FAMILY[name]


def _describe_timm() -> str:
    from alfk_cli.timm_backbones import describe_family

    return describe_family()


ARCHITECTURES.register_prefix(TIMM_PREFIX, _resolve_timm, _describe_timm)


# --- the built-in architectures (networks in ``models``) -----------------------------------------


def _build_builtin(function: str, num_classes: int) -> TapNet:
    """``models.<function>(num_classes)``: models (torch) is imported when a network is built."""
    from alfk_cli import models

    net: TapNet = getattr(models, function)(num_classes)
    return net


def _built_by(function: str) -> Callable[[int], TapNet]:
    # a partial of a module-level function, so a spec pickles like one holding the function
    return functools.partial(_build_builtin, function)


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

register_arch(
    "lenet",
    input=InputSpec(28, 1, (0.1307,), (0.3081,)),
    presets={"L20": ("conv2",), "L80": ("conv1", "conv2", "fc1")},
    default_preset="L80",
    train_defaults={"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 25},
)(_built_by("build_lenet"))
register_arch(
    "resnet10",
    input=InputSpec(32, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    presets={"L256": ("layer3",), "L768": ("layer3", "layer4")},
    default_preset="L768",
    train_defaults={"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128},
)(_built_by("build_resnet10"))
register_arch(
    "resnet18",
    input=InputSpec(224, 3, *_IMAGENET),
    presets={"L512": ("layer4",), "L768": ("layer3", "layer4")},
    default_preset="L768",
    train_defaults={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64},
)(_built_by("build_resnet18"))


__all__ = [
    "ARCHITECTURES",
    "ARCHS",
    "AUTO",
    "ROTATION_CLASSES",
    "TIMM_PREFIX",
    "ArchSpec",
    "InputSpec",
    "get_arch",
    "known_family",
    "register_arch",
    "remember_arch",
    "resolve_taps",
    "scale_dims",
    "spec_from_record",
    "timm_name",
]
