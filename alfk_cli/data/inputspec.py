"""``InputSpec``: what a network eats, the one thing decoding needs to know about a model.

Images are decoded, resized and normalised per channel for an architecture (``images``) before
any network exists, so the description lives apart from the architecture registry (``archs``)
and imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """What the network eats: images are resized to ``size`` and normalised per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
