"""The HDF5 feature store's format, schema version 1 (docs/design.md "The feature store").

One file per embedded image set:

==========================  =====================  ============================================
node                        shape, type            meaning
==========================  =====================  ============================================
attrs ``schema_version``    int64 scalar = 1
attrs ``alfk_version``,     UTF-8 str              provenance
``created``, ``image_root``,
``arch``, ``checkpoint_sha256``, ``pseudo_label``
attrs ``taps``              UTF-8 str array        tapped layer names, in order
attrs ``scale_dims``        int64 array            length of each scale; they sum to L
``paths``                   [N] UTF-8 str          relative to ``image_root``, POSIX separators
``labels``                  [N] int64              class index from the sub-folder, −1 unknown
``classes``                 [D] UTF-8 str          class names
``z``, ``g``                [N, L] float32         raw pooled features / Fisher scores
``logits``                  [N, D] float32         model outputs
``pseudo``                  [N] int64              the label g was computed with
==========================  =====================  ============================================

Extra nodes (allowed by the schema): ``size`` and ``mtime_ns`` ([N] int64, each image's file size
and modification time, for incremental reuse), attrs ``seed``, ``embed_config`` (JSON of what
determined the contents, ``decode`` among it: ``data.imagefile.DECODE_VERSION``, the rule that turned
files into pixels), ``config_fingerprint`` (hash of that config) and ``fingerprint`` (hash
of the config and the image list).

Writing is atomic and resumable (``store.writer``). The writer works on ``atomic.partial_path(out)``
(``.NAME.partial`` beside ``out``) and renames it into place only when every row is written. The
partial file carries the ``fingerprint`` and a per-row ``_done`` mask (with its count in the
attribute ``rows_done``), updated only after the rows themselves are written and flushed; a re-run
with the same fingerprint continues where the last one stopped, a partial with any other
fingerprint (or one HDF5 cannot open) is deleted and started over. ``_done`` and ``rows_done``
are removed before the rename, so a complete store never has them.

Compression, measured through this writer (z, g and logits written batch by batch with a flush
each, then read back whole; size relative to the raw float32 bytes) on 10,000 MNIST test images
through a LeNet trained to 94% (L80, batches of 256) and 3,072 of them through ResNet-10 (L768,
batches of 128), 2 CPU cores:

=========  ===========  ===========  ==================  ==================
filter     LeNet L80    ResNet-10    write (ResNet-10)   read (ResNet-10)
=========  ===========  ===========  ==================  ==================
none       1.00         1.00         340 MB/s            2.9 GB/s
lzf        0.89         0.88         105 MB/s            680 MB/s
gzip (4)   0.82         0.80          36 MB/s            260 MB/s
=========  ===========  ===========  ==================  ==================

(gzip with the shuffle filter: 0.76–0.77; gzip level 1: 0.78.) z is post-ReLU (about 40% exact
zeros), g and the logits are dense floats. We use **lzf**: 11–12% smaller at ~100 MB/s, fast
enough never to hold back a GPU run (ResNet-18 L768 makes ~6 KB of z and g per image; gzip at
~35 MB/s, single-threaded under h5py's lock, would take a large share of the main thread at a
few thousand images/s), and 2.6× faster than gzip to read back when ``alfk score`` loads a
whole store. Chunks are ``chunk_rows`` rows (the embedding batch size) × L, so the batches of a
fresh run fill whole chunks and a flush never rewrites a compressed chunk.

The reference checksum in a pool store's fingerprint is ``FeatureStore.data_sha256()`` (the
reference's checkpoint, taps, paths, labels, classes and z), not the file's bytes, so a validation
store rewritten with identical contents (e.g. by the orchestrator) does not invalidate pool stores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
COMPRESSION = "lzf"
REQUIRED_ATTRS = (
    "schema_version",
    "alfk_version",
    "created",
    "image_root",
    "arch",
    "checkpoint_sha256",
    "pseudo_label",
    "taps",
    "scale_dims",
)
REQUIRED_NODES = ("paths", "labels", "classes", "z", "g", "logits", "pseudo")
# nodes with one row per image (the rest are per store)
ROW_NODES = ("paths", "labels", "size", "mtime_ns", "z", "g", "logits", "pseudo")
STR = h5py.string_dtype("utf-8")


def str_array(values: Sequence[str]) -> np.ndarray:
    """``values`` as an array h5py writes as UTF-8 strings (with dtype ``STR``)."""
    return np.array([str(v) for v in values], dtype=object)


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: equal configs give equal text, hence equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_fingerprint(config: dict) -> str:
    """Hash of everything but the image list that determines a store's contents."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def content_fingerprint(
    config: dict,
    paths: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray | None,
    mtime_ns: np.ndarray | None,
) -> str:
    """Hash of the config and the image list (paths, labels, file sizes and mtimes)."""
    h = hashlib.sha256(config_fingerprint(config).encode())
    sizes = np.full(len(paths), -1) if sizes is None else sizes
    mtime_ns = np.full(len(paths), -1) if mtime_ns is None else mtime_ns
    for p, lab, s, m in zip(paths, labels.tolist(), sizes.tolist(), mtime_ns.tolist()):
        h.update(f"\n{p}\0{lab}\0{s}\0{m}".encode())
    return h.hexdigest()


__all__ = [
    "COMPRESSION",
    "REQUIRED_ATTRS",
    "REQUIRED_NODES",
    "ROW_NODES",
    "SCHEMA_VERSION",
    "STR",
    "canonical_json",
    "config_fingerprint",
    "content_fingerprint",
    "str_array",
]
