"""Resolve ``--device auto|cpu|cuda``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def full_precision() -> Iterator[None]:
    """Plain float32 convolutions and matrix products on CUDA (no TF32) inside the block.

    For descriptors: with cuDNN's default TF32 convolutions a random ResNet-10's Fisher scores
    moved by up to 7% on single images against the CPU (benchmarks/bench_gpu_precision.py), and
    g is what the selection ranks by. Training keeps TF32 and bf16. A no-op on the CPU.
    """
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
