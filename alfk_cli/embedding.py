"""The whole ``alfk embed`` job as one library function: images -> descriptors -> feature store.

``embed_folder`` runs three stages: ``plan_embed`` (``embedplan``: check the inputs and decide
the labels, model and store header; writes nothing), then, unless the store is already up to
date, ``write_embed`` (copy what earlier runs left, see ``embedreuse``, and compute the rest
batch by batch into the store), and returns an ``EmbedSummary``. What to do is one
``EmbedOptions`` value (``embedoptions``).

Failures: anything wrong with the inputs raises AlfkError while planning, before any file is
created. Once rows are being computed, any failure (an image that fails to decode under
``strict``, an interrupt, a crash) leaves only the resumable ``.NAME.partial`` file beside
``out``, never a file under ``out`` itself; re-running with the same options continues from it
(see ``storewriter``), other options start over.

Progress goes to the ``progress`` sink when one is given (``reporting.ProgressSink``); the
library draws nothing itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from alfk_cli import distributed
from alfk_cli.embedoptions import DEFAULT_BATCH, EmbedOptions
from alfk_cli.embedplan import EmbedPlan, plan_embed
from alfk_cli.embedreuse import (
    resume_rows,
    reusable_rows,
    set_aside_partial,
    trusted_files,
    up_to_date,
)
from alfk_cli.errors import AlfkError
from alfk_cli.estimators import describe_images, get_estimator
from alfk_cli.imagescan import ImageSet
from alfk_cli.names import printable
from alfk_cli.reporting import ProgressSink
from alfk_cli.rowwriter import RowWriter
from alfk_cli.storewriter import StoreWriter


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


@dataclass
class WriteResult:
    """What ``write_embed`` did."""

    rows: int  # rows in the finished store
    failed: list[tuple[int, str]]  # (row, reason) of images that failed to decode
    computed: int
    reused: int
    resumed: int
    pseudo_accuracy: float | None
    notes: list[str]


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
            pseudo_accuracy=_pseudo_accuracy(stored_pseudo, stored_labels, plan.method),
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
    computes a share of the rows (``embedshard``)."""
    # The model first (torch): a checkpoint that does not fit its architecture fails before any
    # file is created, as a plan does for every other bad input.
    _ = plan.model  # built (and cached) before the partial file is opened
    if distributed.world() > 1:
        from alfk_cli.embedshard import write_sharded

        return write_sharded(
            plan, reuse=reuse, progress=progress, compute=_compute, make_report=_Report,
            copy_reusable=_copy_reusable, accuracy=_pseudo_accuracy,
        )  # fmt: skip
    earlier = set_aside_partial(plan.out, plan.fingerprint, plan.config_fingerprint)
    writer = StoreWriter.open(plan.out, plan.header, plan.fingerprint, chunk_rows=plan.batch_size)
    notes = plan.notes()
    try:
        resumed = writer.resumed + resume_rows(earlier, writer, plan.header)
        reused = _copy_reusable(plan, writer, reuse, notes)
        work = np.flatnonzero(~writer.done)
        writer.check_space(len(work))  # before the first model pass, not when the disk is full
        n = len(plan.images)
        report = _Report(
            progress, f"embed {Path(plan.folder).name or plan.folder}", n, n - len(work)
        )
        computed, failed = _compute(plan, writer, work, report)
        report.finish()
        kept = np.ones(len(plan.labels), dtype=bool)
        kept[[r for r, _ in failed]] = False
        if not kept.any():  # the scan only stats files: this is where "no images" shows
            raise AlfkError(f"no readable images in {plan.folder}: all {n} failed to decode")
        pseudo = writer.file["pseudo"][:][kept]
        accuracy = _pseudo_accuracy(pseudo, plan.labels[kept], plan.method)
        writer.finish(skipped=failed)
    except BaseException:
        writer.close()  # keep the partial file: the next run resumes it
        raise
    return WriteResult(int(kept.sum()), failed, computed, reused, resumed, accuracy, notes)


