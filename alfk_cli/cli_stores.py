"""``alfk embed``, ``score`` and ``select``: the commands that read and write stores."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from alfk_cli.cli_app import app
from alfk_cli.cli_options import (
    Device,
    ExactCount,
    Exclude,
    Kernel,
    McSamples,
    PoolList,
    PseudoLabel,
    Quiet,
    Seed,
    StrategyName,
    Strict,
    Taps,
    Workers,
    check_arch,
    check_format,
    check_taps,
    checkpoint_arch,
    outputs_ok,
    report_skipped,
    say,
    say_note,
    stdout,
)
from alfk_cli.errors import AlfkError
from alfk_cli.label_studio import FROM_NAME, TO_NAME

if TYPE_CHECKING:
    from alfk_cli.scores import ScoreFormat, Scores


def _embed_summary(s, quiet: bool) -> None:
    for note in s.notes:
        say_note(quiet, note)
    rate = f", {s.images_per_second:.0f} images/s" if s.computed else ""
    acc = (
        f", pseudo-label accuracy {100 * s.pseudo_accuracy:.1f}%"
        if s.pseudo_accuracy is not None
        else ""
    )
    say(
        quiet,
        f"{s.out}: {s.images} images ({s.computed} computed, {s.reused} reused, {s.resumed} resumed), "
        f"{len(s.skipped)} skipped, {s.seconds:.1f} s{rate}; pseudo-labels {s.pseudo_label}{acc}",
    )


@app.command(
    epilog="Example: alfk embed --model init.pt --images unlabeled/ --reference val.h5 --out pool.h5"
)
def embed(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Checkpoint (pretrained or trained).")
    ],
    images: Annotated[Path, typer.Option("--images", "-i", help="Image folder to embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Feature store (HDF5) to write.")],
    reference: Annotated[
        Path | None,
        typer.Option("--reference", "-r", help="Validation store (same model and taps), for p_yz."),
    ] = None,
    taps: Taps = None,
    pseudo_label: PseudoLabel = None,
    mc_samples: Annotated[
        int, typer.Option("--mc-samples", min=2, help="K for mc_trace and mc_mi.")
    ] = 32,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1)] = None,
    workers: Workers = None,
    device: Device = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    pool_list: PoolList = None,
    quiet: Quiet = False,
) -> None:
    """Compute multi-scale features z and Fisher scores g for every image into a feature store.

    A labelled folder (class sub-folders) with no --reference is a validation set: g uses the
    true labels. A pool uses a pseudo-label estimator. An interrupted run resumes when re-run
    with the same arguments; an existing --out is updated, recomputing only new or changed images.
    """
    from alfk_cli.embedding import EmbedOptions, embed_folder
    from alfk_cli.montecarlo import MCConfig
    from alfk_cli.progress import make_progress

    outputs_ok(out, model, reference, images, _list_file(pool_list))
    check_taps(checkpoint_arch(model, "lenet"), taps)
    options = EmbedOptions(
        taps=taps,
        pseudo_label=pseudo_label,
        mc=MCConfig(samples=mc_samples),
        batch_size=batch_size,
        workers=workers,
        device=device,
        seed=seed,
        strict=strict,
        pool_list=pool_list,
    )
    with make_progress(quiet) as progress:
        summary = embed_folder(
            model,
            images,
            out,
            options,
            reference=reference,
            progress=progress,
            reuse=out,  # rows of unchanged images in an existing --out are kept, not recomputed
        )
    report_skipped(summary.skipped, images, quiet)
    _embed_summary(summary, quiet)


@app.command(epilog="Example: alfk score --val val.h5 --pool pool.h5 --P 1250 --out scores.h5")
def score(
    val: Annotated[Path, typer.Option("--val", "-v", help="Validation feature store.")],
    pool: Annotated[
        Path, typer.Option("--pool", "-p", help="Pool feature store (same model and taps).")
    ],
    P: Annotated[int, typer.Option("--P", "-P", min=1, help="How many pool images to select.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores file (HDF5) to write.")],
    strategy: StrategyName = "fk",
    kernel: Kernel = "sum",
    exclude: Exclude = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="The stores' checkpoint (for varR and bald only)."),
    ] = None,
    mc_samples: McSamples = 32,
    exact_count: ExactCount = False,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Find misclassified validation images, pick k-center centres among them, and select the P
    pool images with the highest Fisher-kernel similarity (rank-major, no duplicates)."""
    from alfk_cli.scoring import ScoreOptions, score_stores

    outputs_ok(out, val, pool, exclude, model)
    options = ScoreOptions(
        P=P,
        strategy=strategy,
        kernel=kernel,
        exclude=exclude,
        seed=seed,
        device=device,
        exact_count=exact_count,
        checkpoint=model,
        mc_samples=mc_samples,
        workers=workers,
    )
    scores, notes = score_stores(val, pool, out, options)
    for note in notes:
        say_note(quiet, note)
    how = f"by {scores.attrs.get('strategy')}"
    if len(scores.centers):
        how = (
            f"with {len(scores.centers)} centres "
            f"({scores.attrs.get('misclassified')} misclassified validation images)"
        )
    say(quiet, f"selected {len(scores.selected)} images {how}; wrote {out}")


