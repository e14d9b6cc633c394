"""The simulation's data: labelled folders (held in memory or streamed), the biased pool (§9).

A folder is decoded once when it is loaded, to find the images that fail to decode (they are
left out and listed, as ``embed`` does). Its decoded pixels are then kept only when they fit in
the run's memory budget; otherwise every model pass decodes the rows it reads again, batch by
batch in a DataLoader, so memory grows with the batch, not with the folder. Both give the same
uint8 batches in the same order, so every result is the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alfk_cli.data.decode import (
    PRELOAD_LIMIT_BYTES,
    decodable,
    decode_failure,
    fits_in_memory,
    preload,
)
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.scan import ImageSet, scan_images
from alfk_cli.errors import AlfkError
from alfk_cli.train.sources import ImageSource

__all__ = ["Folder", "biased_rows", "load_folder", "resolve_rare"]


@dataclass
class Folder:
    """A labelled folder's readable images and labels [N]; ``x`` holds them decoded (uint8
    [N, C, H, W]) when they fit in memory, else None and each read decodes them again."""

    images: ImageSet
    y: torch.Tensor
    spec: InputSpec
    workers: int | None = None
    x: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def held_bytes(self) -> int:
        return 0 if self.x is None else self.x.numel()

    def source(self, rows: np.ndarray | None = None, hold: bool = False) -> ImageSource:
        """The images of ``rows`` (every one when None) in that order, labels included: sliced
        from ``x`` when the folder is held, else decoded batch by batch each time the source is
        read; ``hold`` decodes them once now instead (a set read many times, e.g. each epoch)."""
        if self.x is not None:
            if rows is None:
                return ImageSource.from_tensors(self.x, self.y, self.spec)
            t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
            return ImageSource.from_tensors(self.x, self.y[t], self.spec, rows=t)
        if rows is None:
            rows = np.arange(len(self), dtype=np.int64)
        src = ImageSource.streamed(self.images, self.spec, rows, self.workers)
        if not hold or len(src) == 0:
            return src
        x = torch.cat([img for img, _ in src.batches(DECODE_BATCH)])
        return ImageSource.from_tensors(x, src.labels, self.spec)

    def batches(self, rows: np.ndarray | None, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 batches of ``rows`` in order (see :meth:`source`)."""
        return (img for img, _ in self.source(rows).batches(batch_size))


# Batch of the decoding passes that only fill memory (no model): the loaders' usual size.
DECODE_BATCH = 256


def load_folder(
    root: str | Path,
    spec: InputSpec,
    classes: Sequence[str] | None,
    workers: int | None,
    what: str,
    budget: int = PRELOAD_LIMIT_BYTES,
) -> Folder:
    """Scan ``root`` and decode every image once: those that fail are left out and listed with
    the scan's skips. The decoded images are kept when they fit in ``budget`` bytes."""
    found = scan_images(root, classes=classes, verify=False)
    if not found.labelled:
        raise AlfkError(f"the {what} folder {root} needs class sub-folders (one per class)")
    hold = fits_in_memory(len(found), spec, budget)
    if hold:
        x, ok = preload(found, spec, workers)
    else:
        x, ok = None, decodable(found, spec, workers)
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise AlfkError(f"no readable images in {root}")
    failed = [
        (found.paths[i], decode_failure(found.absolute(int(i)), spec)) for i in np.flatnonzero(~ok)
    ]
    images = ImageSet(
        found.root,
        [found.paths[i] for i in keep],
        found.labels[keep],
        list(found.classes),
        list(found.skipped) + failed,
    )
    y = torch.from_numpy(images.labels.copy())
    held = None if x is None else (x if keep.size == len(x) else x[torch.from_numpy(keep)])
    return Folder(images, y, spec, workers, held)


def resolve_rare(rare: Sequence[str | int], classes: Sequence[str]) -> list[int]:
    """Rare classes by folder name, or by index when no folder has that name."""
    out = []
    for r in rare:
        r = str(r).strip()
        if r in classes:
            out.append(list(classes).index(r))
        elif r.isdigit() and int(r) < len(classes):
            out.append(int(r))
        else:
            raise AlfkError(f"rare class {r!r} is not among the classes {','.join(classes)}")
    return sorted(set(out))


def biased_rows(
    labels: np.ndarray, rare: Sequence[int], imbalance: float | None, seed: int
) -> np.ndarray:
    """Pool rows kept by the paper's biased protocol (§9), sorted.

    Every row of a non-rare class is kept; of the rare classes taken together,
    ``floor(n_nonrare / imbalance)`` rows are drawn at random (seeded, capped at what there is).
    ``imbalance`` None or 1 keeps every row.
    """
    labels = np.asarray(labels)
    if imbalance is None or imbalance == 1:
        return np.arange(len(labels), dtype=np.int64)
    if not imbalance > 0:
        raise AlfkError(f"the imbalance ratio must be positive, got {imbalance}")
    is_rare = np.isin(labels, np.asarray(list(rare), dtype=np.int64))
    common = np.flatnonzero(~is_rare)
    rare_rows = np.flatnonzero(is_rare)
    want = min(math.floor(len(common) / imbalance + 1e-9), len(rare_rows))
    rng = np.random.default_rng([int(seed), 0xB1A5])
    drawn = rng.choice(rare_rows, size=want, replace=False) if want else rare_rows[:0]
    return np.sort(np.concatenate([common, drawn])).astype(np.int64)
