"""``alfk simulate`` and ``alfk plot``: the oracle simulation and its learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from alfk_cli.cli.app import app
from alfk_cli.cli.console import stderr
from alfk_cli.cli.options import (
    Arch,
    Balance,
    Device,
    Freeze,
    McSamples,
    Quiet,
    Taps,
    Workers,
    check_freeze,
    check_seeds,
    csv_list,
    one_of,
    say,
    say_note,
)
from alfk_cli.errors import AlfkError

if TYPE_CHECKING:
    from alfk_cli.simulate.options import InitName

SimPool = Annotated[
    Path, typer.Option("--pool", "-p", help="Labelled pool (class sub-folders, labels hidden).")
]
SimVal = Annotated[Path, typer.Option("--val", "-v", help="Validation folder (picks epochs).")]
SimTest = Annotated[Path, typer.Option("--test", "-t", help="Test folder (reported only).")]
SimOut = Annotated[Path, typer.Option("--out", "-o", help="Results folder (resumable).")]
Strategies = Annotated[
    str,
    typer.Option(
        "--strategies",
        "-s",
        help="Comma-separated: random, entropy, margin, varR, bald, coreset, balanced-entropy, "
        "badge, similar[:flqmi|gcmi], pcc, "
        "fk[:ESTIMATOR[:KERNEL[:CENTRES]]] (estimators p_yz_knn, p_yz, yhat, true, mc_trace, "
        "mc_mi; kernels sum, product, pcc; centres sample, kcenter, class; fk alone is "
        "fk:p_yz_knn:sum:sample, the paper's fk:p_yz:sum:kcenter), or plug-ins' (alfk list).",
    ),
]
Rounds = Annotated[int, typer.Option("--rounds", "-B", min=1, help="Rounds B.")]
RoundP = Annotated[int, typer.Option("--P", "-P", min=1, help="Images labelled per round.")]
Seeds = Annotated[
    str, typer.Option("--seeds", help="Comma-separated seeds (each 0 to 4294967295).")
]
Imbalance = Annotated[
    float | None,
    typer.Option(
        "--imbalance",
        "-r",
        help="Bias the pool: keep floor(non-rare / R) rare images (default: no bias).",
    ),
]
Rare = Annotated[str, typer.Option("--rare", help="Rare classes, by folder name or index.")]
Init = Annotated[
    str,
    typer.Option(
        "--init",
        callback=lambda v: one_of(v, ("pretrain", "random"), "--init"),
        help="pretrain (rotation self-supervision on the pool) or random.",
    ),
]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="Fine-tuning epochs per round.")]
PretrainEpochs = Annotated[int, typer.Option("--pretrain-epochs", min=1)]
EvalEvery = Annotated[
    int, typer.Option("--eval-every", min=1, help="Validate every N epochs (and the last).")
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size", min=1, help="Fine-tuning batch size (default: the architecture's)."
    ),
]
CacheMib = Annotated[
    float | None,
    typer.Option(
        "--cache-mib",
        min=0,
        help="Decoded images kept in memory, MiB (default 1024): folders that fit are decoded "
        "once, the rest at each pass, batch by batch (0: all). Results do not depend on it.",
    ),
]
LearningRate = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Fine-tuning learning rate (default: the architecture's).",
    ),
]
Plot = Annotated[
    bool, typer.Option("--plot/--no-plot", help="Write OUT/curves.png (needs matplotlib).")
]


@app.command(
    epilog="Example: alfk simulate --pool unlabeled/ --val val/ --test test/ --imbalance 10 "
    "--strategies random,fk --rounds 10 --P 125 --seeds 0,1,2 --out results/"
)
def simulate(
    pool: SimPool,
    val: SimVal,
    test: SimTest,
    out: SimOut,
    strategies: Strategies = "random,fk",
    rounds: Rounds = 10,
    P: RoundP = 125,
    seeds: Seeds = "0",
    imbalance: Imbalance = None,
    rare: Rare = "5,6,7,8,9",
    arch: Arch = "auto",
    taps: Taps = None,
    init: Init = "pretrain",
    epochs: Epochs = 50,
    pretrain_epochs: PretrainEpochs = 8,
    eval_every: EvalEvery = 1,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    balance: Balance = "none",
    freeze: Freeze = "none",
    mc_samples: McSamples = 32,
    device: Device = "auto",
    workers: Workers = None,
    cache_mib: CacheMib = None,
    plot: Plot = True,
    quiet: Quiet = False,
) -> None:
    """Simulate active learning rounds with an oracle on a labelled pool; write learning curves.

    One result row per (strategy, seed, round) goes to OUT/results.csv and OUT/results.jsonl.
    Re-running with the same arguments resumes after the last finished round.
    """
    from alfk_cli.simulate.options import SimulateOptions
    from alfk_cli.simulate.run import simulate as run_simulation

    try:
        seed_list = tuple(int(s) for s in csv_list(seeds, "seeds"))
    except ValueError:
        raise typer.BadParameter("seeds must be integers", param_hint="--seeds") from None
    check_seeds(seed_list)
    from alfk_cli.data.scan import scan_images
    from alfk_cli.models.archauto import pick_arch
    from alfk_cli.models.archs import AUTO
    from alfk_cli.simulate.results import earlier_config
    from alfk_cli.strategies.registry import make_strategy

    if freeze != "none" and arch and arch != AUTO:  # a usage error before any work
        check_freeze(arch, freeze)
    # a bad results folder or strategy fails before the pool is scanned (for --arch auto)
    earlier_config(out)
    names = tuple(csv_list(strategies, "strategies"))
    for name in names:
        make_strategy(name)
    chosen, said = pick_arch(arch, scan_images(pool))  # auto: from the pool's images
    if said:
        say_note(quiet, said)
    if freeze != "none" and arch == AUTO:  # once auto has chosen, before any decoding
        check_freeze(chosen, freeze)
    arch = chosen
    options = SimulateOptions(
        pool=pool, val=val, test=test, out=out,
        strategies=names, rounds=rounds, P=P,
        seeds=seed_list, arch=arch, taps=taps, init=cast("InitName", init), epochs=epochs,
        pretrain_epochs=pretrain_epochs, eval_every=eval_every, imbalance=imbalance,
        rare=tuple(csv_list(rare, "rare classes")), mc_samples=mc_samples, device=device,
        workers=workers, balance=balance, freeze=freeze, batch_size=batch_size, lr=lr,
        **({} if cache_mib is None else {"cache_mib": cache_mib}),
    )  # fmt: skip
    tell = (lambda msg: None) if quiet else (lambda msg: stderr.print(msg, markup=False))
    rows = run_simulation(options, progress=tell)
    say(quiet, f"{len(rows)} result rows in {out / 'results.csv'}")
    if plot:
        from alfk_cli.simulate.plot import plot_results

        try:
            png = plot_results(rows, out / "curves.png", rare=csv_list(rare, "rare classes"))
            say(quiet, f"wrote {png}")
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

    from alfk_cli.simulate.plot import plot_results, summary_table
    from alfk_cli.simulate.results import read_results

    rows = [row for r in results for row in read_results(r)]
    first = results[0]
    if rare is None and first.is_dir() and (first / "config.json").is_file():
        rare = ",".join(json.loads((first / "config.json").read_text()).get("rare", []))
    if out is None:
        out = (first if first.is_dir() else first.parent) / "curves.png"
    rare_list = csv_list(rare, "rare classes") if rare else None
    png = plot_results(rows, out, rare=rare_list)
    if not quiet:
        stderr.print(summary_table(rows, rare_list), markup=False)
    say(quiet, f"wrote {png}")
