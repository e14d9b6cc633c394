"""Frozen stages: ``--freeze none|backbone|STAGE`` of ``train`` and ``simulate``.

``backbone`` freezes every stage (only the head and the classifier train); a stage name (a tap,
``alfk list``) freezes every stage up to and including it. A frozen stage gets no gradient and
runs in eval mode: batch norm uses (and keeps) its running statistics, dropout is off. Its
weights are therefore those of the starting model for the whole run, so its outputs are a fixed
function of the image: the simulation computes them once per model (:mod:`alfk_cli.simulate.activations`)
and runs only the rest of the network on them (:func:`tail_net`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    from torch import nn

    from alfk_cli.models.nets import TapNet

__all__ = [
    "FREEZE_HELP",
    "check_freeze",
    "freeze_stages",
    "frozen_digest",
    "frozen_names",
    "tail_net",
]

FREEZE_HELP = "none, backbone (every stage), or a stage: it and every stage before it"


def frozen_names(stage_names: Sequence[str], freeze: str) -> list[str]:
    """The stages ``freeze`` freezes, in network order; an unknown name is an error naming the
    stages there are."""
    stages = list(stage_names)
    if freeze == "none":
        return []
    if freeze == "backbone":
        return stages
    if freeze not in stages:
        raise AlfkError(
            f"{freeze!r} is not a stage of this network; use none, backbone or one of "
            f"{', '.join(stages)}"
        )
    return stages[: stages.index(freeze) + 1]


def check_freeze(arch: str, freeze: str) -> list[str]:
    """:func:`frozen_names` for the registered architecture ``arch`` (builds a throw-away copy
    once to read its stage names)."""
    from alfk_cli.models.archs import get_arch

    return frozen_names(list(get_arch(arch).tap_dims), freeze)


def freeze_stages(model: TapNet, freeze: str) -> list[nn.Module]:
    """Stop gradients to the stages ``freeze`` names (``requires_grad=False``) and return them:
    the training loop keeps them in eval mode (:func:`alfk_cli.train.loops.fit`)."""
    frozen = [model.stages[n] for n in frozen_names(model.stage_names, freeze)]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def tail_net(model: TapNet, after: str) -> TapNet:
    """The part of ``model`` after stage ``after``, as a TapNet that eats that stage's output.

    Its first stage is an identity named ``after`` (so ``after`` stays a tap: its output is the
    input), then the later stages, the head and the classifier, **shared** with ``model``:
    training the tail trains the model. ``forward_taps`` and ``describe_batch`` work on it as on
    the whole network, with activations in place of images."""
    from torch import nn

    from alfk_cli.models.nets import TapNet

    names = list(model.stage_names)
    later = names[names.index(after) + 1 :]
    stages = [(after, nn.Identity()), *((n, model.stages[n]) for n in later)]
    return TapNet(stages, model.head, model.classifier)


def frozen_digest(model: TapNet, names: Sequence[str]) -> str:
    """SHA-256 of the weights and buffers of the stages ``names``: two models whose frozen
    parts agree bit for bit share one digest (and so one set of cached activations)."""
    import torch

    h = hashlib.sha256()
    for name in names:
        for key, t in model.stages[name].state_dict().items():
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
