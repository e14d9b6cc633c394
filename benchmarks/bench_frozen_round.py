#!/usr/bin/env python3
"""Time per simulated round on CIFAR-10, frozen backbone (``--freeze backbone``) vs fine-tuned.

Builds small class-layout folders from the CIFAR-10 JPEG archive (../shared/data/cifar10/): a
pool of the first ``--pool-per-class`` training images of each class, a validation folder of
the next ``--val-per-class``, and a test folder of the first ``--test-per-class`` test images;
``simulate --imbalance`` biases the pool itself (every common image, 1/R as many rare ones).
Then runs the same ``alfk simulate`` twice in this process, ``--freeze none`` and
``--freeze backbone``, with random initial weights (the time of a round does not depend on
the weights' values), and prints the seconds each round spent selecting and training, the
one-time fill of the activation tables (frozen only), each round's wall time (selection,
training, the test pass and the saved model), and the test accuracy for context.

    python benchmarks/bench_frozen_round.py --work /tmp/bench-frozen
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROW_FIELDS = ("strategy", "round", "labels", "select_seconds", "train_seconds", "test_accuracy")
ARCHIVE = HERE.parent.parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"


def build_folders(archive: Path, work: Path, pool: int, val: int, test: int) -> dict[str, Path]:
    """pool/, val/ and test/ under ``work`` (class sub-folders), read straight from the
    archive: the first ``pool`` + ``val`` training images of each class and ``test`` test ones
    (by file name order)."""
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        by_class: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts  # cifar10/{train,test}/<class>/<file>
            if len(parts) == 4 and parts[1] in ("train", "test"):
                by_class.setdefault((parts[1], parts[2]), []).append(m)
        out = {name: work / name for name in ("pool", "val", "test")}
        for (split, cls), ms in sorted(by_class.items()):
            plan = (
                [("pool", ms[:pool]), ("val", ms[pool : pool + val])]
                if split == "train"
                else [("test", ms[:test])]
            )
            for folder, chosen in plan:
                dest = out[folder] / cls
                dest.mkdir(parents=True, exist_ok=True)
                for m in chosen:
                    f = tar.extractfile(m)
                    assert f is not None
                    (dest / Path(m.name).name).write_bytes(f.read())
    return out


def run(folders: dict[str, Path], out: Path, freeze: str, args: argparse.Namespace) -> dict:
    from alfk_cli.simulate.options import SimulateOptions
    from alfk_cli.simulate.run import simulate

    events: list[tuple[float, str]] = []

    def say(msg: str) -> None:
        events.append((time.perf_counter(), msg))
        print(f"  [{freeze}] {msg}", file=sys.stderr)

    options = SimulateOptions(
        pool=folders["pool"], val=folders["val"], test=folders["test"], out=out,
        strategies=tuple(args.strategies.split(",")), rounds=args.rounds, P=args.P,
        seeds=(0,), arch=args.arch, init="random", epochs=args.epochs, imbalance=args.imbalance,
        rare=tuple(args.rare.split(",")), device=args.device, workers=0, freeze=freeze,
    )  # fmt: skip
    t0 = time.perf_counter()
    rows = simulate(options, progress=say)
    wall = time.perf_counter() - t0
    # a round's wall time: from the message before its own (the previous round, or the table
    # fill) to its message; it holds selection, training, the test pass and the saved model
    fill, rounds = None, []
    for (t_prev, _), (t, msg) in itertools.pairwise(events):
        if msg.startswith("frozen up to"):
            fill = t - t_prev
        elif " round " in msg:
            rounds.append(t - t_prev)
    return {
        "freeze": freeze,
        "wall_s": round(wall, 2),
        "table_fill_s": None if fill is None else round(fill, 2),
        "per_round": [{k: r[k] for k in ROW_FIELDS} for r in rows],
        "round_median_s": round(statistics.median(rounds), 3),
        "round_mean_s": round(statistics.fmean(rounds), 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", type=Path, default=ARCHIVE, help="cifar10-jpg.tar.gz")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    p.add_argument("--pool-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--imbalance", type=float, default=10.0)
    p.add_argument("--rare", default="dog,frog,horse,ship,truck")
    p.add_argument("--arch", default="resnet10")
    p.add_argument("--strategies", default="random,fk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--P", type=int, default=50)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--build-only", action="store_true", help="only build WORK/data/{pool,val,test}")
    args = p.parse_args(argv)
    if not args.archive.is_file():
        print(f"error: no CIFAR-10 archive at {args.archive} (see its README)", file=sys.stderr)
        return 1
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    folders = build_folders(
        args.archive, args.work / "data", args.pool_per_class, args.val_per_class,
        args.test_per_class,
    )  # fmt: skip
    print(f"folders built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.build_only:
        return 0
    import torch

    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "runs": [run(folders, args.work / f"out-{f}", f, args) for f in ("none", "backbone")],
    }
    print("| freeze | round wall median (s) | mean (s) | table fill (s) | whole run (s) |")
    print("|---|---|---|---|---|")
    for r in results["runs"]:
        fill = "-" if r["table_fill_s"] is None else f"{r['table_fill_s']:.1f}"
        print(f"| {r['freeze']} | {r['round_median_s']:.2f} | {r['round_mean_s']:.2f} | {fill} "
              f"| {r['wall_s']:.1f} |")  # fmt: skip
    print("\n| freeze | strategy | round | labels | select (s) | train (s) | test acc |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        for row in r["per_round"]:
            print(f"| {r['freeze']} | {row['strategy']} | {row['round']} | {row['labels']} | "
                  f"{row['select_seconds']:.2f} | {row['train_seconds']:.2f} | "
                  f"{100 * row['test_accuracy']:.1f}% |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
