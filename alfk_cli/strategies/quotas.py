"""Largest-remainder splits of a batch over classes (torch-free: the Fisher-kernel centres and
the class-balanced baselines both use it)."""

from __future__ import annotations

import numpy as np

from alfk_cli.errors import AlfkError

__all__ = ["class_quotas"]


def class_quotas(P: int, weights: np.ndarray) -> np.ndarray:
    """P split over classes in proportion to ``weights`` [D] by largest remainders (Hamilton):
    ⌊P·w_d/Σw⌋ each, then one more to the largest fractional parts, ties to the smaller class."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if (w < 0).any() or not w.sum() > 0:
        raise AlfkError("class weights must be non-negative with a positive sum")
    exact = int(P) * w / w.sum()
    quota = np.floor(exact).astype(np.int64)
    left = int(P) - int(quota.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - quota)))  # remainder desc, class asc
    quota[order[:left]] += 1
    return quota
