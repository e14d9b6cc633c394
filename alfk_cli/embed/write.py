"""Writing an embed's store in one process: the rows an interrupted run left, the rows a
previous store can give, the rest computed batch by batch (``embed.job.write_embed`` runs it;
``embed.shard`` runs the same steps on every rank under torchrun).

The steps are public so that a shard is computed exactly as a single process computes its rows:
``copy_reusable`` (unchanged images from a previous store), ``compute_rows`` (model passes into
the writer), ``RowReport`` (progress) and ``pseudo_accuracy``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alfk_cli.data.names import printable
from alfk_cli.embed.plan import EmbedPlan
from alfk_cli.embed.reuse import resume_rows, reusable_rows, set_aside_partial
from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import describe_images, get_estimator
from alfk_cli.store.rowwriter import RowWriter
from alfk_cli.store.writer import StoreWriter
from alfk_cli.util.progress import ProgressSink

__all__ = [
    "RowReport",
    "WriteResult",
    "compute_rows",
    "copy_reusable",
    "pseudo_accuracy",
    "write_single",
]


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


def write_single(
    plan: EmbedPlan,
    *,
    reuse: str | os.PathLike | None = None,
    progress: ProgressSink | None = None,
) -> WriteResult:
    """Write the store ``plan.out`` in this process: resume an interrupted run, copy the
    unchanged rows of ``reuse``, compute the rest, then rename the finished file into place. On
    any failure the partial file stays for the next run to resume."""
    earlier = set_aside_partial(plan.out, plan.fingerprint, plan.config_fingerprint)
    writer = StoreWriter.open(plan.out, plan.header, plan.fingerprint, chunk_rows=plan.batch_size)
    notes = plan.notes()
    try:
        resumed = writer.resumed + resume_rows(earlier, writer, plan.header)
        reused = copy_reusable(plan, writer, reuse, notes)
        work = np.flatnonzero(~writer.done)
        writer.check_space(len(work))  # before the first model pass, not when the disk is full
        n = len(plan.images)
        report = RowReport(
            progress, f"embed {Path(plan.folder).name or plan.folder}", n, n - len(work)
        )
        computed, failed = compute_rows(plan, writer, work, report)
        report.finish()
        kept = np.ones(len(plan.labels), dtype=bool)
        kept[[r for r, _ in failed]] = False
        if not kept.any():  # the scan only stats files: this is where "no images" shows
            raise AlfkError(f"no readable images in {plan.folder}: all {n} failed to decode")
        pseudo = writer.file["pseudo"][:][kept]
        accuracy = pseudo_accuracy(pseudo, plan.labels[kept], plan.method)
        writer.finish(skipped=failed)
    except BaseException:
        writer.close()  # keep the partial file: the next run resumes it
        raise
    return WriteResult(int(kept.sum()), failed, computed, reused, resumed, accuracy, notes)


def copy_reusable(
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


def pseudo_accuracy(pseudo: np.ndarray, labels: np.ndarray, method: str) -> float | None:
    """How often the pseudo-labels equal the known labels (None when there are none to compare)."""
    known = labels >= 0
    if get_estimator(method).needs_labels or not known.any():
        return None
    return float((pseudo[known] == labels[known]).mean())


class RowReport:
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


def compute_rows(
    plan: EmbedPlan, writer: StoreWriter, work: np.ndarray, report: RowReport
) -> tuple[int, list[tuple[int, str]]]:
    """Compute and write the rows ``work``, batch by batch. Returns how many were computed and
    the (row, reason) of images that failed to decode: skipped and listed like the files the
    scan skipped (``strict``: an error instead)."""
    failed: list[tuple[int, str]] = []
    if len(work) == 0:
        return 0, failed
    import torch  # here, not at import: a store that is up to date needs no model pass

    from alfk_cli.data.decode import ImageDataset, decode_failure, loader_workers
    from alfk_cli.util.reproducible import loader_generator

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