SelectP = Annotated[int | None, typer.Option("--P", "-P", min=1, help="How many images to select.")]
ValFolder = Annotated[
    Path | None, typer.Option("--val", "-v", help="Validation folder (class sub-folders).")
]
PoolFolder = Annotated[Path | None, typer.Option("--pool", "-p", help="Unlabelled pool folder.")]
ScoresFile = Annotated[
    Path | None,
    typer.Option("--scores", "-s", help="Print a scores file of 'alfk score' instead."),
]
SelectModel = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Task checkpoint (default: newest in the work folder, else pretrain one).",
    ),
]
PretrainArch = Annotated[
    str,
    typer.Option(
        "--arch", callback=check_arch, help="Architecture to pretrain when there is no checkpoint."
    ),
]
Workdir = Annotated[
    Path | None,
    typer.Option(
        "--workdir", "-w", help="Cache folder (default: .alfk/<pool name> beside the pool)."
    ),
]
NoLedger = Annotated[
    bool,
    typer.Option(
        "--no-ledger",
        help="A look: do not record this selection in the ledger (the images it lists as sent are "
        "still left out; 'alfk history --run N' prints a recorded run again).",
    ),
]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        callback=check_format,
        help="txt (paths), csv, jsonl or label-studio (a Label Studio tasks JSON).",
    ),
]
UrlPrefix = Annotated[
    str | None,
    typer.Option(
        "--url-prefix",
        help="label-studio: data.image = PREFIX + the URL-quoted path inside the pool folder "
        "(default: the printed path).",
    ),
]
LsFromName = Annotated[
    str,
    typer.Option(
        "--ls-from-name", help="label-studio: the labelling config's <Choices> name (from_name)."
    ),
]
LsToName = Annotated[
    str,
    typer.Option(
        "--ls-to-name", help="label-studio: the labelling config's <Image> name (to_name)."
    ),
]
ReportFile = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Also write the selection as one self-contained HTML page (thumbnails grouped by "
        "matched validation image, class histograms).",
    ),
]


@app.command(
    epilog="Examples: alfk select --val val/ --pool unlabeled/ --P 1250 > to_label.txt  |  "
    "alfk select --scores scores.h5 --format csv  |  "
    "alfk select --scores scores.h5 --format label-studio --url-prefix s3://bucket/pool/ > tasks.json"
)
def select(
    P: SelectP = None,
    val: ValFolder = None,
    pool: PoolFolder = None,
    scores: ScoresFile = None,
    model: SelectModel = None,
    arch: PretrainArch = "lenet",
    workdir: Workdir = None,
    exclude: Exclude = None,
    strategy: StrategyName = "fk",
    kernel: Kernel = "sum",
    pseudo_label: PseudoLabel = None,
    mc_samples: McSamples = 32,
    taps: Taps = None,
    fmt: Format = "txt",
    url_prefix: UrlPrefix = None,
    ls_from_name: LsFromName = FROM_NAME,
    ls_to_name: LsToName = TO_NAME,
    exact_count: ExactCount = False,
    no_ledger: NoLedger = False,
    report: ReportFile = None,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = None,
    strict: Strict = False,
    pool_list: PoolList = None,
    quiet: Quiet = False,
) -> None:
    """Print the P pool images to label next, one per line, in selection order.

    With --val and --pool it runs every stage that is out of date (pretrain when no model is
    given or cached, embed of new images only, score) in the work folder.
    """
    export = _label_studio_options(fmt, url_prefix, ls_from_name, ls_to_name)
    stdout()  # closed (>&-): say so before any work
    if report is not None:
        outputs_ok(report, val, pool, scores, exclude, model)
    if scores is not None:
        if val is not None or pool is not None or pool_list is not None:
            raise typer.BadParameter(
                "give either --scores or --val and --pool", param_hint="--scores"
            )
        result, val_store = _read_selection(scores, P, exact_count, quiet, report is not None)
        _deliver(result, val_store, cast("ScoreFormat", fmt), export, report, quiet, False)
    else:
        if val is None or pool is None or P is None:
            raise typer.BadParameter("needs --val DIR, --pool DIR and --P N (or --scores FILE)")
        from alfk_cli.pipeline import SelectOptions

        if exclude is not None and not exclude.is_file():
            what = "is a folder, not a file" if exclude.is_dir() else "does not exist"
            raise AlfkError(f"exclude file {exclude} {what}")
        check_taps(checkpoint_arch(model, arch), taps)
        options = SelectOptions(
            P=P, model=model, arch=arch, workdir=workdir, exclude=exclude, strategy=strategy,
            kernel=kernel, pseudo_label=pseudo_label, mc_samples=mc_samples, taps=taps,
            seed=seed, device=device, workers=workers, strict=strict, exact_count=exact_count,
            ledger=not no_ledger, pool_list=pool_list,
        )  # fmt: skip
        deliver = functools.partial(
            _deliver, fmt=cast("ScoreFormat", fmt), export=export, report=report, quiet=quiet,
            recorded=not no_ledger,
        )  # fmt: skip
        _run_select(val, pool, options, quiet, deliver)


