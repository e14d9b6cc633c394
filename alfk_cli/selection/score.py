"""The ``score`` stage: two feature stores in, a scores file out (``alfk score``).

Leaves out the validation images found in the pool and the images an exclusion list names, runs
the strategy on what is left (the Fisher kernel by default) and writes the selection with the
paths, predicted classes and matched centres ``select`` prints. An existing scores file made from
the same stores and options is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.search.exact import backend_choice
from alfk_cli.selection.scoresfile import Scores, read_scores, write_scores
from alfk_cli.selection.workdir import match_exclusions
from alfk_cli.store.reader import FeatureStore, check_compatible, check_label_range, open_store
from alfk_cli.strategies import acquisition
from alfk_cli.strategies.registry import Picked, RoundData, Strategy, checked_rows, make_strategy
from alfk_cli.util import distributed
from alfk_cli.util.atomic import check_writable_dir
from alfk_cli.util.reproducible import seeded

__all__ = ["ScoreOptions", "decide_strategy", "score_stores"]


def _same_files(pool_paths: Iterable[str], pool_root: str, val: FeatureStore) -> np.ndarray:
    """Pool rows that are validation images: the validation folder lies inside the pool folder
    (e.g. ``--pool data/ --val data/val``), so the same file is reachable through both."""
    pool_abs, val_abs = Path(pool_root).resolve(), Path(val.image_root).resolve()
    try:
        prefix = val_abs.relative_to(pool_abs).as_posix()
    except ValueError:  # the folders are disjoint, or the pool lies inside the validation folder
        prefix = None
    if prefix is None:
        inside = pool_abs.is_relative_to(val_abs)
        sub = pool_abs.relative_to(val_abs).as_posix() + "/" if inside else None
        val_set = set(val.paths)
        rows = [i for i, p in enumerate(pool_paths) if sub is not None and sub + p in val_set]
    else:
        val_set = {f"{prefix}/{p}" if prefix != "." else p for p in val.paths}
        rows = [i for i, p in enumerate(pool_paths) if p in val_set]
    return np.array(rows, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class ScoreOptions:
    """How ``score_stores`` picks: the strategy and everything its result depends on.

    ``strategy`` is any registered strategy name; a Fisher-kernel one takes its kernel from
    ``kernel`` and its estimator from the pool store unless the name gives them. ``exclude``
    names a file of image paths (already labelled or sent) left out of the pool; validation
    images found in the pool are always left out. ``image_root`` overrides the pool folder used
    to print paths (default: the one recorded in the pool store). ``reuse`` returns an existing
    scores file made from the same stores and options instead of recomputing. When fewer than P
    images are left, the ones left are selected with a ``warning:`` note; ``exact_count`` makes
    that an error. ``checkpoint``, ``mc_samples``, ``workers``: for strategies that run the model
    on the pool images (MC dropout).
    """

    P: int
    strategy: str = "fk"
    kernel: str = "sum"
    exclude: str | os.PathLike | None = None
    seed: int = 0
    device: str = "cpu"
    image_root: str | None = None
    reuse: bool = False
    exact_count: bool = False
    checkpoint: str | os.PathLike | None = None
    mc_samples: int = 32
    workers: int | None = 0  # None: the cores available (images.loader_workers)
    sent: frozenset[str] = frozenset()  # paths inside the pool sent in earlier runs (the ledger)


def score_stores(
    val_path: str | os.PathLike,
    pool_path: str | os.PathLike,
    out: str | os.PathLike,
    options: ScoreOptions,
    *,
    strategy: Strategy | None = None,
) -> tuple[Scores, list[str]]:
    """Select ``options.P`` pool images against the validation store; write the scores file
    ``out``. Returns the scores and notes for the user (e.g. the no-misclassified fallback).
    With ``reuse``, an existing ``out`` made from the same inputs (``sent`` included) is returned.

    ``strategy``: ``options.strategy`` as ``decide_strategy`` made it for the orchestrator, which
    embedded the pool for it; None: decided here, a Fisher-kernel strategy taking the pool
    store's pseudo-labels as its estimator unless its name gives one."""
    check_writable_dir(out)
    if strategy is None:
        backend_choice()  # a bad ALFK_SEARCH_BACKEND fails before the stores are read
    with open_store(val_path) as val, open_store(pool_path) as pool:
        root, base, base_notes = _prepare(val, pool, options)
        if strategy is None:
            strategy = make_strategy(
                options.strategy, {"estimator": pool.pseudo_label, "kernel": options.kernel}
            )
        drop, notes = _with_sent(pool, base, base_notes, options.sent)
        key = _cache_key(val, pool, root, drop, strategy, options)
        if options.reuse:
            cached = _cached(out, key)
            if cached is not None:
                return cached
        left = len(pool) - len(drop)
        if left < options.P:
            if options.exact_count:
                raise AlfkError(
                    f"only {left} pool image(s) are left to select, fewer than {options.P} "
                    "(without exact_count the ones left are selected)"
                )
            notes.append(
                f"warning: only {left} pool image(s) are left to select; selecting {left}, "
                f"not {options.P}"
            )
        sel = _choose(strategy, val, pool, drop, min(options.P, left), options)
        if sel.fallback:
            notes.append(
                "no validation image is misclassified: the whole validation set served as centres"
            )
        attrs = {
            "val_store": str(val_path),
            "pool_store": str(pool_path),
            "val_store_fingerprint": val.get_attr("fingerprint"),
            "pool_store_fingerprint": pool.get_attr("fingerprint"),
            "cache_key": key,
            "notes": json.dumps(notes),
            "checkpoint_sha256": pool.checkpoint_sha256,
            "seed": options.seed,
            "strategy": strategy.name,
            "excluded": len(drop),
            "misclassified": len(acquisition.misclassified(val.logits[:], val.labels[:])),
        }
        # under torchrun rank 0 alone writes; the others wait for the file
        distributed.on_main(lambda: _write(out, sel, val, pool, root, attrs))
    return read_scores(out), notes


