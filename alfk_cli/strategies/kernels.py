"""Similarity kernels between images' standardised descriptors (docs/algorithm.md §4-6).

A kernel scores a validation centre against a pool image from ``R_z = ẑ_v·ẑ`` and
``R_g = ĝ_v·ĝ`` (``ẑ``, ``ĝ``: per-scale-slice standardised z and g). Built-ins:

- ``sum``: ``R_z + R_g`` (the authors' code; one FAISS search over ``[ẑ; ĝ]``).
- ``pcc``: ``R_z`` alone (the paper's PCC baseline; FAISS over ``ẑ``).
- ``product``: ``R_z · R_g`` (the paper's practical Fisher kernel, PFK).

A new kernel is one registered :class:`Kernel` subclass that defines :meth:`Kernel.combine`; the
default search (blocked GEMMs with a running top-k, then canonical float64 rescoring, see
:mod:`alfk_cli.search.exact`) makes it exact and deterministic like the built-ins::

    @KERNELS.register("fisher")
    class FisherOnly(Kernel):
        def combine(self, rz, rg):
            return rg
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from alfk_cli.features.standardize import standardize_into
from alfk_cli.search.exact import (
    U32,
    U64,
    IPScorer,
    SearchBackend,
    canon_dot,
    gamma_bound,
    row_norms,
)
from alfk_cli.util.registry import Registry

__all__ = [
    "KERNELS",
    "Buffers",
    "CombinedScorer",
    "Kernel",
    "canonical",
    "error_bounds",
    "get_kernel",
]


class Buffers:
    """Scratch arrays reused from one pool chunk to the next (fresh large arrays cost page faults)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, rows: int, width: int) -> np.ndarray:
        """A float32 ``[rows, width]`` view of the buffer ``key``."""
        arr = self._arrays.get(key)
        if arr is None or arr.shape[1] != width:
            arr = self._arrays[key] = np.empty((self.capacity, width), dtype=np.float32)
        return arr[:rows]


class Kernel:
    """A similarity computed from ``R_z`` and ``R_g``; subclasses define :meth:`combine`.

    ``combine`` must be elementwise (it runs on numpy float64 and torch float32 arrays alike) and
    affine in each of ``R_z`` and ``R_g`` separately (sums, products, weighted versions): the
    error bound of the exact search, :meth:`error_bound`, relies on it; a kernel that is not
    overrides :meth:`error_bound`. ``uses_g = False`` kernels get ``rg = None`` and never read g.
    """

    name: str = ""
    uses_g: bool = True

    def combine(self, rz: Any, rg: Any) -> Any:
        raise NotImplementedError

    def combine_inplace(self, rz: Any, rg: Any) -> Any:
        """``combine`` that may overwrite ``rz`` (the search's scratch block)."""
        return self.combine(rz, rg)

    def gram(self, qz: Any, qg: Any, xz: Any, xg: Any) -> Any:
        """Dense similarities ``[len(qz), len(xz)]`` (numpy arrays or torch tensors, in their
        dtype): k-center's filter, in float64, within :meth:`error_bound` of :func:`canonical`."""
        return self.combine(qz @ xz.T, qg @ xg.T if self.uses_g else None)

    def payload(self, z: np.ndarray, g: np.ndarray | None, dims: Any, buffers: Buffers) -> Any:
        """One pool chunk standardised for :meth:`scorer`'s ``begin``: ``(ẑ, ĝ)`` by default."""
        zs = buffers.get("z", z.shape[0], z.shape[1])
        standardize_into(zs, z, dims)
        if not self.uses_g:
            return zs, None
        assert g is not None, "a kernel that uses g is given g"
        gs = buffers.get("g", g.shape[0], g.shape[1])
        standardize_into(gs, g, dims)
        return zs, gs

    def scorer(
        self, cz: np.ndarray, cg: np.ndarray | None, *, backend: SearchBackend, norm_sq: float
    ) -> Any:
        """The exact-search scorer for standardised centres; ``norm_sq`` bounds ``|ẑ|², |ĝ|²``;
        ``backend`` says where its filter runs."""
        return CombinedScorer(self, cz, cg, backend, math.sqrt(norm_sq))

    def error_bound(self, bz: Any, bg: Any, ez: Any, eg: Any) -> Any:
        """Bound on ``|combine(a+δ, b+ε) − combine(a, b)|`` over ``|a| ≤ bz, |b| ≤ bg, |δ| ≤ ez,
        |ε| ≤ eg`` (arrays, one entry per query), plus float32 rounding of ``combine``.

        For a function affine in each argument the extremes lie at the corners of that box, so
        the 16 corners are evaluated.
        """
        dev = np.zeros_like(np.asarray(bz, dtype=np.float64))
        top = np.zeros_like(dev)
        signs = list(itertools.product((-1.0, 1.0), repeat=4))
        for sa, sb, sd, se in signs:
            a, d = sa * bz, sd * ez
            b, e = (sb * bg, se * eg) if self.uses_g else (None, None)
            base = np.asarray(self.combine(a, b), dtype=np.float64)
            moved = np.asarray(self.combine(a + d, None if b is None else b + e), dtype=np.float64)
            dev = np.maximum(dev, np.abs(moved - base))
            top = np.maximum(top, np.abs(moved))
        return dev + 4 * U32 * top


def get_kernel(kernel: str | Kernel) -> Kernel:
    """A registered kernel by name (an instance passes through)."""
    if isinstance(kernel, Kernel):
        return kernel
    return KERNELS[kernel]


KERNELS: Registry[Kernel] = Registry("kernel", "alfk.kernels")


