"""The maths of the baseline strategies (docs/algorithm.md §9-§10; registered in ``strategies``).

Uncertainty scores (entropy, margin, variation ratio, BALD) from softmax probabilities, MC-dropout
sampling of those probabilities, random draws and the Sener & Savarese core-set greedy. Every
score is "higher = pick first"; ``top_p`` turns scores into rows, ties to the smaller row. All of
it is exact and deterministic for fixed inputs and seeds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from alfk_cli.data.inputspec import InputSpec

# torch only for MC dropout (imported there): the strategies that hold these scores are looked
# up before any model pass, by runs that may need none.


def _available_rows(P: int, available: np.ndarray) -> np.ndarray:
    available = np.asarray(available, dtype=bool).reshape(-1)
    rows = np.flatnonzero(available)
    if P < 0:
        raise AlfkError(f"cannot pick a negative number of rows ({P})")
    if P > rows.size:
        raise AlfkError(f"asked for {P} rows but only {rows.size} are available")
    return rows


def top_p(scores: np.ndarray, P: int, available: np.ndarray) -> np.ndarray:
    """Rows of the ``P`` highest scores among the available rows; ties go to the smaller row."""
    scores = np.asarray(scores).reshape(-1)
    if scores.shape[0] != np.asarray(available).reshape(-1).shape[0]:
        raise AlfkError(f"{scores.shape[0]} scores for {np.asarray(available).size} rows")
    rows = _available_rows(int(P), available)
    s = scores[rows].astype(np.float64)
    if np.isnan(s).any():
        raise AlfkError("acquisition scores contain NaN")
    order = np.argsort(-s, kind="stable")  # rows ascend, so a stable sort keeps ties by row
    return rows[order[: int(P)]].astype(np.int64)


def random_rows(P: int, available: np.ndarray, seed: int) -> np.ndarray:
    """``P`` distinct available rows drawn with ``np.random.default_rng(seed)``, in draw order."""
    rows = _available_rows(int(P), available)
    rng = np.random.default_rng(seed)
    return rng.choice(rows, size=int(P), replace=False).astype(np.int64)


def _plogp(p: np.ndarray) -> np.ndarray:
    """p·log p with 0·log 0 = 0 (float64)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    pos = p > 0
    out[pos] = p[pos] * np.log(p[pos])
    return out


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats: [N, D] -> [N]."""
    return -_plogp(probs).sum(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Negative gap between the two largest probabilities: [N, D] -> [N]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] < 2:
        raise AlfkError("margin needs at least two classes")
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
    return -(top2[..., 1] - top2[..., 0])


def variation_ratio(mc_probs: np.ndarray) -> np.ndarray:
    """1 − (votes for the modal argmax class)/K over K MC samples: [K, N, D] -> [N]."""
    p = np.asarray(mc_probs)
    k, n, d = p.shape
    votes = p.argmax(axis=-1)  # [K, N]
    counts = np.zeros((n, d), dtype=np.int64)
    cols = np.arange(n)
    for v in votes:
        counts[cols, v] += 1
    return 1.0 - counts.max(axis=1) / k


def bald(mc_probs: np.ndarray) -> np.ndarray:
    """Mutual information H(mean_k p_k) − mean_k H(p_k): [K, N, D] -> [N]."""
    p = np.asarray(mc_probs, dtype=np.float64)
    return entropy(p.mean(axis=0)) - entropy(p).mean(axis=0)


def mc_dropout_probs(
    model: nn.Module,
    images: torch.Tensor,
    spec: InputSpec,
    K: int,
    seed: int,
    device: torch.device | str,
    batch_size: int = 512,
) -> np.ndarray:
    """Softmax probabilities [K, N, D] (float32) from ``K`` stochastic forward passes.

    Only the dropout modules run in train mode; everything else (batch norm included) stays in
    eval mode. ``images`` are uint8 [N, C, H, W] as decoded; they are normalised per batch. The
    passes run under ``torch.random.fork_rng`` seeded with ``seed``, so the caller's RNG state is
    untouched and the same seed (and batch size) gives the same probabilities. The model is moved
    to ``device``; its train/eval flags are restored afterwards.
    """
    import torch

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise AlfkError(
            f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if int(batch_size) < 1:
        raise AlfkError("K and batch_size must be at least 1")
    n, b = images.shape[0], int(batch_size)
    batches = (images[s : s + b] for s in range(0, n, b))
    return mc_dropout_batches(model, batches, n, spec, K, seed, device)


def mc_dropout_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    n: int,
    spec: InputSpec,
    K: int,
    seed: int,
    device: torch.device | str,
) -> np.ndarray:
    """:func:`mc_dropout_probs` over ``n`` images that come in uint8 batches (decoded on demand):
    the same probabilities as for the images in one tensor cut into batches of the same sizes."""
    import torch

    from alfk_cli.data.decode import normalizer
    from alfk_cli.util.reproducible import cuda_devices

    dropout = torch.nn.modules.dropout._DropoutNd  # Dropout, Dropout1d/2d/3d, AlphaDropout, ...
    drops = [m for m in model.modules() if isinstance(m, dropout)]
    if not drops:
        raise AlfkError("MC dropout needs a model with dropout; lenet has it, resnets do not")
    K = int(K)
    if K < 1:
        raise AlfkError("K and batch_size must be at least 1")
    device = torch.device(device)
    norm = normalizer(spec)
    flags = {m: m.training for m in model.modules()}
    model.to(device)
    out: np.ndarray | None = None
    start = 0
    try:
        model.eval()
        for m in drops:
            m.train()
        with torch.random.fork_rng(devices=cuda_devices(device)), torch.no_grad():
            torch.manual_seed(int(seed))
            for batch in batches:
                x = norm(batch.to(device))
                for k in range(K):
                    p = torch.softmax(model(x).float(), dim=1).cpu().numpy()
                    if out is None:
                        out = np.empty((K, n, p.shape[1]), dtype=np.float32)
                    out[k, start : start + x.shape[0]] = p
                start += x.shape[0]
    finally:
        for module, flag in flags.items():
            module.train(flag)
    if out is None:  # no images
        d = getattr(model, "num_classes", 0)
        out = np.empty((K, 0, d), dtype=np.float32)
    return out


def coreset_rows(
    features: np.ndarray, labelled: np.ndarray, P: int, available: np.ndarray
) -> np.ndarray:
    """Sener & Savarese core-set: greedy k-center with Euclidean distance, ``P`` picks in order.

    The labelled rows are the initial centres; with none labelled, the first pick is the available
    row closest to the mean of the available features. Each further pick is the available row
    whose distance to its nearest centre is largest (ties to the smaller row). Squared distances
    are compared (same order); only an [N'] running minimum is kept, updated once per centre.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise AlfkError(f"features must be [N, F], got shape {x.shape}")
    n = x.shape[0]
    labelled = np.asarray(labelled, dtype=bool).reshape(-1)
    available = np.asarray(available, dtype=bool).reshape(-1)
    if labelled.shape[0] != n or available.shape[0] != n:
        raise AlfkError("features, labelled and available must have the same number of rows")
    P = int(P)
    rows = _available_rows(P, available)
    if P == 0:
        return np.empty(0, dtype=np.int64)
    xa = x[rows]
    best = np.full(rows.size, np.inf)

    def add_centre(c: np.ndarray) -> None:
        diff = xa - c
        np.minimum(best, np.einsum("ij,ij->i", diff, diff), out=best)

    picked: list[int] = []
    centres = np.flatnonzero(labelled)
    if centres.size == 0:
        diff = xa - xa.mean(axis=0)
        first = int(np.argmin(np.einsum("ij,ij->i", diff, diff)))
        picked.append(first)
        add_centre(xa[first])
        best[first] = -np.inf
    else:
        for c in centres:
            add_centre(x[c])
    while len(picked) < P:
        nxt = int(np.argmax(best))  # first occurrence: ties to the smaller row
        picked.append(nxt)
        add_centre(xa[nxt])
        best[nxt] = -np.inf  # never picked twice, even among duplicates at distance 0
    return rows[np.asarray(picked, dtype=np.int64)].astype(np.int64)


def balanced_top(
    scores: np.ndarray, predicted: np.ndarray, quotas: np.ndarray, available: np.ndarray
) -> np.ndarray:
    """Rows by score within per-predicted-class quotas: class d gets its ``quotas[d]`` best
    available rows predicted as d; a class with too few such rows leaves its shortfall to the
    best remaining rows of any class. Rows come back by score descending, ties to the smaller
    row, like :func:`top_p`."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    P = int(np.sum(quotas))
    rows = _available_rows(P, available)
    if np.isnan(scores[rows]).any():
        raise AlfkError("acquisition scores contain NaN")
    ranked = rows[np.argsort(-scores[rows], kind="stable")]  # score desc, row asc
    chosen = np.zeros(len(scores), dtype=bool)
    for d, q in enumerate(np.asarray(quotas, dtype=np.int64)):
        chosen[ranked[predicted[ranked] == d][:q]] = True
    short = P - int(chosen.sum())
    if short:
        chosen[ranked[~chosen[ranked]][:short]] = True
    return ranked[chosen[ranked]].astype(np.int64)
