"""``alfk history``: the selections recorded in a work folder's ledger."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from alfk_cli.cli_app import app
from alfk_cli.errors import AlfkError


def _run_id(value: str | None) -> str | None:
    """``--run``: a run number (1 or more) or ``last``, checked at parse time."""
    if value is None or value == "last":
        return value
    if value.isascii() and value.isdigit() and 1 <= int(value) < 2**63:  # SQLite's INTEGER
        return value
    raise typer.BadParameter(f"{value!r} is not a run number (1, 2, ...) or 'last'")


@app.command(
    epilog="Examples: alfk history --pool unlabeled/  |  alfk history --pool unlabeled/ --run 3"
    "  |  alfk history --pool unlabeled/ --run last > to_label.txt"
)
def history(
    pool: Annotated[
        Path | None,
        typer.Option(
            "--pool", "-p", help="The pool folder (its work folder is .alfk/<pool name>)."
        ),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", "-w", help="The work folder (instead of --pool).")
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            callback=_run_id,
            help="Print this run's images (a number, or 'last'), one per line, as select did.",
        ),
    ] = None,
) -> None:
    """List the selections recorded in the ledger, or print one run's images."""
    from alfk_cli import ledger
    from alfk_cli.cli_options import stdout
    from alfk_cli.workdir import default_workdir

    if workdir is not None and pool is None:
        wd = workdir
    elif pool is not None and workdir is None:
        wd = default_workdir(pool)
    else:
        raise typer.BadParameter("give --pool or --workdir (one of them)", param_hint="--pool")
    out = stdout()  # closed (>&-): a one-line error
    if run is not None:
        runs = ledger.history(wd)
        if run == "last" and not runs:
            raise AlfkError(f"the ledger in {wd} has no runs yet")
        run_id = runs[-1].id if run == "last" else int(run)
        paths = ledger.run_paths(wd, run_id)  # an unknown run is an error here
        pool_arg = next(r.pool for r in runs if r.id == run_id)
        lines = [os.path.join(pool_arg, p) for p in paths]
    else:
        lines = ["run\tstarted\tP\tselected\tstrategy\tcheckpoint"]
        lines += [
            f"{r.id}\t{r.started}\t{r.P}\t{r.selected}\t{r.strategy}\t{r.checkpoint_sha256[:12]}"
            for r in ledger.history(wd)
        ]
    out.write("".join(line + "\n" for line in lines))
