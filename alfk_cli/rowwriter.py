"""A store's computed rows written on one background thread, while the next batches are computed.

``embed`` used to write (compress, flush) each batch in the loop that feeds the model, so the GPU
and the decoding workers waited for HDF5 every batch: on an H200, 21-28 % of the slower of
decoding and the model (issue 22). Here the rows are gathered into blocks of about ``block`` rows
and each block goes to ``StoreWriter.write_rows`` on a single worker thread while the loop goes
on; at most one block is in flight, so memory stays at two blocks. The store's bytes do not
change: the same rows, in the same order, through the same writer.

A failure of a write (a full disk) is raised in the caller at its next ``add`` or at the end of
the ``with`` block. Leaving the block by another exception (an interrupt, a decode failure under
``strict``) waits for the write in flight, then writes the rows already computed, so the caller
can close the file with every computed row marked done in the partial file, as before: the next
run resumes from them.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np

from alfk_cli.storewriter import StoreWriter

#: Rows per write: a few HDF5 chunks, so each write compresses whole chunks and flushes once.
BLOCK_ROWS = 1024


class RowWriter:
    """``with RowWriter(writer) as out: out.add(rows, z, g, logits, pseudo)`` ..."""

    def __init__(self, writer: StoreWriter, block: int = BLOCK_ROWS):
        self.writer, self.block = writer, block
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="alfk-store-write")

    def __enter__(self) -> RowWriter:
        return self

    def add(
        self, rows: np.ndarray, z: np.ndarray, g: np.ndarray, logits: np.ndarray, pseudo: np.ndarray
    ) -> None:
        """Queue a batch of rows (arrays the caller no longer changes)."""
        self._parts.append((rows, z, g, logits, pseudo))
        self._buffered += len(rows)
        if self._buffered >= self.block:
            self._submit()

    def _submit(self) -> None:
        if not self._parts:
            return
        block = [np.concatenate(a) for a in zip(*self._parts)]
        self._parts, self._buffered = [], 0
        self._wait()  # one block in flight at most; raises its failure here
        self._pending = self._pool.submit(self.writer.write_rows, *block)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _save_buffered(self) -> None:
        """On the way out by an exception: wait for the write in flight, then write the rows
        already computed (as the loop did before each batch's write) unless a write failed. The
        caller's exception is the one raised."""
        failed = self._pending is not None and self._pending.exception() is not None
        self._pending = None
        if failed or not self._parts:
            return
        block = [np.concatenate(a) for a in zip(*self._parts)]
        self._parts = []
        with contextlib.suppress(Exception):  # the caller's exception matters, not this one
            self.writer.write_rows(*block)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self._submit()
                self._wait()
            else:
                self._save_buffered()
        finally:
            self._pool.shutdown(wait=True)
