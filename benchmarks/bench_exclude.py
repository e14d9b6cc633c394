"""Cost of matching a nightly exclusion list by identity (``selection.workdir.match_exclusions``).

A pool of N image paths (``dayXXX/NNNNNN.png``, files created empty on disk so that paths resolve
as in real use) and an exclusion list of M lines written the three ways a sent.txt meets it: as a
pool-relative path, as printed by a run from the pool's parent (``unlabeled/...``: the cheap
string path when run from there, a resolve otherwise), and absolute. Prints lines/s per spelling,
run from another working directory (the worst case: every line needs a ``resolve``).

    python benchmarks/bench_exclude.py --n 200000 --m 50000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from alfk_cli.selection.workdir import match_exclusions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="pool images")
    ap.add_argument("--m", type=int, default=50_000, help="exclusion lines")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data" / "unlabeled"
        paths = [f"day{i // 1000:03d}/{i:07d}.png" for i in range(args.n)]
        for d in {p.split("/")[0] for p in paths}:
            (root / d).mkdir(parents=True)
        for p in paths:
            (root / p).touch()
        elsewhere = Path(tmp) / "elsewhere"
        elsewhere.mkdir()
        os.chdir(elsewhere)
        picked = paths[:: max(1, args.n // args.m)][: args.m]
        spellings = {
            "pool-relative": picked,
            "printed from the pool's parent": [f"unlabeled/{p}" for p in picked],
            "absolute": [str(root / p) for p in picked],
        }
        print(f"pool {args.n:,} images, {len(picked):,} exclusion lines, run from another folder")
        for name, lines in spellings.items():
            sent = Path(tmp) / "data" / "sent.txt"
            sent.write_text("\n".join(lines) + "\n")
            t0 = time.perf_counter()
            found = match_exclusions(sent, root, paths)
            dt = time.perf_counter() - t0
            assert len(found.rows) == len(picked) and found.unmatched == 0
            print(f"  {name:32s} {dt:6.2f} s  {len(lines) / dt:10,.0f} lines/s")


if __name__ == "__main__":
    main()
