"""Backbones users start from: torchvision ImageNet ResNet weights as an alfk starting point.

``alfk train --init`` takes an alfk checkpoint, a torchvision ResNet-18 state dict saved to a
file (``torch.save(torchvision.models.resnet18(weights=...).state_dict(), "resnet18.pth")``) or
the name ``torchvision:resnet18`` (torchvision downloads the weights, or finds them in the torch
hub cache). Files are read with ``weights_only=True`` only: a pickled model is refused. With
``--arch timm:NAME`` it also takes that timm model's weights from a local file
(``timm_backbones.from_timm_file``); ``timm:NAME`` weights by name are refused (no download).

torchvision's keys map onto alfk's ResNet keys one to one (docs/design.md):

    conv1.*      -> stages.stem.0.*    (the 7×7 convolution)
    bn1.*        -> stages.stem.1.*    (its batch norm)
    layerN.*     -> stages.layerN.*    (BasicBlocks, downsample included, unchanged inside)
    fc.*         -> classifier.*       (the ImageNet head; ``init_from`` never loads it)

Shapes are checked strictly against the alfk architecture, so a resnet34 or resnet50 file is an
error naming the first key that does not fit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from alfk_cli.archs import TIMM_PREFIX
from alfk_cli.checkpoint import (
    Checkpoint,
    checkpoint_from_dict,
    file_sha256,
    is_checkpoint_dict,
)
from alfk_cli.errors import AlfkError
from alfk_cli.models import build_model, get_arch

PREFIX = "torchvision:"
HEAD = "imagenet"  # the Checkpoint.head of torchvision weights: init_from keeps only the trunk
RESNET_ARCHS = ("resnet10", "resnet18")  # alfk architectures with torchvision's ResNet layout
NAMED = {"resnet18": "ResNet18_Weights"}  # torchvision:NAME -> its weights enum (IMAGENET1K_V1)
_MARKERS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight")
_RENAME = (("conv1.", "stages.stem.0."), ("bn1.", "stages.stem.1."), ("fc.", "classifier."))


def is_torchvision_resnet(raw: object) -> bool:
    """Whether ``raw`` looks like a torchvision ResNet ``state_dict()`` (keys and tensors)."""
    return (
        isinstance(raw, dict)
        and all(k in raw for k in _MARKERS)
        and all(isinstance(v, torch.Tensor) for v in raw.values())
    )


def alfk_key(name: str) -> str:
    """The alfk ResNet key of the torchvision key ``name`` (see the module docstring)."""
    for old, new in _RENAME:
        if name.startswith(old):
            return new + name[len(old) :]
    if name.startswith("layer"):
        return "stages." + name
    raise AlfkError(f"{name} is not a torchvision ResNet key")


def from_torchvision(
    state_dict: dict[str, torch.Tensor], arch: str = "resnet18", source: str = "torchvision"
) -> Checkpoint:
    """An alfk :class:`Checkpoint` (head ``"imagenet"``) from a torchvision ResNet state dict.

    Every key must map onto ``arch`` with the same shape, and every trunk weight must be there
    (batch-norm ``num_batches_tracked`` counters, absent from old files, are zero). The ``fc``
    head becomes the checkpoint's classifier, with one class per output ("0".."999"); a task
    model made with :func:`~alfk_cli.checkpoint.init_from` gets a fresh classifier instead.
    """
    if arch not in RESNET_ARCHS:
        raise AlfkError(
            f"{source} holds torchvision ResNet weights; they fit --arch resnet18, not {arch}"
        )
    fc = state_dict.get("fc.weight")
    if fc is None or fc.dim() != 2:
        raise AlfkError(f"{source} has no usable fc.weight (not a torchvision ResNet)")
    own = build_model(arch, fc.shape[0], seed=0).state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = alfk_key(name)
        if key not in own:
            raise AlfkError(f"{source} does not fit {arch}: {name} has no place in it")
        if own[key].shape != tensor.shape:
            raise AlfkError(
                f"{source} does not fit {arch}: {name} is {tuple(tensor.shape)}, "
                f"{arch} needs {tuple(own[key].shape)}"
            )
        mapped[key] = tensor.detach().to("cpu", own[key].dtype)
    for key, tensor in own.items():
        if key in mapped:
            continue
        if not key.endswith("num_batches_tracked"):
            raise AlfkError(f"{source} does not fit {arch}: it lacks the weights for {key}")
        mapped[key] = torch.zeros_like(tensor)
    return Checkpoint(
        arch=arch,
        classes=[str(i) for i in range(fc.shape[0])],
        head=HEAD,
        input=get_arch(arch).input,  # resnet18 eats ImageNet-normalised 224 px images already
        state_dict=mapped,
        info={"task": "torchvision", "source": source},
    )


def download_state_dict(name: str) -> dict[str, Any]:
    """torchvision's ImageNet weights for ``name`` (IMAGENET1K_V1), downloaded or from the
    torch hub cache; the tests replace this function to stay off the network."""
    import torchvision.models

    weights = getattr(torchvision.models, NAMED[name]).IMAGENET1K_V1
    return weights.get_state_dict(progress=False, check_hash=True)


def load_named(spec: str, arch: str | None = None) -> Checkpoint:
    """``torchvision:resnet18``: the ImageNet weights through torchvision (network or cache)."""
    name = spec[len(PREFIX) :]
    if name not in NAMED:
        raise AlfkError(f"unknown backbone {spec}; known: {', '.join(PREFIX + n for n in NAMED)}")
    try:
        state = download_state_dict(name)
    except Exception as exc:  # URLError, OSError, hash mismatches, ...
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise AlfkError(
            f"cannot download the {spec} weights ({type(exc).__name__}: {detail}); "
            f"where downloads work, save them with torch.save(torchvision.models.{name}"
            f"(weights='IMAGENET1K_V1').state_dict(), '{name}.pth') and pass --init {name}.pth"
        ) from None
    ckpt = from_torchvision(state, arch or name, spec)
    ckpt.path = Path(spec)  # recorded as the model's ``init``
    return ckpt


def read_torch_file(path: Path) -> Any:
    """What a ``torch.save`` file holds, read with ``weights_only=True`` (never a pickled model)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled model, a truncated file, something else entirely
        raise AlfkError(
            f"cannot read {path} ({type(exc).__name__}): not an alfk checkpoint or a plain "
            "state dict; files are loaded with weights_only=True, so save "
            "model.state_dict() rather than the model"
        ) from None


