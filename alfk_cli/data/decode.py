"""Decoding images for a network: one image as a uint8 tensor, datasets, loader workers.

Finding and labelling the images of a folder is ``data.scan`` (no torch); its names are
re-exported here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from alfk_cli.data.imagefile import decode_pixels, open_image
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.scan import ImageSet, available_cores, decode_errors, unreadable
from alfk_cli.util.reproducible import loader_generator

DECODE_ERRORS = decode_errors()  # what PIL raises for a file it cannot decode

# Decoding worker processes when none are asked for: the cores this process may use, at most this
# many (more rarely help one loader, and each costs memory and start-up time).
MAX_AUTO_WORKERS = 16
# Decoding every image once for training is far faster than re-decoding each epoch; above this
# many bytes of decoded pixels, stream from disk instead.
PRELOAD_LIMIT_BYTES = 1 << 30


def load_image(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    """Decode one image into a uint8 tensor [C, size, size] (no normalisation yet).

    Decoded as ``data.imagefile.decode_pixels`` says (upright by its EXIF orientation, 16-bit grey
    scaled to 8 bits, the first frame), from a regular file only (``data.imagefile.open_regular``:
    a FIFO is refused, never waited on). Raises one of ``DECODE_ERRORS`` when the file cannot be
    decoded (``data.imagefile.NotRegularFile`` is an OSError); PIL's decompression-bomb
    warning (an image between 1× and 2× its pixel limit, which still decodes) is not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _load_image(path, spec)


def _load_image(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    with open_image(path) as raw:
        im = decode_pixels(raw, "L" if spec.channels == 1 else "RGB")
        if im.size != (spec.size, spec.size):
            im = im.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def normalizer(spec: InputSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [B, C, H, W] -> normalised float32, on whatever device the batch is on."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255.0)
        return (x - mean.to(x.device)) / std.to(x.device)

    return apply


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``(uint8 image, label, row index, ok)``; an image that fails to decode comes
    back as zeros with ``ok=False`` so the caller can drop it and report it, instead of a
    worker process dying with a traceback."""

    def __init__(self, images: ImageSet, spec: InputSpec, rows: Sequence[int] | None = None):
        self.images = images
        self.spec = spec
        self.rows = list(range(len(images))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            img, ok = load_image(self.images.absolute(row), self.spec), True
        except DECODE_ERRORS:
            img, ok = (
                torch.zeros(self.spec.channels, self.spec.size, self.spec.size, dtype=torch.uint8),
                False,
            )
        return img, int(self.images.labels[row]), row, ok


def model_inputs(spec: InputSpec | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image batches -> normalised float (``images.normalizer``); with ``spec`` None the
    batches are already the network's inputs (cached activations) and pass unchanged."""
    return normalizer(spec) if spec is not None else (lambda batch: batch)


def loader_workers(workers: int | None, batches: int) -> int:
    """Decoding worker processes for a loader of ``batches`` batches: ``workers`` when given,
    else the available cores (at most ``MAX_AUTO_WORKERS``) but no more than there are batches,
    and none for a single batch (starting a process costs more than decoding it); ``workers``
    given: no more than there are batches either (each worker is a process started for nothing
    once every batch has one; the command line also caps it at the cores). The images and their
    order never depend on this: the loaders keep row order."""
    if workers is not None:
        return max(0, min(workers, batches))
    return min(available_cores(), MAX_AUTO_WORKERS, batches if batches > 1 else 0)


def decode_failure(path: str | os.PathLike, spec: InputSpec) -> str:
    """Why ``path`` failed to decode (tried again, for the listing; workers only say ``ok``)."""
    try:
        load_image(path, spec)
    except DECODE_ERRORS as exc:
        return unreadable(exc)
    return "could not be decoded (it decodes now: changed during the run?)"


def decoded_batches(
    images: ImageSet, spec: InputSpec, workers: int | None = None, batch: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every image of ``images`` decoded once, in row order: ``(uint8 [B, C, H, W], rows [B],
    ok [B])`` batches, so memory is one batch per worker. ``workers``: see ``loader_workers``."""
    ds = ImageDataset(images, spec)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        num_workers=loader_workers(workers, -(-len(ds) // batch)),
        generator=loader_generator(),
    )
    for img, _, rows, good in loader:
        yield img, rows, good


def preload(
    images: ImageSet, spec: InputSpec, workers: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every image once: (uint8 [N, C, H, W], ok mask). Used when it fits in memory.
    ``workers``: see ``loader_workers``."""
    out = torch.empty(len(images), spec.channels, spec.size, spec.size, dtype=torch.uint8)
    ok = np.zeros(len(images), dtype=bool)
    for img, rows, good in decoded_batches(images, spec, workers):
        out[rows] = img
        ok[rows.numpy()] = good.numpy()
    return out, ok


def decodable(images: ImageSet, spec: InputSpec, workers: int | None = None) -> np.ndarray:
    """Which images decode (ok mask), decoding each once and keeping none."""
    ok = np.zeros(len(images), dtype=bool)
    for _, rows, good in decoded_batches(images, spec, workers):
        ok[rows.numpy()] = good.numpy()
    return ok


def image_bytes(spec: InputSpec) -> int:
    """Bytes of one decoded uint8 image."""
    return spec.channels * spec.size * spec.size


def fits_in_memory(n: int, spec: InputSpec, limit: int = PRELOAD_LIMIT_BYTES) -> bool:
    return n * image_bytes(spec) <= limit


__all__ = [
    "DECODE_ERRORS",
    "MAX_AUTO_WORKERS",
    "PRELOAD_LIMIT_BYTES",
    "ImageDataset",
    "available_cores",
    "decodable",
    "decode_failure",
    "decoded_batches",
    "fits_in_memory",
    "image_bytes",
    "load_image",
    "loader_workers",
    "model_inputs",
    "normalizer",
    "preload",
]
