"""Benchmark the acquisition core: full ``acquisition.select`` vs bare FAISS vs a plain GEMM.

Synthetic pool of N x L random float32 z and g (sum kernel), a validation set of 2 x centres rows
all misclassified (so k-center picks the centres), P images to select. Times, in one process:

  (c) acquisition.select from the in-memory arrays (standardise per chunk, k-center, exact search
      with canonical rescoring, rank-major walk); peak RSS is read right after it;
  (b) a plain torch GEMM of the same shapes (centres x 2L by 2L x N, in chunks, no top-k);
  (a) bare FAISS: IndexFlatIP over the raw [z; g] concatenation, searched with the centres and the
      same k as select used (index building not timed).

The three are interleaved over --repeat rounds (other processes on a shared machine slow them
alike); best and median wall times and the best process CPU time (all threads) are reported.

Usage: python benchmarks/bench_score.py [--n 500000] [--dim 768] [--centers 1250] [--P 1250]
                                       [--repeat 3] [--kernel sum] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alfk_cli.features.standardize import standardize
from alfk_cli.strategies import acquisition
from alfk_cli.strategies.kernels import KERNELS


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000, help="pool rows")
    ap.add_argument("--dim", type=int, default=768, help="descriptor length L (z and g each)")
    ap.add_argument("--centers", type=int, default=1250, help="number of centres (queries)")
    ap.add_argument("--P", type=int, default=1250, help="images to select")
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", choices=KERNELS, default="sum", help="for (c) only")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds of each (best is reported)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first select call")
    args = ap.parse_args()

    n, dim, n_c = args.n, args.dim, args.centers
    dims = [dim // 3, dim - dim // 3]  # two scales, like layer3 + layer4 at L=768 (256 + 512)
    print(
        f"pool {n} x {dim} (z and g), centres {n_c}, P {args.P}, chunk_rows {args.chunk_rows}, "
        f"threads faiss={faiss.omp_get_max_threads()} torch={torch.get_num_threads()}",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    pz = rng.standard_normal((n, dim), dtype=np.float32)
    np.abs(pz, out=pz)  # post-ReLU-like
    pg = rng.standard_normal((n, dim), dtype=np.float32)
    zg_bytes = pz.nbytes + pg.nbytes
    m = 2 * n_c
    vz = np.abs(rng.standard_normal((m, dim), dtype=np.float32))
    vg = rng.standard_normal((m, dim), dtype=np.float32)
    logits = rng.standard_normal((m, 10), dtype=np.float32)
    labels = (np.argmax(logits, axis=1) + 1) % 10  # every validation row misclassified
    val = acquisition.Descriptors(vz, vg, dims, logits, labels)
    pool = acquisition.Descriptors(pz, pg, dims)
    rss_data = rss_bytes()
    print(f"z+g {gib(zg_bytes)}; RSS after making the data {gib(rss_data)}", flush=True)

    # Warm-up on a small slice (thread pools, lazy imports, page faults of the code).
    small = acquisition.Descriptors(pz[:20000], pg[:20000], dims)
    acquisition.select(val, small, args.P, args.kernel, chunk_rows=args.chunk_rows)

    def run_select() -> acquisition.Selection:
        return acquisition.select(
            val, pool, args.P, args.kernel, seed=args.seed, chunk_rows=args.chunk_rows
        )

    # (c) full select, first run: peak RSS is read right after it, before anything else is built.
    prof = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    res = run_select()
    if prof:
        prof.disable()
    times: dict[str, list[float]] = {"select": [time.perf_counter() - t0], "faiss": [], "gemm": []}
    cpu: dict[str, list[float]] = {"select": [time.process_time() - c0], "faiss": [], "gemm": []}
    rss_select = rss_bytes()
    k = res.k_used
    print(
        f"(c) acquisition.select: {times['select'][0]:.2f} s  (k_used={k}, "
        f"centres={res.centers.size}, selected={res.selected.size}); peak RSS "
        f"{gib(rss_select)} = {rss_select / zg_bytes:.2f}x z+g",
        flush=True,
    )
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(18)

    # Queries for (a) and (b): the standardised centres, concatenated like select's sum kernel.
    q = np.concatenate(
        [
            standardize(vz[res.centers], dims),
            standardize(vg[res.centers], dims),
        ],
        axis=1,
    )
    xb = np.empty((n, 2 * dim), dtype=np.float32)
    for a in range(0, n, args.chunk_rows):
        b = min(n, a + args.chunk_rows)
        xb[a:b, :dim] = pz[a:b]
        xb[a:b, dim:] = pg[a:b]
    index = faiss.IndexFlatIP(2 * dim)
    index.add(xb)
    del xb
    # The GEMM reads the index's own copy of the vectors (no third copy in memory).
    tx = torch.from_numpy(faiss.rev_swig_ptr(index.get_xb(), n * 2 * dim).reshape(n, 2 * dim))
    tq = torch.from_numpy(q)

    # Interleave the three so that load from other processes hits them alike; report the best.
    for rep in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        index.search(q, k)  # (a) bare FAISS flat IP, same k
        times["faiss"].append(time.perf_counter() - t0)
        cpu["faiss"].append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        for a in range(0, n, args.chunk_rows):  # (b) plain GEMM, chunked, no top-k
            out = tq @ tx[a : a + args.chunk_rows].T
            del out
        times["gemm"].append(time.perf_counter() - t0)
        cpu["gemm"].append(time.process_time() - c0)
        if rep > 0:
            t0, c0 = time.perf_counter(), time.process_time()
            again = run_select()
            times["select"].append(time.perf_counter() - t0)
            cpu["select"].append(time.process_time() - c0)
            assert np.array_equal(again.selected, res.selected)
        print(
            f"  round {rep + 1} wall/cpu s: faiss {times['faiss'][-1]:.2f}/{cpu['faiss'][-1]:.2f}, "
            f"gemm {times['gemm'][-1]:.2f}/{cpu['gemm'][-1]:.2f}"
            + (
                f", select {times['select'][-1]:.2f}/{cpu['select'][-1]:.2f}"
                if rep > 0
                else f", select {times['select'][0]:.2f}/{cpu['select'][0]:.2f} (first run)"
            ),
            flush=True,
        )

    best = {key: min(v) for key, v in times.items()}
    med = {key: float(np.median(v)) for key, v in times.items()}
    bcpu = {key: min(v) for key, v in cpu.items()}
    names = {
        "faiss": f"(a) bare FAISS IndexFlatIP search, k={k}",
        "gemm": f"(b) torch GEMM {n_c}x{2 * dim} by {2 * dim}x{n}",
        "select": f"(c) acquisition.select (kernel {args.kernel})",
    }
    for key, label in names.items():
        print(
            f"{label}: wall best {best[key]:.2f} s, median {med[key]:.2f} s; "
            f"CPU best {bcpu[key]:.2f} s"
        )
    print(
        f"select/faiss = {best['select'] / best['faiss']:.3f} wall best-of, "
        f"{med['select'] / med['faiss']:.3f} wall median, "
        f"{bcpu['select'] / bcpu['faiss']:.3f} CPU best-of (goal <= 1.3)"
    )
    print(
        f"select/GEMM = {best['select'] / best['gemm']:.3f} wall best-of, "
        f"{bcpu['select'] / bcpu['gemm']:.3f} CPU best-of"
    )
    print(f"peak RSS during select / (z+g) = {rss_select / zg_bytes:.2f} (goal < 2)")


if __name__ == "__main__":
    main()
