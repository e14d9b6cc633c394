"""The run ledger: every nightly selection, kept in ``ledger.sqlite`` in the work folder.

Each ``select --val --pool`` run records when it ran, the checkpoint, P, its options and every
image it selected (path inside the pool, rank, score, predicted class, matched validation image).
Later runs leave out every image already recorded, so nothing is sent twice without a hand-kept
``sent.txt``: a second night with nothing changed picks the next P images. A run is recorded only
once its output is delivered (:func:`alfk_cli.pipeline.run_select`); ``alfk history --run N``
prints a recorded run again.

SQLite (one file, transactions, readable by any tool) in the spirit of ``llm``'s log database.
Schema version 1 (``PRAGMA user_version``)::

    runs(id, started, pool, checkpoint_sha256, P, selected, strategy, options, scores_key)
    images(run, rank, path, score, predicted, center)     path: relative to the pool folder
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alfk_cli.errors import AlfkError
from alfk_cli.scores import Scores

__all__ = ["FILE_NAME", "Run", "create", "history", "record", "run_paths", "sent_paths"]

FILE_NAME = "ledger.sqlite"
SCHEMA_VERSION = 1
#: Seconds to wait for a ledger another process holds (``$ALFK_LEDGER_TIMEOUT`` overrides).
TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL,
    pool TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    P INTEGER NOT NULL,
    selected INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    options TEXT NOT NULL,
    scores_key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    run INTEGER NOT NULL REFERENCES runs(id),
    rank INTEGER NOT NULL,
    path TEXT NOT NULL,
    score REAL,
    predicted TEXT NOT NULL,
    center TEXT NOT NULL,
    PRIMARY KEY (run, rank)
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
"""


@dataclass(frozen=True)
class Run:
    """One recorded selection."""

    id: int
    started: str
    pool: str
    checkpoint_sha256: str
    P: int
    selected: int
    strategy: str
    options: dict[str, Any]
    scores_key: str


@contextmanager
def _connect(workdir: Path, create: bool) -> Iterator[sqlite3.Connection]:
    path = Path(workdir) / FILE_NAME
    if not create and not path.is_file():
        raise AlfkError(f"no ledger in {workdir} (no select has run there yet)")
    try:
        con = sqlite3.connect(path, timeout=_timeout())
    except sqlite3.Error as exc:
        raise AlfkError(f"cannot open the ledger {path}: {exc}") from None
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise AlfkError(f"{path} has ledger schema {version}; this alfk reads {SCHEMA_VERSION}")
        if version == 0:
            with con:
                con.executescript(_SCHEMA)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        yield con
    except sqlite3.OperationalError as exc:
        if not _busy(exc):
            raise AlfkError(f"cannot use the ledger {path}: {exc}") from None
        from alfk_cli.workdir import lock_holder

        who = lock_holder(Path(workdir)) or "another alfk or sqlite session"
        raise AlfkError(
            f"the ledger {path} is busy: {who} holds it; try again when it is done"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise AlfkError(
            f"the ledger {path} is damaged ({exc}); move it aside to start afresh"
        ) from None
    finally:
        con.close()


def _busy(exc: sqlite3.OperationalError) -> bool:
    """A lock another connection holds (SQLITE_BUSY / SQLITE_LOCKED), not a damaged file."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (not in the type stubs)
    return "locked" in str(exc)


def _timeout() -> float:
    """How long to wait for a busy ledger: ``$ALFK_LEDGER_TIMEOUT`` seconds, else 30."""
    raw = os.environ.get("ALFK_LEDGER_TIMEOUT", "").strip()
    if not raw:
        return TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise AlfkError(f"ALFK_LEDGER_TIMEOUT={raw!r} is not a number of seconds")
    return value


def create(workdir: Path) -> None:
    """An empty ledger in ``workdir`` (if it has none), so that a missing one later means lost."""
    with _connect(workdir, create=True):
        pass


def record(
    workdir: Path, scores: Scores, *, pool: str, strategy: str, options: dict[str, Any], P: int
) -> int:
    """Record one selection (one transaction: all of it or nothing); returns the run's id."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [
        (rank + 1, path, None if score != score else float(score), predicted, center)
        for rank, (path, score, predicted, center) in enumerate(
            zip(scores.paths, scores.score, scores.predicted, scores.center_paths, strict=True)
        )
    ]
    with _connect(workdir, create=True) as con, con:
        cur = con.execute(
            "INSERT INTO runs (started, pool, checkpoint_sha256, P, selected, strategy, options,"
            " scores_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                started,
                pool,
                str(scores.attrs.get("checkpoint_sha256", "")),
                int(P),
                len(rows),
                strategy,
                json.dumps(options, sort_keys=True, default=str),
                str(scores.attrs.get("cache_key", "")),
            ),
        )
        run_id = int(cur.lastrowid or 0)
        con.executemany(
            "INSERT INTO images (run, rank, path, score, predicted, center)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, *r) for r in rows],
        )
    return run_id


def history(workdir: Path) -> list[Run]:
    """Every recorded run, oldest first."""
    with _connect(workdir, create=False) as con:
        rows = con.execute(
            "SELECT id, started, pool, checkpoint_sha256, P, selected, strategy, options,"
            " scores_key FROM runs ORDER BY id"
        ).fetchall()
    return [
        Run(
            id=r[0],
            started=r[1],
            pool=r[2],
            checkpoint_sha256=r[3],
            P=r[4],
            selected=r[5],
            strategy=r[6],
            options=json.loads(r[7]),
            scores_key=r[8],
        )
        for r in rows
    ]


def run_paths(workdir: Path, run_id: int) -> list[str]:
    """The images of one run (paths inside the pool), in selection order."""
    with _connect(workdir, create=False) as con:
        if con.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise AlfkError(f"the ledger in {workdir} has no run {run_id}")
        rows = con.execute(
            "SELECT path FROM images WHERE run = ? ORDER BY rank", (run_id,)
        ).fetchall()
    return [r[0] for r in rows]


def sent_paths(workdir: Path, *, before: int | None = None) -> set[str]:
    """Every image recorded so far (paths inside the pool); ``before``: only runs with a smaller
    id. No ledger yet: nothing was sent."""
    if not (Path(workdir) / FILE_NAME).is_file():
        return set()
    with _connect(workdir, create=False) as con:
        limit = before if before is not None else -1
        rows = con.execute(
            "SELECT DISTINCT path FROM images WHERE ? < 0 OR run < ?", (limit, limit)
        ).fetchall()
    return {r[0] for r in rows}
