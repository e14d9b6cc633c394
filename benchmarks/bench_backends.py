"""The exact search on each search backend: `acquisition.select` timed on the same data with
FAISS on the CPU, torch on the CPU, and (where there is a GPU) torch on CUDA and FAISS on the GPU
(when the installed FAISS has GPU support), checking that every backend selects the same rows
with the same scores and centres (docs/algorithm.md §6).

Synthetic pool of N x L float32 z (|N(0,1)|) and g (N(0,1)) in memory, two scales L/3 + 2L/3, a
validation set of 2 x P rows, all misclassified (so k-center picks the P centres). Backends run
interleaved over --repeat rounds (the machine may be shared); best wall time and the process
CPU time (user + system, all threads) of that round are printed per backend and kernel.

Usage: python benchmarks/bench_backends.py [--n 200000] [--dim 768] [--P 1250]
                                           [--kernels sum,product] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alfk_cli.search.exact import CPU_BACKEND, SearchBackend
from alfk_cli.strategies import acquisition


def backends() -> list[SearchBackend]:
    found = [CPU_BACKEND, SearchBackend("torch", "cpu")]
    if torch.cuda.is_available():
        found.append(SearchBackend("torch", "cuda"))
        if faiss.get_num_gpus() > 0:
            found.append(SearchBackend("faiss-gpu", "cuda"))
    return found


def data(n: int, dim: int, P: int, seed: int) -> tuple[acquisition.Descriptors, ...]:
    rng = np.random.default_rng(seed)
    dims = [dim // 3, dim - dim // 3]
    pz = np.abs(rng.standard_normal((n, dim), dtype=np.float32))
    pg = rng.standard_normal((n, dim), dtype=np.float32)
    m = 2 * P
    vz = np.abs(rng.standard_normal((m, dim), dtype=np.float32))
    vg = rng.standard_normal((m, dim), dtype=np.float32)
    logits = rng.standard_normal((m, 10), dtype=np.float32)
    labels = (np.argmax(logits, axis=1) + 1) % 10  # every validation row misclassified
    return (
        acquisition.Descriptors(vz, vg, dims, logits, labels),
        acquisition.Descriptors(pz, pg, dims),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--P", type=int, default=1250)
    ap.add_argument("--kernels", default="sum,product")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    val, pool = data(args.n, args.dim, args.P, args.seed)
    found = backends()
    print(f"pool {args.n:,} x {args.dim} (z and g), P = centres = {args.P}; backends "
          f"{', '.join(f'{b.kind} on {b.device}' for b in found)}; {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    for kernel in args.kernels.split(","):
        best: dict[SearchBackend, tuple[float, float]] = {}
        first: acquisition.Selection | None = None
        for rnd in range(args.repeat):
            for backend in found:
                load = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                sel = acquisition.select(val, pool, args.P, kernel, seed=args.seed, backend=backend)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                print(f"  {kernel} round {rnd + 1} {backend.kind} on {backend.device}: wall "
                      f"{wall:.2f} s, CPU {cpu:.2f} s (load {load:.1f})", flush=True)  # fmt: skip
                if backend not in best or wall < best[backend][0]:
                    best[backend] = (wall, cpu)
                if first is None:
                    first = sel
                for name in ("selected", "score", "center", "centers"):
                    same = np.array_equal(getattr(sel, name), getattr(first, name))
                    assert same, f"{backend} differs from {found[0]} in {name}"
        for backend, (wall, cpu) in best.items():
            print(f"{kernel}: {backend.kind} on {backend.device}: best wall {wall:.2f} s "
                  f"(CPU {cpu:.2f} s); selections identical on every backend")  # fmt: skip


if __name__ == "__main__":
    main()