def _copy_reusable(
    plan: EmbedPlan, writer: StoreWriter, reuse: str | os.PathLike | None, notes: list[str]
) -> int:
    """Copy the rows of unchanged images from the ``reuse`` store; returns how many."""
    prev, src, dst = reusable_rows(
        Path(reuse) if reuse is not None else None,
        plan.config_fingerprint,
        plan.header,
        writer.done,
        notes,
    )
    if prev is None:
        return 0
    try:
        writer.copy_rows(prev, src, dst)
    finally:
        prev.close()
    return len(dst)


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


def _pseudo_accuracy(pseudo: np.ndarray, labels: np.ndarray, method: str) -> float | None:
    """How often the pseudo-labels equal the known labels (None when there are none to compare)."""
    known = labels >= 0
    if get_estimator(method).needs_labels or not known.any():
        return None
    return float((pseudo[known] == labels[known]).mean())


class _Report:
    """Reports rows done to a progress sink, with the rate as its status; silent without one."""

    def __init__(self, progress: ProgressSink | None, description: str, total: int, done: int):
        self.progress = progress
        self.task = None
        if progress is not None:
            self.task = progress.add_task(description, total=total, completed=done, status="")
        self.started = self.computing = time.perf_counter()
        self.rows = 0

    def start(self) -> None:
        """The model passes begin (the rate counts from here)."""
        self.computing = time.perf_counter()

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self.progress is not None:
            rate = self.rows / max(time.perf_counter() - self.computing, 1e-9)
            self.progress.update(self.task, advance=rows, status=f"{rate:.0f} img/s")

    def finish(self) -> None:
        if self.progress is not None:
            rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, status=f"{rate:.0f} img/s")


def _compute(
    plan: EmbedPlan, writer: StoreWriter, work: np.ndarray, report: _Report
) -> tuple[int, list[tuple[int, str]]]:
    """Compute and write the rows ``work``, batch by batch. Returns how many were computed and
    the (row, reason) of images that failed to decode: skipped and listed like the files the
    scan skipped (``strict``: an error instead)."""
    failed: list[tuple[int, str]] = []
    if len(work) == 0:
        return 0, failed
    import torch  # here, not at import: a store that is up to date needs no model pass

    from alfk_cli.images import ImageDataset, decode_failure, loader_workers
    from alfk_cli.reproducible import loader_generator

    opts, images, dev, spec = plan.options, plan.images, plan.device, plan.spec
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, spec, rows=work.tolist()),
        batch_size=plan.batch_size,
        shuffle=False,
        num_workers=loader_workers(opts.workers, -(-len(work) // plan.batch_size)),
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        generator=loader_generator(),  # not the caller's global RNG
    )
    label_t = torch.from_numpy(plan.labels)
    report.start()
    with RowWriter(writer) as out:
        for img, _, rows, ok in loader:
            if not bool(ok.all()):
                for bad in rows[~ok].tolist():
                    reason = decode_failure(images.absolute(bad), spec)
                    if opts.strict:
                        raise AlfkError(f"{printable(str(images.absolute(bad)))}: {reason}")
                    failed.append((int(bad), reason))
                img, rows = img[ok], rows[ok]
                if len(rows) == 0:
                    continue
            rows_np = rows.numpy().astype(np.int64)
            z, g, logits, used = describe_images(
                plan.model, img.to(dev, non_blocking=True), spec, plan.taps, plan.method,
                labels=label_t[rows].to(dev), reference=plan.labeler,
                names=[images.paths[r] for r in rows_np], seed=opts.seed, mc_cfg=opts.mc,
            )  # fmt: skip
            out.add(
                rows_np,
                z.float().cpu().numpy(),
                g.float().cpu().numpy(),
                logits.float().cpu().numpy(),
                used.cpu().numpy().astype(np.int64),
            )
            report.advance(len(rows_np))
    return report.rows, failed


__all__ = [
    "DEFAULT_BATCH",
    "EmbedOptions",
    "EmbedPlan",
    "EmbedSummary",
    "WriteResult",
    "embed_folder",
    "plan_embed",
    "trusted_files",
    "write_embed",
]
