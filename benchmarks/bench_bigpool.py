"""Peak memory and time of the real `alfk score` on a big synthetic pool store (issue 12).

Writes a validation store and a pool store of N x L float32 z and g, both genuine schema-1
feature stores (`storeformat`): the attributes and nodes `alfk score` reads, rows chunked by 256
and lzf-compressed as `embed` writes them. z is post-ReLU-like (max(0, N(0,1)): half exact
zeros), g is N(0,1), logits N(0,1). Generation goes block by block (`--block` rows), so its
memory is bounded by a block, never by the pool. The validation store has 2 x P rows, all
misclassified, so k-center picks the P centres. Then `alfk score` runs as a child process (one
or more times) and the script prints its wall time, CPU time (user + system) and peak RSS
(`os.wait4`), with the machine's load average, since timings on a shared machine vary.

`--virtual-from S` makes the pool's z, g and logits HDF5 virtual datasets that repeat S real
rows (stored once, under `_source/` in the same file) until N: N distinct paths, S distinct
vectors. Repeated rows score exactly alike (canonical scores depend on the vectors alone), so
they only add exact ties, which the exact search breaks by the smaller row id; the work per row
(read, decompress, standardise, filter) is the same as for distinct rows. Disk: S rows, not N.

`--exclude-lines E` adds one more run with an exclusion list of E pool images (`score
--exclude`, pool-relative lines: every line spelling costs the same pool-side look-up).

The stores go to `--root` (refused when less than `--min-free-gb` would be left) and are deleted
at the end unless `--keep`.

Usage: python benchmarks/bench_bigpool.py --n 1000000 [--virtual-from S] [--dim 768] [--P 1250]
           [--kernel sum] [--exclude-lines 0] [--runs 1] [--root /tmp/bigpool] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from childproc import run_child  # noqa: E402

from alfk_cli import __version__  # noqa: E402
from alfk_cli.storeformat import COMPRESSION, SCHEMA_VERSION, STR, str_array  # noqa: E402

CLASSES = [f"c{i}" for i in range(10)]
ROW_CHUNK = 256  # the embedding batch: what `embed` chunks stores by


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _header(f: h5py.File, root: str, dims: list[int], fingerprint: str) -> None:
    """The attributes every store carries (`storeformat.REQUIRED_ATTRS`) and the classes."""
    f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
    f.attrs["alfk_version"] = __version__
    f.attrs["created"] = ""
    f.attrs["image_root"] = root
    f.attrs["arch"] = "resnet18"
    f.attrs["checkpoint_sha256"] = hashlib.sha256(b"bench_bigpool").hexdigest()
    f.attrs["pseudo_label"] = "p_yz"
    f.attrs.create("taps", data=str_array(["layer3", "layer4"][-len(dims) :]), dtype=STR)
    f.attrs["scale_dims"] = np.asarray(dims, dtype=np.int64)
    f.attrs["seed"] = np.int64(0)
    f.attrs["fingerprint"] = fingerprint
    f.create_dataset("classes", data=str_array(CLASSES), dtype=STR)


def _rows(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, ...]:
    z = rng.standard_normal((n, dim), dtype=np.float32)
    np.maximum(z, 0, out=z)
    g = rng.standard_normal((n, dim), dtype=np.float32)
    logits = rng.standard_normal((n, len(CLASSES)), dtype=np.float32)
    return z, g, logits


def _matrix(f: h5py.File, name: str, n: int, width: int) -> h5py.Dataset:
    chunks = (min(ROW_CHUNK, n), width)
    return f.create_dataset(name, (n, width), np.float32, chunks=chunks, compression=COMPRESSION)


def write_val(path: Path, m: int, dims: list[int], seed: int) -> None:
    """m validation rows with labels that every logit row gets wrong (all misclassified)."""
    rng = np.random.default_rng([seed, 1])
    z, g, logits = _rows(rng, m, sum(dims))
    labels = (np.argmax(logits, axis=1) + 1) % len(CLASSES)
    with h5py.File(path, "w") as f:
        _header(f, "/bench/val", dims, f"bench-val-{m}-{sum(dims)}-{seed}")
        paths = [f"{CLASSES[c]}/v{i:07d}.jpg" for i, c in enumerate(labels)]
        f.create_dataset("paths", data=str_array(paths), dtype=STR)
        f.create_dataset("labels", data=labels.astype(np.int64))
        for name, x in (("z", z), ("g", g), ("logits", logits)):
            _matrix(f, name, m, x.shape[1])[:] = x
        f.create_dataset("pseudo", data=labels.astype(np.int64))


def pool_path(i: int) -> str:
    return f"d{i // 10000:04d}/{i:08d}.jpg"


def write_pool(path: Path, n: int, dims: list[int], seed: int, block: int, source: int) -> None:
    """n pool rows written block by block; ``source`` < n: z, g, logits repeat ``source`` real
    rows through virtual datasets."""
    dim = sum(dims)
    real = min(source, n)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        _header(f, "/bench/unlabeled", dims, f"bench-pool-{n}-{real}-{dim}-{seed}")
        ds = {"paths": f.create_dataset("paths", (n,), STR, chunks=(min(n, 65536),))}
        for k in ("labels", "pseudo"):
            ds[k] = f.create_dataset(
                k, (n,), np.int64, chunks=(min(n, 65536),), compression=COMPRESSION
            )
        prefix = "_source/" if real < n else ""
        mats = {
            k: _matrix(f, prefix + k, real, w) for k, w in (("z", dim), ("g", dim), ("logits", 10))
        }
        for a in range(0, n, block):
            b = min(n, a + block)
            ds["paths"][a:b] = str_array([pool_path(i) for i in range(a, b)])
            ds["labels"][a:b] = -1
            ds["pseudo"][a:b] = np.random.default_rng([seed, 2, a]).integers(0, 10, b - a)
            if a < real:
                e = min(b, real)
                rows = _rows(np.random.default_rng([seed, 3, a]), e - a, dim)
                for name, x in zip(("z", "g", "logits"), rows):
                    mats[name][a:e] = x
            print(f"  wrote rows {b:,} / {n:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if real < n:
            for name, width in (("z", dim), ("g", dim), ("logits", 10)):
                _repeat(f, name, n, real, width)


def _repeat(f: h5py.File, name: str, n: int, real: int, width: int) -> None:
    """``name`` as a virtual dataset of n rows cycling through the ``real`` rows of _source/."""
    layout = h5py.VirtualLayout(shape=(n, width), dtype=np.float32)
    src = h5py.VirtualSource(".", f"_source/{name}", shape=(real, width))
    for a in range(0, n, real):
        m = min(real, n - a)
        layout[a : a + m] = src[:m]
    f.create_virtual_dataset(name, layout)


def run_score(args: list[str], label: str) -> dict[str, float]:
    """Run ``alfk ARGS`` as a child; its wall and CPU seconds and peak RSS (os.wait4)."""
    cmd = [sys.executable, "-m", "alfk_cli", *args]
    load0 = os.getloadavg()[0]
    wall, usage, _ = run_child(cmd, label, tail=3000)
    out = {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss * 1024.0,  # KiB on Linux
    }
    print(
        f"{label}: wall {wall:.1f} s, CPU {out['cpu']:.1f} s (user {usage.ru_utime:.1f} + sys "
        f"{usage.ru_stime:.1f}), peak RSS {_gib(out['rss'])}; load average {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return out


def _disk_needed(n: int, real: int, dim: int) -> int:
    """Bytes the pool store may take (float data as if incompressible, ~40 B per path)."""
    return real * (2 * dim + 10) * 4 + n * (16 + 8 + 8 + 40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="pool rows")
    ap.add_argument(
        "--virtual-from", type=int, default=0, help="real rows repeated to n (0: all real)"
    )
    ap.add_argument("--dim", type=int, default=768, help="L (z and g each); two scales L/3 + 2L/3")
    ap.add_argument("--P", type=int, default=1250)
    ap.add_argument("--kernel", default="sum")
    ap.add_argument("--exclude-lines", type=int, default=0)
    ap.add_argument("--runs", type=int, default=1, help="`alfk score` runs (each fresh)")
    ap.add_argument("--block", type=int, default=65536, help="rows generated per block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=Path("/tmp/bigpool"))
    ap.add_argument("--min-free-gb", type=float, default=15.0)
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument(
        "--device", default="cpu", help="score's --device; a comma list runs each and compares"
    )
    ap.add_argument(
        "--bare", action="store_true", help="also a bare torch matmul + top-k over the same rows"
    )
    args = ap.parse_args()
    n, dim = args.n, args.dim
    real = args.virtual_from if 0 < args.virtual_from < n else n
    dims = [dim // 3, dim - dim // 3]
    args.root.mkdir(parents=True, exist_ok=True)
    need = _disk_needed(n, real, dim)
    free = shutil.disk_usage(args.root).free
    if free - need < args.min_free_gb * 2**30:
        sys.exit(f"error: {args.root}: {_gib(free)} free, the pool needs up to {_gib(need)} and "
                 f"{args.min_free_gb:.0f} GiB must stay free")  # fmt: skip
    val, pool = args.root / "val.h5", args.root / "pool.h5"
    try:
        _bench(args, n, real, dims, val, pool)
    finally:
        if not args.keep:
            for p in (val, pool, args.root / "scores.h5", args.root / "exclude.txt"):
                p.unlink(missing_ok=True)


def _bench(
    args: argparse.Namespace, n: int, real: int, dims: list[int], val: Path, pool: Path
) -> None:
    print(f"pool {n:,} x {sum(dims)} (z and g; {real:,} real rows), validation {2 * args.P:,} rows, "
          f"P {args.P}, kernel {args.kernel}, {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    write_val(val, 2 * args.P, dims, args.seed)
    t0 = time.perf_counter()
    gen = resource_usage()
    write_pool(pool, n, dims, args.seed, args.block, real)
    gen_rss = resource_usage()
    print(f"generated in {time.perf_counter() - t0:.0f} s; store {_gib(pool.stat().st_size)}; "
          f"generator peak RSS {_gib(max(gen, gen_rss))}", flush=True)  # fmt: skip
    runs = []
    for device in args.device.split(","):
        score = ["score", "--val", str(val), "--pool", str(pool), "--P", str(args.P),
                 "--kernel", args.kernel, "--out", str(args.root / "scores.h5"),
                 "--device", device, "-q"]  # fmt: skip
        runs += [(score, f"alfk score --device {device}, run {r + 1}") for r in range(args.runs)]
    if args.exclude_lines:
        rows = np.random.default_rng(args.seed).choice(n, args.exclude_lines, replace=False)
        (args.root / "exclude.txt").write_text("".join(pool_path(i) + "\n" for i in rows))
        excl = [*score, "--exclude", str(args.root / "exclude.txt")]
        runs.append((excl, f"alfk score --exclude ({args.exclude_lines:,} lines)"))
    first = None
    for cmd, label in runs:
        (args.root / "scores.h5").unlink(missing_ok=True)
        run_score(cmd, label)
        with h5py.File(args.root / "scores.h5", "r") as f:
            sel, score = f["selected"][()], f["score"][()]
        same = "" if first is None else (
            "; identical to the first run's selection and scores"
            if np.array_equal(sel, first[0]) and np.array_equal(score, first[1])
            else "; DIFFERS from the first run's selection or scores"
        )  # fmt: skip
        first = first or (sel, score)
        print(f"  selected {sel.size} rows, {np.unique(sel % real).size} distinct vectors{same}")
    if args.bare:
        from bare_topk import bare_topk  # torch, only for this

        bare_topk(val, pool, args.P, args.block)


def resource_usage() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
