"""The command line's shared pieces: option types, parse-time checks, and stderr wording.

Option values are checked when the command line is parsed (exit 2, before any work), against the
library's own registries, imported only then so that ``--help`` stays fast; none of those checks
imports torch (a run with nothing to compute must not). Everything for humans goes to stderr;
stdout carries data only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO, TypeVar

import typer

from alfk_cli.cli.console import stderr
from alfk_cli.data.names import printable
from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    from rich.table import Table

_Value = TypeVar("_Value", bound="str | None")

#: The largest ``--seed``: every RNG a seed reaches takes it, and so do the seeds made from it
#: (a simulation round's ``seed * 100003 + round`` stays below 2**64, torch's limit).
MAX_SEED = 2**32 - 1


def one_of(value: _Value, allowed: Collection[str], option: str) -> _Value:
    if value is not None and value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=option)
    return value


def check_device(value: str) -> str:
    from alfk_cli.util.devices import parse_device

    try:
        return parse_device(value)
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None


def check_kernel(value: str) -> str:
    from alfk_cli.strategies.kernels import KERNELS

    return one_of(value, KERNELS, "--kernel")


def check_pseudo_label(value: str | None) -> str | None:
    from alfk_cli.features.estimators import ESTIMATORS

    return one_of(value, ESTIMATORS, "--pseudo-label")


def check_strategy(value: str) -> str:
    from alfk_cli.strategies.registry import make_strategy

    try:
        make_strategy(value)
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint="--strategy") from None
    return value


def _usage_error(check: Callable[[], object], option: str) -> None:
    """Run ``check``; its ``AlfkError`` becomes a usage error of ``option`` (exit 2)."""
    try:
        check()
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def check_arch(value: str | None) -> str | None:
    """``--arch``: auto, a registered name, or ``timm:NAME`` (which timm must have: this imports
    timm, as the command will to build the model)."""
    from alfk_cli.models.archs import ARCHITECTURES, AUTO, get_arch

    if value is None or value == AUTO or value in ARCHITECTURES:  # a built-in reads no plug-ins
        return value
    if ARCHITECTURES.prefix_of(value) is None:
        family = (f"{prefix}NAME" for prefix in ARCHITECTURES.prefixes())
        return one_of(value, (AUTO, *ARCHITECTURES, *family), "--arch")
    _usage_error(lambda: get_arch(value), "--arch")
    return value


def check_arch_form(value: str) -> str:
    """``select --arch``: as :func:`check_arch`, but a ``timm:NAME`` is checked for its form
    only (a warm run, whose model is cached, must not import timm); timm is asked whether it
    has the model when it is pretrained."""
    from alfk_cli.models.archs import ARCHITECTURES
    from alfk_cli.models.timmname import timm_name

    if ARCHITECTURES.prefix_of(value) is None:
        return check_arch(value) or value
    _usage_error(lambda: timm_name(value), "--arch")
    return value


def check_freeze(arch: str, value: str) -> list[str]:
    """The stages ``--freeze value`` freezes in ``arch`` (``freeze.frozen_names``); a name that
    is not one of them is a usage error. Called once the architecture is known, before any work
    (it builds a throw-away copy of the network to read its stage names)."""
    from alfk_cli.models.freeze import check_freeze as stages_frozen

    try:
        return stages_frozen(arch, value)
    except AlfkError as exc:
        raise typer.BadParameter(str(exc), param_hint="--freeze") from None


def check_format(value: str) -> str:
    from alfk_cli.selection.scoresfile import FORMATS

    return one_of(value, FORMATS, "--format")


def check_taps(arch: str, taps: str | None) -> None:
    """``--taps`` against the architecture it will be used with (known once the checkpoint is).

    With ``auto`` they must fit one of the architectures it may choose (and are checked again
    against the choice, before pretraining); a ``timm:NAME`` not built yet is checked when it is.
    """
    from alfk_cli.models.archauto import CHOICES
    from alfk_cli.models.archs import ARCHITECTURES, AUTO, known_family, resolve_taps

    if not taps or (ARCHITECTURES.prefix_of(arch) is not None and not known_family(arch)):
        return
    errors = []
    for candidate in CHOICES if arch == AUTO else (arch,):
        try:
            resolve_taps(candidate, taps)
            return
        except AlfkError as exc:
            errors.append(str(exc))
    if arch == AUTO:
        errors = [f"{taps!r} fits none of the architectures auto chooses ({', '.join(CHOICES)})"]
    raise typer.BadParameter(errors[0], param_hint="--taps")


def checkpoint_arch(model: Path | None, default: str) -> str:
    """The architecture of ``model`` (read before any work), else ``default``."""
    if model is None:
        return default
    from alfk_cli.models.checkpoint import read_checkpoint

    return read_checkpoint(model).arch


def check_seeds(seeds: Sequence[int], option: str = "--seeds") -> tuple[int, ...]:
    """Seeds in the range ``--seed`` takes (``MAX_SEED``), for an option that lists several."""
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise typer.BadParameter(
                f"{seed} is not in the range 0<=x<={MAX_SEED}", param_hint=option
            )
    return tuple(seeds)


def check_workers(ctx: typer.Context, value: int | None) -> int | None:
    """``--workers`` at most the cores this process may use: decoding is CPU-bound, and each
    worker is a process to start (1000 of them: a minute and a half for nothing)."""
    from alfk_cli.data.scan import available_cores

    cores = available_cores()
    if value is None or value <= cores:
        return value
    if not ctx.params.get("quiet"):
        stderr.print(f"note: --workers {value}: using {cores}, the CPU cores this process may use")
    return cores


def check_pool_list(value: Path | None) -> Path | None:
    """``--pool-list -`` needs an open standard input (``<&-`` leaves none)."""
    from alfk_cli.data.poollist import STDIN

    if value is not None and str(value) == STDIN and (sys.stdin is None or sys.stdin.closed):
        raise typer.BadParameter(
            "'-' reads standard input, which is closed", param_hint="--pool-list"
        )
    return value


def outputs_ok(out: Path, *inputs: Path | None) -> None:
    """Fail before any work when ``out`` cannot be written or is one of the command's inputs."""
    from alfk_cli.util.atomic import check_output

    check_output(out, *inputs)


