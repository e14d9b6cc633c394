"""The oracle simulation of active learning on a labelled pool (docs/algorithm.md §8-10).

The pool folder has class sub-folders, but a strategy only sees the labels of the images it has
selected. Per seed: build the (optionally biased, §9) pool by choosing rows, make the initial
model (rotation-pretrained on that pool, or fresh), then for rounds b = 1..B select P new rows
with the strategy and the current model, reveal their labels, fine-tune from the previous
round's model on everything labelled so far (fresh optimiser, restarted schedule, §8) keeping the
epoch with the best *validation* accuracy, and evaluate on the test folder.

Every folder is decoded once into a uint8 tensor and reused by all seeds, strategies and rounds.

Outputs under ``out_dir``::

    config.json                               the arguments (a re-run must repeat them)
    cache/pretrain_seed<S>.pt                 rotation-pretrained initial model per seed
    runs/<strategy>/<seed>/round_<b>.pt       model state after round b
    runs/<strategy>/<seed>/round_<b>.json     {"row": result row, "labelled_rows": [...], ...}
    results.jsonl, results.csv                every finished row, sorted (rewritten each round)

A round's ``.json`` is written after its ``.pt`` and marks it finished; a re-run with the same
arguments continues after the last finished round of each (strategy, seed). Each round reseeds
every random number generator from (seed, round), so a resumed run gives the same results.

``model_passes`` counts forward-equivalents spent selecting (a backward to the taps counts as
one forward), over the N' unlabelled pool rows and the M validation images:

    random 0; entropy, margin N'; varR, bald K·N' (K = mc_samples); coreset N' (z of the
    unlabelled rows; the labelled rows' z are computed too and counted, so N);
    fk and pcc 2·(M + N') (one forward and one activation-only backward per image);
    fk with mc_trace / mc_mi adds K·(1 + D)·N' (K perturbed copies: one forward and D
    backwards each, D = classes).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alfk_cli import strategies as strat_lib
from alfk_cli.acquisition import KERNELS, Descriptors
from alfk_cli.acquisition import select as fk_select
from alfk_cli.atomic import atomic_output
from alfk_cli.devices import resolve_device
from alfk_cli.errors import AlfkError
from alfk_cli.images import (
    ImageSet,
    decode_failure,
    fits_in_memory,
    normalizer,
    preload,
    scan_images,
)
from alfk_cli.models import InputSpec, TapNet, build_model, get_arch, resolve_taps, scale_dims
from alfk_cli.names import printable
from alfk_cli.reproducible import save_torch, seeded
from alfk_cli.training import (
    ROTNET_MILESTONES,
    ImageSource,
    TrainConfig,
    default_config,
    predict,
    rotate_batch,
    split_holdout,
)
from alfk_cli.training import fit as train_fit

BASE_STRATEGIES = ("random", "entropy", "margin", "varR", "bald", "coreset", "pcc", "fk")
ESTIMATORS = ("p_yz", "yhat", "true", "mc_trace", "mc_mi")
INITS = ("pretrain", "random")
DESCRIBE_BATCH = 256
RESULT_FIELDS = (
    "strategy",
    "seed",
    "round",
    "labels",
    "test_accuracy",
    "rare_accuracy",
    "val_accuracy",
    "per_class",
    "pseudo_label_accuracy",
    "batch_histogram",
    "select_seconds",
    "model_passes",
    "train_seconds",
    "best_epoch",
)
# Arguments that change how a run is computed but not what it computes (not compared on resume).
_NOT_COMPARED = ("device", "workers")

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    """A strategy name from the command line, parsed."""

    name: str  # as given
    kind: str  # one of BASE_STRATEGIES except "pcc" (pcc is fk:p_yz:pcc)
    estimator: str | None = None  # fk only
    kernel: str | None = None  # fk only

    @property
    def dirname(self) -> str:
        return self.name.replace(":", "-")


def parse_strategy(name: str) -> Strategy:
    """``random``, ``entropy``, ``margin``, ``varR``, ``bald``, ``coreset``, ``pcc`` or
    ``fk[:ESTIMATOR[:KERNEL]]`` (estimator p_yz, yhat, true, mc_trace, mc_mi; kernel sum,
    product, pcc)."""
    name = name.strip()
    parts = name.split(":")
    head = parts[0]
    if head == "fk" and len(parts) <= 3:
        est = parts[1] if len(parts) > 1 and parts[1] else "p_yz"
        kernel = parts[2] if len(parts) > 2 and parts[2] else "sum"
        if est not in ESTIMATORS:
            raise AlfkError(
                f"unknown pseudo-label estimator {est!r} in {name!r}; choose one of {', '.join(ESTIMATORS)}"
            )
        if kernel not in KERNELS:
            raise AlfkError(
                f"unknown kernel {kernel!r} in {name!r}; choose one of {', '.join(KERNELS)}"
            )
        return Strategy(name, "fk", est, kernel)
    if head == "pcc" and len(parts) == 1:
        return Strategy(name, "fk", "p_yz", "pcc")
    if head in BASE_STRATEGIES and len(parts) == 1:
        return Strategy(name, head)
    raise AlfkError(
        f"unknown strategy {name!r}; choose from random, entropy, margin, varR, bald, coreset, "
        "pcc and fk[:ESTIMATOR[:KERNEL]]"
    )


# ----------------------------------------------------------------------------- data


@dataclass
class Folder:
    """A labelled folder decoded once: the readable images, uint8 [N, C, H, W] and labels [N]."""

    images: ImageSet
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def load_folder(
    root: str | Path, spec: InputSpec, classes: Sequence[str] | None, workers: int, what: str
) -> Folder:
    found = scan_images(root, classes=classes, verify=False)
    if not found.labelled:
        raise AlfkError(f"the {what} folder {root} needs class sub-folders (one per class)")
    if not fits_in_memory(len(found), spec):
        raise AlfkError(f"the {what} folder {root} is too large to simulate in memory")
    x, ok = preload(found, spec, workers)
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise AlfkError(f"no readable images in {root}")
    # images that failed to decode are left out and listed with the scan's skips
    failed = [
        (found.paths[i], decode_failure(found.absolute(i), spec)) for i in np.flatnonzero(~ok)
    ]
    images = ImageSet(
        found.root,
        [found.paths[i] for i in keep],
        found.labels[keep],
        list(found.classes),
        list(found.skipped) + failed,
    )
    return Folder(images, x[torch.from_numpy(keep)], torch.from_numpy(images.labels.copy()))


def resolve_rare(rare: Sequence[str | int], classes: Sequence[str]) -> list[int]:
    """Rare classes by folder name, or by index when no folder has that name."""
    out = []
    for r in rare:
        r = str(r).strip()
        if r in classes:
            out.append(list(classes).index(r))
        elif r.isdigit() and int(r) < len(classes):
            out.append(int(r))
        else:
            raise AlfkError(f"rare class {r!r} is not among the classes {','.join(classes)}")
    return sorted(set(out))


def biased_rows(
    labels: np.ndarray, rare: Sequence[int], imbalance: float | None, seed: int
) -> np.ndarray:
    """Pool rows kept by the paper's biased protocol (§9), sorted.

    Every row of a non-rare class is kept; of the rare classes taken together,
    ``floor(n_nonrare / imbalance)`` rows are drawn at random (seeded, capped at what there is).
    ``imbalance`` None or 1 keeps every row.
    """
    labels = np.asarray(labels)
    if imbalance is None or imbalance == 1:
        return np.arange(len(labels), dtype=np.int64)
    if not imbalance > 0:
        raise AlfkError(f"the imbalance ratio must be positive, got {imbalance}")
    is_rare = np.isin(labels, np.asarray(list(rare), dtype=np.int64))
    common = np.flatnonzero(~is_rare)
    rare_rows = np.flatnonzero(is_rare)
    want = min(math.floor(len(common) / imbalance + 1e-9), len(rare_rows))
    rng = np.random.default_rng([int(seed), 0xB1A5])
    drawn = rng.choice(rare_rows, size=want, replace=False) if want else rare_rows[:0]
    return np.sort(np.concatenate([common, drawn])).astype(np.int64)


# ----------------------------------------------------------------------------- training


def _round_seed(seed: int, round_: int) -> int:
    return int(seed) * 100_003 + int(round_)


def logits_of(
    model: TapNet, x: torch.Tensor, spec: InputSpec, device: torch.device
) -> torch.Tensor:
    """Eval-mode logits of in-memory uint8 images (float32, CPU)."""
    return predict(
        model, ImageSource.from_tensors(x, torch.zeros(len(x)), spec), device, batch_size=512
    )


def fit(
    model: TapNet,
    x: torch.Tensor,
    y: torch.Tensor,
    held_x: torch.Tensor,
    held_y: torch.Tensor,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
    transform=None,
) -> tuple[int, float]:
    """``training.fit`` on in-memory images; returns (best epoch, its held-out accuracy)."""
    result = train_fit(
        model,
        ImageSource.from_tensors(x, y, spec),
        ImageSource.from_tensors(held_x, held_y, spec),
        cfg,
        device=device,
        description="fit",
        transform=transform,
    )
    return result.best_epoch, result.best_accuracy


# ----------------------------------------------------------------------------- selection


@dataclass
class Context:
    """What the strategies need besides the model: data, taps, device, options."""

    spec: InputSpec
    taps: tuple[str, ...]
    dims: list[int]
    val: Folder
    pool_x: torch.Tensor  # the (biased) pool of this seed
    pool_y: torch.Tensor  # hidden labels
    pool_names: list[str]
    device: torch.device
    mc_samples: int
    num_classes: int


@torch.no_grad()
def pooled_features(
    model: TapNet, x: torch.Tensor, spec: InputSpec, taps: Sequence[str], device: torch.device
) -> np.ndarray:
    """z (concatenated pooled taps) of uint8 images, float32 numpy."""
    from alfk_cli.descriptors import concat_pooled

    model.eval().to(device)
    norm = normalizer(spec)
    out = []
    for s in range(0, len(x), DESCRIBE_BATCH):
        _, feats = model.forward_taps(norm(x[s : s + DESCRIBE_BATCH].to(device)), taps)
        out.append(concat_pooled(feats).float().cpu())
    return torch.cat(out).numpy()


def describe(
    model: TapNet,
    x: torch.Tensor,
    ctx: Context,
    method: str,
    labels: torch.Tensor | None = None,
    reference=None,
    names: Sequence[str] = (),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """z, g, logits and the labels g used, for uint8 images, in batches of 256."""
    from alfk_cli.pseudolabels import MCConfig, describe_images

    model.to(ctx.device)
    mc_cfg = MCConfig(samples=ctx.mc_samples)
    zs, gs, ls, us = [], [], [], []
    for s in range(0, len(x), DESCRIBE_BATCH):
        part = slice(s, s + DESCRIBE_BATCH)
        z, g, lg, used = describe_images(
            model, x[part].to(ctx.device), ctx.spec, ctx.taps, method,
            labels=labels[part].to(ctx.device) if labels is not None else None,
            reference=reference, names=names[part], seed=seed, mc_cfg=mc_cfg,
        )  # fmt: skip
        zs.append(z.float().cpu())
        gs.append(g.float().cpu())
        ls.append(lg.float().cpu())
        us.append(used.cpu())
    return (
        torch.cat(zs).numpy(),
        torch.cat(gs).numpy(),
        torch.cat(ls).numpy(),
        torch.cat(us).numpy(),
    )


def choose(
    strategy: Strategy,
    model: TapNet,
    ctx: Context,
    labelled: np.ndarray,
    P: int,
    seed: int,
) -> tuple[np.ndarray, int, float | None]:
    """P new pool rows for ``strategy``: (rows, model passes, pseudo-label accuracy or None)."""
    available = ~labelled
    avail_rows = np.flatnonzero(available)
    n_avail = len(avail_rows)
    kind = strategy.kind
    if kind == "random":
        return strat_lib.random_rows(P, available, seed), 0, None
    if kind in ("entropy", "margin", "varR", "bald"):
        x = ctx.pool_x[torch.from_numpy(avail_rows)]
        scores = np.full(len(labelled), -np.inf)
        if kind in ("entropy", "margin"):
            probs = torch.softmax(logits_of(model, x, ctx.spec, ctx.device), 1).numpy()
            fn = strat_lib.entropy if kind == "entropy" else strat_lib.margin
            scores[avail_rows], passes = fn(probs), n_avail
        else:
            mc = strat_lib.mc_dropout_probs(model, x, ctx.spec, ctx.mc_samples, seed, ctx.device)
            fn = strat_lib.variation_ratio if kind == "varR" else strat_lib.bald
            scores[avail_rows], passes = fn(mc), ctx.mc_samples * n_avail
        return strat_lib.top_p(scores, P, available), passes, None
    if kind == "coreset":
        z = pooled_features(model, ctx.pool_x, ctx.spec, ctx.taps, ctx.device)
        return strat_lib.coreset_rows(z, labelled, P, available), len(labelled), None
    # Fisher kernel: validation with true labels, the unlabelled pool with pseudo-labels
    from alfk_cli.pseudolabels import MC_METHODS, NearestReference

    vz, vg, vl, _ = describe(model, ctx.val.x, ctx, "true", labels=ctx.val.y)
    x = ctx.pool_x[torch.from_numpy(avail_rows)]
    hidden = ctx.pool_y[torch.from_numpy(avail_rows)]
    passes = 2 * (len(ctx.val) + n_avail)
    est = strategy.estimator
    ref = NearestReference(vz, ctx.val.y.numpy(), ctx.dims) if est == "p_yz" else None
    names = [ctx.pool_names[i] for i in avail_rows]
    pz, pg, _, used = describe(
        model, x, ctx, est, labels=hidden, reference=ref, names=names, seed=seed
    )
    if est in MC_METHODS:
        passes += ctx.mc_samples * (1 + ctx.num_classes) * n_avail
    pseudo_acc = float((used == hidden.numpy()).mean()) if n_avail else None
    sel = fk_select(
        Descriptors(vz, vg, ctx.dims, vl, ctx.val.y.numpy()),
        Descriptors(pz, pg, ctx.dims),
        P,
        kernel=strategy.kernel,
        seed=seed,
        device="auto" if ctx.device.type == "cuda" else "cpu",
    )
    return avail_rows[sel.selected].astype(np.int64), passes, pseudo_acc


# ----------------------------------------------------------------------------- outputs


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def rows_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_FIELDS)
    for r in rows:
        w.writerow(
            [
                json.dumps(r.get(f))
                if isinstance(r.get(f), list)
                else ("" if r.get(f) is None else r.get(f))
                for f in RESULT_FIELDS
            ]
        )
    return buf.getvalue()


#: Columns every results row has; a file without them is not simulate's.
RESULT_COLUMNS = ("strategy", "seed", "round", "labels", "test_accuracy")


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results folder, ``results.jsonl`` or ``results.csv``."""
    path = Path(path)
    if path.is_dir():
        path = (
            path / "results.jsonl" if (path / "results.jsonl").is_file() else path / "results.csv"
        )
    if not path.is_file():
        raise AlfkError(f"no results at {path}")
    try:
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise AlfkError(f"{path} is not a results file of alfk simulate ({exc})") from None
    for row in rows:
        missing = [c for c in RESULT_COLUMNS if c not in row or row[c] is None]
        if not isinstance(row, dict) or missing:
            raise AlfkError(
                f"{path} is not a results file of alfk simulate (no {missing[0] if missing else 'rows'!r})"
            )
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError("a line is not a JSON object")
    return rows


