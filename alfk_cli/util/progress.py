"""The progress interface the library reports to; the CLI decides how it is shown.

Library functions take an optional ``progress`` object with the three methods below and never
draw anything themselves. Both ``rich.progress.Progress`` and :class:`alfk_cli.cli.console.PlainProgress`
satisfy it, and a test can pass its own recorder.
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressSink(Protocol):
    """Where long-running stages report: one task per stage, advanced step by step."""

    def add_task(self, description: str, *, total: float | None = None, **fields: Any) -> Any:
        """Start a task; returns its id for :meth:`advance` and :meth:`update`.

        ``total`` is keyword-only: rich's ``Progress.add_task`` takes ``start`` second."""

    def advance(self, task_id: Any, advance: float = 1) -> None:
        """``advance`` more steps of the task are done."""

    def update(self, task_id: Any, **fields: Any) -> None:
        """Change a task's ``total``, ``completed`` or ``status`` text."""
