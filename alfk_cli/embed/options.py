"""``EmbedOptions``: what a caller chooses about an embed, passed through its stages as one value."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from alfk_cli.data.imagefile import DECODE_VERSION
from alfk_cli.features.estimators import get_estimator
from alfk_cli.features.montecarlo import MCConfig

#: Images per model pass when ``EmbedOptions.batch_size`` is None, per architecture (else 64).
DEFAULT_BATCH = {"lenet": 256, "resnet10": 128, "resnet18": 32}


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """The options of one embed. ``taps``: a preset name (``L80``), a comma-separated list or a
    sequence of tap names; None: the reference's taps, else the architecture's default preset.
    ``pseudo_label``: the estimator g is computed with; None: ``true`` for a labelled folder
    without a reference, else ``p_yz``. ``mc``: the Monte-Carlo settings of ``mc_trace`` and
    ``mc_mi``. ``batch_size`` None: ``DEFAULT_BATCH`` of the architecture. ``workers`` None: the
    cores available (``images.loader_workers``). ``strict``: a file
    that is not a readable image is an error instead of being skipped.

    Only ``taps``, ``pseudo_label``, ``mc`` (for the MC estimators) and ``seed`` decide a store's
    contents (``fingerprint_dict``, with the decoding rule's ``data.imagefile.DECODE_VERSION``, so
    stores decoded by an earlier rule are embedded again); the batch size, device and workers change only how fast (and,
    on a GPU, float round-off)."""

    taps: str | Sequence[str] | None = None
    pseudo_label: str | None = None
    mc: MCConfig = field(default_factory=MCConfig)
    seed: int = 0
    batch_size: int | None = None
    workers: int | None = None  # decoding processes; None: images.loader_workers decides
    device: str = "auto"
    strict: bool = False
    # a file naming the images (one path per line, relative to the folder; "-": stdin) instead of
    # walking the folder (``data.poollist``)
    pool_list: str | os.PathLike | None = None

    def batch_for(self, arch: str) -> int:
        """The batch size to use for a model of ``arch``."""
        return self.batch_size or DEFAULT_BATCH.get(arch, 64)

    def fingerprint_dict(self) -> dict:
        """The options that decide a store's contents, as recorded in its ``embed_config``.

        Only for resolved options (``taps`` a sequence of tap names, ``pseudo_label`` a method),
        as ``plan_embed`` makes them; the MC settings count only for the MC estimators."""
        if self.pseudo_label is None or self.taps is None or isinstance(self.taps, str):
            raise ValueError("fingerprint_dict needs resolved taps and pseudo_label")
        return {
            "taps": list(self.taps),
            "pseudo_label": self.pseudo_label,
            "mc": self.mc.params() if get_estimator(self.pseudo_label).uses_mc else None,
            "seed": int(self.seed),
            "decode": DECODE_VERSION,
        }


__all__ = ["DEFAULT_BATCH", "EmbedOptions"]
