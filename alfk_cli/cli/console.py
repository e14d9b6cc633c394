"""Progress and messages, always on stderr so stdout carries data only.

On a terminal: rich progress bars. Anywhere else (cron, ``2> log``, a pipe): plain timestamped
lines, one when a task starts, at each epoch summary, every 10% or 30 s, and when it ends, with
no bars, colours or box-drawing, so a log file reads line by line while the job runs.
``ALFK_PROGRESS=rich|plain`` overrides the choice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

#: A plain progress line at least this often (seconds) while a task advances.
PLAIN_INTERVAL = 30.0


def plain_output() -> bool:
    """True when progress should be plain lines: stderr is not a terminal, or ALFK_PROGRESS=plain."""
    choice = os.environ.get("ALFK_PROGRESS", "").strip().lower()
    if choice in ("plain", "rich"):
        return choice == "plain"
    return not stderr.is_terminal


def stamp() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    last_step: int = 0
    summaries: int = 0  # status lines without progress: training's per-epoch evaluations
    done: bool = False


class PlainProgress:
    """The subset of rich's ``Progress`` the library uses (``add_task``, ``update``, ``advance``,
    a context manager), writing timestamped lines instead of a live display."""

    def __init__(self, console: Console = stderr, disable: bool = False):
        self.console, self.disable = console, disable
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def _line(self, task: _Task, event: str = "") -> None:
        if self.disable:
            return
        count = f"{task.completed:.0f}/{task.total:.0f}" if task.total else f"{task.completed:.0f}"
        parts = [f"{stamp()} {task.description}: {count}", event, task.status]
        self.console.print("  ".join(p for p in parts if p), markup=False, highlight=False)
        task.last_line = time.monotonic()

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task = _Task(description, total, float(fields.get("completed", 0) or 0))
        task.status = str(fields.get("status", "") or "")
        self.tasks.append(task)
        self._line(task, "started")
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        advance: float | None = None,
        completed: float | None = None,
        total: float | None = None,
        status: str | None = None,
        **_: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        if task.done:  # its closing line is out: nothing more for this task
            return
        summary = status is not None and not advance
        if status is not None:
            task.status = status
        task.summaries += summary
        total = task.total or 0.0  # None (unknown) and 0 both mean: no steps to count
        step = int(10 * task.completed / total) if total else 0
        finished = bool(total) and task.completed >= total
        if finished and (summary or not task.summaries):
            task.done = True  # a trainer's last evaluation comes after its last step
            self._line(task, f"done in {time.monotonic() - task.started:.1f} s")
        elif finished:
            pass
        elif (
            summary
            or time.monotonic() - task.last_line >= PLAIN_INTERVAL
            or (not task.summaries and step > task.last_step)  # epochs already give a line each
        ):
            self._line(task)
        task.last_step = max(task.last_step, step)


def make_progress(quiet: bool = False) -> Progress | PlainProgress:
    """Bars on a terminal, timestamped lines elsewhere; nothing at all when ``quiet``."""
    if plain_output():
        return PlainProgress(stderr, disable=quiet)
    # rich's bars only for a terminal: their modules cost a cron job's start-up for nothing
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=False,
    )
