"""Fisher-kernel acquisition (docs/algorithm.md §4-6): standardise, pick centres, search, select.

Pure numerics: arrays (or h5py datasets) in, pool row indices out. The pool is streamed in chunks of
``chunk_rows`` rows for standardisation and search, so it is never held whole.

Kernels (``ẑ``, ``ĝ`` = per-scale-slice standardised z and g):

- ``sum``: ``R_z + R_g`` = inner product of ``[ẑ; ĝ]`` (the authors' code; one FAISS search).
- ``pcc``: ``R_z`` alone (the paper's PCC baseline; FAISS over ``ẑ``).
- ``product``: ``R_z ∘ R_g`` (the paper's PFK); exact, blocked torch GEMMs with a running top-k.

Every score that decides an order is a canonical float64 rescoring (see :mod:`alfk_cli.search.exact`), so
the selection is the same for any ``chunk_rows``, device or BLAS library, and identical pool rows
tie exactly and are broken by the smaller pool id.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.features.standardize import check_dims, norm_bound, standardize
from alfk_cli.search.exact import CPU_BACKEND, U64, SearchBackend, kcenter_greedy, search_backend
from alfk_cli.search.sharded import sharded_topk
from alfk_cli.strategies.fkinputs import (
    DescriptorSource,
    Exclude,
    ValidationSource,
    checked_descriptors,
    field_of,
    keep_mask,
    positive_int,
)
from alfk_cli.strategies.kernels import Buffers, Kernel, canonical, error_bounds, get_kernel
from alfk_cli.strategies.quotas import class_quotas

__all__ = [
    "CENTER_RULES",
    "Descriptors",
    "Selection",
    "choose_centers",
    "misclassified",
    "rank_major_select",
    "select",
]

#: Largest candidate set whose k-center similarity matrix is precomputed (float32, 512 MiB).
GRAM_MAX_ROWS = 11585

#: How centres are chosen among the misclassified validation images when there are more than P:
#: ``kcenter`` (the paper: one greedy k-center over all of them), ``class`` (P split over the
#: true classes in proportion to their errors, then k-center within each class) or ``sample``
#: (the same split, then a seeded uniform sample within each class: the errors' own density).
CENTER_RULES = ("kcenter", "class", "sample")


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


# ----------------------------------------------------------------------------- weak supervision


def misclassified(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows whose argmax prediction differs from the label (int64, ascending)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise AlfkError(f"logits {logits.shape} and labels {labels.shape} do not match")
    return np.flatnonzero(np.argmax(logits, axis=1) != labels).astype(np.int64)


def _similarity(
    kernel: Kernel, z64: np.ndarray, g64: np.ndarray | None, backend: SearchBackend
) -> Callable[[int], np.ndarray]:
    """``sim_to(i)`` over the standardised candidates in the kernel's space, k-center's filter:
    float64 GEMMs (their error is ~1e-9 of float32's, so few picks need the canonical decision,
    see ``choose_centers``), held as a float32 Gram matrix when it fits."""
    n = z64.shape[0]
    gram = _gram(kernel, z64, g64, backend)
    if n <= GRAM_MAX_ROWS:
        full = np.empty((n, n), dtype=np.float32)
        step = 1024
        for a in range(0, n, step):
            full[a : a + step] = gram(slice(a, min(n, a + step)))
        return lambda i: full[i]
    return lambda i: gram(np.array([i]))[0]


def _gram(
    kernel: Kernel, z64: np.ndarray, g64: np.ndarray | None, backend: SearchBackend
) -> Callable[[Any], np.ndarray]:
    """``gram(rows)``: the similarities of ``rows`` (a slice or an index array) to every
    candidate, as numpy GEMMs, or as torch GEMMs on the backend's device (float64: TF32 and bf16
    never apply)."""
    if not backend.torch_gemms:
        return lambda rows: kernel.gram(z64[rows], None if g64 is None else g64[rows], z64, g64)
    import torch

    dev = torch.device(backend.device)
    tz = torch.from_numpy(z64).to(dev)
    tg = None if g64 is None else torch.from_numpy(g64).to(dev)

    def gram(rows: Any) -> np.ndarray:
        sel = rows if isinstance(rows, slice) else torch.from_numpy(rows).to(dev)
        return kernel.gram(tz[sel], None if tg is None else tg[sel], tz, tg).cpu().numpy()

    return gram


def choose_centers(
    val_z: Any,
    val_g: Any,
    val_logits: Any,
    val_labels: Any,
    scale_dims: Sequence[int],
    P: int,
    kernel: str | Kernel,
    seed: int,
    rule: str = "kcenter",
    *,
    backend: SearchBackend = CPU_BACKEND,
) -> tuple[np.ndarray, bool]:
    """Centres for one round (Alg. 1 lines 3-7): validation rows, int64, plus the fallback flag.

    M' = misclassified rows. M' <= P: all of them, in index order. Otherwise, with ``rule``
    ``kcenter``, greedy k-center over them in the kernel's similarity space to P centres; with
    ``class``, P is split over the true classes in proportion to their counts in M' (largest
    remainders, :func:`alfk_cli.strategies.quotas.class_quotas`) and each class's share is a greedy
    k-center over that class's rows (seeded with ``seed`` + class), the classes' centres
    concatenated in class order; with ``sample``, the same split, each share drawn uniformly
    without replacement from that class's rows (``numpy.random.default_rng(seed + class)``,
    in row order). M' = 0: the whole validation set is the candidate set instead (same rules)
    and ``fallback`` is True. k-center's similarities are float64 GEMMs (on the ``backend``'s
    device) that only filter; each pick is decided by the kernel's canonical similarities, so
    the centres are the same on every backend.
    """
    kern = get_kernel(kernel)
    P = positive_int(P, "P")
    if rule not in CENTER_RULES:
        raise AlfkError(f"unknown centre rule {rule!r}; use one of {', '.join(CENTER_RULES)}")
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
    dims = check_dims(scale_dims, z_all.shape[1])
    g_all = np.asarray(val_g) if kern.uses_g else None
    if rule == "kcenter":
        return _kcenter(kern, z_all, g_all, dims, cand, P, seed, backend), fallback
    cls = labels[cand]
    classes = np.unique(cls)
    quotas = class_quotas(P, np.array([np.count_nonzero(cls == c) for c in classes]))
    if rule == "sample":
        parts = [
            np.sort(np.random.default_rng(seed + int(c)).choice(cand[cls == c], int(q), False))
            for c, q in zip(classes, quotas)
        ]
    else:
        parts = [
            _kcenter(kern, z_all, g_all, dims, cand[cls == c], int(q), seed + int(c), backend)
            for c, q in zip(classes, quotas)
        ]
    return np.concatenate(parts).astype(np.int64), fallback


def _kcenter(
    kern: Kernel,
    z_all: np.ndarray,
    g_all: np.ndarray | None,
    dims: Sequence[int],
    cand: np.ndarray,
    n: int,
    seed: int,
    backend: SearchBackend,
) -> np.ndarray:
    """``n`` of the validation rows ``cand`` by greedy k-center in the kernel's space."""
    if n >= cand.size:
        return cand
    z = standardize(z_all[cand], dims)
    g = standardize(g_all[cand], dims) if g_all is not None else None
    z64, g64 = z.astype(np.float64), None if g is None else g.astype(np.float64)

    def canon(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return canonical(kern, z64, g64, z, g, centres, rows)

    # the filter's float64 GEMMs, and the float32 rounding of the Gram matrix holding them
    err = float(error_bounds(kern, z, g, math.sqrt(norm_bound(dims)), unit=U64).max())
    sim_to = _similarity(kern, z64, g64, backend)
    return cand[kcenter_greedy(sim_to, cand.size, n, seed, canon=canon, err=err)]


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


# ----------------------------------------------------------------------------- select


def _pool_chunks(
    pz: Any,
    pg: Any,
    dims: Sequence[int],
    keep: np.ndarray | None,
    chunk_rows: int,
    kernel: Kernel,
    first: int = 0,
    end: int | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(ids, payload)`` per chunk of rows ``[first, end)``, the payload standardised by
    the kernel into buffers reused between chunks; excluded rows are dropped before
    standardisation."""
    n = pz.shape[0] if end is None else end
    buffers = Buffers(max(1, min(chunk_rows, n - first)))

    def read(ds: Any, a: int, b: int, m: np.ndarray | None) -> np.ndarray:
        x = ds[a:b]
        return x if m is None else np.asarray(x)[m]

    for a in range(first, n, chunk_rows):
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
        g = read(pg, a, b, m) if kernel.uses_g else None
        yield ids, kernel.payload(read(pz, a, b, m), g, dims, buffers)


def select(
    val: ValidationSource | Mapping[str, Any],
    pool: DescriptorSource | Mapping[str, Any],
    P: int,
    kernel: str | Kernel = "sum",
    exclude: Exclude = None,
    seed: int = 0,
    device: str = "cpu",
    chunk_rows: int = 65536,
    center_rule: str = "kcenter",
    *,
    backend: SearchBackend | None = None,
) -> Selection:
    """Select P pool rows for labelling (docs/algorithm.md §4-6).

    ``val`` and ``pool`` are :class:`Descriptors`, dicts or objects with ``z``, ``g``,
    ``scale_dims`` (and ``logits``, ``labels`` for ``val``); ``z``/``g`` may be h5py datasets, read
    in chunks of ``chunk_rows`` rows. ``exclude`` (boolean mask or row indices over the pool) is
    removed before the search. ``center_rule`` is the centre rule (:data:`CENTER_RULES`). Raises
    :class:`AlfkError` when P exceeds the available pool rows. ``backend``: where the search
    filters (default: :func:`alfk_cli.search.exact.search_backend` of ``device``); the selection does
    not depend on it.
    """
    kern = get_kernel(kernel)
    P = positive_int(P, "P")
    chunk_rows = positive_int(chunk_rows, "chunk_rows")
    backend = backend or search_backend(device)  # the one choice of where the search runs

    vz, vg, pz, pg, dims = checked_descriptors(val, pool)
    n_pool = pz.shape[0]
    keep = keep_mask(exclude, n_pool)
    n_avail = n_pool if keep is None else int(keep.sum())
    if n_avail < P:
        raise AlfkError(f"P={P} exceeds the {n_avail} available pool images")

    vz = np.asarray(vz)
    vg = np.asarray(vg)
    logits, labels = field_of(val, "logits"), field_of(val, "labels")
    args = (vz, vg, logits, labels, dims, P, kern, seed, center_rule)
    centers, fallback = choose_centers(*args, backend=backend)
    cz = standardize(vz[centers], dims)
    cg = standardize(vg[centers], dims) if kern.uses_g else None
    scorer = kern.scorer(cz, cg, backend=backend, norm_sq=norm_bound(dims))

    n_c = centers.size
    per = -(-P // n_c)
    k = min(n_avail, per + max(16, per))
    chunks = functools.partial(_pool_chunks, pz, pg, dims, keep, chunk_rows, kern)
    while True:
        scores, ids = sharded_topk(scorer, chunks, n_pool, n_c, k)  # torchrun: a share per rank
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
        kernel=kern.name,
        k_used=int(k),
    )
