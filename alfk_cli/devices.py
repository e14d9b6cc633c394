"""Resolve ``--device auto|cpu|cuda``."""

from __future__ import annotations

import torch

from alfk_cli.errors import AlfkError


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AlfkError("--device cuda was asked for, but no CUDA device is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise AlfkError(f"unknown device {name!r}; use auto, cpu or cuda")


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; a no-op context on the CPU."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )
