"""SIMILAR's submodular mutual information, maximised greedily (docs/algorithm.md §9).

Kothawade et al., *SIMILAR* (NeurIPS 2021), as the DISTIL toolkit runs it (``smi.py`` with
submodlib): the ground set is the unlabelled pool, the query set Q the misclassified validation
images, both embedded by their last-layer gradients (:mod:`alfk_cli.strategies.badge`, ``bias_linear``:
the pool at its predicted label, the queries at their true label). The similarity is DISTIL's
rescaled cosine s_qa = (1 + cos(x_q, x_a))/2 ∈ [0, 1]; a zero vector has cosine 0 to everything
(scikit-learn's convention), so s = ½.

- FLQMI (submodlib's ``FacilityLocationVariantMutualInformation``, DISTIL's ``fl2mi``):
  f(A; Q) = Σ_{q∈Q} max_{a∈A} s_qa + η Σ_{a∈A} max_{q∈Q} s_qa, with max over ∅ = 0.
  The marginal gain of a is Σ_q max(0, s_qa − m_q) + η max_q s_qa, m_q = max_{a'∈A} s_qa'.
- GCMI (``GraphCutMutualInformation``): f(A; Q) = 2λ Σ_{a∈A} Σ_{q∈Q} s_qa, modular, so the greedy
  maximiser is the top P by Σ_q s_qa (λ = 1; it scales every gain alike).

FLQMI runs lazy greedy (DISTIL's default optimiser) with an exact rule: a candidate is taken
when its gain, evaluated for the current set, beats every other candidate's upper bound under the
order (gain descending, row ascending), so the picks are those of naive greedy with ties to the
smaller row. Stale bounds are re-evaluated in batches of ``LAZY_BATCH``. The first pass costs
O(N·M·(D + F)); the N×M similarities are kept when they fit in ``CACHE_ENTRIES`` (then a
re-evaluation costs O(M)), else only O(N + M) and a block of 2^22 similarities are kept and a
re-evaluation recomputes its row, O(M·(D + F)).
"""

from __future__ import annotations

import heapq

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.strategies.badge import CHUNK, GradEmbedding

__all__ = ["SMI_FUNCTIONS", "flqmi_greedy", "gcmi_top", "similarity"]

SMI_FUNCTIONS = ("flqmi", "gcmi")
#: FLQMI keeps the N×|Q| similarities (float64) when they fit in this many entries (1 GiB), else
#: recomputes the rows it re-evaluates.
CACHE_ENTRIES = 2**27
#: Stale bounds re-evaluated at once by lazy greedy.
LAZY_BATCH = 256


def similarity(pool: GradEmbedding, query: GradEmbedding) -> np.ndarray:
    """s = (1 + cosine)/2 between every pool and query embedding: [n, m] float64."""
    dots = pool.dots(query)
    npool, nq = np.sqrt(pool.sq_norms()), np.sqrt(query.sq_norms())
    denom = npool[:, None] * nq[None, :]
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return (1.0 + np.clip(cos, -1.0, 1.0)) / 2.0


def _check(pool: GradEmbedding, query: GradEmbedding, P: int) -> int:
    P = int(P)
    if P < 0 or P > len(pool):
        raise AlfkError(f"cannot pick {P} of {len(pool)} rows")
    if len(query) == 0:
        raise AlfkError("the query set is empty")
    return P


def _block(m: int) -> int:
    """Pool rows per similarity block: about 2^22 entries (32 MiB of float64) at a time."""
    return max(1, min(CHUNK, 2**22 // max(m, 1)))


def gcmi_top(
    pool: GradEmbedding, query: GradEmbedding, P: int, lam: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """GCMI greedy: (rows in pick order, their gains 2λ Σ_q s_qa); ties to the smaller row."""
    P = _check(pool, query, P)
    gain = np.empty(len(pool))
    step = _block(len(query))
    for s in range(0, len(pool), step):
        gain[s : s + step] = 2.0 * lam * similarity(pool.take(slice(s, s + step)), query).sum(1)
    order = np.argsort(-gain, kind="stable")[:P]
    return order.astype(np.int64), gain[order]


def _gains(S: np.ndarray, m: np.ndarray, modular: np.ndarray) -> np.ndarray:
    return np.maximum(S - m, 0.0).sum(axis=1) + modular


def flqmi_greedy(
    pool: GradEmbedding, query: GradEmbedding, P: int, eta: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """FLQMI lazy greedy: (rows in pick order, the marginal gain of each when picked)."""
    P = _check(pool, query, P)
    n = len(pool)
    m = np.zeros(len(query))
    modular = np.empty(n)
    bound = np.empty(n)
    cache = np.empty((n, len(query))) if n * len(query) <= CACHE_ENTRIES else None
    step = _block(len(query))
    for s in range(0, n, step):
        e = s + step
        S = similarity(pool.take(slice(s, e)), query)
        if cache is not None:
            cache[s:e] = S
        modular[s:e] = eta * S.max(axis=1)
        bound[s:e] = _gains(S, m, modular[s:e])

    def sims(rows: np.ndarray) -> np.ndarray:
        return cache[rows] if cache is not None else similarity(pool.take(rows), query)

    # entries (-gain bound, row, version): a bound is exact when its version is the current one
    heap = [(-float(g), i, 0) for i, g in enumerate(bound)]
    heapq.heapify(heap)
    version = 0
    rows: list[int] = []
    gains: list[float] = []
    while len(rows) < P:
        if heap[0][2] == version:  # exact and no bound beats it: naive greedy's pick
            neg, i, _ = heapq.heappop(heap)
            rows.append(i)
            gains.append(-neg)
            np.maximum(m, sims(np.array([i]))[0], out=m)
            version += 1
            continue
        stale: list[int] = []  # re-evaluate the best stale bounds together
        while heap and heap[0][2] != version and len(stale) < LAZY_BATCH:
            stale.append(heapq.heappop(heap)[1])
        idx = np.asarray(stale, dtype=np.int64)
        fresh = _gains(sims(idx), m, modular[idx])
        for i, g in zip(stale, fresh.tolist(), strict=True):
            heapq.heappush(heap, (-g, i, version))
    return np.asarray(rows, dtype=np.int64), np.asarray(gains)
