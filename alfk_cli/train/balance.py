"""Class-balanced training (``--balance``; docs/algorithm.md §8).

A labelled set gathered from a biased pool is itself skewed, and a model trained on it unweighted
under-predicts the rare classes. Two standard remedies, both computed from the labelled set's own
class counts n_c (n images, K classes present):

- ``reweight``: the cross-entropy weights each image by w_c = n / (K·n_c) (inverse class
  frequency, mean weight 1 over the set); a batch's loss is the weighted mean
  Σ w_{y_i} ℓ_i / Σ w_{y_i} (``torch.nn.functional.cross_entropy`` with ``weight``).
- ``sample``: each epoch draws n images with replacement, image i with probability ∝ 1/n_{y_i},
  so every present class is drawn equally often in expectation (``WeightedRandomSampler``'s
  draw, ``torch.multinomial`` on the training loop's seeded generator: reproducible).
- ``auto``: trains ``none``, ``reweight`` and ``sample`` from the same starting weights and
  keeps the one with the best held-out accuracy (validation data, never test; ties to that
  order). It costs three trainings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from alfk_cli.errors import AlfkError

__all__ = [
    "BALANCE_MODES",
    "TRAINED_MODES",
    "check_balance",
    "class_weights",
    "epoch_order",
    "loss",
    "sample_weights",
]

BALANCE_MODES = ("none", "reweight", "sample", "auto")
#: What ``auto`` tries, in tie-breaking order.
TRAINED_MODES = ("none", "reweight", "sample")


def check_balance(mode: str) -> str:
    if mode not in BALANCE_MODES:
        raise AlfkError(f"balance must be one of {', '.join(BALANCE_MODES)}, not {mode!r}")
    return mode


def _counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) == 0:
        raise AlfkError("no labelled images to balance")
    if y.min() < 0 or y.max() >= num_classes:
        raise AlfkError("a training label is outside the model's classes")
    return np.bincount(y, minlength=num_classes)


def class_weights(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = n/(K·n_c) for the K classes present, 1 for absent ones (no image uses it)."""
    counts = _counts(labels, num_classes)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def sample_weights(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-image draw weights 1/n_{y_i} (float64)."""
    counts = _counts(labels, num_classes)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    return torch.tensor(1.0 / counts[y], dtype=torch.float64)


def epoch_order(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch of len(weights) rows drawn with replacement ∝ ``weights``."""
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator)


def loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy, weighted per class when ``weight`` is given (weighted mean)."""
    if weight is None:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits, y, weight=weight.to(logits.device))
