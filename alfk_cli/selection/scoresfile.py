"""The scores file written by ``alfk score`` and read by ``alfk select --scores``.

It is self-contained: besides the row indices into the pool store (``selected``) it keeps the
selected images' paths, predicted classes and matched centres, so printing a selection never
needs the (large) pool store again. Written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import h5py
import numpy as np

from alfk_cli import __version__
from alfk_cli.errors import AlfkError
from alfk_cli.store.reader import open_hdf5
from alfk_cli.util.atomic import atomic_output
from alfk_cli.util.reproducible import created_stamp

if TYPE_CHECKING:
    from alfk_cli.strategies.acquisition import Selection

KIND = "alfk-scores"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")
#: How ``alfk select`` prints a selection (``--format``).
ScoreFormat = Literal["txt", "csv", "jsonl", "label-studio"]
FORMATS: tuple[ScoreFormat, ...] = ("txt", "csv", "jsonl", "label-studio")
#: The formats ``Scores.lines`` writes (one line per image); label-studio is ``labels.labelstudio``'s.
LineFormat = Literal["txt", "csv", "jsonl"]
LINE_FORMATS: tuple[LineFormat, ...] = ("txt", "csv", "jsonl")
_NODES = ("selected", "score", "center", "centers", "paths", "predicted", "center_paths")


@dataclass
class Scores:
    """A selection in order: pool rows, their paths (relative to ``image_root``), scores,
    predicted class names, and the validation row (centre) each one matched."""

    selected: np.ndarray
    score: np.ndarray
    center: np.ndarray
    centers: np.ndarray
    paths: list[str]
    predicted: list[str]
    center_paths: list[str]  # the validation image each selected image matched
    image_root: str
    attrs: dict

    def printed_paths(self) -> list[str]:
        """Paths as the user typed the pool folder, joined with each image's path inside it."""
        return [os.path.join(self.image_root, p) for p in self.paths]

    def head(self, n: int | None, exact: bool = False) -> tuple[Scores, str | None]:
        """The first ``n`` of the selection (selection order is rank order), and a warning when
        the file holds fewer (all of them are returned; ``exact`` makes that an error)."""
        if n is None:
            return self, None
        held = len(self.selected)
        warning = None
        if n > held:
            if exact:
                raise AlfkError(f"--P {n} is more than the {held} images this scores file holds")
            warning = f"warning: this scores file holds {held} images, fewer than --P {n}"
        sub = Scores(
            self.selected[:n],
            self.score[:n],
            self.center[:n],
            self.centers,
            self.paths[:n],
            self.predicted[:n],
            self.center_paths[:n],
            self.image_root,
            self.attrs,
        )
        return sub, warning

    def lines(self, fmt: LineFormat = "txt") -> Iterator[str]:
        """The selection as text lines: ``txt`` paths only; ``csv`` and ``jsonl`` add the rank,
        the kernel score, the predicted class and the matched validation image. (``label-studio``
        is one JSON document, not lines: ``labels.labelstudio.tasks``.)"""
        if fmt not in LINE_FORMATS:
            raise AlfkError(f"unknown line format {fmt!r}; use {', '.join(LINE_FORMATS)}")
        paths = self.printed_paths()
        if fmt == "txt":
            yield from paths
            return
        rows = (
            {"path": p, "rank": i + 1, "score": _number(s), "predicted": c, "center": v}
            for i, (p, s, c, v) in enumerate(
                zip(paths, self.score, self.predicted, self.center_paths)
            )
        )
        if fmt == "jsonl":
            yield from (json.dumps(r) for r in rows)
            return
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, ["path", "rank", "score", "predicted", "center"], lineterminator="\n"
        )
        writer.writeheader()
        for r in rows:
            score = r["score"]
            writer.writerow({**r, "score": "" if score is None else f"{score:.6g}"})
        yield from buf.getvalue().splitlines()


def _number(x: float) -> float | None:
    """A score for JSON and CSV: strategies without scores (random) store NaN; print nothing."""
    return None if np.isnan(x) else float(x)


def write_scores(
    out: str | os.PathLike,
    sel: Selection,
    paths: list[str],
    predicted: list[str],
    center_paths: list[str],
    image_root: str,
    attrs: dict,
) -> None:
    """Write ``sel`` to ``out`` with, per selected image, its path inside the pool, its predicted
    class and the path of the validation image it matched."""
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["kind"] = KIND
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["alfk_version"] = __version__
        f.attrs["created"] = created_stamp()  # no wall-clock time: equal runs, equal bytes
        f.attrs["image_root"] = image_root
        f.attrs["kernel"] = sel.kernel
        f.attrs["P"] = len(sel.selected)
        f.attrs["fallback"] = bool(sel.fallback)
        f.attrs["k_used"] = int(sel.k_used)
        for k, v in attrs.items():
            f.attrs[k] = v
        f["selected"] = np.asarray(sel.selected, dtype=np.int64)
        f["score"] = np.asarray(sel.score, dtype=np.float32)
        f["center"] = np.asarray(sel.center, dtype=np.int64)
        f["centers"] = np.asarray(sel.centers, dtype=np.int64)
        for name, values in (
            ("paths", paths),
            ("predicted", predicted),
            ("center_paths", center_paths),
        ):
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR)


def read_scores(path: str | os.PathLike) -> Scores:
    path = Path(path)
    with open_hdf5(path, "scores file") as f:
        if f.attrs.get("kind") != KIND:
            raise AlfkError(f"{path} is not an alfk scores file")
        version = f.attrs.get("schema_version", -1)
        if isinstance(version, np.generic):
            version = version.item()
        if isinstance(version, bytes):
            version = version.decode(errors="replace")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise AlfkError(
                f"{path} has scores schema_version {version}; this alfk reads {SCHEMA_VERSION}"
            )
        missing = [k for k in _NODES if k not in f] + (
            ["image_root"] if "image_root" not in f.attrs else []
        )
        if missing:
            raise AlfkError(f"{path} is not a complete alfk scores file (missing {missing[0]!r})")
        return Scores(
            selected=f["selected"][:],
            score=f["score"][:],
            center=f["center"][:],
            centers=f["centers"][:],
            paths=_strings(f["paths"]),
            predicted=_strings(f["predicted"]),
            center_paths=_strings(f["center_paths"]),
            image_root=str(f.attrs["image_root"]),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        )


def _strings(ds: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[:]]
