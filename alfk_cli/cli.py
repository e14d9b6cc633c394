"""The ``alfk`` command: parses options, calls the library, formats output. No maths here.

stdout carries data only; progress, tables and warnings go to stderr. Expected failures
(``AlfkError``) print one ``error: …`` line and exit 1; usage errors exit 2 (Typer's).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from alfk_cli import __version__
from alfk_cli.atomic import disk_error
from alfk_cli.errors import AlfkError
from alfk_cli.names import printable
from alfk_cli.progress import stderr

app = typer.Typer(
    name="alfk",
    help="Deep active learning on biased image collections (Fisher-kernel self-supervision).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Option values are checked when the command line is parsed (exit 2, before any work), against
# the library's own tables, imported only then so that --help stays fast.


def _one_of(value: str | None, allowed, option: str) -> str | None:
    if value is not None and value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


def _check_device(value: str) -> str:
    from alfk_cli.devices import parse_device

    try:
        return parse_device(value)
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None


def _check_kernel(value: str) -> str:
    from alfk_cli.acquisition import KERNELS

    return _one_of(value, KERNELS, "--kernel")


def _check_pseudo_label(value: str | None) -> str | None:
    from alfk_cli.estimators import ESTIMATORS

    return _one_of(value, ESTIMATORS, "--pseudo-label")


def _check_strategy(value: str) -> str:
    from alfk_cli.strategies import make_strategy

    try:
        make_strategy(value)
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint="--strategy") from None
    return value


def _check_arch(value: str | None) -> str | None:
    from alfk_cli.models import ARCHS

    return _one_of(value, tuple(ARCHS), "--arch")


def _check_format(value: str) -> str:
    from alfk_cli.scores import FORMATS

    return _one_of(value, FORMATS, "--format")


def _check_taps(arch: str, taps: str | None) -> None:
    """``--taps`` against the architecture it will be used with (known once the checkpoint is)."""
    from alfk_cli.models import resolve_taps

    if taps:
        try:
            resolve_taps(arch, taps)
        except AlfkError as exc:
            raise typer.BadParameter(str(exc), param_hint="--taps") from None


def _checkpoint_arch(model: Path | None, default: str) -> str:
    """The architecture of ``model`` (read before any work), else ``default``."""
    if model is None:
        return default
    from alfk_cli.checkpoint import load_checkpoint

    return load_checkpoint(model).arch


def _outputs_ok(out: Path, *inputs: Path | None) -> None:
    """Fail before any work when ``out`` cannot be written or is one of the command's inputs."""
    from alfk_cli.atomic import check_output

    check_output(out, *inputs)


# Options shared by several commands.
Device = Annotated[
    str,
    typer.Option(
        "--device",
        callback=_check_device,
        help="auto, cpu, cuda or cuda:N (auto = cuda when available).",
    ),
]
Seed = Annotated[
    int, typer.Option("--seed", help="Seed for initialisation, shuffling and sampling.")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summaries on stderr.")]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict", help="Fail on unreadable or non-image files instead of skipping them."
    ),
]
Workers = Annotated[
    int, typer.Option("--workers", min=0, help="Image-decoding worker processes (0: none).")
]
Arch = Annotated[
    str | None,
    typer.Option("--arch", callback=_check_arch, help="lenet, resnet10 or resnet18."),
]
ExactCount = Annotated[
    bool,
    typer.Option(
        "--exact-count",
        help="Fail when fewer than P pool images are left (default: select the ones left, "
        "with a warning).",
    ),
]


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        stderr.print(message)


def _note(quiet: bool, note: str) -> None:
    """A library note: ``warning: …`` ones as they are, the others as ``note: …``."""
    _say(quiet, note if note.startswith("warning:") else f"note: {note}")


def _report_skipped(skipped: list[tuple[str, str]] | list[str], root: Path, quiet: bool) -> None:
    """List files that were skipped, on stderr (unless --quiet)."""
    if not skipped or quiet:
        return
    stderr.print(f"[yellow]warning:[/] skipped {len(skipped)} file(s) under {root}:")
    for item in skipped[:20]:
        path, reason = item if isinstance(item, tuple) else (item, "could not be decoded")
        stderr.print(f"  {printable(str(root / path))}: {reason}", markup=False)
    if len(skipped) > 20:
        stderr.print(f"  … and {len(skipped) - 20} more")


