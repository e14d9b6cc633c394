"""Fisher-kernel acquisition (docs/algorithm.md §4-6): standardise, pick centres, search, select.

Pure numerics: arrays (or h5py datasets) in, pool row indices out. The pool is streamed in chunks of
``chunk_rows`` rows for standardisation and search, so it is never held whole.

Kernels (``ẑ``, ``ĝ`` = per-scale-slice standardised z and g):

- ``sum``: ``R_z + R_g`` = inner product of ``[ẑ; ĝ]`` (the authors' code; one FAISS search).
- ``pcc``: ``R_z`` alone (the paper's PCC baseline; FAISS over ``ẑ``).
- ``product``: ``R_z ∘ R_g`` (the paper's PFK); exact, blocked torch GEMMs with a running top-k.

Every score that decides an order is a canonical float64 rescoring (see :mod:`alfk_cli.search`), so
the selection is the same for any ``chunk_rows``, device or BLAS library, and identical pool rows
tie exactly and are broken by the smaller pool id.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.search import (
    U32,
    U64,
    _canon_dot,
    _gamma,
    _IPScorer,
    _row_norms,
    exact_topk_stream,
    kcenter_greedy,
    use_gpu,
)

__all__ = [
    "KERNELS",
    "Descriptors",
    "Selection",
    "choose_centers",
    "misclassified",
    "rank_major_select",
    "select",
    "standardize",
]

KERNELS = ("sum", "pcc", "product")

#: Largest candidate set whose k-center similarity matrix is precomputed (float32, 512 MiB).
GRAM_MAX_ROWS = 11585
#: Scratch budget (bytes) for the two blocks of product-kernel scores (about 8k pool columns per
#: block for 1250 centres: fast GEMMs, and the multiply and top-k still run from cache-warm memory).
PRODUCT_BLOCK_BYTES = 80 << 20
#: Rows per thread below which standardisation stays single-threaded.
STANDARDIZE_ROWS_PER_THREAD = 4096
#: Bytes of input standardised per block (fits in cache together with its output).
STANDARDIZE_BLOCK_BYTES = 3 << 20


@dataclass
class Descriptors:
    """One embedded image set: ``z``/``g`` are ``[N, L]`` arrays or h5py datasets."""

    z: Any
    g: Any
    scale_dims: Sequence[int]
    logits: Any = None
    labels: Any = None


@dataclass
class Selection:
    """Result of :func:`select`.

    ``selected``: pool rows in selection order; ``score``: kernel similarity of each to the centre
    that picked it; ``center``: that centre's validation row; ``centers``: all centres (validation
    rows, in the order chosen); ``fallback``: no validation image was misclassified, so the whole
    validation set was the candidate set; ``k_used``: neighbours per centre searched.
    """

    selected: np.ndarray
    score: np.ndarray
    center: np.ndarray
    centers: np.ndarray
    fallback: bool
    kernel: str
    k_used: int


# ----------------------------------------------------------------------------- standardisation


def _check_dims(scale_dims: Sequence[int], width: int) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in np.asarray(scale_dims).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise AlfkError(f"scale_dims must be integers, got {scale_dims!r}") from exc
    if not dims or min(dims) < 1 or sum(dims) != width:
        raise AlfkError(f"scale_dims {list(dims)} must be positive and sum to L={width}")
    return dims


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_pool: ThreadPoolExecutor | None = None


def _standardize_into(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
    """Write the per-row, per-slice standardisation of ``src`` into ``dst`` (float32, same shape).

    Row-wise operations only, so identical rows give bit-identical results wherever they sit.
    Rows are processed in cache-sized blocks (the passes over a block hit the cache, not memory),
    and large inputs are split over threads (numpy releases the GIL in these loops).
    """
    global _pool
    if src.dtype != np.float32 and src.dtype != np.float64:
        src = np.asarray(src, dtype=np.float32)
    n = src.shape[0]
    parts = min(_threads(), n // STANDARDIZE_ROWS_PER_THREAD)
    if parts <= 1:
        _standardize_blocks(dst, src, dims)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="alfk-std")
    bounds = np.linspace(0, n, parts + 1).astype(int)
    jobs = [
        _pool.submit(_standardize_blocks, dst[a:b], src[a:b], dims)
        for a, b in itertools.pairwise(bounds)
    ]
    for job in jobs:
        job.result()


def _standardize_blocks(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
    step = max(1, STANDARDIZE_BLOCK_BYTES // (4 * max(1, src.shape[1])))
    for a in range(0, src.shape[0], step):
        _standardize_rows(dst[a : a + step], src[a : a + step], dims)


def _standardize_rows(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
    off = 0
    for width in dims:
        s = src[:, off : off + width]
        d = dst[:, off : off + width]
        off += width
        if width == 1:
            if not np.isfinite(s).all():
                raise AlfkError("non-finite values in the descriptors (NaN or inf)")
            d[...] = 0
            continue
        mean = s.mean(axis=1, keepdims=True)
        if not np.isfinite(mean).all():
            raise AlfkError("non-finite values in the descriptors (NaN or inf)")
        np.subtract(s, mean, out=d, casting="same_kind")
        ss = np.einsum("ij,ij->i", d, d)
        # Rows whose spread is at rounding level: zero them only if truly constant.
        sus = np.flatnonzero(ss <= width * np.square(1e-4 * np.abs(mean[:, 0])))
        good = ss > 0
        if sus.size:
            raw = np.asarray(s[sus])
            good[sus[(raw == raw[:, :1]).all(axis=1)]] = False
        scale = np.zeros(ss.shape, dtype=np.float32)
        scale[good] = 1.0 / np.sqrt(ss[good] / np.float32(width - 1))
        d *= scale[:, None]


def standardize(x: np.ndarray, scale_dims: Sequence[int]) -> np.ndarray:
    """Standardise each row, each scale slice separately (own mean, own std with ddof=1).

    Over a slice of width L_j, ``ẑ_a · ẑ_b = (L_j - 1) · PCC(a_j, b_j)``. A constant slice (or one
    of width 1) becomes zeros. Returns a new float32 array.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise AlfkError(f"descriptors must be 2-D, got shape {x.shape}")
    dims = _check_dims(scale_dims, x.shape[1])
    out = np.empty(x.shape, dtype=np.float32)
    _standardize_into(out, x, dims)
    return out


