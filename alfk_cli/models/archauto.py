"""``--arch auto``: the architecture a folder of images calls for, and a warning when an explicit
one does not fit it.

The folder is looked at cheaply and deterministically: the headers of at most :data:`SAMPLE`
of its scanned files, evenly spaced through the sorted list (every class and sub-folder has its
share; no RNG), opened with PIL without decoding the pixels. Each gives its mode and size. The
folder is *colour* when any sampled file has a colour mode (RGB, RGBA, CMYK, YCbCr, ... or a
palette that is not grey; an RGB file of grey pixels counts as colour: telling would mean
decoding it) and its *size* is the median of the sampled files' longer sides. Then:

- greyscale, up to :data:`SMALL` px: ``lenet`` (28×28 grey);
- colour, up to :data:`SMALL` px: ``resnet10`` (32×32 RGB);
- anything larger: ``resnet18`` (224×224 RGB; grey images are fed as RGB).

A built-in ResNet-18 rather than a timm model for large images: it needs no timm import (which
costs seconds), its checkpoints are what ``--init torchvision:resnet18`` fits, and without a
download a timm model would start from random weights too. Nothing here imports torch.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

from PIL import Image

from alfk_cli.data.imagefile import open_image
from alfk_cli.data.scan import ImageSet, decode_errors
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import AUTO, get_arch

SAMPLE = 32  # headers read
SMALL = 64  # px: up to this size, the 28/32 px networks
MISFIT = 4  # an image this many times larger or smaller than the network's input is a misfit
CHOICES = ("lenet", "resnet10", "resnet18")  # what auto may choose
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class FolderLook:
    """What the sampled headers say: colour or not, the median longer side, how many."""

    colour: bool
    size: int
    sampled: int

    def words(self) -> str:
        kind = "colour" if self.colour else "greyscale"
        return f"{kind} images of about {self.size} px, from {self.sampled} headers"


def _is_colour(im: Image.Image) -> bool:
    if im.mode in ("P", "PA"):
        palette = im.getpalette() or []
        rgb = [tuple(palette[i : i + 3]) for i in range(0, len(palette) - 2, 3)]
        return any(not (r == g == b) for r, g, b in rgb)
    return im.mode not in GREY_MODES


def look(images: ImageSet, sample: int = SAMPLE) -> FolderLook:
    """The folder's look from at most ``sample`` headers (see the module docstring)."""
    n = len(images)
    rows = sorted({i * n // sample for i in range(sample)}) if n > sample else range(n)
    colour, sizes = False, []
    errors = decode_errors()
    for i in rows:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a decompression-bomb warning: size is enough
                with open_image(images.absolute(i)) as im:  # a FIFO: refused, not waited on
                    colour = colour or _is_colour(im)
                    sizes.append(max(im.size))
        except errors:
            continue  # listed (or refused with --strict) when the images are decoded
    if not sizes:
        raise AlfkError(
            f"cannot choose an architecture for {images.root}: none of the {len(rows)} images "
            "looked at could be opened; give --arch"
        )
    return FolderLook(colour, int(statistics.median_low(sizes)), len(sizes))


def choose_arch(seen: FolderLook) -> str:
    """The built-in architecture for a folder that looks like ``seen``."""
    if seen.size <= SMALL:
        return "resnet10" if seen.colour else "lenet"
    return "resnet18"


def misfit(arch: str, seen: FolderLook) -> str | None:
    """Why ``arch`` does not fit images that look like ``seen``, or None when it does."""
    spec = get_arch(arch).input
    why = []
    if spec.channels == 1 and seen.colour:
        why.append("it eats greyscale, so their colour is thrown away")
    if seen.size > MISFIT * spec.size:
        why.append(f"they are shrunk to {spec.size} px")
    elif seen.size * MISFIT < spec.size:
        why.append(f"they are enlarged to {spec.size} px")
    return "; ".join(why) or None


def pick_arch(arch: str | None, images: ImageSet) -> tuple[str, str | None]:
    """The architecture to build for ``images`` and what to say about it.

    ``auto`` (or None): the choice and a note saying why. An explicit name: itself, with a
    ``warning: ...`` when it does not fit the folder, else None."""
    if arch is not None and arch != AUTO:
        seen = look(images)
        why = misfit(arch, seen)
        if why is None:
            return arch, None
        return arch, (
            f"warning: --arch {arch} does not fit {images.root} ({seen.words()}): {why}; "
            f"--arch auto would choose {choose_arch(seen)}"
        )
    seen = look(images)
    chosen = choose_arch(seen)
    spec = get_arch(chosen).input
    kind = "colour" if spec.channels == 3 else "greyscale"
    return chosen, (
        f"--arch auto: {chosen} ({spec.size}×{spec.size} {kind}) for {images.root}: {seen.words()}"
    )


def auto_reason(arch: str | None, said: str | None) -> str | None:
    """What a checkpoint records of the choice (``info["arch_auto"]``): ``pick_arch``'s note when
    ``arch`` was ``auto`` (or None), else None (an explicit name's warning is not a reason)."""
    return said if arch in (None, AUTO) else None


__all__ = [
    "CHOICES",
    "GREY_MODES",
    "SAMPLE",
    "SMALL",
    "FolderLook",
    "auto_reason",
    "choose_arch",
    "look",
    "misfit",
    "pick_arch",
]
