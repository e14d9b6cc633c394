"""``MCConfig``: the Monte-Carlo settings of the ``mc_trace`` and ``mc_mi`` pseudo-labels.

A leaf with no torch import: the settings are part of every embed's options and of a store's
configuration, which a run with nothing to compute still compares (the maths is in
``features.pseudolabels``, docs/algorithm.md §3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MCConfig:
    samples: int = 32  # K perturbed copies per image
    max_degrees: float = 5.0  # rotations uniform in [-max_degrees, +max_degrees] degrees
    noise_std: float = 0.01  # Gaussian pixel noise on the [0, 1] scale, before normalisation
    ridge: float = 1e-3  # ε of the scale-free ridge of mc_mi
    trace_centered: bool = False  # mc_trace: centre the samples over K (textbook covariance)
    mi_pick: str = "min"  # mc_mi: argmin_d of the MI (measured: the label); "max" = paper's text
    pixel_budget: int = 1 << 25  # at most this many input values per forward (memory bound)

    def params(self) -> dict:
        """What determines the labels (for store fingerprints)."""
        d = asdict(self)
        d.pop("pixel_budget")
        return d


__all__ = ["MCConfig"]
