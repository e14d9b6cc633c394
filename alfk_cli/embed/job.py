"""The whole ``alfk embed`` job as one library function: images -> descriptors -> feature store.

``embed_folder`` runs three stages: ``plan_embed`` (``embed.plan``: check the inputs and decide
the labels, model and store header; writes nothing), then, unless the store is already up to
date, ``write_embed`` (copy what earlier runs left, see ``embed.reuse``, and compute the rest
batch by batch into the store: ``embed.write``, or ``embed.shard`` under torchrun), and returns an ``EmbedSummary``. What to do is one
``EmbedOptions`` value (``embed.options``).

Failures: anything wrong with the inputs raises AlfkError while planning, before any file is
created. Once rows are being computed, any failure (an image that fails to decode under
``strict``, an interrupt, a crash) leaves only the resumable ``.NAME.partial`` file beside
``out``, never a file under ``out`` itself; re-running with the same options continues from it
(see ``store.writer``), other options start over.

Progress goes to the ``progress`` sink when one is given (``util.progress.ProgressSink``); the
library draws nothing itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alfk_cli.data.scan import ImageSet
from alfk_cli.embed.options import EmbedOptions
from alfk_cli.embed.plan import EmbedPlan, plan_embed
from alfk_cli.embed.reuse import up_to_date
from alfk_cli.embed.shard import write_sharded
from alfk_cli.embed.write import WriteResult, pseudo_accuracy, write_single
from alfk_cli.util import distributed
from alfk_cli.util.progress import ProgressSink


@dataclass
class EmbedSummary:
    out: Path
    images: int  # rows in the store
    skipped: list[tuple[str, str]]  # (relative path, reason) of files that are not readable images
    seconds: float
    computed: int  # rows computed by this run
    reused: int  # rows copied from the ``reuse`` store
    resumed: int  # rows already in the partial file of an interrupted run
    pseudo_label: str
    classes: list[str]
    taps: tuple[str, ...]
    device: str = "cpu"  # of the model passes; as asked (``auto``) when the store was up to date
    pseudo_accuracy: float | None = None  # pseudo == labels, over images with known labels
    notes: list[str] = field(default_factory=list)  # e.g. why a reuse store was not used

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def embed_folder(
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    options: EmbedOptions | None = None,
    *,
    reference: str | os.PathLike | None = None,
    reuse: str | os.PathLike | None = None,
    images: ImageSet | None = None,
    progress: ProgressSink | None = None,
    **fields: Any,
) -> EmbedSummary:
    """Embed every image under ``folder`` into the feature store ``out`` (z, g, logits, labels).

    ``options``: an ``EmbedOptions`` (default: all defaults); ``fields`` are EmbedOptions fields
    that override it (``embed_folder(ckpt, folder, out, workers=0, taps="L80")``). ``reference``:
    the validation store p_yz pseudo-labels need (same checkpoint and taps). ``reuse``: a
    previous complete store of (an earlier version of) the same folder; rows of images whose
    relative path, size and mtime are unchanged are copied when everything else matches.
    ``images``: the folder already scanned by the caller (``scan_images(folder)``), to avoid
    walking it twice. ``progress``: where to report the rows done; None reports nothing.
    """
    t0 = time.perf_counter()
    options = replace(options if options is not None else EmbedOptions(), **fields)
    plan = plan_embed(
        checkpoint, folder, out, options, reference=reference, reuse=reuse, images=images
    )
    # under torchrun rank 0 decides, so that no rank sees the store another has just finished
    stored = distributed.on_main(lambda: up_to_date(plan.out, plan.fingerprint))
    if stored is not None:  # same checkpoint, options, reference and files: nothing to do
        stored_pseudo, stored_labels, undecodable = stored
        result = WriteResult(
            rows=len(stored_pseudo),
            failed=[],
            computed=0,
            reused=len(plan.images),
            resumed=0,
            pseudo_accuracy=pseudo_accuracy(stored_pseudo, stored_labels, plan.method),
            notes=[f"{plan.out} is up to date"],
        )
        return _summary(plan, result, t0, undecodable)
    return _summary(plan, write_embed(plan, reuse=reuse, progress=progress), t0)


def write_embed(
    plan: EmbedPlan,
    *,
    reuse: str | os.PathLike | None = None,
    progress: ProgressSink | None = None,
) -> WriteResult:
    """Write the store ``plan.out``: resume an interrupted run, copy the unchanged rows of
    ``reuse``, compute the rest, then rename the finished file into place. On any failure the
    partial file stays for the next run to resume. Under torchrun every rank calls it and
    computes a share of the rows (``embed.shard``)."""
    # The model first (torch): a checkpoint that does not fit its architecture fails before any
    # file is created, as a plan does for every other bad input.
    _ = plan.model  # built (and cached) before the partial file is opened
    if distributed.world() > 1:
        return write_sharded(plan, reuse=reuse, progress=progress)
    return write_single(plan, reuse=reuse, progress=progress)


def _summary(
    plan: EmbedPlan,
    result: WriteResult,
    t0: float,
    undecodable: Sequence[tuple[str, str]] = (),
) -> EmbedSummary:
    images = plan.images
    return EmbedSummary(
        out=plan.out,
        images=result.rows,
        skipped=[*images.skipped, *undecodable]
        + [(images.paths[r], why) for r, why in result.failed],
        seconds=time.perf_counter() - t0,
        computed=result.computed,
        reused=result.reused,
        resumed=result.resumed,
        pseudo_label=plan.method,
        classes=list(plan.classes),
        taps=plan.taps,
        device=plan.device_name,
        pseudo_accuracy=result.pseudo_accuracy,
        notes=result.notes,
    )


__all__ = ["EmbedSummary", "embed_folder", "write_embed"]
