"""Time and memory of the modern baselines' selection maths on a synthetic pool (issue 11).

BADGE's k-means++ (``strategies.badge.kmeanspp_rows``), SIMILAR's FLQMI lazy greedy and GCMI
(``strategies.similar``) and class-balanced entropy (``baselines.balanced_top``) over N pool rows with D
classes and F classifier-input features, |Q| query rows, P picks. The inputs are random softmax
outputs and |N(0,1)| features (ReLU-like), so the embeddings' geometry is not a trained
network's, and lazy greedy's savings depend on that geometry. FLQMI runs twice: with the N×|Q|
similarities kept (when they fit in 1 GiB) and, with ``--uncached``, with every re-evaluated row
recomputed (what a pool too large for the cache gets; slow on random embeddings, where nearly
every bound goes stale at each pick).

    python benchmarks/bench_strategies.py --n 100000 --classes 10 --features 512 --queries 1000 --P 250
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from alfk_cli.strategies import badge, baselines, similar
from alfk_cli.strategies.quotas import class_quotas


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _probs(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    logits = rng.normal(scale=3.0, size=(n, d))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--P", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--uncached", action="store_true", help="also run FLQMI recomputing every re-evaluated row"
    )
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n, d, f, m = args.n, args.classes, args.features, args.queries
    probs = _probs(rng, n, d)
    feats = np.abs(rng.normal(size=(n, f))).astype(np.float32)
    qp, qf = _probs(rng, m, d), np.abs(rng.normal(size=(m, f))).astype(np.float32)
    qy = rng.integers(0, d, m)
    print(f"N={n} D={d} F={f} |Q|={m} P={args.P}; inputs {_rss_gib():.2f} GiB peak RSS so far")

    t0 = time.perf_counter()
    rows = baselines.balanced_top(
        baselines.entropy(probs), probs.argmax(1), class_quotas(args.P, np.ones(d)),
        np.ones(n, dtype=bool),
    )  # fmt: skip
    print(f"balanced-entropy: {time.perf_counter() - t0:7.2f} s ({len(rows)} rows)")

    t0 = time.perf_counter()
    emb = badge.grad_embedding(probs, feats)
    rows = badge.kmeanspp_rows(emb, args.P, args.seed)
    print(f"badge k-means++:  {time.perf_counter() - t0:7.2f} s, peak RSS {_rss_gib():.2f} GiB")

    pool = badge.grad_embedding(probs, feats, bias=True)
    query = badge.grad_embedding(qp, qf, qy, bias=True)
    t0 = time.perf_counter()
    rows, _ = similar.gcmi_top(pool, query, args.P)
    print(f"similar:gcmi:     {time.perf_counter() - t0:7.2f} s, peak RSS {_rss_gib():.2f} GiB")

    for cached in (True, False) if args.uncached else (True,):
        similar.CACHE_ENTRIES = 2**27 if cached else 0
        t0 = time.perf_counter()
        rows, _ = similar.flqmi_greedy(pool, query, args.P)
        how = "N×|Q| kept" if cached and n * m <= 2**27 else "rows recomputed"
        print(
            f"similar (flqmi), {how}: {time.perf_counter() - t0:7.2f} s, "
            f"peak RSS {_rss_gib():.2f} GiB"
        )


if __name__ == "__main__":
    main()
