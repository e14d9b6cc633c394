"""Per-row, per-scale-slice standardisation of descriptors (docs/algorithm.md §4).

Over a slice of width L_j, ``ẑ_a · ẑ_b = (L_j - 1) · PCC(a_j, b_j)``, so inner products of
standardised vectors are sums of per-scale Pearson correlations. A leaf module (numpy only):
the kernels, the selection and the p_yz estimator all standardise the same way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from alfk_cli.errors import AlfkError

__all__ = ["check_dims", "norm_bound", "standardize", "standardize_into"]

#: Rows per thread below which standardisation stays single-threaded.
STANDARDIZE_ROWS_PER_THREAD = 4096
#: Bytes of input standardised per block (fits in cache together with its output).
STANDARDIZE_BLOCK_BYTES = 3 << 20


def check_dims(scale_dims: Sequence[int], width: int) -> tuple[int, ...]:
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


def standardize_into(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
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
        _blocks(dst, src, dims)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="alfk-std")
    bounds = np.linspace(0, n, parts + 1).astype(int)
    jobs = [_pool.submit(_blocks, dst[a:b], src[a:b], dims) for a, b in itertools.pairwise(bounds)]
    for job in jobs:
        job.result()


def _blocks(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
    step = max(1, STANDARDIZE_BLOCK_BYTES // (4 * max(1, src.shape[1])))
    for a in range(0, src.shape[0], step):
        _rows(dst[a : a + step], src[a : a + step], dims)


def _rows(dst: np.ndarray, src: np.ndarray, dims: Sequence[int]) -> None:
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
        # a crafted store's huge values (g = 3e38) overflow float32 here: one error, not
        # numpy's RuntimeWarning as well
        with np.errstate(over="ignore", invalid="ignore"):
            mean = s.mean(axis=1, keepdims=True)
            if not np.isfinite(mean).all():
                raise AlfkError("non-finite values in the descriptors (NaN or inf)")
            np.subtract(s, mean, out=d, casting="same_kind")
            ss = np.einsum("ij,ij->i", d, d)
            if not np.isfinite(ss).all():
                raise AlfkError("descriptor values too large for float32 (a damaged store)")
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
    dims = check_dims(scale_dims, x.shape[1])
    out = np.empty(x.shape, dtype=np.float32)
    standardize_into(out, x, dims)
    return out


#: Unit round-off of float32.
_U32 = 2.0**-24


def norm_bound(dims: Sequence[int]) -> float:
    """Upper bound on the *squared* norm of a float32-standardised vector with these slices."""
    b = float(sum(d - 1 for d in dims))
    return b * (1.0 + 8.0 * (max(dims) + 2) * _U32) + 1e-6
