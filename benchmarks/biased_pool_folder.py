#!/usr/bin/env python3
"""Hard-link the pool images one ``alfk simulate`` seed keeps into a folder of their own.

``alfk simulate --imbalance R --rare ...`` biases a class-layout pool itself
(``simulate.data.biased_rows``: every common image, a seeded draw of the rare ones). This writes
exactly the images seed SEED keeps, in the same class sub-folders, so that ``alfk pretrain``
can self-supervise on exactly that pool, outside ``simulate`` (whose ``--init pretrain`` does so
per seed, cached under OUT/cache/). Hard links: nothing is copied.

    python benchmarks/biased_pool_folder.py --pool POOL --out DIR --imbalance 100 \
        --rare dog,frog,horse,ship,truck --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True, type=Path, help="class-layout pool folder")
    p.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    p.add_argument("--imbalance", type=float, default=None, help="simulate's --imbalance")
    p.add_argument("--rare", default="5,6,7,8,9", help="simulate's --rare")
    p.add_argument("--seed", type=int, default=0, help="the simulate seed whose pool to link")
    args = p.parse_args(argv)
    from alfk_cli.data.scan import scan_images
    from alfk_cli.errors import AlfkError
    from alfk_cli.simulate.data import biased_rows, resolve_rare

    try:
        if args.out.exists():
            raise AlfkError(f"{args.out} exists; choose a new folder")
        found = scan_images(args.pool, verify=False)
        if not found.labelled:
            raise AlfkError(f"the pool {args.pool} needs class sub-folders")
        rare = resolve_rare(args.rare.split(","), found.classes)
        keep = biased_rows(np.asarray(found.labels), rare, args.imbalance, args.seed)
        for i in keep:
            dest = args.out / found.paths[int(i)]
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(found.absolute(int(i)), dest)
    except (AlfkError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_rare = int(np.isin(np.asarray(found.labels)[keep], rare).sum())
    print(f"linked {len(keep)} images ({n_rare} of rare classes) under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
