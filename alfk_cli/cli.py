"""The ``alfk`` command: parses options, calls the library, formats output. No maths here.

stdout carries data only; progress, tables and warnings go to stderr. Expected failures
(``AlfkError``) print one ``error: …`` line and exit 1; usage errors exit 2 (Typer's).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from alfk_cli import __version__
from alfk_cli.errors import AlfkError
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

# Options shared by several commands.
Device = Annotated[
    str, typer.Option("--device", help="auto, cpu or cuda (auto = cuda when available).")
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
Workers = Annotated[int, typer.Option("--workers", help="Image-decoding worker processes.")]
Arch = Annotated[str | None, typer.Option("--arch", help="lenet, resnet10 or resnet18.")]


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        stderr.print(message)


def _report_skipped(skipped: list[tuple[str, str]] | list[str], root: Path, quiet: bool) -> None:
    """List files that were skipped, on stderr (always: the user must learn about them)."""
    if not skipped:
        return
    stderr.print(f"[yellow]warning:[/] skipped {len(skipped)} file(s) under {root}:")
    for item in skipped[:20]:
        path, reason = item if isinstance(item, tuple) else (item, "could not be decoded")
        stderr.print(f"  {root / path}: {reason}", markup=False)
    if len(skipped) > 20:
        stderr.print(f"  … and {len(skipped) - 20} more")


def _accuracy_table(
    title: str, classes: list[str], overall: float, per_class: list[float]
) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in zip(classes, per_class, strict=False):
        table.add_row(name, "-" if acc != acc else f"{100 * acc:.1f}%")
    table.add_row("[bold]overall", f"[bold]{100 * overall:.2f}%")
    return table


def _train_config(
    arch: str, epochs, lr, momentum, weight_decay, batch_size, seed, workers, **extra
):
    from alfk_cli.models import get_arch
    from alfk_cli.training import TrainConfig

    d = get_arch(arch).train_defaults
    return TrainConfig(
        epochs=epochs,
        lr=d["lr"] if lr is None else lr,
        momentum=d["momentum"] if momentum is None else momentum,
        weight_decay=d["weight_decay"] if weight_decay is None else weight_decay,
        batch_size=int(d["batch_size"]) if batch_size is None else batch_size,
        seed=seed,
        workers=workers,
        **extra,
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
    from alfk_cli.checkpoint import init_from, load_checkpoint, save_checkpoint
    from alfk_cli.devices import resolve_device
    from alfk_cli.images import check_same_classes, scan_images
    from alfk_cli.models import build_model, get_arch
    from alfk_cli.progress import make_progress
    from alfk_cli.training import train_classifier

    dev = resolve_device(device)
    start = load_checkpoint(init, arch) if init else None
    arch = arch or (start.arch if start else "lenet")
    spec = get_arch(arch).input
    data_set = scan_images(data, strict=strict)
    val_set = scan_images(val, strict=strict)
    _report_skipped(data_set.skipped, data, quiet)
    _report_skipped(val_set.skipped, val, quiet)
    check_same_classes(data_set, val_set)
    cfg = _train_config(arch, epochs, lr, momentum, weight_decay, batch_size, seed, workers)
    model = build_model(arch, len(data_set.classes), seed=seed)
    if start is not None:
        skipped = init_from(model, start)
        _say(
            quiet,
            f"initialised from {init} ({start.head} checkpoint); fresh: {', '.join(skipped) or 'nothing'}",
        )
    _say(
        quiet,
        f"training {arch} on {len(data_set)} images ({len(data_set.classes)} classes), "
        f"validating on {len(val_set)}, device {dev}",
    )
    with make_progress(quiet) as progress:
        result = train_classifier(model, data_set, val_set, spec, cfg, dev, progress)
    _report_skipped(result.skipped, data, quiet)
    info = {
        "task": "train",
        "data": str(data),
        "val": str(val),
        "init": str(init) if init else "",
        "init_sha256": start.sha256 if start else "",
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.best_accuracy,
        "train_images": len(data_set),
    }
    save_checkpoint(out, model.cpu(), arch, data_set.classes, "classifier", info)
    if not quiet:
        stderr.print(
            _accuracy_table(
                f"validation accuracy, epoch {result.best_epoch} of {cfg.epochs}",
                val_set.classes,
                result.best_accuracy,
                result.per_class,
            )
        )
    _say(quiet, f"wrote {out}")


@app.command(epilog="Example: alfk pretrain --images unlabeled/ --arch lenet --out init.pt")
def pretrain(
    images: Annotated[
        Path, typer.Option("--images", "-i", help="Any image folder; labels are ignored.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    arch: Annotated[str, typer.Option("--arch", help="lenet, resnet10 or resnet18.")] = "lenet",
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
    from alfk_cli.checkpoint import ROTATION_CLASSES, save_checkpoint
    from alfk_cli.devices import resolve_device
    from alfk_cli.images import scan_images
    from alfk_cli.models import build_model, get_arch
    from alfk_cli.progress import make_progress
    from alfk_cli.training import pretrain_rotation

    dev = resolve_device(device)
    spec = get_arch(arch).input
    found = scan_images(images, strict=strict)
    _report_skipped(found.skipped, images, quiet)
    # RotNet schedule: ×0.1 at 3/8 and 6/8 of the run (MNIST: epochs 3 and 6 of 8)
    cfg = _train_config(
        arch,
        epochs,
        lr,
        momentum,
        weight_decay,
        batch_size,
        seed,
        workers,
        milestones=(3 / 8, 6 / 8),
    )
    model = build_model(arch, len(ROTATION_CLASSES), seed=seed)
    _say(quiet, f"rotation pretraining {arch} on {len(found)} images, device {dev}")
    with make_progress(quiet) as progress:
        result = pretrain_rotation(model, found, spec, cfg, dev, holdout, progress)
    _report_skipped(result.skipped, images, quiet)
    info = {
        "task": "pretrain",
        "images": str(images),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "rotation_accuracy": result.best_accuracy,
        "images_count": len(found),
    }
    save_checkpoint(out, model.cpu(), arch, list(ROTATION_CLASSES), "rotation", info)
    if not quiet:
        stderr.print(
            _accuracy_table(
                f"held-out rotation accuracy, epoch {result.best_epoch} of {cfg.epochs}",
                [f"{c}°" for c in ROTATION_CLASSES],
                result.best_accuracy,
                result.per_class,
            )
        )
    _say(quiet, f"wrote {out}")


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


def main() -> None:
    """Console entry point: one-line errors, no tracebacks for expected failures."""
    try:
        app()
    except AlfkError as exc:
        stderr.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        stderr.print("error: interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
