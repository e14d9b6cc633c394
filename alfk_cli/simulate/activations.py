"""Cached activations of a frozen backbone, for ``simulate --freeze`` (docs/design.md).

With the stages up to a boundary frozen (:mod:`alfk_cli.models.freeze`), their outputs are a fixed
function of each image for the whole run. They are computed once per frozen model: one eval-mode
forward of every validation, test and pool image through the frozen stages, in batches of
:data:`ACT_BATCH` in row order, in plain float32 (``devices.full_precision``). Two stages' outputs
are kept:

* the **boundary** (the last frozen stage): every round's training, the test accuracy and the
  probabilities the baselines read run the rest of the network on it;
* the **cut**, the earlier of the boundary and the first tap: z and g (and the classifier inputs
  of badge and SIMILAR) run from it, so a tap inside the frozen part still gets its exact Fisher
  score (the backward runs through the frozen stages between the cut and the boundary).

Each table is held in memory when it fits in what is left of the run's budget (``--cache-mib``,
after the decoded images), else written once to a memory-mapped file under the results folder's
``cache/`` that is unlinked at once (the disk space goes when the run ends, even a killed one).
The numbers are the same bits either way.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alfk_cli.data.decode import normalizer
from alfk_cli.models.freeze import frozen_digest
from alfk_cli.models.nets import TapNet
from alfk_cli.simulate.data import Folder
from alfk_cli.train.sources import ImageSource
from alfk_cli.util.devices import full_precision

__all__ = ["ACT_BATCH", "ActivationCache", "Activations", "FrozenTables", "cut_stage"]

#: Batch of the passes that fill the tables: fixed, so the cached numbers do not depend on how
#: the run was split or how much memory it had.
ACT_BATCH = 256


def cut_stage(stage_names: Sequence[str], boundary: str, taps: Sequence[str]) -> str:
    """The stage whose output the descriptors start from: the boundary, or the first tap when
    a tap lies inside the frozen part."""
    names = list(stage_names)
    return names[min([names.index(boundary), *(names.index(t) for t in taps)])]


@dataclass
class Activations:
    """Stage outputs (float32 [N, ...] per stage name) of some rows of one folder, with their
    labels; ``position`` maps a folder row to its row here (-1 where absent)."""

    at: dict[str, torch.Tensor]
    y: torch.Tensor
    position: np.ndarray

    def _rows(self, rows: np.ndarray | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(len(self.y))
        pos = self.position[np.asarray(rows, dtype=np.int64)]
        assert (pos >= 0).all(), "activations were not computed for every row asked for"
        return torch.from_numpy(pos)

    def source(self, stage: str, rows: np.ndarray | None = None) -> ImageSource:
        """The outputs of ``stage`` for folder rows ``rows`` (every row when None), labelled, as
        a source of model inputs (``spec`` None), read without a copy."""
        take = self._rows(rows)
        return ImageSource.from_tensors(self.at[stage], self.y[take], None, rows=take)

    def batches(self, stage: str, rows: np.ndarray | None, size: int) -> Iterator[torch.Tensor]:
        return (x for x, _ in self.source(stage, rows).batches(size))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.at.values())


@dataclass
class FrozenTables:
    """The activations of one frozen part (``key``: its :func:`freeze.frozen_digest` and the
    pool rows')."""

    key: str
    cut: str
    boundary: str
    val: Activations
    test: Activations
    pool: Activations

    @property
    def nbytes(self) -> int:
        return self.val.nbytes + self.test.nbytes + self.pool.nbytes


class ActivationCache:
    """The tables of the frozen model met last: a new frozen part (another seed's pretrained
    model) or pool replaces them; the same frozen weights, bit for bit, on the same pool rows
    (another strategy of the seed, a resumed run) reuse them."""

    def __init__(
        self,
        frozen: Sequence[str],
        taps: Sequence[str],
        budget: int,
        spill: Path,
        device: torch.device,
        say: Callable[[str], None],
    ):
        self.frozen, self.taps = list(frozen), tuple(taps)
        self.budget, self.spill, self.device, self.say = budget, spill, device, say
        self.current: FrozenTables | None = None

    def tables(
        self, model: TapNet, val: Folder, test: Folder, pool: Folder, pool_rows: np.ndarray
    ) -> FrozenTables:
        """The tables for ``model``'s frozen part: validation, test, and pool rows ``pool_rows``."""
        rows = np.unique(pool_rows)
        # the pool's rows too: two seeds may share a frozen part (not a pool) one day
        key = frozen_digest(model, self.frozen) + hashlib.sha256(rows.tobytes()).hexdigest()[:16]
        if self.current is not None and self.current.key == key:
            return self.current
        self.current = None  # free the old tables before filling new ones
        boundary = self.frozen[-1]
        cut = cut_stage(model.stage_names, boundary, self.taps)
        both = tuple(dict.fromkeys((cut, boundary)))
        left = [self.budget]
        fill = _Filler(model, val.spec, both, self.device, self.spill / key[:16], left)
        self.current = FrozenTables(
            key, cut, boundary,
            val=fill.folder(val, None, "val", both),
            test=fill.folder(test, None, "test", (boundary,)),
            pool=fill.folder(pool, rows, "pool", both),
        )  # fmt: skip
        t = self.current
        mib = t.nbytes / (1 << 20)
        where = "in memory" if not fill.spilled else f"{mib - fill.spilled / (1 << 20):.0f} MiB "
        where += "" if not fill.spilled else "in memory, the rest memory-mapped from disk"
        self.say(
            f"frozen up to {boundary}: activations at {', '.join(both)} of "
            f"{len(t.val.y) + len(t.test.y) + len(t.pool.y)} images, {mib:.0f} MiB {where}"
        )
        return t


class _Filler:
    """Computes stage outputs into tensors held while ``left[0]`` bytes of budget remain, else
    into unlinked memory-mapped files under ``spill``."""

    def __init__(
        self,
        model: TapNet,
        spec,
        stages: Sequence[str],
        device: torch.device,
        spill: Path,
        left: list[int],
    ):
        self.model, self.spec, self.device, self.spill, self.left = model, spec, device, spill, left
        last = max(model.stage_names.index(s) for s in stages)
        self.run = model.stage_names[: last + 1]
        self.spilled = 0

    def _empty(self, shape: tuple[int, ...], name: str) -> torch.Tensor:
        size = math.prod(shape) * 4
        if size <= self.left[0]:
            self.left[0] -= size
            return torch.empty(shape, dtype=torch.float32)
        self.spill.mkdir(parents=True, exist_ok=True)
        path = self.spill / f"{name}.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        os.unlink(path)  # the mapping stays; the file goes with it
        self.spilled += size
        return torch.from_numpy(mm)

    @torch.no_grad()
    def folder(
        self, folder: Folder, rows: np.ndarray | None, what: str, stages: Sequence[str]
    ) -> Activations:
        model = self.model.eval().to(self.device)
        rows = np.arange(len(folder), dtype=np.int64) if rows is None else rows
        position = np.full(len(folder), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        norm = normalizer(self.spec)
        out: dict[str, torch.Tensor] = {}
        start = 0
        with full_precision():
            for x in folder.batches(rows, ACT_BATCH):
                h = norm(x.to(self.device))
                for name in self.run:
                    h = model.stages[name](h)
                    if name in stages:
                        if name not in out:
                            out[name] = self._empty((len(rows), *h.shape[1:]), f"{what}-{name}")
                        out[name][start : start + len(h)] = h.float().cpu()
                start += len(x)
        return Activations(out, folder.y[torch.from_numpy(rows)], position)