def register_kernel(name: str) -> Callable[[type], type]:
    """Class decorator: register one instance of the decorated :class:`Kernel` as ``name``."""
    return KERNELS.register_instance(name)


# ----------------------------------------------------------------------------- built-ins


@register_kernel("sum")
class SumKernel(Kernel):
    """``R_z + R_g`` = the inner product of ``[ẑ; ĝ]``: one FAISS search, no score blocks."""

    def combine(self, rz: Any, rg: Any) -> Any:
        return rz + rg

    def payload(self, z: np.ndarray, g: np.ndarray | None, dims: Any, buffers: Buffers) -> Any:
        assert g is not None, "a kernel that uses g is given g"
        w = z.shape[1]
        out = buffers.get("zg", z.shape[0], 2 * w)
        standardize_into(out[:, :w], z, dims)
        standardize_into(out[:, w:], g, dims)
        return out

    def scorer(
        self, cz: np.ndarray, cg: np.ndarray | None, *, backend: SearchBackend, norm_sq: float
    ) -> Any:
        zg = np.concatenate([cz, cg], axis=1)
        return IPScorer(zg, backend, max_norm=math.sqrt(2 * norm_sq))


@register_kernel("pcc")
class PCCKernel(Kernel):
    """``R_z``: a sum of per-scale Pearson correlations of z; g is never read."""

    uses_g = False

    def combine(self, rz: Any, rg: Any) -> Any:
        return rz

    def payload(self, z: np.ndarray, g: np.ndarray | None, dims: Any, buffers: Buffers) -> Any:
        out = buffers.get("z", z.shape[0], z.shape[1])
        standardize_into(out, z, dims)
        return out

    def scorer(
        self, cz: np.ndarray, cg: np.ndarray | None, *, backend: SearchBackend, norm_sq: float
    ) -> Any:
        return IPScorer(cz, backend, max_norm=math.sqrt(norm_sq))


@register_kernel("product")
class ProductKernel(Kernel):
    """``R_z · R_g``, the paper's PFK: the default blocked search, multiplying in place."""

    def combine(self, rz: Any, rg: Any) -> Any:
        return rz * rg

    def combine_inplace(self, rz: Any, rg: Any) -> Any:
        rz *= rg
        return rz


# ----------------------------------------------------------------------------- default search


def canonical(
    kernel: Kernel,
    qz64: np.ndarray,
    qg64: np.ndarray | None,
    xz: np.ndarray,
    xg: np.ndarray | None,
    qrows: np.ndarray,
    xrows: np.ndarray,
) -> np.ndarray:
    """The kernel's canonical similarity of each pair ``(qrows[t], xrows[t])``: ``combine`` of
    the canonical float64 ``R_z`` and ``R_g`` (:func:`alfk_cli.search.exact.canon_dot`)."""
    rz = canon_dot(qz64, xz, qrows, xrows)
    rg = None
    if qg64 is not None:
        assert xg is not None, "queries with g score rows with g"
        rg = canon_dot(qg64, xg, qrows, xrows)
    return np.asarray(kernel.combine(rz, rg), dtype=np.float64)


def error_bounds(
    kernel: Kernel, qz: np.ndarray, qg: np.ndarray | None, bound: float, unit: float = U32
) -> np.ndarray:
    """Per query row: the bound on |filter − canonical| of :func:`canonical`, for rows whose ẑ
    and ĝ norms are at most ``bound`` (the GEMMs' error in the arithmetic of unit round-off
    ``unit``, float32 by default, the float64 canonical error, then the kernel's combination of
    them with float32 rounding, :meth:`Kernel.error_bound`)."""

    def side(q: np.ndarray | None) -> tuple[Any, Any]:
        if q is None:
            return None, None
        b = row_norms(q) * bound
        return b, gamma_bound(q.shape[1], unit) * b + 4 * q.shape[1] * U64 * b

    bz, ez = side(qz)
    bg, eg = side(qg)
    return np.asarray(kernel.error_bound(bz, bg, ez, eg), dtype=np.float64)


class CombinedScorer:
    """Any kernel: blocked float32 torch GEMMs for ``R_z``/``R_g``, ``combine``, a running top-k
    as the filter (:mod:`alfk_cli.search.blockfilter`, on the backend's device), and canonical float64
    rescoring (see :func:`alfk_cli.search.exact.exact_topk_stream`).
    """

    def __init__(
        self,
        kernel: Kernel,
        qz: np.ndarray,
        qg: np.ndarray | None,
        backend: SearchBackend,
        bound: float,
    ):
        from alfk_cli.search.blockfilter import TorchQueries

        self.kernel = kernel
        self.qz = np.ascontiguousarray(qz, dtype=np.float32)
        self.qg = None if qg is None else np.ascontiguousarray(qg, dtype=np.float32)
        self.qz64 = self.qz.astype(np.float64)
        self.qg64 = None if self.qg is None else self.qg.astype(np.float64)
        self.filter = TorchQueries(self.qz, self.qg, backend.device)
        # per query: bounds on |R| and on the float32 GEMM error plus the float64 canonical error
        self.eps_rows = error_bounds(kernel, self.qz, self.qg, bound)

    def begin(self, payload: tuple[np.ndarray, np.ndarray | None]) -> None:
        self.xz, self.xg = payload
        self.filter.begin(self.xz, self.xg)

    def eps(self, rows: np.ndarray) -> np.ndarray:
        return self.eps_rows[rows]

    def approx(self, rows: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
        return self.filter.topk(rows, kp, self.kernel.combine_inplace)

    def canon(self, qrows: np.ndarray, xrows: np.ndarray) -> np.ndarray:
        return canonical(self.kernel, self.qz64, self.qg64, self.xz, self.xg, qrows, xrows)
