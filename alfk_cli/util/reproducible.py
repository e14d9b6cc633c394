"""What makes ``--seed`` reproducible: scoped torch RNG, order-stable loaders, stable file bytes.

* Randomness that torch draws from its global generators (dropout masks) runs under
  ``seeded``: the global state is forked, seeded, and restored afterwards, so a run gives the
  same result whatever the caller did with the RNG before, and leaves the caller's state as it
  was.
* DataLoaders get their own generator (``loader_generator``): each iteration otherwise draws its
  worker base seed from the global generator, which would shift the dropout stream by how often
  images are streamed rather than preloaded.
* Files carry no wall-clock time: ``created`` is empty unless ``SOURCE_DATE_EPOCH`` (the
  reproducible-builds convention) fixes it, and torch checkpoints are saved through a file
  object so that the zip archive's inner folder name does not follow the output file's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: ``created_stamp`` is used by every
# writer of stores and scores files, and a run with nothing to compute must not import torch.


def cuda_devices(device: torch.device | str | None) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save for ``device``."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU, and ``device`` when CUDA) seeded with ``seed``;
    the caller's RNG state is restored on exit."""
    import torch

    with torch.random.fork_rng(devices=cuda_devices(device)):
        torch.manual_seed(int(seed))
        yield


def loader_generator() -> torch.Generator:
    """A generator for a DataLoader that shuffles nothing: it only seeds the (randomness-free)
    decoding workers, and keeps the loader from consuming the global RNG."""
    import torch

    return torch.Generator().manual_seed(0)


def created_stamp() -> str:
    """The ``created`` provenance field: ``SOURCE_DATE_EPOCH`` as ISO 8601 UTC, else empty.

    The current time would make every output differ byte-wise between two identical runs; the
    file's own modification time already says when it was written.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return ""
    try:
        when = datetime.fromtimestamp(int(raw), timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise AlfkError(f"SOURCE_DATE_EPOCH must be an integer (seconds), not {raw!r}") from None
    return when.isoformat(timespec="seconds")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` into ``path`` through an open file: given a path, torch names the zip
    archive's inner folder after the file (``.NAME.partial`` here), so equal contents written
    under different names would differ byte-wise; a file object gets the fixed name ``archive``."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


__all__ = ["created_stamp", "loader_generator", "save_torch", "seeded"]