def _norm_bound(dims: Sequence[int]) -> float:
    """Upper bound on the squared norm of a float32-standardised vector with these slices."""
    b = float(sum(d - 1 for d in dims))
    return b * (1.0 + 8.0 * (max(dims) + 2) * U32) + 1e-6


# ----------------------------------------------------------------------------- weak supervision


def misclassified(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows whose argmax prediction differs from the label (int64, ascending)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise AlfkError(f"logits {logits.shape} and labels {labels.shape} do not match")
    return np.flatnonzero(np.argmax(logits, axis=1) != labels).astype(np.int64)


def _similarity(kernel: str, z: np.ndarray, g: np.ndarray | None):
    """``sim_to(i)`` over the standardised candidates in the kernel's space."""
    n = z.shape[0]

    def block(a: int, b: int, rows: np.ndarray | None = None) -> np.ndarray:
        zz = z[a:b] if rows is None else z[rows]
        gg = None if g is None else (g[a:b] if rows is None else g[rows])
        if kernel == "pcc":
            return zz @ z.T
        if kernel == "sum":
            return zz @ z.T + gg @ g.T
        return (zz @ z.T) * (gg @ g.T)

    if n <= GRAM_MAX_ROWS:
        gram = np.empty((n, n), dtype=np.float32)
        step = 1024
        for a in range(0, n, step):
            gram[a : a + step] = block(a, min(n, a + step))
        return lambda i: gram[i]
    return lambda i: block(0, 0, np.array([i]))[0]


def choose_centers(
    val_z: Any,
    val_g: Any,
    val_logits: Any,
    val_labels: Any,
    scale_dims: Sequence[int],
    P: int,
    kernel: str,
    seed: int,
) -> tuple[np.ndarray, bool]:
    """Centres for one round (Alg. 1 lines 3-7): validation rows, int64, plus the fallback flag.

    M' = misclassified rows. M' <= P: all of them, in index order. Otherwise greedy k-center over
    them in the kernel's similarity space to P centres. M' = 0: the whole validation set is the
    candidate set instead (same rule) and ``fallback`` is True.
    """
    if kernel not in KERNELS:
        raise AlfkError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    P = _positive_int(P, "P")
    if val_logits is None or val_labels is None:
        raise AlfkError("the validation descriptors need logits and labels")
    labels = np.asarray(val_labels).reshape(-1)
    if labels.size == 0:
        raise AlfkError("the validation set is empty")
    if (labels < 0).any():
        raise AlfkError("the validation set has unlabelled rows (label -1)")
    n_val = np.shape(val_z)[0]
    if n_val != labels.size:
        raise AlfkError(f"validation z has {n_val} rows but {labels.size} labels")
    mis = misclassified(val_logits, labels)
    fallback = mis.size == 0
    cand = np.arange(labels.size, dtype=np.int64) if fallback else mis
    if cand.size <= P:
        return cand, fallback
    z_all = np.asarray(val_z)
    dims = _check_dims(scale_dims, z_all.shape[1])
    z = standardize(z_all[cand], dims)
    g = None
    if kernel != "pcc":
        g = standardize(np.asarray(val_g)[cand], dims)
    chosen = kcenter_greedy(_similarity(kernel, z, g), cand.size, P, seed)
    return cand[chosen], fallback


# ----------------------------------------------------------------------------- selection walk


def rank_major_select(
    cand_ids: np.ndarray, cand_scores: np.ndarray, P: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walk the centres' candidate lists rank-major until P unique pool ids are taken.

    Rank 0 of every centre first, ordered by score descending (ties: smaller centre row), then rank
    1, and so on; ids already taken (and padding ids < 0) are skipped. Returns ``(selected int64,
    scores float32, center_rank int64)`` — at most P entries; fewer when the lists run out.
    """
    ids = np.asarray(cand_ids, dtype=np.int64)
    scores = np.asarray(cand_scores)
    if ids.ndim != 2 or ids.shape != scores.shape:
        raise AlfkError(f"candidate ids {ids.shape} and scores {scores.shape} must be equal 2-D")
    n_c, k = ids.shape
    rows = np.arange(n_c)
    taken: set[int] = set()
    sel: list[int] = []
    sel_s: list[float] = []
    sel_c: list[int] = []
    for r in range(k):
        if len(sel) >= P:
            break
        col_i = ids[:, r]
        col_s = scores[:, r]
        for c in np.lexsort((rows, -col_s)):
            j = int(col_i[c])
            if j < 0 or j in taken:
                continue
            taken.add(j)
            sel.append(j)
            sel_s.append(col_s[c])
            sel_c.append(int(c))
            if len(sel) >= P:
                break
    return (
        np.asarray(sel, dtype=np.int64),
        np.asarray(sel_s, dtype=np.float32),
        np.asarray(sel_c, dtype=np.int64),
    )


# ----------------------------------------------------------------------------- product kernel


class _ProductScorer:
    """``(ẑ·ẑ)(ĝ·ĝ)``: blocked float32 torch GEMMs + top-k as the filter, canonical rescoring."""

    def __init__(self, qz: np.ndarray, qg: np.ndarray, gpu: bool, bz: float, bg: float):
        import torch

        self.torch = torch
        self.dev = torch.device("cuda" if gpu else "cpu")
        self.qz = np.ascontiguousarray(qz, dtype=np.float32)
        self.qg = np.ascontiguousarray(qg, dtype=np.float32)
        self.qz64 = self.qz.astype(np.float64)
        self.qg64 = self.qg.astype(np.float64)
        self.nz = _row_norms(self.qz)
        self.ng = _row_norms(self.qg)
        self.tqz = torch.from_numpy(self.qz).to(self.dev)
        self.tqg = torch.from_numpy(self.qg).to(self.dev)
        self.gz = _gamma(self.qz.shape[1])
        self.gg = _gamma(self.qg.shape[1])
        self.bz, self.bg = bz, bg
        self.dim = self.qz.shape[1] + self.qg.shape[1]

    def begin(self, payload: tuple[np.ndarray, np.ndarray]) -> None:
        self.xz, self.xg = payload
        self.txz = self.torch.from_numpy(self.xz).to(self.dev)
        self.txg = self.torch.from_numpy(self.xg).to(self.dev)

    def eps(self, rows: np.ndarray) -> np.ndarray:
        bz = self.nz[rows] * self.bz
        bg = self.ng[rows] * self.bg
        ez = self.gz * bz
        eg = self.gg * bg
        return (
            ez * bg + eg * bz + ez * eg + 2 * U32 * (bz + ez) * (bg + eg)
        ) + 8 * self.dim * U64 * bz * bg

    def approx(self, rows: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        if rows.size == self.qz.shape[0]:
            qz, qg = self.tqz, self.tqg
        else:
            sel = torch.from_numpy(rows).to(self.dev)
            qz, qg = self.tqz[sel], self.tqg[sel]
        n = self.txz.shape[0]
        nr = rows.size
        step = min(n, max(kp, PRODUCT_BLOCK_BYTES // (8 * max(1, nr))))
        # Two score blocks reused across the chunk (fresh large buffers cost page faults).
        flat_z = torch.empty(nr * step, dtype=torch.float32, device=self.dev)
        flat_g = torch.empty(nr * step, dtype=torch.float32, device=self.dev)
        best_v = best_i = None
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # no TF32/bf16: the error bound needs fp32
        try:
            for a in range(0, n, step):
                b = min(n, a + step)
                s = flat_z[: nr * (b - a)].view(nr, b - a)
                t = flat_g[: nr * (b - a)].view(nr, b - a)
                torch.matmul(qz, self.txz[a:b].T, out=s)
                torch.matmul(qg, self.txg[a:b].T, out=t)
                s.mul_(t)
                v, i = torch.topk(s, min(kp, b - a), dim=1)
                i += a
                if best_v is not None:
                    v = torch.cat([best_v, v], dim=1)
                    i = torch.cat([best_i, i], dim=1)
                    v, pos = torch.topk(v, min(kp, v.shape[1]), dim=1)
                    i = torch.gather(i, 1, pos)
                best_v, best_i = v, i
        finally:
            torch.set_float32_matmul_precision(prev)
        return best_v.cpu().numpy(), best_i.cpu().numpy().astype(np.int64)

    def canon(self, qrows: np.ndarray, xrows: np.ndarray) -> np.ndarray:
        rz = _canon_dot(self.qz64, self.xz, qrows, xrows)
        return rz * _canon_dot(self.qg64, self.xg, qrows, xrows)


# ----------------------------------------------------------------------------- select


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _positive_int(value: Any, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError) as exc:
        raise AlfkError(f"{name} must be a positive integer, got {value!r}") from exc
    if v != value or v < 1:
        raise AlfkError(f"{name} must be a positive integer, got {value!r}")
    return v


def _keep_mask(exclude: Any, n: int) -> np.ndarray | None:
    """Boolean mask of pool rows to search, or None when nothing is excluded."""
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.dtype == bool:
        if ex.shape != (n,):
            raise AlfkError(f"exclude mask has shape {ex.shape}, expected ({n},)")
        keep = ~ex
    else:
        ex = ex.reshape(-1)
        if ex.size == 0:
            return None
        if not np.issubdtype(ex.dtype, np.integer):
            raise AlfkError("exclude must be a boolean mask or an array of pool row indices")
        if ex.min() < 0 or ex.max() >= n:
            raise AlfkError(f"exclude holds row indices outside the pool [0, {n})")
        keep = np.ones(n, dtype=bool)
        keep[ex] = False
    return None if keep.all() else keep


def _pool_chunks(
    pz: Any, pg: Any, dims: Sequence[int], keep: np.ndarray | None, chunk_rows: int, kernel: str
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(ids, standardised payload)`` per chunk; payload buffers are reused between chunks."""
    n, width = pz.shape
    cap = max(1, min(chunk_rows, n))
    if kernel == "sum":
        buf = np.empty((cap, 2 * width), dtype=np.float32)
    else:
        buf = np.empty((cap, width), dtype=np.float32)
        if kernel == "product":
            buf_g = np.empty((cap, width), dtype=np.float32)

    def read(ds: Any, a: int, b: int, m: np.ndarray | None) -> np.ndarray:
        x = ds[a:b]
        return x if m is None else np.asarray(x)[m]

    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        m = None
        if keep is None:
            ids = np.arange(a, b, dtype=np.int64)
        else:
            m = keep[a:b]
            ids = a + np.flatnonzero(m).astype(np.int64)
            if ids.size == 0:
                continue
            if ids.size == b - a:
                m = None
        rows = ids.size
        if kernel == "sum":
            out = buf[:rows]
            _standardize_into(out[:, :width], read(pz, a, b, m), dims)
            _standardize_into(out[:, width:], read(pg, a, b, m), dims)
            yield ids, out
        elif kernel == "pcc":
            out = buf[:rows]
            _standardize_into(out, read(pz, a, b, m), dims)
            yield ids, out
        else:
            out, out_g = buf[:rows], buf_g[:rows]
            _standardize_into(out, read(pz, a, b, m), dims)
            _standardize_into(out_g, read(pg, a, b, m), dims)
            yield ids, (out, out_g)


def _matrix(x: Any, name: str, who: str) -> Any:
    if x is None:
        raise AlfkError(f"the {who} descriptors have no {name!r}")
    if len(getattr(x, "shape", ())) != 2:
        raise AlfkError(f"the {who} {name!r} must be 2-D, got shape {getattr(x, 'shape', None)}")
    return x


def select(
    val: Any,
    pool: Any,
    P: int,
    kernel: str = "sum",
    exclude: Any = None,
    seed: int = 0,
    device: str = "cpu",
    chunk_rows: int = 65536,
) -> Selection:
    """Select P pool rows for labelling (docs/algorithm.md §4-6).

    ``val`` and ``pool`` are :class:`Descriptors`, dicts or objects with ``z``, ``g``,
    ``scale_dims`` (and ``logits``, ``labels`` for ``val``); ``z``/``g`` may be h5py datasets, read
    in chunks of ``chunk_rows`` rows. ``exclude`` (boolean mask or row indices over the pool) is
    removed before the search. Raises :class:`AlfkError` when P exceeds the available pool rows.
    """
    if kernel not in KERNELS:
        raise AlfkError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    P = _positive_int(P, "P")
    chunk_rows = _positive_int(chunk_rows, "chunk_rows")
    gpu = use_gpu(device)

    vz = _matrix(_field(val, "z"), "z", "validation")
    vg = _matrix(_field(val, "g"), "g", "validation")
    pz = _matrix(_field(pool, "z"), "z", "pool")
    pg = _matrix(_field(pool, "g"), "g", "pool")
    width = vz.shape[1]
    dims = _check_dims(_field(val, "scale_dims"), width)
    pool_dims = _field(pool, "scale_dims")
    if pool_dims is not None and _check_dims(pool_dims, pz.shape[1]) != dims:
        raise AlfkError(
            f"validation scale_dims {list(dims)} and pool scale_dims {list(pool_dims)} differ"
        )
    if vg.shape != vz.shape or pg.shape != pz.shape or pz.shape[1] != width:
        raise AlfkError(
            f"shape mismatch: validation z {vz.shape}, g {vg.shape}; pool z {pz.shape}, "
            f"g {pg.shape}"
        )
    n_pool = pz.shape[0]
    keep = _keep_mask(exclude, n_pool)
    n_avail = n_pool if keep is None else int(keep.sum())
    if n_avail < P:
        raise AlfkError(f"P={P} exceeds the {n_avail} available pool images")

    vz = np.asarray(vz)
    vg = np.asarray(vg)
    centers, fallback = choose_centers(
        vz, vg, _field(val, "logits"), _field(val, "labels"), dims, P, kernel, seed
    )
    cz = standardize(vz[centers], dims)
    bound = _norm_bound(dims)
    if kernel == "sum":
        queries = np.concatenate([cz, standardize(vg[centers], dims)], axis=1)
        scorer: Any = _IPScorer(queries, gpu, max_norm=math.sqrt(2 * bound))
    elif kernel == "pcc":
        scorer = _IPScorer(cz, gpu, max_norm=math.sqrt(bound))
    else:
        cg = standardize(vg[centers], dims)
        scorer = _ProductScorer(cz, cg, gpu, math.sqrt(bound), math.sqrt(bound))

    n_c = centers.size
    per = -(-P // n_c)
    k = min(n_avail, per + max(16, per))
    while True:
        scores, ids = exact_topk_stream(
            scorer, _pool_chunks(pz, pg, dims, keep, chunk_rows, kernel), n_c, k
        )
        sel, sel_s, sel_c = rank_major_select(ids, scores, P)
        # Deterministic ties make top-k lists prefixes of longer ones, so growing k and walking
        # again gives exactly the walk over unbounded lists.
        if sel.size >= P or k >= n_avail:
            break
        k = min(n_avail, 2 * k)
    if sel.size < P:  # pragma: no cover - k = n_avail lists every available row
        raise RuntimeError("rank-major walk ran out of candidates")
    return Selection(
        selected=sel,
        score=sel_s,
        center=centers[sel_c],
        centers=centers,
        fallback=bool(fallback),
        kernel=kernel,
        k_used=int(k),
    )
