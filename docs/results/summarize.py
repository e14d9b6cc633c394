"""Print the Markdown summary of a simulation results folder for docs/benchmarks.md.

Usage: python docs/results/summarize.py docs/results/mnist-sample-100x [MORE_FOLDERS...]
(several folders, e.g. one per strategy, are combined)
"""

from __future__ import annotations

import statistics
import sys

from alfk_cli.plot import curves, summary_table
from alfk_cli.simulate import read_results

PRIOR = ("random", "entropy", "margin", "varR", "bald", "coreset")  # methods before the paper's
# every baseline alfk compares against (not alfk's own FK variants, nor the fk:true oracle)
OTHERS = (*PRIOR, "badge", "similar", "similar:gcmi", "balanced-entropy")


def main(folders: list[str]) -> None:
    rows = [r for f in folders for r in read_results(f)]
    print(summary_table(rows))
    test = curves(rows, "test_accuracy")
    last = max(int(r["labels"]) for r in rows)
    finals = {s: pts[-1][1] for s, pts in test.items() if pts[-1][0] == last}
    prior = {s: a for s, a in finals.items() if s in OTHERS}
    if prior:
        best, target = max(prior.items(), key=lambda kv: kv[1])
        print(
            f"Best other strategy at round 10 ({last} labels): {best}, {100 * target:.1f}% test accuracy.\n"
        )
        # read off the mean curve, as one reads the paper's figures
        reach = {
            s: next((n for n, mean, _, _ in pts if mean >= target - 1e-12), None)
            for s, pts in test.items()
        }
        print(
            "| strategy | labels for the mean curve to reach it (- = never within the run) | rare acc. % at round 4 | pseudo-label acc. % (mean over rounds) |"
        )
        print("|---|---:|---:|---:|")
        r4 = {}
        pseudo: dict[str, list[float]] = {}
        for r in rows:
            if int(r["round"]) == 4 and r.get("rare_accuracy") not in (None, ""):
                r4.setdefault(r["strategy"], []).append(float(r["rare_accuracy"]))
            if r.get("pseudo_label_accuracy") not in (None, ""):
                pseudo.setdefault(r["strategy"], []).append(float(r["pseudo_label_accuracy"]))
        for s in test:
            n = reach.get(s)
            ra = f"{100 * statistics.mean(r4[s]):.1f}" if s in r4 else "-"
            pa = f"{100 * statistics.mean(pseudo[s]):.1f}" if s in pseudo else "-"
            saved = "" if n is None else f" ({100 * (n - last) / last:+.0f}%)"
            print(f"| {s} | {'-' if n is None else f'{n:.0f}'}{saved} | {ra} | {pa} |")


if __name__ == "__main__":
    main(sys.argv[1:])
