"""RowWriter: embed's rows reach the store writer in order, in blocks, on a background thread;
failures surface in the caller; an exception leaves only after the write in flight is done."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from alfk_cli.errors import AlfkError
from alfk_cli.rowwriter import RowWriter


class FakeWriter:
    """Records each write_rows call (and the thread it ran on); can fail or be slow."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0):
        self.calls: list[tuple[np.ndarray, ...]] = []
        self.threads: set[str] = set()
        self.fail_at, self.delay = fail_at, delay
        self.finished = threading.Event()

    def write_rows(self, rows, z, g, logits, pseudo) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise AlfkError("out.h5: the file system is full")
        self.calls.append((rows, z, g, logits, pseudo))
        self.finished.set()


def batch(a: int, b: int) -> tuple[np.ndarray, ...]:
    rows = np.arange(a, b, dtype=np.int64)
    z = np.stack([rows * 1.0, rows * 2.0], 1).astype(np.float32)
    return rows, z, -z, z[:, :1], rows % 3


def test_every_row_arrives_once_in_order_in_blocks_off_the_calling_thread():
    fake = FakeWriter()
    with RowWriter(fake, block=5) as out:  # type: ignore[arg-type]
        for a in range(0, 23, 3):  # batches of 3 (the last of 2)
            out.add(*batch(a, min(a + 3, 23)))
    rows = np.concatenate([c[0] for c in fake.calls])
    np.testing.assert_array_equal(rows, np.arange(23))
    want = batch(0, 23)
    for k in range(5):
        np.testing.assert_array_equal(np.concatenate([c[k] for c in fake.calls]), want[k])
    sizes = [len(c[0]) for c in fake.calls]
    assert all(s >= 5 for s in sizes[:-1]) and sum(sizes) == 23 and len(sizes) == 4
    assert fake.threads and threading.current_thread().name not in fake.threads


def test_a_failed_write_is_raised_in_the_caller():
    fake = FakeWriter(fail_at=1)
    with pytest.raises(AlfkError, match="file system is full"), RowWriter(fake, block=2) as out:  # type: ignore[arg-type]
        for a in range(0, 12, 2):
            out.add(*batch(a, a + 2))
    assert len(fake.calls) == 1  # nothing after the failure was written


def test_an_exception_in_the_loop_waits_for_the_write_in_flight():
    fake = FakeWriter(delay=0.3)
    with pytest.raises(KeyboardInterrupt), RowWriter(fake, block=2) as out:  # type: ignore[arg-type]
        out.add(*batch(0, 2))  # submitted: sleeping on the writer thread
        raise KeyboardInterrupt
    assert fake.finished.is_set()  # done before the caller could close the file
    np.testing.assert_array_equal(fake.calls[0][0], [0, 1])


def test_an_exception_in_the_loop_still_saves_the_rows_computed_before_it():
    fake = FakeWriter()
    with pytest.raises(KeyboardInterrupt), RowWriter(fake, block=100) as out:  # type: ignore[arg-type]
        out.add(*batch(0, 3))
        out.add(*batch(3, 5))  # both still buffered when the interrupt comes
        raise KeyboardInterrupt
    np.testing.assert_array_equal(np.concatenate([c[0] for c in fake.calls]), np.arange(5))
