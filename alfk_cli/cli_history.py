"""``alfk history``: the selections recorded in a work folder's ledger."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alfk_cli.cli_app import app


@app.command(
    epilog="Examples: alfk history --pool unlabeled/  |  alfk history --pool unlabeled/ --run 3"
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
        int | None,
        typer.Option("--run", min=1, help="Print this run's images, one per line, as select did."),
    ] = None,
) -> None:
    """List the selections recorded in the ledger, or print one run's images."""
    from alfk_cli import ledger
    from alfk_cli.workdir import default_workdir

    if workdir is not None and pool is None:
        wd = workdir
    elif pool is not None and workdir is None:
        wd = default_workdir(pool)
    else:
        raise typer.BadParameter("give --pool or --workdir (one of them)", param_hint="--pool")
    if run is not None:
        paths = ledger.run_paths(wd, run)  # an unknown run is an error here
        pool_arg = next(r.pool for r in ledger.history(wd) if r.id == run)
        lines = [os.path.join(pool_arg, p) for p in paths]
    else:
        lines = ["run\tstarted\tP\tselected\tstrategy\tcheckpoint"]
        lines += [
            f"{r.id}\t{r.started}\t{r.P}\t{r.selected}\t{r.strategy}\t{r.checkpoint_sha256[:12]}"
            for r in ledger.history(wd)
        ]
    sys.stdout.write("".join(line + "\n" for line in lines))
