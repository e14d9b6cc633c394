"""The simulation's data: labelled folders decoded once, and the paper's biased pool (§9)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.images import ImageSet, decode_failure, fits_in_memory, preload, scan_images
from alfk_cli.models import InputSpec

__all__ = ["Folder", "biased_rows", "load_folder", "resolve_rare"]


@dataclass
class Folder:
    """A labelled folder decoded once: the readable images, uint8 [N, C, H, W] and labels [N]."""

    images: ImageSet
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def load_folder(
    root: str | Path, spec: InputSpec, classes: Sequence[str] | None, workers: int | None, what: str
) -> Folder:
    found = scan_images(root, classes=classes, verify=False)
    if not found.labelled:
        raise AlfkError(f"the {what} folder {root} needs class sub-folders (one per class)")
    if not fits_in_memory(len(found), spec):
        raise AlfkError(f"the {what} folder {root} is too large to simulate in memory")
    x, ok = preload(found, spec, workers)
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise AlfkError(f"no readable images in {root}")
    # images that failed to decode are left out and listed with the scan's skips
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
    return Folder(images, x[torch.from_numpy(keep)], torch.from_numpy(images.labels.copy()))


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
