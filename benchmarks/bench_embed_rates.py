"""Embedding throughput against its two limits: decoding alone and the model alone (issue 22).

On one labelled image folder (class sub-folders, so g uses the true labels), in one process:

- decode-only: every image decoded by the DataLoader `embed` uses (`images.ImageDataset`, the
  same worker count and batch), nothing else;
- model-only: `estimators.describe_images` (z, g and logits, one forward and one backward) on
  random uint8 batches of the same size already on the device: no decoding, no transfer;
- embed: `embedding.embed_folder` into a fresh store (decode, transfer, model, HDF5 write), after
  the two above warmed the device; its own seconds (scan included) and images/s;
- `--cli`: also `alfk embed` as a child process (interpreter, imports and CUDA start included),
  and `--torchrun` the same under `torchrun --nproc_per_node=1` (a process group: NCCL on CUDA).

Prints each rate and embed / min(decode-only, model-only); the goal (issue 22) is >= 70 %.
The random-weight checkpoint is written beside the store; stores are deleted unless --keep.

Usage: python benchmarks/bench_embed_rates.py --images DIR --arch resnet10 [--device cuda]
           [--workers 16] [--batches 30] [--cli] [--torchrun] [--root /tmp/embed-rates]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from childproc import run_child  # noqa: E402

from alfk_cli.archs import get_arch, resolve_taps  # noqa: E402
from alfk_cli.checkpoint import save_checkpoint  # noqa: E402
from alfk_cli.embedding import embed_folder  # noqa: E402
from alfk_cli.embedoptions import EmbedOptions  # noqa: E402
from alfk_cli.estimators import describe_images  # noqa: E402
from alfk_cli.images import decoded_batches, loader_workers  # noqa: E402
from alfk_cli.imagescan import scan_images  # noqa: E402
from alfk_cli.models import build_model  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def decode_rate(images, spec, workers: int, batch: int) -> float:
    t0, n = time.perf_counter(), 0
    for img, _, _ in decoded_batches(images, spec, workers, batch):
        n += len(img)
    return n / (time.perf_counter() - t0)


def model_rate(model, spec, taps, classes: int, batch: int, batches: int, dev) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, spec.channels, spec.size, spec.size), generator=gen)
    x, y = x.to(torch.uint8).to(dev), torch.randint(0, classes, (batch,), generator=gen).to(dev)
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        describe_images(model, x, spec, taps, "true", labels=y)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(batches):
        z, g, logits, _ = describe_images(model, x, spec, taps, "true", labels=y)
        # embed copies each batch back to the host to write it: so does this (same bytes)
        z.float().cpu(), g.float().cpu(), logits.float().cpu()
    sync(dev)
    return batches * batch / (time.perf_counter() - t0)


def child_embed(ckpt: Path, images: Path, out: Path, args, nproc: int = 0) -> float:
    launch = [sys.executable, "-m", "alfk_cli"]
    if nproc:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={nproc}", "-m", "alfk_cli"]  # fmt: skip
    cmd = [*launch, "embed", "--model", str(ckpt), "--images", str(images), "--out", str(out),
           "--workers", str(args.workers), "--device", args.device, "-q"]  # fmt: skip
    out.unlink(missing_ok=True)
    wall, _, _ = run_child(cmd, "alfk embed" + (" under torchrun" if nproc else ""))
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True, help="labelled image folder")
    ap.add_argument("--arch", default="resnet10")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30, help="timed model-only batches")
    ap.add_argument("--cli", action="store_true", help="also time `alfk embed` as a child")
    ap.add_argument("--torchrun", action="store_true", help="also under torchrun, 1 process")
    ap.add_argument("--root", type=Path, default=Path("/tmp/embed-rates"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the embed (top 20, tottime)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    args.root.mkdir(parents=True, exist_ok=True)
    try:
        bench(args, dev)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


def bench(args: argparse.Namespace, dev: torch.device) -> None:
    images = scan_images(args.images, verify=False)
    classes = list(images.classes)
    spec, taps = get_arch(args.arch).input, resolve_taps(args.arch, None)
    batch = EmbedOptions().batch_for(args.arch)
    workers = loader_workers(args.workers, -(-len(images) // batch))
    ckpt = args.root / "m.pt"
    model = build_model(args.arch, len(classes), seed=0)
    save_checkpoint(ckpt, model, args.arch, classes)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{args.images}: {len(images):,} images {spec.size}x{spec.size}x{spec.channels}, "
          f"{args.arch} (taps {','.join(taps)}), batch {batch}, {workers} decode workers, "
          f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)  # fmt: skip
    model = model.to(dev).eval()
    m_rate = model_rate(model, spec, taps, len(classes), batch, args.batches, dev)
    print(f"model-only  : {m_rate:9.0f} img/s", flush=True)
    d_rate = decode_rate(images, spec, args.workers, batch)
    print(f"decode-only : {d_rate:9.0f} img/s", flush=True)
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    summary = embed_folder(ckpt, args.images, args.root / "s.h5", workers=args.workers,
                           device=args.device)  # fmt: skip
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    e_rate = summary.images / summary.seconds
    bound = min(d_rate, m_rate)
    print(f"embed       : {e_rate:9.0f} img/s ({summary.images:,} rows in "
          f"{summary.seconds:.1f} s) = {100 * e_rate / bound:.0f} % of min(decode, model) "
          f"(goal >= 70 %)", flush=True)  # fmt: skip
    if args.cli:
        wall = child_embed(ckpt, args.images, args.root / "c.h5", args)
        print(f"alfk embed (child process, start-up included): {wall:.1f} s = "
              f"{len(images) / wall:.0f} img/s", flush=True)  # fmt: skip
    if args.torchrun:
        wall_t = child_embed(ckpt, args.images, args.root / "t.h5", args, nproc=1)
        print(f"torchrun --nproc_per_node=1 alfk embed: {wall_t:.1f} s = "
              f"{len(images) / wall_t:.0f} img/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
