"""``embed`` under torchrun: each rank computes a contiguous share of the rows into its own
resumable shard file, and rank 0 merges the shards into the one store a single process writes.

Rank 0 opens the store's ``.NAME.partial`` as a single process does (resuming it, copying
reusable rows), takes in what shards of an interrupted run left (``.NAME.shard-R-of-W.partial``,
any world size), and tells every rank the rows still to compute. Those are split by rank into
contiguous runs of whole batches, so every batch holds the same images as in a single-process
run: on the CPU the values are bit-identical (same torch thread count). Rank 0 computes its
share into the partial file itself, rank R > 0 into its shard file (a ``StoreWriter`` partial
too: flushed per batch, resumed after an interrupt). After all ranks are done, rank 0 copies the
shards in, deletes them and finishes the store (``StoreWriter.finish``: decode failures of every
rank left out and listed, renamed into place); every rank returns the same ``WriteResult``.

The output folder must be one file system that every rank sees (on several nodes, a shared one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from alfk_cli.embed.plan import EmbedPlan
from alfk_cli.embed.reuse import resume_rows, set_aside_partial
from alfk_cli.embed.write import (
    RowReport,
    WriteResult,
    compute_rows,
    copy_reusable,
    pseudo_accuracy,
)
from alfk_cli.store.writer import StoreWriter
from alfk_cli.util import distributed
from alfk_cli.util.progress import ProgressSink

__all__ = ["rank_rows", "shard_partials", "shard_store", "write_sharded"]


def shard_store(out: Path, rank: int, world: int) -> Path:
    """The name rank ``rank`` of ``world`` writes its shard under (as a ``.partial`` of it)."""
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}")


def shard_partials(out: Path) -> list[Path]:
    """Every shard file beside ``out``, whatever world size made it."""
    return sorted(out.parent.glob(f".{out.name}.shard-*-of-*.partial"))


def rank_rows(work: np.ndarray, batch: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s share of ``work``: a contiguous run of whole batches of ``batch`` rows
    (the batches a single process makes), as even across ranks as whole batches allow."""
    batches = -(-len(work) // batch)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return work[first * batch : last * batch]


class _Checked:
    """A progress sink that, on each update, stops this rank if another has failed."""

    def __init__(self, sink: ProgressSink | None):
        self.sink = sink

    def add_task(self, description: str, *, total: float | None = None, **fields: Any) -> Any:
        return None if self.sink is None else self.sink.add_task(description, total=total, **fields)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        distributed.check()
        if self.sink is not None:
            self.sink.advance(task_id, advance)

    def update(self, task_id: Any, **fields: Any) -> None:
        distributed.check()
        if self.sink is not None:
            self.sink.update(task_id, **fields)


def _take_shards(plan: EmbedPlan, writer: StoreWriter) -> int:
    """Copy the finished rows of every shard file beside the store into ``writer`` (rank 0),
    then delete the shards. Rows are matched by path, size and mtime, so the shards of an
    interrupted run are used even when the folder changed since; shards made with other
    options are deleted. Returns how many rows were copied."""
    copied = 0
    for shard in shard_partials(plan.out):
        try:
            with h5py.File(shard, "r") as f:
                same = f.attrs.get("config_fingerprint") == plan.config_fingerprint
        except OSError:  # damaged: start those rows over
            same = False
        if same:
            copied += resume_rows(shard, writer, plan.header)  # deletes it
        else:
            shard.unlink(missing_ok=True)
    return copied


def _begin(
    plan: EmbedPlan, reuse: str | os.PathLike | None
) -> tuple[StoreWriter, np.ndarray, int, int, list[str]]:
    """Rank 0: open the store's partial file as one process would, and take in the shards."""
    earlier = set_aside_partial(plan.out, plan.fingerprint, plan.config_fingerprint)
    writer = StoreWriter.open(plan.out, plan.header, plan.fingerprint, chunk_rows=plan.batch_size)
    notes = plan.notes()
    try:
        resumed = writer.resumed + resume_rows(earlier, writer, plan.header)
        resumed += _take_shards(plan, writer)
        reused = copy_reusable(plan, writer, reuse, notes)
        work = np.flatnonzero(~writer.done)
        writer.check_space(len(work))
    except BaseException:
        writer.close()
        raise
    return writer, work, resumed, reused, notes


def write_sharded(
    plan: EmbedPlan,
    *,
    reuse: str | os.PathLike | None,
    progress: ProgressSink | None,
) -> WriteResult:
    """``embed.job.write_embed`` for every rank of a torchrun run (see the module docstring).

    It runs ``embed.write``'s steps, so that a shard is computed exactly as a single process
    computes its rows."""
    rank, world = distributed.rank(), distributed.world()
    writer: StoreWriter | None = None
    try:
        if rank == 0:
            writer, work, resumed, reused, notes = _begin(plan, reuse)
            distributed.broadcast((work, resumed, reused, notes))
        else:
            work, resumed, reused, notes = distributed.broadcast()
            shard = shard_store(plan.out, rank, world)
            writer = StoreWriter.open(
                shard, plan.header, plan.fingerprint, chunk_rows=plan.batch_size
            )
        mine = rank_rows(work, plan.batch_size, rank, world)
        name = Path(plan.folder).name or str(plan.folder)
        n = len(plan.images)
        report = RowReport(
            _Checked(progress), f"embed {name} [rank 0 of {world}]", n - len(work) + len(mine),
            n - len(work),
        )  # fmt: skip
        computed, failed = compute_rows(plan, writer, mine, report)
        report.finish()
        if rank != 0:
            writer.close()  # the shard stays for rank 0 to copy (or for the next run to resume)
        done = distributed.all_gather((computed, failed))
        result = None
        if rank == 0:
            result = _finish(plan, writer, done, resumed, reused, notes)
        return distributed.broadcast(result)
    except BaseException:
        if writer is not None:
            writer.close()
        raise


def _finish(
    plan: EmbedPlan,
    writer: StoreWriter,
    done: list[tuple[int, list[tuple[int, str]]]],
    resumed: int,
    reused: int,
    notes: list[str],
) -> WriteResult:
    """Rank 0: copy every shard in, then finish the store as a single process does."""
    _take_shards(plan, writer)
    failed = sorted(f for _, rank_failed in done for f in rank_failed)
    kept = np.ones(len(plan.labels), dtype=bool)
    kept[[r for r, _ in failed]] = False
    pseudo = writer.file["pseudo"][:][kept]
    acc = pseudo_accuracy(pseudo, plan.labels[kept], plan.method)
    writer.finish(skipped=failed)
    computed = sum(c for c, _ in done)
    return WriteResult(int(kept.sum()), failed, computed, reused, resumed, acc, notes)
