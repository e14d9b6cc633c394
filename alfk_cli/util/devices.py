"""Device names (``auto``, ``cpu``, ``cuda``, ``cuda:N``): one parser, resolution, autocast.

torch is imported inside the functions that need it, so that :func:`parse_device` stays cheap for
the command-line validator and for FAISS searches that run on the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    import torch

#: The spellings :func:`parse_device` accepts (any case), for help texts and messages.
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"

_DEVICE = re.compile(r"auto|cpu|cuda(?::([0-9]+))?")


def parse_device(name: str) -> str:
    """Validate and normalise a device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, in any
    case (``CUDA:01`` -> ``cuda:1``). Raises :class:`AlfkError` for anything else."""
    m = _DEVICE.fullmatch(name.lower()) if isinstance(name, str) else None
    if m is None:
        raise AlfkError(f"unknown device {name!r}; use {DEVICE_NAMES}")
    return m[0] if m[1] is None else f"cuda:{int(m[1])}"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (see :func:`parse_device`); ``auto`` is CUDA when available.

    Asking for CUDA without a CUDA device, or for a CUDA index the machine lacks, raises
    :class:`AlfkError`.
    """
    import torch

    name = parse_device(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AlfkError(f"device {name} was asked for, but no CUDA device is available")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise AlfkError(
                f"device {name} was asked for, but there are only "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; a no-op context on the CPU."""
    import torch

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
    import torch

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextmanager
def ieee_matmul() -> Iterator[None]:
    """IEEE float32 matrix products inside the block, on CUDA (no TF32) and on the CPU (no
    oneDNN bf16 or TF32), whatever ``torch.set_float32_matmul_precision`` the caller chose.

    For the exact search: its a-priori error bound assumes every product and partial sum of a
    float32 GEMM is rounded to float32. ``"highest"`` sets both the legacy flag and (torch >=
    2.9) the per-backend ones, which cuBLAS requires to agree; on the way out the legacy value is
    set back first and the per-backend values after it, so the caller's state is restored as
    it was, even a mixed one (whose legacy getter raises).
    """
    import torch

    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the legacy and the per-backend APIs
        legacy = None
    backends: list[Any] = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", 0)]
    per_backend = [(obj, obj.fp32_precision) for obj in backends if hasattr(obj, "fp32_precision")]
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for obj, value in per_backend:
            obj.fp32_precision = value
