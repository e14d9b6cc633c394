"""End-to-end timings of the real commands on Fashion-MNIST (LeNet, CPU by default).

Runs, each as its own ``alfk`` process (wall seconds, peak RSS of that process):
  1. pretrain on the pool (``--pretrain-epochs``, default 1: only to have a checkpoint; the
     figure is not a selection cost)
  2. embed of the 10k validation folder, and of the 50k pool folder against it (images/s, RSS)
  3. ``alfk select --val --pool --P 1250 --model`` in a fresh work folder: cold (embeds both)
  4. the same again: warm (nothing changed: no model passes)
Memory must not grow with the number of images: compare the RSS of the 10k and 50k embeds.

``--warm-only`` times step 4 alone in the work folder an earlier run left, ``--rounds`` times,
with and without a pool list (``--pool-list``), interleaving the checkouts ``--compare`` names
(each runs its own ``alfk_cli``; default: this one): wall and CPU (user + system) seconds of the
process and the load average, and a check that every run printed the same selection.

Needs the folders of ``examples/make_biased_folders.py --source fashion-mnist --imbalance 1
--test-per-class 0 --out ROOT`` (built here when ROOT/val is missing; Debian's
dataset-fashion-mnist must be installed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from childproc import run_child

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], label: str, cwd: Path | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall s, peak RSS MiB of that process) and print a line."""
    wall_s, _, rss, _ = run(cmd, label, cwd)
    print(f"{label:<44} {wall_s:8.1f} s   peak RSS {rss:7.0f} MiB", flush=True)
    return wall_s, rss


def run(cmd: list[str], label: str, cwd: Path | None = None) -> tuple[float, float, float, str]:
    """Run ``cmd``: (wall s, CPU s (user + system), peak RSS MiB, sha256 of its stdout)."""
    wall_s, usage, printed = run_child(cmd, label, cwd)
    rss = usage.ru_maxrss / 1024  # KiB on Linux
    return wall_s, usage.ru_utime + usage.ru_stime, rss, hashlib.sha256(printed).hexdigest()


def warm_rounds(args: argparse.Namespace, sel: list[str]) -> None:
    """The warm select alone, ``args.rounds`` times per checkout and pool-list setting,
    interleaved; every run must print the same selection."""
    pool_list = args.root / "pool.txt"
    if args.pool_list:
        files = sorted(
            p.relative_to(args.root / "unlabeled") for p in (args.root / "unlabeled").rglob("*.png")
        )
        pool_list.write_text("".join(f"{p.as_posix()}\n" for p in files))
    settings = [[]] + ([["--pool-list", str(pool_list)]] if args.pool_list else [])
    checkouts = args.compare or [REPO]
    printed: set[str] = set()
    for r in range(args.rounds):
        for extra in settings:
            for checkout in checkouts:
                # -m from the checkout: its alfk_cli comes first on sys.path
                cmd = [sys.executable, "-m", "alfk_cli.cli", *sel[3:], *extra]
                wall, cpu, rss, out = run(cmd, "warm select", cwd=Path(checkout))
                printed.add(out)
                load = os.getloadavg()[0]
                name = f"{Path(checkout).name}{' --pool-list' if extra else ''}"
                print(
                    f"round {r + 1}  {name:<32} wall {wall:6.2f} s  CPU {cpu:5.2f} s  "
                    f"RSS {rss:5.0f} MiB  load {load:4.1f}",
                    flush=True,
                )
    if len(printed) != 1:
        sys.exit(f"the warm runs printed {len(printed)} different selections")
    print("every warm run printed the same selection")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/fashion-bench"))
    ap.add_argument("--P", type=int, default=1250)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warm-only", action="store_true", help="time the warm select alone")
    ap.add_argument("--rounds", type=int, default=1, help="with --warm-only: rounds")
    ap.add_argument("--pool-list", action="store_true", help="with --warm-only: also a pool list")
    ap.add_argument("--compare", nargs="+", type=Path, help="with --warm-only: checkouts to time")
    args = ap.parse_args()
    root = args.root = args.root.resolve()  # the warm runs start in other folders
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
    init = work / "init.pt"
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
        "--no-ledger",  # looks: a recorded warm run leaves the cold run's images out, and re-scores
        "-q",
        *dev,
    ]
    if args.warm_only:
        if not (work / "wd" / "scores.h5").is_file():
            sys.exit(f"no work folder from an earlier run in {work}: run without --warm-only first")
        return warm_rounds(args, sel)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    n_val = sum(1 for p in (root / "val").rglob("*.png"))
    n_pool = sum(1 for p in (root / "unlabeled").rglob("*.png"))
    print(
        f"Fashion-MNIST: {n_val} validation images, {n_pool} pool images, P={args.P}, device {args.device}"
    )
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
    cold, _ = timed(sel, "select cold (embed val + pool, score)")
    warm, _ = timed(sel, "select warm (nothing changed)")
    print(f"warm / cold = {warm / cold:.3f}")


if __name__ == "__main__":
    main()
