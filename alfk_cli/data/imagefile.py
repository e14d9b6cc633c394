"""One image file opened and decoded to 8-bit pixels the way an annotator sees it (no torch).

- Only a regular file is opened (a symlink to one is followed): a FIFO, socket or device named
  ``x.png`` is refused without blocking. It is opened with ``O_NONBLOCK`` and checked with
  ``fstat``, so a file replaced by a FIFO after the scan cannot hang a decoding worker.
- The EXIF orientation tag is applied (``ImageOps.exif_transpose``): a phone photo is decoded
  upright, as viewers and labelling tools show it, not in the sensor's orientation.
- 16-bit greyscale (PIL modes ``I;16*``, and ``I``, which PIL uses for some 16-bit files) is
  scaled to 8 bits by its high byte, ``value >> 8`` (as libpng's ``png_set_strip_16``);
  PIL's own conversion clips every value above 255 to white. ``I`` values outside 0..65535
  saturate.
- A multi-frame file (animated GIF, APNG, multi-page TIFF) gives its first frame.

``DECODE_VERSION`` enters every feature store's fingerprint, so stores decoded by an earlier
rule are embedded again once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DECODE_VERSION",
    "NotRegularFile",
    "check_named_file",
    "decode_pixels",
    "open_image",
    "open_regular",
    "special_file",
]

#: 1: PIL's ``convert`` of the raw file; 2: EXIF orientation, 16-bit grey scaled, first frame.
DECODE_VERSION = 2

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ORIENTATION = 0x0112  # the EXIF orientation tag


class NotRegularFile(OSError):
    """The path names a FIFO, socket, device or folder, not a regular file."""


def special_file(mode: int) -> str | None:
    """None for a regular file's ``st_mode``, else what it is (for a skip reason)."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    )
    kind = next((name for test, name in kinds if test(mode)), "special")
    return f"not a regular file ({kind})"


def check_named_file(path: Path, what: str, *, pipe: bool = False) -> None:
    """``path``, a ``what`` the user named ("options file", "pool list"), must exist and be a
    regular file (or, with ``pipe``, a pipe: ``<(find ...)``); else a one-line AlfkError. Reading
    ``/dev/zero`` would never end, and a folder's "does not exist" would mislead."""
    from alfk_cli.errors import AlfkError

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AlfkError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise AlfkError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise AlfkError(f"{what} {path} is a folder, not a file")
    if not (stat.S_ISREG(mode) or (pipe and stat.S_ISFIFO(mode))):
        raise AlfkError(f"{what} {path} is not a regular file" + (" or a pipe" if pipe else ""))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading in binary mode, if it is a regular file; else
    ``NotRegularFile``, without waiting for a FIFO's writer (``O_NONBLOCK``, then ``fstat``)."""
    # opened by ``open`` (not ``os.fdopen``) so that the file object is named by its path
    fh = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 - returned to the caller
    try:
        reason = special_file(os.fstat(fh.fileno()).st_mode)
        if reason is not None:
            raise NotRegularFile(reason)
        # O_NONBLOCK means nothing for a regular file's reads; clear it all the same
        os.set_blocking(fh.fileno(), True)
        return fh
    except BaseException:
        fh.close()
        raise


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """PIL's ``Image.open`` of a regular file (``open_regular``); both closed on exit."""
    from PIL import Image

    with open_regular(path) as fh, Image.open(fh) as im:
        yield im


def decode_pixels(im: Image.Image, mode: str | None = None) -> Image.Image:
    """``im``'s first frame, upright (EXIF orientation), 16-bit grey scaled to 8 bits, in
    ``mode`` (``L``, ``RGB``, ...; None: the mode it decodes to). See the module docstring."""
    import numpy as np
    from PIL import Image, ImageOps

    if getattr(im, "n_frames", 1) > 1 and im.tell() != 0:
        im.seek(0)
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)  # a transposed copy (exif_transpose copies any image)
    if im.mode in _SIXTEEN_BIT:
        high = np.right_shift(np.clip(np.asarray(im, dtype=np.int64), 0, 65535), 8)
        im = Image.fromarray(high.astype(np.uint8))  # mode L
    return im if mode is None or im.mode == mode else im.convert(mode)
