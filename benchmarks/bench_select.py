"""End-to-end timings of the real commands on Fashion-MNIST (LeNet, CPU by default).

Runs, each as its own ``alfk`` process (wall seconds, peak RSS of that process):
  1. pretrain on the pool (``--pretrain-epochs``, default 1: only to have a checkpoint; the
     figure is not a selection cost)
  2. embed of the 10k validation folder, and of the 50k pool folder against it (images/s, RSS)
  3. ``alfk select --val --pool --P 1250 --model`` in a fresh work folder: cold (embeds both)
  4. the same again: warm (nothing changed: no model passes)
Memory must not grow with the number of images: compare the RSS of the 10k and 50k embeds.

Needs the folders of ``examples/make_biased_folders.py --source fashion-mnist --imbalance 1
--test-per-class 0 --out ROOT`` (built here when ROOT/val is missing; Debian's
dataset-fashion-mnist must be installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], label: str) -> tuple[float, float]:
    """Run ``cmd``; return (wall s, peak RSS MiB of that process) and print a line.

    ``os.wait4`` gives the child's own rusage, so no GNU time is needed (GPU images lack it).
    """
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{label} failed:\n{err.read()[-2000:]}")
    rss = usage.ru_maxrss / 1024  # KiB on Linux
    print(f"{label:<44} {wall_s:8.1f} s   peak RSS {rss:7.0f} MiB", flush=True)
    return wall_s, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--P", type=int, default=1250)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = args.root
    if not (root / "val").is_dir():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "make_biased_folders.py"),
                "--source",
                "fashion-mnist",
                "--imbalance",
                "1",
                "--test-per-class",
                "0",
                "--out",
                str(root),
                "--force",
            ],
            check=True,
        )
    alfk = [sys.executable, "-m", "alfk_cli.cli"]
    dev = ["--device", args.device, "--workers", str(args.workers)]
    work = root / "bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    n_val = sum(1 for p in (root / "val").rglob("*.png"))
    n_pool = sum(1 for p in (root / "unlabeled").rglob("*.png"))
    print(
        f"Fashion-MNIST: {n_val} validation images, {n_pool} pool images, P={args.P}, device {args.device}"
    )
    init = work / "init.pt"
    timed(
        [
            *alfk,
            "pretrain",
            "--images",
            str(root / "unlabeled"),
            "--out",
            str(init),
            "--epochs",
            str(args.pretrain_epochs),
            "-q",
            *dev,
        ],
        f"pretrain ({args.pretrain_epochs} epoch)",
    )
    w, _ = timed(
        [
            *alfk,
            "embed",
            "--model",
            str(init),
            "--images",
            str(root / "val"),
            "--out",
            str(work / "val.h5"),
            "-q",
            *dev,
        ],
        "embed validation",
    )
    print(f"{'':<44} {n_val / w:8.0f} images/s (whole command)")
    w, _r = timed(
        [
            *alfk,
            "embed",
            "--model",
            str(init),
            "--images",
            str(root / "unlabeled"),
            "--reference",
            str(work / "val.h5"),
            "--out",
            str(work / "pool.h5"),
            "-q",
            *dev,
        ],
        "embed pool (p_yz)",
    )
    print(f"{'':<44} {n_pool / w:8.0f} images/s (whole command)")
    timed(
        [
            *alfk,
            "score",
            "--val",
            str(work / "val.h5"),
            "--pool",
            str(work / "pool.h5"),
            "--P",
            str(args.P),
            "--out",
            str(work / "scores.h5"),
            "-q",
            "--device",
            args.device,
        ],
        "score (sum kernel)",
    )
    sel = [
        *alfk,
        "select",
        "--val",
        str(root / "val"),
        "--pool",
        str(root / "unlabeled"),
        "--P",
        str(args.P),
        "--model",
        str(init),
        "--workdir",
        str(work / "wd"),
        "-q",
        *dev,
    ]
    cold, _ = timed(sel, "select cold (embed val + pool, score)")
    warm, _ = timed(sel, "select warm (nothing changed)")
    print(f"warm / cold = {warm / cold:.3f}")


if __name__ == "__main__":
    main()
