"""The exact pool search split across torchrun ranks: each rank searches a contiguous range of
pool rows, and the per-rank top-k lists are merged into the single-process result.

``search.exact_topk_stream`` is exact under the order (score descending, id ascending) whatever
the chunking, with canonical float64 scores that depend on the two vectors alone; so the top k
of the union of the ranks' ranges is the top k of the union of their top-k lists, under the same
order (``merge_topk``), bit for bit. Every rank gets the merged lists, so loops around the
search (``acquisition.select`` doubling k) run in lockstep and decide alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from alfk_cli.search.exact import exact_topk_stream
from alfk_cli.util import distributed

__all__ = ["merge_topk", "rank_range", "sharded_topk"]


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` rows."""
    return rank * n // world, (rank + 1) * n // world


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` per query of several ``(scores [Q, k_i], ids [Q, k_i])`` lists over
    disjoint row sets, by score descending then id ascending (as ``exact_topk_stream``)."""
    scores = np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    keep = min(int(k), scores.shape[1])
    order = np.lexsort((ids, -scores), axis=1)[:, :keep]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def sharded_topk(
    scorer: Any,
    chunks: Callable[[int, int], Iterable[tuple[np.ndarray, Any]]],
    n: int,
    nq: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``exact_topk_stream`` over rows ``[0, n)``, this rank searching its ``rank_range`` only
    (``chunks(lo, hi)`` yields that range's chunks); every rank returns the merged result."""
    world = distributed.world()
    if world == 1:
        return exact_topk_stream(scorer, chunks(0, n), nq, k)
    lo, hi = rank_range(n, distributed.rank(), world)
    mine = exact_topk_stream(scorer, chunks(lo, hi), nq, k)
    return merge_topk(distributed.all_gather(mine), k)
