"""GPU only: z and g against a float64 CPU reference, and z+g throughput, with and without TF32.

    python benchmarks/bench_gpu_precision.py [--seconds 1]

alfk computes descriptors in plain float32 (``devices.full_precision``: cuDNN's default TF32
convolutions off). This prints, per architecture and preset, the largest per-image relative error
of z and g against float64 on the CPU (random-weight model, 8 random inputs, 10 classes), once as
alfk runs and once with TF32 allowed, and the z+g and forward-only images/s of both at two batch
sizes, so the cost of that choice is on record.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from functools import partial
from unittest import mock

import torch

import alfk_cli.features.descriptors as descriptors
from alfk_cli.features.descriptors import describe_batch
from alfk_cli.models.archs import build_model, get_arch, resolve_taps

CASES = [
    ("lenet", "L80", (256, 1024)),
    ("resnet10", "L256", (128, 512)),
    ("resnet10", "L768", (128, 512)),
    ("resnet18", "L512", (32, 128)),
    ("resnet18", "L768", (32, 128)),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())


def per_second(fn, seconds: float) -> float:
    fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


@contextlib.contextmanager
def tf32_allowed():
    """TF32 on, and alfk's full_precision() made a no-op."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with mock.patch.object(descriptors, "full_precision", contextlib.nullcontext):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad(), descriptors.full_precision():
        model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    cuda = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "arch     taps  mode     err z    err g   "
        + "  ".join("batch  fwd/s   z+g/s" for _ in range(2))
    )
    for arch, preset, batches in CASES:
        spec = get_arch(arch).input
        model = build_model(arch, 10, seed=0).eval()
        taps = resolve_taps(arch, preset)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, spec.channels, spec.size, spec.size, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        z64, g64, _, _ = describe_batch(model.double(), x.double(), taps, labels=y)
        model.float().to(cuda)
        for mode, ctx in (("fp32", contextlib.nullcontext), ("tf32", tf32_allowed)):
            with ctx():
                z, g, _, _ = describe_batch(model, x.to(cuda), taps, labels=y.to(cuda))
                line = f"{arch:8} {preset:5} {mode:5} {rel(z, z64):8.1e} {rel(g, g64):8.1e}"
                for b in batches:
                    xb = torch.randn(b, spec.channels, spec.size, spec.size, device=cuda)
                    yb = torch.randint(0, 10, (b,), device=cuda)

                    fwd = per_second(partial(forward, model, xb), args.seconds) * b
                    zg = per_second(
                        partial(describe_batch, model, xb, taps, labels=yb), args.seconds
                    )
                    line += f"  {b:5} {fwd:8,.0f} {zg * b:8,.0f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