def _deliver(
    result: Scores,
    val_store: Path | None,
    fmt: ScoreFormat,  # checked at parse time
    export: dict,
    report: Path | None,
    quiet: bool,
    recorded: bool,
) -> None:
    """The selection on stdout, then the report; a selection to record must arrive whole."""
    _print_selection(result, fmt, export, recorded)
    if report is not None:
        _write_report(report, result, val_store, quiet)


def _list_file(pool_list: Path | None) -> Path | None:
    """The pool list as a file the output must not be (none for standard input)."""
    from alfk_cli.poollist import STDIN

    return None if pool_list is None or str(pool_list) == STDIN else pool_list


def _read_selection(
    scores: Path, P: int | None, exact: bool, quiet: bool, want_val: bool
) -> tuple[Scores, Path | None]:
    """The first P of a scores file, and (for --report) its validation store when unchanged."""
    from alfk_cli.scores import read_scores

    result, short = read_scores(scores).head(P, exact=exact)
    if short:
        say_note(quiet, short)
    if not want_val:
        return result, None
    from alfk_cli.report import recorded_val_store

    return result, recorded_val_store(result)


def _write_report(out: Path, result: Scores, val_store: Path | None, quiet: bool) -> None:
    from alfk_cli import distributed
    from alfk_cli.report import write_report

    distributed.on_main(lambda: write_report(out, result, val_store=val_store))
    what = "" if val_store is not None else " (no validation store: scores-file classes only)"
    say(quiet, f"wrote report {out}{what}")


def _run_select(
    val: Path, pool: Path, options, quiet: bool, deliver: Callable[[Scores, Path], None]
) -> None:
    """The orchestrator with progress on stderr, the selection delivered, then what it did."""
    from alfk_cli.pipeline import run_select
    from alfk_cli.progress import make_progress

    with contextlib.ExitStack() as bars:
        progress = make_progress(quiet)
        bars.enter_context(progress)

        def after_bars(result: Scores, val_store: Path) -> None:
            bars.close()  # rich's live bars redirect sys.stdout while they run
            deliver(result, val_store)

        result, notes, report = run_select(
            val, pool, options, progress=progress, deliver=after_bars
        )
    if report.pretrained:
        say(quiet, f"no checkpoint given or cached: pretrained {report.checkpoint}")
    else:
        say(quiet, f"model {report.checkpoint}")
    for folder, s in zip((val, pool), report.embeds):
        report_skipped(s.skipped, folder, quiet)
        _embed_summary(s, quiet)
    for note in notes:
        say_note(quiet, note)
    say(
        quiet,
        f"selected {len(result.selected)} of the pool in {report.seconds:.1f} s "
        f"(work folder {report.workdir})",
    )


def _label_studio_options(
    fmt: str, url_prefix: str | None, from_name: str, to_name: str
) -> dict[str, str | None]:
    """The keyword arguments of ``label_studio.tasks``; the options are refused with another
    ``--format`` (before any work), and empty names always."""
    given = [
        opt
        for opt, value, default in (
            ("--url-prefix", url_prefix, None),
            ("--ls-from-name", from_name, FROM_NAME),
            ("--ls-to-name", to_name, TO_NAME),
        )
        if value != default
    ]
    if given and fmt != "label-studio":
        raise typer.BadParameter("only with --format label-studio", param_hint=given[0])
    for opt, name in (("--ls-from-name", from_name), ("--ls-to-name", to_name)):
        if not name.strip():
            raise typer.BadParameter("give the labelling config's tag name", param_hint=opt)
    return {"url_prefix": url_prefix, "from_name": from_name, "to_name": to_name}


def _selection_lines(result: Scores, fmt: ScoreFormat, export: dict) -> Iterable[str]:
    """``Scores.lines``, or the Label Studio tasks as one JSON document (``[]`` when empty)."""
    if fmt != "label-studio":
        return result.lines(fmt)
    from alfk_cli.label_studio import tasks

    return [json.dumps(tasks(result, **export), indent=1)]


def _print_selection(result: Scores, fmt: ScoreFormat, export: dict, recorded: bool) -> None:
    """The selection on stdout (one line per image, or one JSON document). A reader that hangs
    up early is fine for a look; a selection to record has not been delivered: an error."""
    out = stdout()
    try:
        for line in _selection_lines(result, fmt, export):
            out.write(line + "\n")
        out.flush()
    except OSError as exc:  # > /dev/full, a full disk behind the redirection, a reader gone
        if isinstance(exc, BrokenPipeError):  # e.g. `| head`: fine for a look
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            if not recorded:
                return
        why = f"{exc.strerror}{' (nothing recorded)' if recorded else ''}"
        raise AlfkError(f"cannot write the selection to standard output: {why}") from None
