#!/usr/bin/env python3
"""Regenerate the bundled MNIST sample in examples/data/mnist-sample/.

Draws ``--per-class`` images of every digit (default 800, i.e. 8,000 in total) without
replacement from the official MNIST test set (t10k), with ``numpy.random.default_rng(seed)``:
for digits 0..9 in order, ``rng.choice(indices_of_digit, per_class, replace=False)``. The drawn
test-set indices are sorted, so the sample keeps the original t10k order. The result is written
as gzipped IDX files (level 9, gzip mtime 0, so reruns are byte-identical)::

    python examples/make_mnist_sample.py --mnist DIR_WITH_T10K_FILES

``DIR_WITH_T10K_FILES`` holds t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (the
standard MNIST distribution files). The decoded contents are checked against known SHA-256
digests so a different or corrupt copy is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_biased_folders import BuildError, read_idx, write_idx

OUT_DIR = Path(__file__).resolve().parent / "data" / "mnist-sample"
# SHA-256 of the decoded (uncompressed) IDX payloads of the official MNIST t10k files.
T10K_IMAGES_SHA256 = "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"
T10K_LABELS_SHA256 = "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"


def draw_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted source indices of a stratified sample of ``per_class`` images per label."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise BuildError(f"digit {c} has only {len(idx)} images (< {per_class})")
        picked.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", required=True, help="folder with the MNIST t10k-*-ubyte.gz files")
    p.add_argument("--out", default=str(OUT_DIR), help=f"output folder (default {OUT_DIR})")
    p.add_argument("--per-class", type=int, default=800, help="images per digit (default 800)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 check of the t10k files"
    )
    args = p.parse_args(argv)
    src = Path(args.mnist)
    try:
        images = read_idx(src / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(src / "t10k-labels-idx1-ubyte.gz")
        if not args.no_verify:
            for arr, want, name in (
                (images, T10K_IMAGES_SHA256, "images"),
                (labels, T10K_LABELS_SHA256, "labels"),
            ):
                if hashlib.sha256(arr.tobytes()).hexdigest() != want:
                    raise BuildError(f"{src}: t10k {name} differ from the official MNIST file")
        idx = draw_sample(labels, args.per_class, args.seed)
    except (BuildError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_idx(out / "images-idx3-ubyte.gz", images[idx])
    write_idx(out / "labels-idx1-ubyte.gz", labels[idx].astype(np.uint8))
    for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        f = out / name
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        print(f"{f}: {f.stat().st_size} bytes, sha256 {digest}", file=sys.stderr)
    print(f"{len(idx)} images, per class {np.bincount(labels[idx]).tolist()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
