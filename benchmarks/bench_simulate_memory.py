"""Peak memory of ``alfk simulate`` against the size of its pool (issue 12).

    python benchmarks/bench_simulate_memory.py [--sizes 1000,4000] [--run LABEL=PYTHON[:ARGS]]...

Folders of 224×224 JPEGs made from the CIFAR-10 archive (``--archive``, see
/work/shared/data/cifar10/README.md; built under ``--root`` on first use, upscaled bicubic,
quality 90): validation and test sets of 10 images per class from its test split, and one pool
per ``--sizes`` from its training split. Then, per pool size and per ``--run``, one ``alfk
simulate`` process: resnet18 from random weights, one round of ``--strategy`` (default
``random``: no model pass over the pool, so a run takes minutes on 2 cores; ``entropy`` adds a
forward pass over the whole pool in batches of 512) with P = 20 and 1 epoch, on the CPU, into a
fresh results folder.

``--run LABEL=PYTHON[:ARGS]`` names the interpreter that runs ``-m alfk_cli`` (another
checkout's, e.g. main's, to compare) and extra simulate arguments; default: this interpreter as
it is, and with ``--cache-mib 0`` (every folder decoded again at each pass).

Prints, per run: wall seconds, CPU seconds (user + system, the process and its decoding
workers), and peak RSS (``os.wait4``'s ``ru_maxrss``: the largest of the process and the workers
it waited for), beside the pool's decoded size (N × 3 × 224 × 224 bytes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import ARCHIVE, extract
from childproc import run_child

SIZE = 224


def folders(archive: Path, root: Path, sizes: list[int]) -> dict[str, Path]:
    """val/, test/ (100 test-split images each) and pool-N/ for each size."""
    out = {
        "val": extract(archive, root / "val", 100, SIZE, split="test"),
        "test": extract(archive, root / "test", 100, SIZE, split="test", skip=100),
    }
    for n in sizes:
        out[f"pool-{n}"] = extract(archive, root / f"pool-{n}", n, SIZE)
    return out


def simulate(
    python: str, extra: list[str], data: dict[str, Path], n: int, strategy: str, out: Path
) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one simulate process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python, "-m", "alfk_cli", "simulate", "--pool", str(data[f"pool-{n}"])]
    cmd += ["--val", str(data["val"]), "--test", str(data["test"]), "--out", str(out)]
    cmd += ["--arch", "resnet18", "--strategies", strategy, "--rounds", "1", "--P", "20"]
    cmd += ["--init", "random", "--epochs", "1", "--device", "cpu", "--no-plot", "--quiet"]
    wall, usage, _ = run_child([*cmd, *extra], " ".join(cmd + extra))
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "alfk-bench-sim")
    ap.add_argument("--sizes", default="1000,4000", help="pool sizes, comma-separated")
    ap.add_argument("--run", action="append", default=None, help="LABEL=PYTHON[:ARGS]")
    ap.add_argument("--strategy", default="random", help="random (default) or entropy, ...")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = args.run or [
        f"after={sys.executable}",
        f"after, streamed={sys.executable}:--cache-mib 0",
    ]
    data = folders(args.archive, args.root, sizes)
    print(f"bench_simulate_memory: {args.strategy}, {len(os.sched_getaffinity(0))} cores, load "
          f"average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("pool images  decoded MiB  run                      wall s   CPU s  peak RSS MiB")
    for n in sizes:
        for spec in runs:
            label, _, rest = spec.partition("=")
            python, _, extra = rest.partition(":")
            wall, cpu, rss = simulate(
                python, shlex.split(extra), data, n, args.strategy, args.root / "out"
            )
            print(f"{n:>11} {n * 3 * SIZE * SIZE / 2**20:>12.0f}  {label:24} {wall:>7.1f} "
                  f"{cpu:>7.1f} {rss:>13.0f}", flush=True)  # fmt: skip
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