def load_start(path: str | os.PathLike, arch: str | None = None) -> Checkpoint:
    """What ``--init`` names: an alfk checkpoint, a torchvision ResNet state-dict file or
    ``torchvision:resnet18``; ``arch`` (when given) must fit it."""
    if str(path).startswith(PREFIX):
        return load_named(str(path), arch)
    if str(path).startswith(TIMM_PREFIX):
        raise _no_download(str(path))
    path = Path(path)
    if not path.is_file():
        raise AlfkError(f"checkpoint {path} does not exist")
    timm_arch = arch is not None and arch.startswith(TIMM_PREFIX)
    if timm_arch and path.suffix == ".safetensors":
        return _timm_start(path, arch)
    raw = read_torch_file(path)
    if is_checkpoint_dict(raw):
        return checkpoint_from_dict(raw, path, arch)
    if timm_arch:
        return _timm_start(path, arch)
    if is_torchvision_resnet(raw):
        ckpt = from_torchvision(raw, arch or "resnet18", str(path))
        ckpt.path, ckpt.sha256 = path, file_sha256(path)
        return ckpt
    raise AlfkError(
        f"{path} is neither an alfk checkpoint nor a torchvision resnet18 state dict "
        "(timm weights: give --arch timm:NAME)"
    )


def _timm_start(path: Path, arch: str | None) -> Checkpoint:
    from alfk_cli.timm_backbones import from_timm_file  # imports timm

    assert arch is not None
    return from_timm_file(path, arch)


def _no_download(spec: str) -> AlfkError:
    """``--init timm:NAME``: weights by name would need a download, which alfk never does."""
    model = spec[len(TIMM_PREFIX) :]
    return AlfkError(
        f"alfk does not download timm weights ({spec}); where downloads work, save them with "
        f"python -c \"import timm, torch; torch.save(timm.create_model('{model}', "
        f"pretrained=True).state_dict(), '{model}.pth')\" and pass --init {model}.pth "
        f"--arch timm:{model}"
    )


__all__ = [
    "HEAD",
    "PREFIX",
    "alfk_key",
    "download_state_dict",
    "from_torchvision",
    "is_torchvision_resnet",
    "load_named",
    "load_start",
    "read_torch_file",
]
