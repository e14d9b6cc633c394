"""Where training and prediction read images from: batches of uint8 images and their labels.

An :class:`ImageSource` is preloaded from an image set when it fits in memory, streamed from
disk by a DataLoader otherwise (or always: ``streamed``), or made from tensors already decoded.
Every kind yields the same batches for the same rows and order. A source made from tensors with
``spec=None`` holds model inputs that need no normalisation: the cached activations of a frozen
backbone (:mod:`alfk_cli.simulate.activations`); :func:`images.model_inputs` is the step from a batch to what
the network eats either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from alfk_cli.data.decode import (
    ImageDataset,
    decode_failure,
    fits_in_memory,
    loader_workers,
    preload,
)
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.names import printable
from alfk_cli.data.scan import ImageSet
from alfk_cli.errors import AlfkError
from alfk_cli.train import balance
from alfk_cli.util import distributed
from alfk_cli.util.reproducible import loader_generator

__all__ = ["ImageSource"]


class ImageSource:
    """Batches of (uint8 images, labels, rows) from an ImageSet, preloaded when it fits."""

    def __init__(
        self,
        images: ImageSet,
        spec: InputSpec,
        rows: Sequence[int] | np.ndarray | None = None,
        workers: int | None = None,
    ):
        # None only from from_tensors, whose images are all in ``cache``
        self.images: ImageSet | None = images
        self.spec: InputSpec | None = spec
        self.workers = workers
        idx = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.cache: torch.Tensor | None = None
        self.take: torch.Tensor | None = None  # the cache rows read, when not all in order
        self.bad: list[tuple[str, str]] = []
        self.strict = False  # a decode failure while streaming is an error, not a skip
        if fits_in_memory(len(idx), spec):
            sub = ImageSet(
                images.root, [images.paths[r] for r in idx], images.labels[idx], images.classes
            )
            cache, ok = preload(sub, spec, workers)
            self.bad = [self._failure(sub, int(i)) for i in np.flatnonzero(~ok)]
            keep = np.flatnonzero(ok)
            self.cache, idx = cache[torch.from_numpy(keep)], idx[keep]
        self.rows = idx
        self.labels = torch.from_numpy(images.labels[idx])

    def _failure(self, images: ImageSet, i: int) -> tuple[str, str]:
        path = images.absolute(int(i))
        assert self.spec is not None, "only a source of images fails to decode"
        return str(path), decode_failure(path, self.spec)

    @classmethod
    def streamed(
        cls,
        images: ImageSet,
        spec: InputSpec,
        rows: Sequence[int] | np.ndarray,
        workers: int | None = None,
    ) -> ImageSource:
        """A source that decodes ``rows`` of ``images`` batch by batch each time it is read, for
        images known to decode (a failure then is an error: the file changed)."""
        src = cls.__new__(cls)
        src.images, src.spec, src.workers = images, spec, workers
        src.cache, src.take, src.bad, src.strict = None, None, [], True
        src.rows = np.asarray(rows, dtype=np.int64)
        src.labels = torch.from_numpy(images.labels[src.rows])
        return src

    @classmethod
    def from_tensors(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: InputSpec | None,
        rows: torch.Tensor | None = None,
    ) -> ImageSource:
        """A source over images already decoded into memory (uint8 [N, C, H, W]), or over model
        inputs (``spec`` None: float activations, held or memory-mapped); ``rows``: only these
        rows of ``images``, in this order (``labels`` are theirs), read without a copy."""
        src = cls.__new__(cls)
        src.images, src.spec, src.workers = None, spec, 0
        src.cache, src.take, src.bad, src.strict = images, rows, [], False
        src.rows = np.arange(len(images) if rows is None else len(rows))
        src.labels = torch.as_tensor(labels, dtype=torch.int64)
        return src

    def __len__(self) -> int:
        return len(self.rows)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: bool = False,
        weights: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in row order, shuffled, or (``weights``) drawn with replacement ∝ weights.
        ``shard``: under torchrun, this rank's share of the samples only
        (``distributed.shard_order``)."""
        if weights is not None:
            assert generator is not None, "a weighted draw needs the loop's generator"
            order = balance.epoch_order(weights, generator)
        elif shuffle:
            order = torch.randperm(len(self.rows), generator=generator)
        else:
            order = torch.arange(len(self.rows))
        if shard:
            order = distributed.shard_order(order)
        if self.cache is not None:
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                yield self.cache[idx if self.take is None else self.take[idx]], self.labels[idx]
            return
        images = self.images
        assert images is not None and self.spec is not None, "a cacheless source reads images"
        ds = ImageDataset(images, self.spec, self.rows[order.numpy()])
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=loader_workers(self.workers, -(-len(ds) // batch_size)),
            generator=loader_generator(),
        )
        for img, label, rows, ok in loader:
            if not ok.all():
                self.bad.extend(self._failure(images, r) for r in rows[~ok].tolist())
                if self.strict:
                    path, why = self.bad[-1]
                    raise AlfkError(f"{printable(path)}: {why} (it decoded when the run started)")
            yield img[ok], label[ok]
