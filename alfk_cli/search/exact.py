"""The exact search: the search backend, streamed inner-product top-k, greedy k-center.

The pool is never held whole: searches take an iterable of chunks and merge per-chunk results into a
running top-k. FAISS (or a GEMM) only *filters* candidates; every candidate that can reach a top-k
list is rescored canonically (float32 inputs, float64 products, which are exact, and numpy's pairwise
sum over the feature axis). The canonical score of a (query, row) pair depends on the two vectors
alone, not on where the row sits in a chunk, the chunk size, the BLAS library or the device, so
identical rows tie exactly and ties are broken by the smaller pool id. A candidate is accepted only
when an a-priori float32 error bound proves that nothing FAISS left out can beat it; otherwise the
chunk is searched again with more neighbours for the affected queries. The result is the exact
top-k under the order (score descending, id ascending), whatever the chunking.

Which library filters is one decision, :func:`search_backend`, taken once per search from the
device: FAISS on the CPU, FAISS on the GPU, or torch matmul + topk (on a CUDA device when the
installed FAISS has no GPU support). The result does not depend on it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from alfk_cli.errors import AlfkError

__all__ = [
    "BACKEND_ENV",
    "CPU_BACKEND",
    "IPScorer",
    "SearchBackend",
    "backend_choice",
    "canon_dot",
    "exact_topk_stream",
    "gamma_bound",
    "kcenter_greedy",
    "row_norms",
    "search_backend",
    "topk_ip",
]

#: Neighbours fetched per chunk beyond k, so that a tie or near-tie at the k-th place is detected.
EXTRA = 8
#: FAISS GPU k-selection limit; larger searches run on the CPU (results are identical).
GPU_MAX_K = 2048
#: Unit round-off of float32 and float64.
U32 = 2.0**-24
U64 = 2.0**-53
#: Elements of float64 scratch per canonical-rescoring block (16 MiB).
RESCORE_BLOCK = 1 << 21

_gpu_resources: Any = None


#: Environment variable that overrides the choice: ``auto`` (the default), ``faiss`` or ``torch``.
BACKEND_ENV = "ALFK_SEARCH_BACKEND"


@dataclass(frozen=True)
class SearchBackend:
    """Which library computes the search's float32 filter, and the torch device of its GEMMs.

    ``faiss-cpu``: FAISS on the CPU (the GEMMs of combined kernels on ``device``, the CPU unless
    forced); ``faiss-gpu``: FAISS's GPU search (for k <= ``GPU_MAX_K``; FAISS on the CPU above it)
    and torch GEMMs on ``device``; ``torch``: torch matmul + topk on ``device`` for every kernel
    and for k-center's similarities. The selection is the same on all of them.
    """

    kind: Literal["faiss-cpu", "faiss-gpu", "torch"] = "faiss-cpu"
    device: str = "cpu"

    @property
    def torch_gemms(self) -> bool:
        """Whether k-center's similarities are torch GEMMs on ``device`` (else numpy)."""
        return self.kind != "faiss-cpu"


CPU_BACKEND = SearchBackend()


def search_backend(device: str = "cpu", prefer: str | None = None) -> SearchBackend:
    """The search backend for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): the one place
    the choice is made.

    On the CPU: FAISS. On CUDA: FAISS's GPU search when the installed FAISS has GPU support (the
    ``faiss-gpu`` wheel), else torch matmul + topk on the GPU (``faiss-cpu``, off Linux x86_64).
    ``prefer`` (default: the ``ALFK_SEARCH_BACKEND`` environment variable, else ``auto``) may
    force ``faiss`` (the CPU one where FAISS has no GPU) or ``torch`` (on the CPU too). ``cuda``
    without a CUDA device raises :class:`AlfkError`, as :func:`alfk_cli.util.devices.resolve_device`.
    """
    from alfk_cli.util.devices import parse_device, resolve_device

    choice = backend_choice(prefer)
    dev = "cpu" if parse_device(device) == "cpu" else str(resolve_device(device))  # imports torch
    if dev == "cpu":
        return SearchBackend("torch", "cpu") if choice == "torch" else CPU_BACKEND
    gpu_faiss = _faiss().get_num_gpus() > 0
    if choice == "torch" or (choice == "auto" and not gpu_faiss):
        return SearchBackend("torch", dev)
    return SearchBackend("faiss-gpu", dev) if gpu_faiss else CPU_BACKEND