def _read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                if k == "strategy" or v is None:
                    row[k] = v
                elif v == "":
                    row[k] = None
                else:
                    try:
                        row[k] = json.loads(v)
                    except ValueError:  # a text column
                        row[k] = v
            rows.append(row)
    return rows


def _finished_rounds(run_dir: Path, rounds: int) -> int:
    b = 0
    while (
        b < rounds
        and (run_dir / f"round_{b + 1}.json").is_file()
        and (run_dir / f"round_{b + 1}.pt").is_file()
    ):
        b += 1
    return b


def _collect(out: Path, strats: list[Strategy], seeds: list[int], rounds: int) -> list[dict]:
    rows = []
    for st in strats:
        for seed in seeds:
            run_dir = out / "runs" / st.dirname / str(seed)
            for b in range(1, _finished_rounds(run_dir, rounds) + 1):
                rows.append(json.loads((run_dir / f"round_{b}.json").read_text())["row"])
    return rows


def _write_results(out: Path, rows: list[dict]) -> None:
    _write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_text(out / "results.csv", rows_to_csv(rows))


# ----------------------------------------------------------------------------- the harness


def _initial_model(
    init: str,
    arch: str,
    classes: list[str],
    seed: int,
    pool_x: torch.Tensor,
    spec: InputSpec,
    out: Path,
    pretrain_epochs: int,
    eval_every: int,
    workers: int,
    device: torch.device,
    say: Progress,
) -> TapNet:
    if init == "random":
        return build_model(arch, len(classes), seed=seed)
    from alfk_cli.checkpoint import (
        ROTATION_CLASSES,
        load_checkpoint,
        save_checkpoint,
        task_model,
    )

    path = out / "cache" / f"pretrain_seed{seed}.pt"
    if not path.is_file():
        if len(pool_x) < 2:
            raise AlfkError("rotation pretraining needs at least 2 pool images")
        say(f"seed {seed}: rotation-pretraining {arch} on {len(pool_x)} pool images")
        t0 = time.perf_counter()
        model = build_model(arch, len(ROTATION_CLASSES), seed=seed)
        cfg = default_config(
            arch,
            epochs=pretrain_epochs,
            seed=seed,
            workers=workers,
            milestones=ROTNET_MILESTONES,
            eval_every=eval_every,
        )
        tr, held = split_holdout(len(pool_x), 0.1, seed)
        tr_t, held_t = torch.from_numpy(tr), torch.from_numpy(held)
        dummy = torch.zeros(len(pool_x), dtype=torch.long)  # rotate_batch makes the labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            epoch, acc = fit(
                model,
                pool_x[tr_t],
                dummy[tr_t],
                pool_x[held_t],
                dummy[held_t],
                spec,
                cfg,
                device,
                transform=rotate_batch,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "task": "pretrain",
            "images_count": len(pool_x),
            "epochs": pretrain_epochs,
            "seed": seed,
            "best_epoch": epoch,
            "rotation_accuracy": acc,
        }
        save_checkpoint(path, model.cpu(), arch, list(ROTATION_CLASSES), "rotation", info)
        say(
            f"seed {seed}: rotation accuracy {100 * acc:.1f}% (epoch {epoch}), "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return task_model(load_checkpoint(path, arch), classes, seed=seed)


def simulate(
    pool_dir: str | Path,
    val_dir: str | Path,
    test_dir: str | Path,
    out_dir: str | Path,
    strategies: Sequence[str],
    rounds: int,
    P: int,
    seeds: Sequence[int],
    arch: str = "lenet",
    taps: str | Sequence[str] | None = None,
    init: str = "pretrain",
    epochs: int = 50,
    pretrain_epochs: int = 8,
    eval_every: int = 1,
    imbalance: float | None = None,
    rare: Sequence[str | int] = (5, 6, 7, 8, 9),
    mc_samples: int = 32,
    device: str = "auto",
    workers: int = 2,
    progress: Progress | None = None,
) -> list[dict]:
    """Run (or resume) the simulation; returns every result row, sorted by (strategy as given,
    seed, round). See the module docstring for the outputs."""
    say = progress or (lambda _msg: None)
    strats = [parse_strategy(s) for s in strategies]
    if not strats:
        raise AlfkError("give at least one strategy")
    if len({s.name for s in strats}) != len(strats):
        raise AlfkError("a strategy is named twice")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise AlfkError("give one or more distinct seeds")
    for name, v in (("rounds", rounds), ("P", P), ("epochs", epochs), ("eval_every", eval_every)):
        if int(v) < 1:
            raise AlfkError(f"{name} must be at least 1, got {v}")
    if init not in INITS:
        raise AlfkError(f"--init must be pretrain or random, not {init!r}")
    if init == "pretrain" and pretrain_epochs < 1:
        raise AlfkError("pretrain_epochs must be at least 1")
    if imbalance is not None and not imbalance > 0:
        raise AlfkError(f"the imbalance ratio must be positive, got {imbalance}")
    needs_mc = any(
        s.kind in ("varR", "bald") or s.estimator in ("mc_trace", "mc_mi") for s in strats
    )
    if needs_mc and mc_samples < 2:
        raise AlfkError("mc_samples must be at least 2")
    spec = get_arch(arch).input
    tap_names = resolve_taps(arch, taps)
    dims = scale_dims(arch, tap_names)
    dev = resolve_device(device)
    out = Path(out_dir)

    # config: a re-run must repeat the arguments that decide the results
    config = {
        "pool": str(Path(pool_dir).resolve()),
        "val": str(Path(val_dir).resolve()),
        "test": str(Path(test_dir).resolve()),
        "strategies": [s.name for s in strats],
        "rounds": int(rounds),
        "P": int(P),
        "seeds": seeds,
        "arch": arch,
        "taps": list(tap_names),
        "init": init,
        "epochs": int(epochs),
        "pretrain_epochs": int(pretrain_epochs) if init == "pretrain" else None,
        "eval_every": int(eval_every),
        "imbalance": None if imbalance is None or imbalance == 1 else float(imbalance),
        "rare": [str(r) for r in rare],
        "mc_samples": int(mc_samples),
        "device": device,
        "workers": int(workers),
    }
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise AlfkError(f"--out {out} is a file; simulate writes a results folder")
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            raise AlfkError(
                f"{cfg_path} is damaged (not a JSON object); remove it, or choose another --out"
            ) from None
        differ = sorted(
            k
            for k in set(old) | set(config)
            if k not in _NOT_COMPARED and old.get(k) != config.get(k)
        )
        if differ:
            raise AlfkError(
                f"{out} holds a simulation with other arguments ({', '.join(differ)} differ); "
                "choose another --out, or repeat the arguments to resume"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(cfg_path, config)

    say("decoding the validation, test and pool folders")
    val = load_folder(val_dir, spec, None, workers, "validation")
    classes = val.images.classes
    test = load_folder(test_dir, spec, classes, workers, "test")
    pool = load_folder(pool_dir, spec, classes, workers, "pool")
    for folder in (val, test, pool):
        for path, reason in folder.images.skipped:
            say(f"warning: skipped {printable(str(folder.images.root / path))}: {reason}")
    rare_idx = resolve_rare(rare, classes)
    D = len(classes)
    test_rare = torch.from_numpy(np.isin(test.y.numpy(), rare_idx))
    if dev.type == "cuda":  # keep the decoded images on the GPU for the whole run
        val.x, test.x, pool.x = val.x.to(dev), test.x.to(dev), pool.x.to(dev)

    for seed in seeds:
        keep = biased_rows(pool.y.numpy(), rare_idx, imbalance, seed)
        if rounds * P > len(keep):
            raise AlfkError(
                f"{rounds} rounds of P={P} need {rounds * P} pool images; the pool of seed "
                f"{seed} has {len(keep)}"
            )
        keep_t = torch.from_numpy(keep)
        ctx = Context(
            spec=spec,
            taps=tap_names,
            dims=dims,
            val=val,
            pool_x=pool.x[keep_t.to(pool.x.device)],
            pool_y=pool.y[keep_t],
            pool_names=[pool.images.paths[i] for i in keep],
            device=dev,
            mc_samples=int(mc_samples),
            num_classes=D,
        )
        n_rare = int(np.isin(ctx.pool_y.numpy(), rare_idx).sum())
        say(f"seed {seed}: pool of {len(keep)} images ({n_rare} of rare classes)")
        initial: TapNet | None = None
        for st in strats:
            run_dir = out / "runs" / st.dirname / str(seed)
            done = _finished_rounds(run_dir, rounds)
            if done == rounds:
                say(f"{st.name} seed {seed}: all {rounds} rounds done, skipped")
                continue
            labelled = np.zeros(len(keep), dtype=bool)
            order: list[int] = []
            if done:
                state = torch.load(run_dir / f"round_{done}.pt", map_location="cpu")
                model = build_model(arch, D, seed=0)  # weights loaded next; seed: no RNG leak
                model.load_state_dict(state)
                rec = json.loads((run_dir / f"round_{done}.json").read_text())
                where = {int(r): i for i, r in enumerate(keep)}
                order = [where[int(r)] for r in rec["labelled_rows"]]
                labelled[order] = True
                say(f"{st.name} seed {seed}: resuming after round {done}")
            else:
                if initial is None:
                    initial = _initial_model(
                        init, arch, classes, seed, ctx.pool_x, spec, out,
                        pretrain_epochs, eval_every, workers, dev, say,
                    )  # fmt: skip
                model = copy.deepcopy(initial)
            run_dir.mkdir(parents=True, exist_ok=True)
            for b in range(done + 1, rounds + 1):
                rs = _round_seed(seed, b)
                t0 = time.perf_counter()
                with seeded(rs, dev):  # scoped: the caller's RNG state is left as it was
                    picked, passes, pseudo_acc = choose(st, model, ctx, labelled, P, rs)
                select_s = time.perf_counter() - t0
                picked = np.asarray(picked, dtype=np.int64)
                if len(picked) != P or len(set(picked.tolist())) != P or labelled[picked].any():
                    raise RuntimeError(f"{st.name} selected invalid rows")  # pragma: no cover
                labelled[picked] = True
                order.extend(picked.tolist())
                idx = torch.tensor(order, dtype=torch.long)

                # fit seeds (and scopes) torch's RNG with cfg.seed itself
                cfg = default_config(
                    arch, epochs=epochs, seed=rs, workers=workers, eval_every=eval_every
                )
                t0 = time.perf_counter()
                best_epoch, val_acc = fit(
                    model,
                    ctx.pool_x[idx.to(ctx.pool_x.device)],
                    ctx.pool_y[idx],
                    val.x,
                    val.y,
                    spec,
                    cfg,
                    dev,
                )
                train_s = time.perf_counter() - t0
                logits = logits_of(model, test.x, spec, dev)
                hit = logits.argmax(1) == test.y
                per_class = [
                    hit[test.y == c].float().mean().item() if (test.y == c).any() else math.nan
                    for c in range(D)
                ]
                batch_y = ctx.pool_y[torch.from_numpy(picked)]
                row = {
                    "strategy": st.name,
                    "seed": seed,
                    "round": b,
                    "labels": len(order),
                    "test_accuracy": hit.float().mean().item(),
                    "rare_accuracy": _clean(
                        hit[test_rare].float().mean().item() if test_rare.any() else math.nan
                    ),
                    "val_accuracy": val_acc,
                    "per_class": [_clean(a) for a in per_class],
                    "pseudo_label_accuracy": pseudo_acc,
                    "batch_histogram": torch.bincount(batch_y, minlength=D).tolist(),
                    "select_seconds": round(select_s, 4),
                    "model_passes": int(passes),
                    "train_seconds": round(train_s, 4),
                    "best_epoch": best_epoch,
                }
                with atomic_output(run_dir / f"round_{b}.pt") as tmp:
                    save_torch({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
                _write_json(
                    run_dir / f"round_{b}.json",
                    {
                        "row": row,
                        "labelled_rows": [int(keep[i]) for i in order],
                        "selected_paths": [ctx.pool_names[i] for i in picked],
                    },
                )
                _write_results(out, _collect(out, strats, seeds, rounds))
                rare_s = (
                    "-" if row["rare_accuracy"] is None else f"{100 * row['rare_accuracy']:.1f}%"
                )
                say(
                    f"{st.name} seed {seed} round {b}: {row['labels']} labels, "
                    f"test {100 * row['test_accuracy']:.1f}%, rare {rare_s} "
                    f"(select {select_s:.1f} s, train {train_s:.1f} s)"
                )
    rows = _collect(out, strats, seeds, rounds)
    _write_results(out, rows)
    return rows


__all__ = [
    "RESULT_FIELDS",
    "Folder",
    "Strategy",
    "biased_rows",
    "fit",
    "load_folder",
    "parse_strategy",
    "read_results",
    "resolve_rare",
    "rows_to_csv",
    "simulate",
]
