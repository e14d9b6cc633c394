"""Learning curves and summary tables of a simulation's results (paper Fig. 4 style).

matplotlib is optional (``pip install 'alfk[plot]'``); it is imported only by ``plot_results``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alfk_cli.errors import AlfkError


def _rows(results: str | Path | Sequence[dict]) -> list[dict]:
    if isinstance(results, (str, Path)):
        from alfk_cli.simulate.results import read_results

        return read_results(results)
    return list(results)


def _strategies(rows: Sequence[dict]) -> list[str]:
    """Strategies in order of first appearance."""
    return list(dict.fromkeys(r["strategy"] for r in rows))


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / len(vals)
    return m, math.sqrt(var)


def curves(rows: Sequence[dict], field: str) -> dict[str, list[tuple[int, float, float, int]]]:
    """{strategy: [(labels, mean, std over seeds, seeds), ...]} by increasing labels."""
    by: dict[str, dict[int, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["strategy"]][int(r["labels"])].append(r.get(field))
    out = {}
    for s in _strategies(rows):
        pts = []
        for labels in sorted(by[s]):
            m, sd = _mean_std(by[s][labels])
            pts.append((labels, m, sd, len(by[s][labels])))
        out[s] = pts
    return out


def _rare_title(rare: Sequence[Any] | None) -> str:
    return f"rare classes ({','.join(map(str, rare))})" if rare else "rare classes"


def plot_results(
    results: str | Path | Sequence[dict],
    out_png: str | Path,
    rare: Sequence[Any] | None = None,
    title: str | None = None,
) -> Path:
    """Mean ± std (over seeds) test accuracy and rare-class accuracy against labels used, one line
    per strategy, written to ``out_png``. ``results`` is a results folder or file, or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AlfkError("plotting needs matplotlib: pip install 'alfk[plot]'") from None
    from alfk_cli.util.atomic import atomic_output

    rows = _rows(results)
    if not rows:
        raise AlfkError("no results to plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (
        ("test_accuracy", "test accuracy"),
        ("rare_accuracy", f"{_rare_title(rare)} accuracy"),
    )
    for ax, (field, label) in zip(axes, panels):
        for s, pts in curves(rows, field).items():
            pts = [p for p in pts if not math.isnan(p[1])]
            if not pts:
                continue
            x = [p[0] for p in pts]
            m = [100 * p[1] for p in pts]
            sd = [100 * p[2] for p in pts]
            (line,) = ax.plot(x, m, marker="o", markersize=3, label=s)
            ax.fill_between(
                x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                color=line.get_color(), alpha=0.2, linewidth=0,
            )  # fmt: skip
        ax.set_xlabel("labelled images")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(True, alpha=0.3)
    seeds = len({r["seed"] for r in rows})
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"active learning curves (mean ± std over {seeds} seed(s))")
    out_png = Path(out_png)
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_png


def labels_to_reach(rows: Sequence[dict], target_accuracy: float) -> dict[str, float | None]:
    """{strategy: mean over seeds of the fewest labels at which test accuracy ≥ target}.

    None when some seed never reaches the target (a mean over the seeds that did would flatter
    the strategy). ``target_accuracy`` is a fraction (0.9 = 90%).
    """
    rows = _rows(rows)
    first: dict[str, dict[int, int | None]] = defaultdict(dict)
    for r in sorted(rows, key=lambda r: (r["strategy"], r["seed"], r["labels"])):
        per_seed = first[r["strategy"]]
        per_seed.setdefault(r["seed"], None)
        if per_seed[r["seed"]] is None and (r.get("test_accuracy") or 0) >= target_accuracy:
            per_seed[r["seed"]] = int(r["labels"])
    out: dict[str, float | None] = {}
    for s in _strategies(rows):
        reached = list(first[s].values())
        counts = [v for v in reached if v is not None]
        out[s] = None if len(counts) < len(reached) else sum(counts) / len(counts)
    return out


def summary_table(rows: Sequence[dict], rare: Sequence[Any] | None = None) -> str:
    """A Markdown table: one line per strategy, one column per number of labels, cells
    ``test ± std (rare mean)`` in percent over seeds."""
    rows = _rows(rows)
    test = curves(rows, "test_accuracy")
    rare_c = curves(rows, "rare_accuracy")
    labels = sorted({int(r["labels"]) for r in rows})
    head = "| strategy | " + " | ".join(f"{n} labels" for n in labels) + " |"
    lines = [
        f"Test accuracy % (mean ± std over seeds), {_rare_title(rare)} accuracy % in brackets.",
        "",
        head,
        "|---|" + "---:|" * len(labels),
    ]
    for s in _strategies(rows):
        t = {p[0]: p for p in test[s]}
        rr = {p[0]: p for p in rare_c[s]}
        cells = []
        for n in labels:
            if n not in t:
                cells.append("")
                continue
            cell = f"{100 * t[n][1]:.1f} ± {100 * t[n][2]:.1f}"
            if n in rr and not math.isnan(rr[n][1]):
                cell += f" ({100 * rr[n][1]:.1f})"
            cells.append(cell)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["curves", "labels_to_reach", "plot_results", "summary_table"]
