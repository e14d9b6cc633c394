"""Whole-command ``alfk embed`` throughput against its two limits: decoding and the model.

    python benchmarks/bench_pipeline.py [--n 5000] [--n224 300] [--device cpu|cuda] [--workers W]

Two cases, each on its own folder of real JPEGs made from the CIFAR-10 archive
(``--archive``, see /work/shared/data/cifar10/README.md; 10 class sub-folders, so the embed is a
validation-set embed with true labels and needs no reference):

- ``resnet10``: the first ``--n`` training JPEGs (32×32, the network's input size);
- ``resnet18``: ``--n224`` of them upscaled to 224×224 (bicubic, JPEG quality 90).

For each, with a random-weight checkpoint of 10 classes and the command's default taps, batch
size and the same ``--workers`` everywhere (default: what ``alfk embed`` picks):

1. decode-only: the images/s of the embed's own loader (``ImageDataset`` in a DataLoader with
   the same workers and batch size), every image decoded, nothing else;
2. model z+g: images/s of ``estimators.describe_images`` (normalise, forward, Fisher scores) over
   the same images already decoded in memory, on ``--device``;
3. whole command: ``alfk embed`` as its own process, from start-up to exit, into a fresh store;
   also the rate the command itself reports (from its start of work: checkpoint, scan, model
   passes, store), which leaves out the interpreter and torch start-up.

Prints each, and whole / min(decode, model). Goal (issue 12): ≥ 0.7.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from alfk_cli.data.decode import ImageDataset, loader_workers, preload
from alfk_cli.data.scan import scan_images
from alfk_cli.embed.options import DEFAULT_BATCH
from alfk_cli.features.estimators import describe_images
from alfk_cli.models.archs import build_model, get_arch, resolve_taps
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.util.reproducible import loader_generator

ARCHIVE = Path("/work/shared/data/cifar10/cifar10-jpg.tar.gz")


def extract(
    archive: Path, out: Path, n: int, size: int | None, split: str = "train", skip: int = 0
) -> Path:
    """The first ``n`` JPEGs of the archive's ``split`` (round-robin over classes) after the
    first ``skip`` into ``out/<class>/``, upscaled to ``size``² when given. Reused when already
    there."""
    if out.is_dir() and sum(1 for _ in out.rglob("*.jpg")) >= n:
        return out
    per_class: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and split in parts and m.name.endswith(".jpg"):
                per_class.setdefault(parts[-2], []).append(m)
            if sum(map(len, per_class.values())) >= 4 * (n + skip) and len(per_class) == 10:
                break
        classes = sorted(per_class)
        count = range(n + skip)
        picked = [per_class[c][i] for i in count for c in classes if i < len(per_class[c])]
        for m in picked[skip : skip + n]:
            cls, name = m.name.split("/")[-2:]
            (out / cls).mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if size is None:
                (out / cls / name).write_bytes(data)
            else:
                im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
                im.save(out / cls / name, quality=90)
    return out


def decode_rate(folder: Path, arch: str, batch: int, workers: int) -> float:
    images = scan_images(folder, verify=False)
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, get_arch(arch).input),
        batch_size=batch,
        num_workers=workers,
        generator=loader_generator(),
    )
    t0 = time.perf_counter()
    n = sum(len(rows) for _, _, rows, _ in loader)
    return n / (time.perf_counter() - t0)


def model_rate(folder: Path, arch: str, batch: int, device: torch.device, rounds: int) -> float:
    images = scan_images(folder, verify=False)
    spec = get_arch(arch).input
    x, _ = preload(images, spec, 0)
    labels = torch.from_numpy(images.labels)
    model = build_model(arch, 10, seed=0).to(device)
    taps = resolve_taps(arch, None)
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            z, g, _, _ = describe_images(
                model, x[s : s + batch].to(device), spec, taps, "true",
                labels=labels[s : s + batch].to(device),
            )  # fmt: skip
            z.cpu(), g.cpu()
        best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def whole_rate(folder: Path, ckpt: Path, out: Path, device: str, workers: int | None):
    """(images/s over the process's wall time, images/s the command reports)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "alfk_cli.cli.main", "embed", "-m", str(ckpt), "-i", str(folder)]
    cmd += ["-o", str(out), "--device", device]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    n = len(scan_images(folder, verify=False))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(p.stderr[-2000:])
    m = re.search(r"([\d,]+) images/s", p.stderr)
    return n / wall, float(m.group(1).replace(",", "")) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "alfk-bench-pipe")
    ap.add_argument("--n", type=int, default=5000, help="CIFAR-10 JPEGs for the resnet10 case")
    ap.add_argument("--n224", type=int, default=300, help="224-px JPEGs for the resnet18 case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="default: as alfk embed picks")
    ap.add_argument("--rounds", type=int, default=2, help="model passes; the best is kept")
    ap.add_argument("--cases", default="resnet10,resnet18")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"bench_pipeline: {torch.get_num_threads()} torch threads, device {device}, "
          f"{len(os.sched_getaffinity(0))} cores available, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("case                 images workers   decode/s    model/s    whole/s  (command's own)"
          "  whole/min  own/min")  # fmt: skip
    for arch in args.cases.split(","):
        n, size = (args.n, None) if arch == "resnet10" else (args.n224, 224)
        folder = extract(args.archive, args.root / f"{arch}-{n}", n, size)
        ckpt = args.root / f"{arch}.pt"
        classes = sorted(p.name for p in folder.iterdir())
        save_checkpoint(ckpt, build_model(arch, len(classes), seed=0), arch, classes)
        batch = DEFAULT_BATCH[arch]
        workers = loader_workers(args.workers, -(-n // batch))
        dec = decode_rate(folder, arch, batch, workers)
        mod = model_rate(folder, arch, batch, device, args.rounds)
        whole, own = whole_rate(folder, ckpt, args.root / "out.h5", args.device, args.workers)
        low = min(dec, mod)
        print(f"{arch + (' 224px' if size else ' 32px'):20} {n:>6} {workers:>7} {dec:>10.0f} "
              f"{mod:>10.0f} {whole:>10.0f} {own:>10.0f}        {whole / low:>9.2f} "
              f"{own / low:>8.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
