"""The exact search's filter as torch GEMMs: blocked float32 matrix products, an elementwise
kernel combination and a running top-k, on any torch device (docs/algorithm.md §6).

This is the ``torch`` search backend's inner-product filter and the filter every kernel that
combines ``R_z`` and ``R_g`` uses on every backend. It only *filters*: what it returns is within
the a-priori float32 bound of the canonical scores, which the search then computes and orders by.
The GEMMs run under :func:`alfk_cli.util.devices.ieee_matmul` (no TF32, no bf16), the bound's premise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from alfk_cli.util.devices import ieee_matmul

__all__ = ["BLOCK_BYTES", "TorchQueries", "block_bytes", "blocked_topk"]

#: Scratch budget (bytes) for the score blocks on the CPU: about 8k pool columns per block for
#: 1250 centres, fast GEMMs, and the combine and top-k still run from cache-warm memory.
BLOCK_BYTES = 80 << 20
#: On a GPU a block is one kernel launch of each op: large blocks keep it busy (640 MiB).
CUDA_BLOCK_BYTES = 8 * BLOCK_BYTES


def block_bytes(device: torch.device) -> int:
    """The score-block budget for ``device``."""
    return BLOCK_BYTES if device.type == "cpu" else CUDA_BLOCK_BYTES


def blocked_topk(
    qz: torch.Tensor,
    xz: torch.Tensor,
    qg: torch.Tensor | None,
    xg: torch.Tensor | None,
    kp: int,
    combine: Callable[[torch.Tensor, torch.Tensor | None], Any],
    budget: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``kp`` largest ``combine(qz @ xz.T, qg @ xg.T)`` per query row (any order among them),
    as float32 values and int64 column indices on the CPU.

    ``qg``/``xg`` are None for a single product (``combine`` then gets None). ``combine`` may
    overwrite its first argument. Columns are taken in blocks so that the score blocks fit in
    ``budget`` bytes; the blocks are reused across the chunk (fresh large buffers cost page
    faults on the CPU).
    """
    n, nr = xz.shape[0], qz.shape[0]
    kp = min(kp, n)
    per_col = 4 * nr * (1 if qg is None else 2)
    step = min(n, max(kp, budget // max(1, per_col)))
    flat_z = torch.empty(nr * step, dtype=torch.float32, device=xz.device)
    flat_g = None if qg is None else torch.empty_like(flat_z)
    best_v = best_i = None
    with ieee_matmul():
        for a in range(0, n, step):
            b = min(n, a + step)
            s = flat_z[: nr * (b - a)].view(nr, b - a)
            torch.matmul(qz, xz[a:b].T, out=s)
            t = None
            if flat_g is not None:
                assert qg is not None and xg is not None, "g queries score g columns"
                t = flat_g[: nr * (b - a)].view(nr, b - a)
                torch.matmul(qg, xg[a:b].T, out=t)
            v, i = torch.topk(combine(s, t), min(kp, b - a), dim=1)
            i += a
            if best_v is not None and best_i is not None:
                v = torch.cat([best_v, v], dim=1)
                i = torch.cat([best_i, i], dim=1)
                v, pos = torch.topk(v, min(kp, v.shape[1]), dim=1)
                i = torch.gather(i, 1, pos)
            best_v, best_i = v, i
    assert best_v is not None and best_i is not None, "a pool chunk has at least one row"
    return best_v.cpu().numpy(), best_i.cpu().numpy().astype(np.int64)


class TorchQueries:
    """Queries (``qz`` and optionally ``qg``) held on a torch device, and the pool chunk the
    filter reads: ``begin`` moves a chunk there, ``topk`` runs :func:`blocked_topk` for a subset
    of the queries."""

    def __init__(self, qz: np.ndarray, qg: np.ndarray | None, device: str):
        self.dev = torch.device(device)
        self.nq = qz.shape[0]
        self.qz = torch.from_numpy(np.ascontiguousarray(qz, dtype=np.float32)).to(self.dev)
        self.qg = None if qg is None else torch.from_numpy(np.ascontiguousarray(qg)).to(self.dev)
        self.xz: torch.Tensor | None = None
        self.xg: torch.Tensor | None = None
        self.budget = block_bytes(self.dev)

    def begin(self, xz: np.ndarray, xg: np.ndarray | None) -> None:
        """The next pool chunk (float32, C-contiguous; on the CPU the tensors share its memory)."""
        self.xz = torch.from_numpy(xz).to(self.dev)
        self.xg = None if xg is None else torch.from_numpy(xg).to(self.dev)

    def topk(
        self, rows: np.ndarray, kp: int, combine: Callable[[torch.Tensor, torch.Tensor | None], Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.xz is not None, "begin() gives the pool chunk first"
        qz, qg = self.qz, self.qg
        if rows.size != self.nq:
            sel = torch.from_numpy(rows).to(self.dev)
            qz, qg = qz[sel], None if qg is None else qg[sel]
        return blocked_topk(qz, self.xz, qg, self.xg, kp, combine, self.budget)