def backend_choice(prefer: str | None = None) -> str:
    """``auto``, ``faiss`` or ``torch``: ``prefer``, else ``ALFK_SEARCH_BACKEND``, else ``auto``.

    Torch-free, so commands check the variable before any model pass without importing torch
    (a warm run that never searches must not pay for the import)."""
    raw = prefer if prefer is not None else os.environ.get(BACKEND_ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in ("auto", "faiss", "torch"):
        raise AlfkError(f"unknown search backend {raw!r} ({BACKEND_ENV}); use auto, faiss or torch")
    return choice


def _faiss() -> Any:
    """The faiss module, imported on first search: a run whose scores file is up to date never
    searches, and the import costs ~0.4 s of CPU."""
    import faiss

    return faiss


def _gpu_res() -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = _faiss().StandardGpuResources()
    return _gpu_resources


def gamma_bound(d: int, unit: float = U32) -> float:
    """Bound factor for a dot product of length ``d`` (any summation order), with margin, in the
    arithmetic of unit round-off ``unit`` (float32 by default)."""
    nu = (d + 2) * unit
    return 2.0 * nu / (1.0 - nu)


def row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def canon_dot(q64: np.ndarray, x: np.ndarray, qrows: np.ndarray, xrows: np.ndarray) -> np.ndarray:
    """Canonical ``q64[qrows[t]] · x[xrows[t]]`` for each t: exact float64 products of the float32
    inputs, pairwise-summed over the contiguous feature axis (independent of position and layout)."""
    m = qrows.size
    out = np.empty(m, dtype=np.float64)
    d = max(1, q64.shape[1])
    step = max(1, RESCORE_BLOCK // d)
    for a in range(0, m, step):
        b = min(m, a + step)
        prod = x[xrows[a:b]].astype(np.float64)
        prod *= q64[qrows[a:b]]
        out[a:b] = prod.sum(axis=1)
    return out


class IPScorer:
    """Inner-product scorer: the backend's flat search (FAISS on the CPU or GPU, or torch matmul +
    topk) as the filter, canonical rescoring."""

    def __init__(
        self,
        queries: np.ndarray,
        backend: SearchBackend = CPU_BACKEND,
        max_norm: float | None = None,
    ):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.q64 = self.q.astype(np.float64)
        self.qnorm = row_norms(self.q)
        self.backend = backend
        self.max_norm = max_norm
        self.gamma = gamma_bound(self.q.shape[1])
        self.x: np.ndarray | None = None
        self.bound = 0.0
        self._torch: Any = None
        if backend.kind == "torch":
            from alfk_cli.search.blockfilter import TorchQueries

            self._torch = TorchQueries(self.q, None, backend.device)

    def begin(self, payload: np.ndarray) -> None:
        x = payload
        if x.ndim != 2 or x.shape[1] != self.q.shape[1]:
            raise AlfkError(
                f"pool chunk has shape {x.shape}, expected (n, {self.q.shape[1]}) like the queries"
            )
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        if self.max_norm is None:
            xmax = float(row_norms(self.x).max())
            if not math.isfinite(xmax):
                raise AlfkError("non-finite values in the pool vectors (NaN or inf)")
            self.bound = xmax
        else:
            self.bound = self.max_norm
        if self._torch is not None:
            self._torch.begin(self.x, None)

    def eps(self, rows: np.ndarray) -> np.ndarray:
        b = self.qnorm[rows] * self.bound
        return self.gamma * b + 4 * self.q.shape[1] * U64 * b

    def _chunk(self) -> np.ndarray:
        assert self.x is not None, "begin() gives the pool chunk first"
        return self.x

    def approx(self, rows: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
        if self._torch is not None:
            return self._torch.topk(rows, kp, _inner_product)
        q = self.q if rows.size == self.q.shape[0] else self.q[rows]
        x = self._chunk()
        faiss = _faiss()
        if self.backend.kind == "faiss-gpu" and kp <= GPU_MAX_K:
            ip, gpu = faiss.METRIC_INNER_PRODUCT, _gpu_index(self.backend)
            dist, idx = faiss.knn_gpu(_gpu_res(), q, x, kp, metric=ip, device=gpu)
        else:
            dist, idx = faiss.knn(q, x, kp, faiss.METRIC_INNER_PRODUCT)
        return dist, idx

    def canon(self, qrows: np.ndarray, xrows: np.ndarray) -> np.ndarray:
        return canon_dot(self.q64, self._chunk(), qrows, xrows)


def _inner_product(s: Any, t: Any) -> Any:
    return s


def _gpu_index(backend: SearchBackend) -> int:
    """The CUDA device index FAISS should use (-1: the current device)."""
    _, _, index = backend.device.partition(":")
    return int(index) if index else -1


def exact_topk_stream(
    scorer: Any, chunks: Iterable[tuple[np.ndarray, Any]], nq: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per query over a chunked pool, ties by smaller id (internal engine).

    ``chunks`` yields ``(ids, payload)`` with ``ids`` the int64 pool ids of the payload's rows.
    ``scorer`` provides ``begin(payload)``, ``approx(rows, kp) -> (D, I)`` (any exact-by-bound
    top-kp filter), ``eps(rows)`` (bound on |approx - canonical|) and ``canon(qrows, xrows)``.
    Returns float64 canonical scores and int64 ids, ``[nq, min(k, pool size)]``.
    """
    if k < 1:
        raise AlfkError(f"k must be at least 1 (got {k})")
    best_s = np.full((nq, k), -np.inf, dtype=np.float64)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    total = 0
    for ids, payload in chunks:
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.size
        if n == 0:
            continue
        total += n
        scorer.begin(payload)
        rows = np.arange(nq)
        kp = min(n, k + max(EXTRA, k // 4))
        while rows.size:
            dist, idx = scorer.approx(rows, kp)
            if (idx < 0).any() or not np.isfinite(dist).all():
                raise AlfkError("non-finite values in the descriptors (NaN or inf)")
            eps = scorer.eps(rows)
            # Only fetched rows whose approximate score comes within eps of the running k-th
            # canonical score can enter the list; everything else is provably below it.
            need = dist >= (best_s[rows, k - 1] - eps)[:, None]
            score = np.full(dist.shape, -np.inf, dtype=np.float64)
            gid = np.full(dist.shape, -1, dtype=np.int64)
            r_idx, c_idx = np.nonzero(need)
            if r_idx.size:
                lidx = idx[r_idx, c_idx]
                score[r_idx, c_idx] = scorer.canon(rows[r_idx], lidx)
                gid[r_idx, c_idx] = ids[lidx]
            cs = np.concatenate([best_s[rows], score], axis=1)
            ci = np.concatenate([best_i[rows], gid], axis=1)
            order = np.lexsort((ci, -cs), axis=1)[:, :k]
            new_s = np.take_along_axis(cs, order, axis=1)
            new_i = np.take_along_axis(ci, order, axis=1)
            if kp >= n:
                ok = np.ones(rows.size, dtype=bool)
            else:
                # Rows FAISS left out score at most min(dist) + eps canonically: they can enter
                # the list only if that reaches the new k-th score (ties included).
                ok = dist.min(axis=1) + eps < new_s[:, k - 1]
            best_s[rows[ok]] = new_s[ok]
            best_i[rows[ok]] = new_i[ok]
            rows = rows[~ok]
            kp = min(n, 2 * kp)
    kk = min(k, total)
    return best_s[:, :kk], best_i[:, :kk]


def _normalise_chunks(
    base_chunks: Iterable[tuple[Any, Any]],
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    for first, x in base_chunks:
        x = np.asarray(x)
        if x.ndim != 2:
            raise AlfkError(f"pool chunk must be 2-D, got shape {x.shape}")
        if isinstance(first, numbers.Integral):
            ids = np.arange(int(first), int(first) + x.shape[0], dtype=np.int64)
        else:
            ids = np.asarray(first, dtype=np.int64)
            if ids.shape != (x.shape[0],):
                raise AlfkError(f"chunk ids have shape {ids.shape}, expected ({x.shape[0]},)")
        yield ids, x


def topk_ip(
    queries: np.ndarray,
    base_chunks: Iterable[tuple[Any, np.ndarray]],
    k: int,
    device: str = "cpu",
    *,
    max_norm: float | None = None,
    backend: SearchBackend | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over a pool streamed in chunks.

    ``base_chunks`` yields ``(offset, array[n_i, L])`` (rows get ids ``offset + arange(n_i)``) or
    ``(ids[n_i], array)``. Returns ``(scores [Q, k] float32, ids [Q, k] int64)`` sorted by score
    descending, equal scores by smaller id; ``k`` is clipped to the pool size. Scores are compared
    in float64 (canonical rescoring), so two float32 scores may print equal yet be ordered.
    ``max_norm``: a known upper bound on the pool rows' norms (skips one pass per chunk).
    ``backend``: the filter (default: :func:`search_backend` of ``device``).
    """
    q = np.asarray(queries)
    if q.ndim != 2:
        raise AlfkError(f"queries must be 2-D, got shape {q.shape}")
    if not np.isfinite(q).all():
        raise AlfkError("non-finite values in the queries (NaN or inf)")
    scorer = IPScorer(q, backend or search_backend(device), max_norm)
    scores, ids = exact_topk_stream(scorer, _normalise_chunks(base_chunks), q.shape[0], int(k))
    return scores.astype(np.float32), ids


def kcenter_greedy(
    sim_to: Callable[[int], np.ndarray],
    n: int,
    n_centers: int,
    seed: int,
    *,
    canon: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    err: float = 0.0,
) -> np.ndarray:
    """Farthest-first greedy k-center in a similarity space.

    Starts from ``int(np.random.default_rng(seed).integers(n))``, then repeatedly adds the point
    whose best (maximum) similarity to the chosen centres is lowest, ties to the smallest index.
    ``sim_to(i)`` returns the similarities of all ``n`` points to point ``i``. Returns the centres
    (int64) in the order chosen; ``n_centers`` is clipped to ``n``.

    With ``canon(rows, centres)`` (the exact similarity of each pair ``rows[t]``, ``centres[t]``)
    and ``err`` (a bound on ``|sim_to − canon|`` for every pair), ``sim_to`` only filters: each
    pick is decided by ``canon`` among the points whose filtered best similarity comes within
    ``2·err`` of the lowest, which provably holds the exact pick, so the centres do not depend
    on how (BLAS, device) ``sim_to`` rounds.
    """
    n_centers = min(int(n_centers), int(n))
    if n_centers <= 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    first = int(rng.integers(n))
    centers = [first]
    best = np.array(sim_to(first), dtype=np.float64, copy=True).reshape(-1)
    if best.shape != (n,):
        raise AlfkError(f"sim_to returned shape {best.shape}, expected ({n},)")
    best[first] = np.inf
    exact = None if canon is None else _CanonicalBest(canon, n)
    for _ in range(1, n_centers):
        nxt = int(np.argmin(best))  # first occurrence: ties go to the smallest index
        if exact is not None:
            near = np.flatnonzero(best <= best[nxt] + 2 * err)
            if near.size > 1:  # a near-tie within the filter's error: canonical values decide
                nxt = exact.argmin(near, centers)
        centers.append(nxt)
        np.maximum(best, np.asarray(sim_to(nxt), dtype=np.float64).reshape(-1), out=best)
        best[nxt] = np.inf
    return np.asarray(centers, dtype=np.int64)


class _CanonicalBest:
    """Each point's exact best similarity to the chosen centres, brought up to date lazily: only
    points that come near the minimum are ever rescored, and each against new centres only."""

    def __init__(self, canon: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int):
        self.canon = canon
        self.best = np.full(n, -np.inf)
        self.upto = np.zeros(n, dtype=np.int64)  # centres already folded into ``best``

    def argmin(self, rows: np.ndarray, centers: list[int]) -> int:
        """The row of ``rows`` (ascending) with the lowest exact best similarity, ties to the
        smallest."""
        todo = len(centers) - self.upto[rows]
        pair_rows = np.repeat(rows, todo)
        starts = np.repeat(self.upto[rows] - np.cumsum(todo) + todo, todo)
        pair_centres = np.asarray(centers, dtype=np.int64)[np.arange(pair_rows.size) + starts]
        if pair_rows.size:
            np.maximum.at(self.best, pair_rows, self.canon(pair_rows, pair_centres))
        self.upto[rows] = len(centers)
        return int(rows[np.argmin(self.best[rows])])  # first occurrence: the smallest row
