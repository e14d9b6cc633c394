"""``timm:NAME[@SIZE]``, the names of timm backbones: their form, checked without timm or torch
(the registry in ``archs`` and the networks in ``models.timmnets`` both read it).
"""

from __future__ import annotations

import re

from alfk_cli.errors import AlfkError

TIMM_PREFIX = "timm:"

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


__all__ = ["TIMM_PREFIX", "timm_name"]