def decide_strategy(name: str, kernel: str, estimator: str | None) -> Strategy:
    """The strategy ``name`` (``kernel``, ``estimator``: a Fisher-kernel one's defaults), after
    checking the search backend the environment asks for: what the orchestrator decides once,
    before any model pass, and hands to ``score_stores``."""
    strategy = make_strategy(name, {"estimator": estimator, "kernel": kernel})
    backend_choice()  # a bad ALFK_SEARCH_BACKEND fails before any model pass
    return strategy


def _prepare(
    val: FeatureStore, pool: FeatureStore, options: ScoreOptions
) -> tuple[str, set[int], list[str]]:
    """Checks, the printed root, the rows left out before the ledger, and notes."""
    check_compatible(val, pool)
    check_label_range(val)
    check_label_range(pool)
    if (np.asarray(val.labels[:]) < 0).any():
        raise AlfkError(
            f"{val.path} has images without labels; the validation store needs class sub-folders"
        )
    root = options.image_root if options.image_root is not None else pool.image_root
    drop, notes = _left_out(val, pool, root, options.exclude)
    return root, drop, notes


def _with_sent(
    pool: FeatureStore, drop: set[int], notes: list[str], sent: frozenset[str]
) -> tuple[set[int], list[str]]:
    """``drop`` and ``notes`` extended by the pool images sent in earlier runs (new objects)."""
    rows = {i for i, p in enumerate(pool.path_view()) if p in sent} - drop if sent else set()
    if not rows:
        return set(drop), list(notes)
    note = f"left out {len(rows)} pool image(s) sent in earlier runs (the ledger)"
    return drop | rows, [*notes, note]


def _left_out(
    val: FeatureStore, pool: FeatureStore, root: str, exclude: str | os.PathLike | None
) -> tuple[set[int], list[str]]:
    """Pool rows that may not be selected (validation images, listed images) and notes. The
    pool's paths are read a block at a time (a list of 10M takes ~2 GiB while it is read)."""
    notes: list[str] = []
    pool_paths = pool.path_view()
    drop = set(_same_files(pool_paths, root, val).tolist())
    if drop:
        notes.append(f"left out {len(drop)} pool image(s) that are also validation images")
    if exclude is not None:
        found = match_exclusions(exclude, root, pool_paths)
        unmatched = (
            f"; {found.unmatched} line(s) named no image of this pool" if found.unmatched else ""
        )
        notes.append(f"excluded {len(found.rows)} pool image(s) listed in {exclude}{unmatched}")
        drop.update(found.rows)
    return drop, notes


