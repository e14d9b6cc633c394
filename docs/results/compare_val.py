"""Validation accuracy of strategies across datasets: how alfk's default FK variant was chosen
(docs/benchmarks.md §4). Test accuracy is not read.

Usage: python docs/results/compare_val.py DATASET=FOLDER[,FOLDER...] [DATASET=...] [--seed S]

Per dataset and strategy: the mean over seeds of the validation accuracy after each round, then
the mean over the rounds ("val AUC"), round 1 and round 10. Only seeds every strategy of a dataset
has are used, so rows compare like with like.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(folders: list[str]) -> dict[str, dict[int, dict[int, float]]]:
    """strategy -> seed -> round -> validation accuracy."""
    out: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        for line in Path(folder, "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[r["strategy"]][int(r["seed"])][int(r["round"])] = float(r["val_accuracy"])
    return out


def main(argv: list[str]) -> None:
    only = None
    if "--seed" in argv:
        i = argv.index("--seed")
        only = {int(argv[i + 1])}
        argv = argv[:i] + argv[i + 2 :]
    datasets = [a.split("=", 1) for a in argv]
    tables = {name: load(spec.split(",")) for name, spec in datasets}
    strategies = sorted({s for t in tables.values() for s in t})
    print("| strategy | " + " | ".join(f"{n} val AUC (r1, r10)" for n, _ in datasets) + " |")
    print("|---|" + "---:|" * len(datasets))
    for s in strategies:
        cells = []
        for name, _ in datasets:
            t = tables[name]
            seeds = set.intersection(*(set(v) for v in t.values())) if t else set()
            seeds = seeds & only if only else seeds
            if s not in t or not seeds:
                cells.append("-")
                continue
            rounds = sorted(set.intersection(*(set(t[s][k]) for k in seeds)))
            curve = [100 * statistics.mean(t[s][k][b] for k in seeds) for b in rounds]
            cells.append(f"{statistics.mean(curve):.1f} ({curve[0]:.1f}, {curve[-1]:.1f})")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