def _accuracy_table(
    title: str, classes: list[str], overall: float, per_class: list[float]
) -> Table:
    from rich import box

    from alfk_cli.progress import plain_output

    # no box-drawing characters in a log file
    table = Table(
        title=title, title_justify="left", box=box.ASCII2 if plain_output() else box.HEAVY_HEAD
    )
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in zip(classes, per_class, strict=False):
        table.add_row(name, "-" if acc != acc else f"{100 * acc:.1f}%")
    table.add_row("[bold]overall", f"[bold]{100 * overall:.2f}%")
    return table


def _say_training(quiet: bool, init: Path | None, head: str, start) -> None:
    """What ``train`` says before its first epoch; ``start`` is a ``training.TrainStart``."""
    if init is not None:
        fresh = ", ".join(start.fresh) or "nothing"
        _say(quiet, f"initialised from {init} ({head} checkpoint); fresh: {fresh}")
    _say(
        quiet,
        f"training {start.arch} on {start.train_images} images ({len(start.classes)} classes), "
        f"validating on {start.val_images}, device {start.device}",
    )


@app.command(epilog="Example: alfk train --data labeled/ --val val/ --init init.pt --out model.pt")
def train(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled images, one sub-folder per class.")
    ],
    val: Annotated[
        Path,
        typer.Option(
            "--val", "-v", help="Validation images (same class folders); picks the best epoch."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start from this checkpoint (pretrained or a previous model)."),
    ] = None,
    arch: Arch = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: per architecture).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1)] = None,
    momentum: Annotated[float | None, typer.Option("--momentum")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = 2,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Train the task model on labelled images; keep the epoch with the best validation accuracy."""
    from alfk_cli.checkpoint import load_checkpoint
    from alfk_cli.devices import resolve_device
    from alfk_cli.images import scan_images
    from alfk_cli.progress import make_progress
    from alfk_cli.training import TrainOptions, train_checkpoint

    _outputs_ok(out, data, val)  # --init may be --out: it is read first, the output is atomic
    dev = resolve_device(device)
    start = load_checkpoint(init, arch) if init else None
    data_set = scan_images(data, strict=strict)
    val_set = scan_images(val, strict=strict)
    _report_skipped(data_set.skipped, data, quiet)
    _report_skipped(val_set.skipped, val, quiet)
    options = TrainOptions(
        arch=arch,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
    )
    head = start.head if start else ""
    with make_progress(quiet) as progress:
        report = train_checkpoint(
            data_set,
            val_set,
            out,
            options,
            device=dev,
            init=start,
            progress=progress,
            on_start=lambda s: _say_training(quiet, init, head, s),
        )
    result = report.result
    _report_skipped(result.skipped, data, quiet)
    if not quiet:
        title = f"validation accuracy, epoch {result.best_epoch} of {report.config.epochs}"
        stderr.print(
            _accuracy_table(title, val_set.classes, result.best_accuracy, result.per_class)
        )
    _say(quiet, f"wrote {out}")


@app.command(epilog="Example: alfk pretrain --images unlabeled/ --arch lenet --out init.pt")
def pretrain(
    images: Annotated[
        Path, typer.Option("--images", "-i", help="Any image folder; labels are ignored.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    arch: Annotated[
        str, typer.Option("--arch", callback=_check_arch, help="lenet, resnet10 or resnet18.")
    ] = "lenet",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 8,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: per architecture).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, help="Images per batch (×4 rotations)."),
    ] = None,
    momentum: Annotated[float | None, typer.Option("--momentum")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay")] = None,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout", min=0.01, max=0.5, help="Fraction held out to measure rotation accuracy."
        ),
    ] = 0.1,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = 2,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Rotation self-supervised pretraining (RotNet) of the task network on unlabelled images."""
    from alfk_cli.devices import resolve_device
    from alfk_cli.images import scan_images
    from alfk_cli.progress import make_progress
    from alfk_cli.training import TrainOptions, pretrain_checkpoint

    _outputs_ok(out, images)
    dev = resolve_device(device)
    found = scan_images(images, strict=strict)
    _report_skipped(found.skipped, images, quiet)
    options = TrainOptions(
        arch=arch,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
    )
    _say(quiet, f"rotation pretraining {arch} on {len(found)} images, device {dev}")
    with make_progress(quiet) as progress:
        report = pretrain_checkpoint(
            found, out, options, device=dev, holdout=holdout, progress=progress
        )
    result = report.result
    _report_skipped(result.skipped, images, quiet)
    if not quiet:
        title = f"held-out rotation accuracy, epoch {result.best_epoch} of {report.config.epochs}"
        labels = [f"{c}°" for c in report.classes]
        stderr.print(_accuracy_table(title, labels, result.best_accuracy, result.per_class))
    _say(quiet, f"wrote {out}")


Kernel = Annotated[
    str,
    typer.Option(
        "--kernel",
        "-k",
        callback=_check_kernel,
        help="sum (R_z+R_g, default), product (R_z·R_g, the paper's PFK) or pcc (R_z).",
    ),
]
PseudoLabel = Annotated[
    str | None,
    typer.Option(
        "--pseudo-label",
        callback=_check_pseudo_label,
        help="Labels for a pool's g: p_yz (default), yhat, true, mc_trace or mc_mi.",
    ),
]
Taps = Annotated[
    str | None,
    typer.Option("--taps", help="A preset (L80, L768, ...) or comma-separated tap names."),
]
Exclude = Annotated[
    Path | None,
    typer.Option("--exclude", help="File of pool images to leave out (one path per line)."),
]
StrategyName = Annotated[
    str,
    typer.Option(
        "--strategy",
        callback=_check_strategy,
        help="fk[:ESTIMATOR[:KERNEL]] (default fk: the paper's method, with --pseudo-label and "
        "--kernel), pcc, random, entropy, margin, varR, bald, coreset, or a plug-in's "
        "(alfk list strategies).",
    ),
]
McSamples = Annotated[
    int, typer.Option("--mc-samples", min=2, help="K for varR, bald, mc_trace and mc_mi.")
]


def _embed_summary(s, quiet: bool) -> None:
    for note in s.notes:
        _note(quiet, note)
    rate = f", {s.images_per_second:.0f} images/s" if s.computed else ""
    acc = (
        f", pseudo-label accuracy {100 * s.pseudo_accuracy:.1f}%"
        if s.pseudo_accuracy is not None
        else ""
    )
    _say(
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
    workers: Workers = 2,
    device: Device = "auto",
    seed: Seed = 0,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Compute multi-scale features z and Fisher scores g for every image into a feature store.

    A labelled folder (class sub-folders) with no --reference is a validation set: g uses the
    true labels. A pool uses a pseudo-label estimator. An interrupted run resumes when re-run
    with the same arguments; an existing --out is updated, recomputing only new or changed images.
    """
    from alfk_cli.embedding import EmbedOptions, embed_folder
    from alfk_cli.progress import make_progress
    from alfk_cli.pseudolabels import MCConfig

    _outputs_ok(out, model, reference, images)
    _check_taps(_checkpoint_arch(model, "lenet"), taps)
    options = EmbedOptions(
        taps=taps,
        pseudo_label=pseudo_label,
        mc=MCConfig(samples=mc_samples),
        batch_size=batch_size,
        workers=workers,
        device=device,
        seed=seed,
        strict=strict,
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
    _report_skipped(summary.skipped, images, quiet)
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
    workers: Workers = 2,
    quiet: Quiet = False,
) -> None:
    """Find misclassified validation images, pick k-center centres among them, and select the P
    pool images with the highest Fisher-kernel similarity (rank-major, no duplicates)."""
    from alfk_cli.scoring import ScoreOptions, score_stores

    _outputs_ok(out, val, pool, exclude, model)
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
        _note(quiet, note)
    how = f"by {scores.attrs.get('strategy')}"
    if len(scores.centers):
        how = (
            f"with {len(scores.centers)} centres "
            f"({scores.attrs.get('misclassified')} misclassified validation images)"
        )
    _say(quiet, f"selected {len(scores.selected)} images {how}; wrote {out}")


@app.command(
    epilog="Examples: alfk select --val val/ --pool unlabeled/ --P 1250 > to_label.txt  |  "
    "alfk select --scores scores.h5 --format csv"
)
def select(
    P: Annotated[
        int | None, typer.Option("--P", "-P", min=1, help="How many images to select.")
    ] = None,
    val: Annotated[
        Path | None, typer.Option("--val", "-v", help="Validation folder (class sub-folders).")
    ] = None,
    pool: Annotated[
        Path | None, typer.Option("--pool", "-p", help="Unlabelled pool folder.")
    ] = None,
    scores: Annotated[
        Path | None,
        typer.Option("--scores", "-s", help="Print a scores file of 'alfk score' instead."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Task checkpoint (default: newest in the work folder, else pretrain one).",
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            callback=_check_arch,
            help="Architecture to pretrain when there is no checkpoint.",
        ),
    ] = "lenet",
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", "-w", help="Cache folder (default: .alfk/<pool name> beside the pool)."
        ),
    ] = None,
    exclude: Exclude = None,
    strategy: StrategyName = "fk",
    kernel: Kernel = "sum",
    pseudo_label: PseudoLabel = None,
    mc_samples: McSamples = 32,
    taps: Taps = None,
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", callback=_check_format, help="txt (paths), csv or jsonl."),
    ] = "txt",
    exact_count: ExactCount = False,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = 2,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Print the P pool images to label next, one per line, in selection order.

    With --val and --pool it runs every stage that is out of date (pretrain when no model is
    given or cached, embed of new images only, score) in the work folder.
    """
    if scores is not None:
        if val is not None or pool is not None:
            raise typer.BadParameter(
                "give either --scores or --val and --pool", param_hint="--scores"
            )
        from alfk_cli.scores import read_scores

        result, short = read_scores(scores).head(P, exact=exact_count)
        if short:
            _note(quiet, short)
    else:
        if val is None or pool is None or P is None:
            raise typer.BadParameter("needs --val DIR, --pool DIR and --P N (or --scores FILE)")
        from alfk_cli.pipeline import SelectOptions, run_select
        from alfk_cli.progress import make_progress

        if exclude is not None and not exclude.is_file():
            what = "is a folder, not a file" if exclude.is_dir() else "does not exist"
            raise AlfkError(f"exclude file {exclude} {what}")
        _check_taps(_checkpoint_arch(model, arch), taps)
        with make_progress(quiet) as progress:
            options = SelectOptions(
                P=P,
                model=model,
                arch=arch,
                workdir=workdir,
                exclude=exclude,
                strategy=strategy,
                kernel=kernel,
                pseudo_label=pseudo_label,
                mc_samples=mc_samples,
                taps=taps,
                seed=seed,
                device=device,
                workers=workers,
                strict=strict,
                exact_count=exact_count,
            )
            result, notes, report = run_select(val, pool, options, progress=progress)
        if report.pretrained:
            _say(quiet, f"no checkpoint given or cached: pretrained {report.checkpoint}")
        else:
            _say(quiet, f"model {report.checkpoint}")
        for folder, s in zip((val, pool), report.embeds):
            _report_skipped(s.skipped, folder, quiet)
            _embed_summary(s, quiet)
        for note in notes:
            _note(quiet, note)
        _say(
            quiet,
            f"selected {len(result.selected)} of the pool in {report.seconds:.1f} s (work folder {report.workdir})",
        )
    out = sys.stdout
    try:
        for line in result.lines(fmt):
            out.write(line + "\n")
        out.flush()
    except BrokenPipeError:  # e.g. `alfk select ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:  # e.g. > /dev/full, or a full disk behind the redirection
        raise AlfkError(f"cannot write the selection to standard output: {exc.strerror}") from None


def _csv_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"give a comma-separated list of {what}")
    return items


@app.command(
    epilog="Example: alfk simulate --pool unlabeled/ --val val/ --test test/ --imbalance 10 "
    "--strategies random,fk:p_yz --rounds 10 --P 125 --seeds 0,1,2 --out results/"
)
def simulate(
    pool: Annotated[
        Path, typer.Option("--pool", "-p", help="Labelled pool (class sub-folders, labels hidden).")
    ],
    val: Annotated[Path, typer.Option("--val", "-v", help="Validation folder (picks epochs).")],
    test: Annotated[Path, typer.Option("--test", "-t", help="Test folder (reported only).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (resumable).")],
    strategies: Annotated[
        str,
        typer.Option(
            "--strategies",
            "-s",
            help="Comma-separated: random, entropy, margin, varR, bald, coreset, pcc, "
            "fk[:ESTIMATOR[:KERNEL]] (estimators p_yz, yhat, true, mc_trace, mc_mi; "
            "kernels sum, product, pcc).",
        ),
    ] = "random,fk:p_yz",
    rounds: Annotated[int, typer.Option("--rounds", "-B", min=1, help="Rounds B.")] = 10,
    P: Annotated[int, typer.Option("--P", "-P", min=1, help="Images labelled per round.")] = 125,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0",
    imbalance: Annotated[
        float | None,
        typer.Option(
            "--imbalance",
            "-r",
            help="Bias the pool: keep floor(non-rare / R) rare images (default: no bias).",
        ),
    ] = None,
    rare: Annotated[
        str, typer.Option("--rare", help="Rare classes, by folder name or index.")
    ] = "5,6,7,8,9",
    arch: Annotated[
        str, typer.Option("--arch", callback=_check_arch, help="lenet, resnet10 or resnet18.")
    ] = "lenet",
    taps: Taps = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            callback=lambda v: _one_of(v, ("pretrain", "random"), "--init"),
            help="pretrain (rotation self-supervision on the pool) or random.",
        ),
    ] = "pretrain",
    epochs: Annotated[
        int, typer.Option("--epochs", min=1, help="Fine-tuning epochs per round.")
    ] = 50,
    pretrain_epochs: Annotated[int, typer.Option("--pretrain-epochs", min=1)] = 8,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="Validate every N epochs (and the last).")
    ] = 1,
    mc_samples: Annotated[
        int, typer.Option("--mc-samples", min=2, help="K for varR, bald, mc_trace, mc_mi.")
    ] = 32,
    device: Device = "auto",
    workers: Workers = 2,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="Write OUT/curves.png (needs matplotlib).")
    ] = True,
    quiet: Quiet = False,
) -> None:
    """Simulate active learning rounds with an oracle on a labelled pool; write learning curves.

    One result row per (strategy, seed, round) goes to OUT/results.csv and OUT/results.jsonl.
    Re-running with the same arguments resumes after the last finished round.
    """
    from alfk_cli.simulate import SimulateOptions
    from alfk_cli.simulate import simulate as run_simulation

    try:
        seed_list = tuple(int(s) for s in _csv_list(seeds, "seeds"))
    except ValueError:
        raise typer.BadParameter("seeds must be integers", param_hint="--seeds") from None
    options = SimulateOptions(
        pool=pool,
        val=val,
        test=test,
        out=out,
        strategies=tuple(_csv_list(strategies, "strategies")),
        rounds=rounds,
        P=P,
        seeds=seed_list,
        arch=arch,
        taps=taps,
        init=init,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        eval_every=eval_every,
        imbalance=imbalance,
        rare=tuple(_csv_list(rare, "rare classes")),
        mc_samples=mc_samples,
        device=device,
        workers=workers,
    )
    say = (lambda msg: None) if quiet else (lambda msg: stderr.print(msg, markup=False))
    rows = run_simulation(options, progress=say)
    _say(quiet, f"{len(rows)} result rows in {out / 'results.csv'}")
    if plot:
        from alfk_cli.plot import plot_results

        try:
            png = plot_results(rows, out / "curves.png", rare=_csv_list(rare, "rare classes"))
            _say(quiet, f"wrote {png}")
        except AlfkError as exc:
            stderr.print(f"[yellow]warning:[/] {exc}; no plot written")