# Options shared by several commands.
Device = Annotated[
    str,
    typer.Option(
        "--device",
        callback=check_device,
        help="auto, cpu, cuda or cuda:N (auto = cuda when available).",
    ),
]
Balance = Annotated[
    str,
    typer.Option(
        "--balance",
        callback=lambda v: one_of(v, ("none", "reweight", "sample", "auto"), "--balance"),
        help="Class balancing of the labelled images: none, reweight (inverse-frequency loss "
        "weights), sample (class-balanced draws) or auto (the best of the three on validation).",
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        min=0,
        max=MAX_SEED,
        help="Seed for initialisation, shuffling and sampling (0 to 4294967295).",
    ),
]
# eager: read before the others, so that their checks know whether to print notes
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", is_eager=True, help="No progress or summaries on stderr."),
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict", help="Fail on unreadable or non-image files instead of skipping them."
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        callback=check_workers,
        help="Image-decoding worker processes (default: the cores available, at most 16; "
        "0: decode in the main process; more than the cores available: the cores).",
    ),
]
PoolList = Annotated[
    Path | None,
    typer.Option(
        "--pool-list",
        callback=check_pool_list,
        help="File naming the images, one path per line relative to the folder ('-': standard "
        "input), instead of walking the folder; names already in the store are not re-stat'ed.",
    ),
]
ARCH_HELP = (
    "auto (chosen from the images), lenet, resnet10, resnet18, timm:NAME or timm:NAME@SIZE "
    "(any timm model with features_only) or a plug-in's (alfk list architectures)."
)
Arch = Annotated[str | None, typer.Option("--arch", callback=check_arch, help=ARCH_HELP)]
PretrainArch = Annotated[  # select's: a timm:NAME is checked for its form only (warm runs)
    str,
    typer.Option(
        "--arch",
        callback=check_arch_form,
        help="Architecture to pretrain when there is no checkpoint: " + ARCH_HELP,
    ),
]
Freeze = Annotated[
    str,
    typer.Option(
        "--freeze",
        help="Stages that do not train: none, backbone (every stage: only the classifier "
        "trains) or a stage name (it and every stage before it; alfk list shows the taps).",
    ),
]
ExactCount = Annotated[
    bool,
    typer.Option(
        "--exact-count",
        help="Fail when fewer than P pool images are left (default: select the ones left, "
        "with a warning).",
    ),
]


def stdout() -> TextIO:
    """Standard output, or a one-line error when it is closed (``>&-``: Python's is None)."""
    if sys.stdout is None:
        raise AlfkError("standard output is closed; redirect it to a file (or /dev/null)")
    return sys.stdout


def say(quiet: bool, message: str) -> None:
    if not quiet:
        stderr.print(message)


def say_note(quiet: bool, note: str) -> None:
    """A library note: ``warning: …`` ones as they are, the others as ``note: …``."""
    say(quiet, note if note.startswith("warning:") else f"note: {note}")


def report_skipped(skipped: list[tuple[str, str]] | list[str], root: Path, quiet: bool) -> None:
    """List files that were skipped, on stderr (unless --quiet)."""
    if not skipped or quiet:
        return
    stderr.print(f"[yellow]warning:[/] skipped {len(skipped)} file(s) under {root}:")
    for item in skipped[:20]:
        path, reason = item if isinstance(item, tuple) else (item, "could not be decoded")
        stderr.print(f"  {printable(str(root / path))}: {reason}", markup=False)
    if len(skipped) > 20:
        stderr.print(f"  … and {len(skipped) - 20} more")


def accuracy_table(title: str, classes: list[str], overall: float, per_class: list[float]) -> Table:
    from rich import box
    from rich.table import Table

    from alfk_cli.cli.console import plain_output

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


Kernel = Annotated[
    str,
    typer.Option(
        "--kernel",
        "-k",
        callback=check_kernel,
        help="sum (R_z+R_g, default), product (R_z·R_g, the paper's PFK) or pcc (R_z).",
    ),
]
PseudoLabel = Annotated[
    str | None,
    typer.Option(
        "--pseudo-label",
        callback=check_pseudo_label,
        help="Labels for a pool's g: p_yz_knn (default), p_yz (the paper's), yhat, true, mc_trace "
        "or mc_mi.",
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
        callback=check_strategy,
        help="fk[:ESTIMATOR[:KERNEL[:CENTRES]]] (default fk: p_yz_knn pseudo-labels, or "
        "--pseudo-label, the --kernel, and sample centres; the paper's method is "
        "fk:p_yz:sum:kcenter), pcc, random, entropy, margin, varR, bald, coreset, balanced-entropy, badge, "
        "similar[:flqmi|gcmi], or a plug-in's "
        "(alfk list strategies).",
    ),
]
McSamples = Annotated[
    int, typer.Option("--mc-samples", min=2, help="K for varR, bald, mc_trace and mc_mi.")
]


def csv_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise typer.BadParameter(f"give a comma-separated list of {what}")
    return items
