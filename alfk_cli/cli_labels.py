"""``alfk labels import``: file the labelling tool's answers under ``labeled/<class>/``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from alfk_cli.cli_app import app
from alfk_cli.cli_options import Quiet, csv_list
from alfk_cli.names import printable
from alfk_cli.progress import stderr

if TYPE_CHECKING:
    from alfk_cli.label_filing import ImportReport

labels_app = typer.Typer(
    name="labels",
    help="Exchange labels with the labelling tool (Label Studio or a CSV).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(labels_app, name="labels")


@labels_app.command(
    "import",
    epilog="Example: alfk labels import export.json --pool unlabeled/ --into labeled/ "
    "--classes-from val/",
)
def import_labels(
    exports: Annotated[
        list[Path],
        typer.Argument(
            metavar="EXPORT...",
            help="Label Studio JSON or JSON_MIN exports, or CSV files with a path,label header.",
        ),
    ],
    into: Annotated[
        Path, typer.Option("--into", "-o", help="Labelled folder to file the images in.")
    ],
    pool: Annotated[
        Path,
        typer.Option(
            "--pool",
            "-p",
            help="The pool folder select ran on: only images inside it (links followed) are "
            "filed, and --into must lie outside it.",
        ),
    ],
    root: Annotated[
        Path,
        typer.Option("--root", help="Folder relative image paths start from (where select ran)."),
    ] = Path("."),
    url_prefix: Annotated[
        str | None,
        typer.Option(
            "--url-prefix",
            help="Strip this from URL-style image values (e.g. /data/local-files/?d=) and "
            "join the rest to --root.",
        ),
    ] = None,
    classes: Annotated[
        str | None, typer.Option("--classes", help="Comma-separated known classes.")
    ] = None,
    classes_from: Annotated[
        Path | None,
        typer.Option("--classes-from", help="Known classes: the class sub-folders of this folder."),
    ] = None,
    relabel: Annotated[
        bool,
        typer.Option("--relabel", help="Move an image already filed under another class."),
    ] = False,
    skip_missing: Annotated[
        bool,
        typer.Option("--skip-missing", help="Skip images that do not exist instead of failing."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """File labelled pool images under INTO/<class>/ as hard links (copies across file systems);
    the pool is never changed. Nothing is written unless every label checks out and every image
    is an image file inside the pool folder."""
    from alfk_cli.label_filing import file_labels, known_classes
    from alfk_cli.label_import import read_labels

    if classes is not None and classes_from is not None:
        raise typer.BadParameter(
            "give --classes or --classes-from, not both", param_hint="--classes"
        )
    known = csv_list(classes, "classes") if classes is not None else None
    if classes_from is not None:
        known = known_classes(classes_from)
    labelled = [
        item for export in exports for item in read_labels(export, root=root, url_prefix=url_prefix)
    ]
    report = file_labels(
        labelled, into, pool=pool, classes=known, relabel=relabel, skip_missing=skip_missing
    )
    if not quiet:
        _say(report, into)


def _say(report: ImportReport, into: Path) -> None:
    """The summary line on stderr, and the missing images."""
    new = report.linked + report.copied
    parts = [
        f"{new} filed under {into} ({report.linked} linked, {report.copied} copied"
        + (f", {report.relabelled} relabelled)" if report.relabelled else ")"),
        f"{report.already} already there",
        f"{report.skipped} skipped (cancelled or unlabelled)",
    ]
    if report.missing:
        parts.append(f"{len(report.missing)} missing images skipped")
    stderr.print("; ".join(parts), markup=False, highlight=False, soft_wrap=True)
    for path in report.missing[:20]:
        stderr.print(f"  missing: {printable(path)}", markup=False, highlight=False)
    if len(report.missing) > 20:
        stderr.print(f"  … and {len(report.missing) - 20} more", markup=False, highlight=False)
