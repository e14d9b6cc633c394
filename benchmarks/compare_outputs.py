"""Compare two folders of alfk outputs made from the same inputs (benchmarks/move_identity.sh).

    python benchmarks/compare_outputs.py OUT_A OUT_B

The same files in both; each HDF5 store or scores file: the same groups, every dataset with the
same dtype, shape and bytes, every attribute equal; each checkpoint (``*.pt``): the same nested
metadata and every tensor with the same dtype, shape and bytes; a ledger (``*.sqlite``): the
same tables and rows; every other file byte for byte. Values that record when or how long
(attribute, key or column names with ``time``, ``created``, ``started``, ``seconds``...) are
left out, as are ``commit.txt`` (which commit made the folder) and the work folder's ``lock``
(who held it). Prints each difference and exits 1 when there is one, else prints what was
compared.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

TIMES = re.compile(r"time|created|started|finished|seconds|date|_at$|elapsed", re.IGNORECASE)
SKIP_FILES = {"commit.txt", "lock"}  # which commit; the lock holder (pid@host)


def h5_items(path: Path) -> dict[str, Any]:
    """Every dataset (as raw bytes with dtype and shape) and attribute of an HDF5 file."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                arr = np.asarray(data)
                raw = arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode()
                out[f"dataset {name}"] = (str(obj.dtype), obj.shape, raw)
            for key, value in obj.attrs.items():
                if not TIMES.search(key):
                    out[f"attr {name}@{key}"] = _plain(value)

        visit("/", f)
        f.visititems(visit)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # object arrays (strings) by value, not by pointer
        raw = repr(value.tolist()).encode() if value.dtype == object else value.tobytes()
        return (str(value.dtype), value.shape, raw)
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def pt_items(path: Path, prefix: str = "") -> dict[str, Any]:
    """Every tensor (dtype, shape, bytes) and metadata leaf of a checkpoint, by key path."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    out: dict[str, Any] = {}
    _walk(obj, prefix, out)
    return out


def _walk(obj: Any, key: str, out: dict[str, Any]) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().cpu()
        out[key] = (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes()
                    if t.numel() else b"")  # fmt: skip
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not TIMES.search(str(k)):
                _walk(v, f"{key}/{k}", out)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _walk(v, f"{key}[{i}]", out)
    else:
        out[key] = obj


def sqlite_items(path: Path) -> dict[str, Any]:
    """Every table's rows (time columns left out), in rowid order."""
    out: dict[str, Any] = {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in sorted(tables):
            cols = [r[1] for r in con.execute(f"PRAGMA table_info('{table}')")]
            keep = [c for c in cols if not TIMES.search(c)]
            rows = con.execute(f"SELECT {', '.join(keep)} FROM '{table}' ORDER BY rowid").fetchall()
            out[f"table {table} {keep}"] = rows
    finally:
        con.close()
    return out


def items(path: Path) -> dict[str, Any]:
    if path.suffix == ".h5":
        return h5_items(path)
    if path.suffix == ".pt":
        return pt_items(path)
    if path.suffix == ".sqlite":
        return sqlite_items(path)
    return {"bytes": path.read_bytes()}


def compare(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """The differences between the folders, and what was compared (one line per file)."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in SKIP_FILES}
    diffs = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    diffs += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    seen = []
    for rel in sorted(files_a & files_b):
        ia, ib = items(a / rel), items(b / rel)
        for key in sorted(set(ia) | set(ib)):
            if key not in ia or key not in ib:
                diffs.append(f"{rel}: {key} in one only")
            elif ia[key] != ib[key]:
                diffs.append(f"{rel}: {key} differs")
        seen.append(f"{rel}: {len(ia)} items")
    return diffs, seen


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    diffs, seen = compare(a, b)
    for line in seen:
        print("compared", line)
    for line in diffs:
        print("DIFFERENT", line)
    print(f"{len(seen)} files compared, {len(diffs)} difference(s)")
    raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()