@app.command(
    epilog="Example: alfk plot --results runs/random --results runs/fk-p_yz --out curves.png"
)
def plot(
    results: Annotated[
        list[Path],
        typer.Option(
            "--results",
            help="Results folder of 'alfk simulate' (or its .csv/.jsonl); repeat to combine "
            "folders, e.g. one per strategy.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="PNG to write (default: curves.png in the first RESULTS)."
        ),
    ] = None,
    rare: Annotated[
        str | None, typer.Option("--rare", help="Rare class names for the panel title.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Plot mean ± std learning curves (test and rare-class accuracy) from simulation results."""
    import json

    from alfk_cli.plot import plot_results, summary_table
    from alfk_cli.simulate import read_results

    rows = [row for r in results for row in read_results(r)]
    first = results[0]
    if rare is None and first.is_dir() and (first / "config.json").is_file():
        rare = ",".join(json.loads((first / "config.json").read_text()).get("rare", []))
    if out is None:
        out = (first if first.is_dir() else first.parent) / "curves.png"
    rare_list = _csv_list(rare, "rare classes") if rare else None
    png = plot_results(rows, out, rare=rare_list)
    if not quiet:
        stderr.print(summary_table(rows, rare_list), markup=False)
    _say(quiet, f"wrote {png}")


@app.command("list", epilog="Example: alfk list strategies")
def list_registered(
    kind: Annotated[
        str | None,
        typer.Argument(help="architectures, strategies, kernels or estimators (default: all)."),
    ] = None,
) -> None:
    """The registered architectures, strategies, kernels and estimators, plug-ins included."""
    from alfk_cli.plugins import registries

    found = registries()
    if kind is not None and kind not in found:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(found)}", param_hint="KIND")
    for name, registry in found.items():
        if kind is None:
            sys.stdout.write(f"{name}: {', '.join(registry)}\n")
        elif name == kind:
            sys.stdout.write("".join(f"{n}\n" for n in registry))


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Deep active learning on biased image collections (Fisher-kernel self-supervision)."""


def _usage_error_type() -> type[Exception]:
    """The base of Typer's usage errors: its own since Typer vendored click, click's before."""
    import typer.exceptions

    base = getattr(typer.exceptions, "TyperException", None)
    if base is None:  # pragma: no cover - Typer before it vendored click
        from click.exceptions import ClickException as base
    return base


def _run() -> int:
    """The app without Typer's standalone handling, so that every outcome maps to our codes."""
    usage_error = _usage_error_type()
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:  # EOF on a prompt, or Ctrl-C in older Typer
        raise KeyboardInterrupt from None
    except usage_error as exc:  # usage errors: Typer's message, exit 2
        exc.show()
        return int(getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        rc = exc.exit_code
    if rc == 130:  # Typer turns KeyboardInterrupt into a silent Exit(130)
        raise KeyboardInterrupt
    return rc if isinstance(rc, int) else 0


def main() -> None:
    """Console entry point: one-line errors, no tracebacks for expected failures.

    Exit codes: 0 success, 2 usage error, 1 ``error: …``, 130 ``error: interrupted``."""
    sys.unraisablehook = _quiet_disk_errors
    try:
        code = _run()
        sys.stdout.flush()  # a full stdout (``> /dev/full``) must fail here, not at exit
    except AlfkError as exc:
        _error(str(exc))
        code = 1
    except KeyboardInterrupt:
        _error("interrupted")
        code = 130
    except BrokenPipeError:  # e.g. `alfk select ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except (OSError, RuntimeError) as exc:
        message = disk_error(exc)
        if message is None:
            raise
        _error(message)
        # HDF5 cannot clean up after a failed write (its finalisers crash the process): leave
        # now, keeping the partial file for the next run, instead of unwinding through them.
        sys.stderr.flush()
        os._exit(1)
    if code and sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError:  # stdout is the full device itself: drop what is left, quietly
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


def _quiet_disk_errors(info) -> None:
    """h5py reports a failed write again from its finalisers ("Exception ignored in ..."): the
    one-line error says it already."""
    if disk_error(info.exc_value) is None:
        sys.__unraisablehook__(info)


def _error(message: str) -> None:
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
