"""The floor `alfk score` is compared with on a GPU: a bare torch matmul + top-k over a store's rows.

For bench_bigpool's stores (issue 22): P queries (the first P validation rows, [z, g]) against
every pool row [z, g] (the sum kernel's inner product, unstandardised), top-k per query merged
block by block, on the fastest device present. Three figures, each best of two:

- read: the store's z and g read block by block with h5py (decompression included), nothing else:
  what any scorer of this store pays before the first multiply;
- from host: the rows already in (pinned) host memory, copied to the device block by block,
  multiplied and top-k'd there: the device-side floor of a streamed search;
- resident: the rows already on the device: GEMM + top-k alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import torch

K = 17  # what select's search asks for at bench_bigpool's default shape (P 1250, 2P centres)


def _blocks(pool: Path, block: int):
    with h5py.File(pool, "r") as f:
        n = f["z"].shape[0]
        for a in range(0, n, block):
            b = min(n, a + block)
            yield np.concatenate([f["z"][a:b], f["g"][a:b]], axis=1)


def _search(q: torch.Tensor, blocks, dev: torch.device) -> torch.Tensor:
    best_s = torch.full((q.shape[0], K), -torch.inf, device=dev)
    best_i = torch.zeros((q.shape[0], K), dtype=torch.int64, device=dev)
    start = 0
    for x in blocks:
        x = x.to(dev, non_blocking=True)
        s = q @ x.T
        s, i = torch.topk(s, min(K, s.shape[1]), dim=1)
        s, j = torch.topk(torch.cat([best_s, s], 1), K, dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, j)
        best_s, start = s, start + x.shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return best_i


def _best(fn, repeat: int = 2) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bare_topk(val: Path, pool: Path, P: int, block: int) -> dict[str, float]:
    """Print and return the three floors (seconds)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # score multiplies in full float32 too
    with h5py.File(val, "r") as f:
        q = np.concatenate([f["z"][:P], f["g"][:P]], axis=1)
    qd = torch.from_numpy(q).to(dev)
    read = _best(lambda: sum(x.shape[0] for x in _blocks(pool, block)))
    host = [torch.from_numpy(x) for x in _blocks(pool, block)]
    if dev.type == "cuda":
        host = [x.pin_memory() for x in host]
    from_host = _best(lambda: _search(qd, iter(host), dev))
    resident_rows = [x.to(dev) for x in host]
    resident = _best(lambda: _search(qd, iter(resident_rows), dev))
    n = sum(x.shape[0] for x in host)
    print(f"bare matmul + top-k (k={K}) of {P} queries over {n:,} rows x {q.shape[1]} on {dev}: "
          f"read the store {read:.2f} s; from host memory {from_host:.3f} s; resident on the "
          f"device {resident:.3f} s; read + from host {read + from_host:.2f} s", flush=True)  # fmt: skip
    return {"read": read, "from_host": from_host, "resident": resident}