def _cache_key(
    val: FeatureStore,
    pool: FeatureStore,
    root: str,
    drop: set[int],
    strategy: Strategy,
    options: ScoreOptions,
) -> str:
    """Everything the selection depends on (the rows left out, not how the lists spelled them)."""
    key = {
        "val": val.get_attr("fingerprint"),
        "pool": pool.get_attr("fingerprint"),
        "P": options.P,
        "strategy": strategy.name,
        **strategy.key_fields(),  # estimator, kernel (and a centre rule other than kcenter)
        "mc_samples": options.mc_samples if strategy.uses_mc else None,
        "seed": options.seed,
        "image_root": root,
        "val_root": val.image_root,
        "left_out": hashlib.sha256(np.array(sorted(drop), dtype=np.int64).tobytes()).hexdigest(),
        "exact_count": options.exact_count,
    }
    return json.dumps(key, sort_keys=True)


def _cached(out: str | os.PathLike, key: str) -> tuple[Scores, list[str]] | None:
    """An existing scores file made with the same key, and its notes repeated."""
    if not Path(out).is_file():
        return None
    with contextlib.suppress(AlfkError, ValueError):
        cached = read_scores(out)
        if cached.attrs.get("cache_key") == key:
            notes = json.loads(cached.attrs.get("notes", "[]"))
            return cached, [*notes, f"{out} is up to date"]
    return None


def _choose(
    strategy: Strategy,
    val: FeatureStore,
    pool: FeatureStore,
    drop: set[int],
    P: int,
    options: ScoreOptions,
) -> acquisition.Selection:
    """The strategy's pick as a Selection (no centres for strategies without them)."""
    if P == 0:
        return _empty_selection(strategy.key_fields()["kernel"] or "")
    from alfk_cli.selection.storeround import StoreRound  # torch: only when the scores are computed

    left_out = np.zeros(len(pool), dtype=bool)
    left_out[sorted(drop)] = True
    data = StoreRound(
        val,
        pool,
        left_out,
        device=options.device,
        checkpoint=options.checkpoint,
        mc_samples=options.mc_samples,
        workers=options.workers,
    )
    picked = _pick(strategy, data, P, options.seed)
    rows = checked_rows(strategy, picked, P, data.available)
    if picked.selection is not None:
        return picked.selection
    return acquisition.Selection(
        rows,
        np.asarray(picked.score, dtype=np.float32),
        np.full(len(rows), -1, dtype=np.int64),
        np.empty(0, dtype=np.int64),
        False,
        "",
        0,
    )


def _pick(strategy: Strategy, data: RoundData, P: int, seed: int) -> Picked:
    """The strategy's choice. Under torchrun a strategy that splits its search by rank (the
    Fisher-kernel ones, ``search.sharded``) runs on every rank; the others run on rank 0 alone and
    share their result."""

    def choose() -> Picked:
        with seeded(seed):
            return strategy.choose(data, P, seed)

    return choose() if strategy.every_rank else distributed.on_main(choose)


def _write(
    out: str | os.PathLike,
    sel: acquisition.Selection,
    val: FeatureStore,
    pool: FeatureStore,
    root: str,
    attrs: dict,
) -> None:
    classes = val.classes
    rows = np.asarray(sel.selected)
    order = np.argsort(rows)
    logits = np.empty((len(rows), len(classes)), dtype=np.float32)
    logits[order] = pool.logits[rows[order]] if len(rows) else logits[:0]
    predicted = [classes[c] for c in logits.argmax(1)]
    val_paths = val.paths
    center_paths = [
        os.path.join(val.image_root, val_paths[c]) if c >= 0 else "" for c in sel.center
    ]
    write_scores(out, sel, pool.path_view().at(rows), predicted, center_paths, root, attrs)


def _empty_selection(kernel: str) -> acquisition.Selection:
    """The selection when every pool image is excluded: nothing to label tonight."""
    none = np.empty(0, dtype=np.int64)
    return acquisition.Selection(none, np.empty(0, dtype=np.float32), none, none, False, kernel, 0)
