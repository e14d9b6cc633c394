"""Acquisition strategies: the registry behind ``select --strategy`` and ``simulate --strategies``.

A strategy picks P rows of a pool from a :class:`RoundData`, which hides where the numbers come
from: the simulation computes them from images held in memory, ``select`` and ``score`` read
them from the feature stores. Built-ins: ``random``, ``entropy``, ``margin``, ``varR``, ``bald``,
``coreset``, ``balanced-entropy[:val|equal]`` (the baselines' maths is in
:mod:`alfk_cli.strategies.baselines`), ``badge`` (:mod:`alfk_cli.strategies.badge`), ``similar[:flqmi|gcmi]``
(:mod:`alfk_cli.strategies.similar`), ``fk[:ESTIMATOR[:KERNEL]]`` and ``pcc`` (= ``fk:p_yz:pcc``). A strategy name is the registered name, optionally followed by
``:``-separated arguments, which the class's ``from_args`` checks. A new strategy::

    @register_strategy("newest")
    class Newest(Strategy):
        def choose(self, data, P, seed):
            rows = np.flatnonzero(data.available)[::-1][:P]
            return Picked(rows, np.full(len(rows), np.nan, dtype=np.float32))

``model_passes`` counts forward-equivalents spent selecting (a backward to the taps counts as
one forward), over the N' unlabelled pool rows and the M validation images:

    random 0; entropy, margin, balanced-entropy, badge N'; similar N' + M; varR, bald K·N'
    (K = mc_samples); coreset N' (z of the unlabelled rows; the labelled rows' z are computed
    too and counted, so N);
    fk and pcc 2·(M + N') (one forward and one activation-only backward per image);
    fk with mc_trace / mc_mi adds K·(1 + D)·N' (K perturbed copies: one forward and D
    backwards each, D = classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import DEFAULT_ESTIMATOR, Estimator, get_estimator
from alfk_cli.strategies import badge, baselines, similar
from alfk_cli.strategies.acquisition import CENTER_RULES, Selection
from alfk_cli.strategies.kernels import Kernel, get_kernel
from alfk_cli.strategies.quotas import class_quotas
from alfk_cli.util.registry import Registry

__all__ = [
    "STRATEGIES",
    "FisherKernel",
    "FisherRound",
    "Picked",
    "RoundData",
    "Strategy",
    "checked_rows",
    "make_strategy",
    "register_strategy",
]


@dataclass
class Picked:
    """A strategy's choice: pool ``rows`` in pick order, the ``score`` that ranked each (NaN where
    there is none), the model passes spent, and Fisher-kernel details when there are any."""

    rows: np.ndarray
    score: np.ndarray
    passes: int = 0
    pseudo_accuracy: float | None = None
    selection: Selection | None = None  # a Fisher-kernel strategy's, with centres and fallback


class RoundData(Protocol):
    """What a strategy may read about the pool in one round. Rows index the whole pool;
    ``available`` marks those that may be picked, ``labelled`` those already labelled.

    The values are read-only here: an implementation may hold them as attributes or compute
    them as properties."""

    @property
    def available(self) -> np.ndarray: ...

    @property
    def labelled(self) -> np.ndarray: ...

    @property
    def mc_samples(self) -> int:
        """K for Monte-Carlo strategies."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def n_val(self) -> int:
        """Validation images (for counting model passes)."""
        ...

    def probs(self, rows: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[len(rows), D]`` of the current model (eval mode)."""
        ...

    def mc_probs(self, rows: np.ndarray, samples: int, seed: int) -> np.ndarray:
        """MC-dropout probabilities ``[samples, len(rows), D]``."""
        ...

    def features(self) -> np.ndarray:
        """z of every pool row ``[N, L]``."""
        ...

    @property
    def val_labels(self) -> np.ndarray:
        """True class of each validation image ``[M]``."""
        ...

    def last_layer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax probabilities ``[len(rows), D]`` and the classifier's input features
        ``[len(rows), F]`` (penultimate layer, eval mode) of pool rows."""
        ...

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same for every validation image, with their true labels: ``(probs, features,
        labels)``."""
        ...


@runtime_checkable
class FisherRound(Protocol):
    """A round that runs the Fisher-kernel selection itself, from descriptors only it can make
    (``fk`` and ``pcc`` read it besides :class:`RoundData`): the stores' round and the
    simulation's implement it; a round without it serves every other strategy."""

    def fisher(
        self, estimator: Estimator, kernel: Kernel, P: int, seed: int, center_rule: str = "kcenter"
    ) -> tuple[Selection, float | None]:
        """The Fisher-kernel selection over the available rows with the centre rule
        ``center_rule`` (:data:`alfk_cli.strategies.acquisition.CENTER_RULES`): ``(Selection with pool rows,
        pseudo-label accuracy or None)``."""
        ...


class Strategy:
    """A registered strategy; ``name`` is its full name with arguments (``fk:p_yz:sum``)."""

    name: str = ""
    uses_mc: bool = False  # needs at least two Monte-Carlo samples
    estimator: str | None = None  # the pseudo-labels the pool's g must be computed with
    #: ``choose`` runs on every rank under torchrun (its search is split by rank); else on rank
    #: 0 alone, its result shared
    every_rank: bool = False

    @classmethod
    def from_args(cls, args: Sequence[str], defaults: dict[str, str | None]) -> Strategy:
        if any(args):
            raise AlfkError(f"strategy {cls.__name__} takes no ':' arguments")
        return cls()

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        raise NotImplementedError

    def key_fields(self) -> dict[str, str | None]:
        """What the selection depends on besides the name, the data and the seed, as the scores
        file's cache key records it: the estimator and the kernel (None where there is none)."""
        return {"estimator": self.estimator, "kernel": None}

    @property
    def dirname(self) -> str:
        return self.name.replace(":", "-")


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "alfk.strategies")


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: register a :class:`Strategy` subclass as ``name``."""
    return STRATEGIES.register(name)


def make_strategy(name: str, defaults: dict[str, str | None] | None = None) -> Strategy:
    """A strategy from its name: ``entropy``, ``fk:p_yz:product``, ... ``defaults`` fill the
    arguments a name leaves out (``estimator``, ``kernel``: the ``--pseudo-label`` and
    ``--kernel`` options of ``select``)."""
    head, *args = name.strip().split(":")
    cls = STRATEGIES[head]
    try:
        strategy = cls.from_args(args, defaults or {})
    except AlfkError as exc:
        raise AlfkError(f"strategy {name.strip()!r}: {exc}") from None
    strategy.name = name.strip()
    return strategy


def checked_rows(strategy: Strategy, picked: Picked, P: int, available: np.ndarray) -> np.ndarray:
    """The picked rows as a fresh int64 array, after checking that they are P distinct
    available rows (a plug-in's mistake is an error, never a silent re-send)."""
    rows = np.array(picked.rows, dtype=np.int64).reshape(-1)
    ok = len(rows) == P and len(np.unique(rows)) == P
    ok = ok and bool(((rows >= 0) & (rows < len(available))).all()) and bool(available[rows].all())
    if not ok:
        raise AlfkError(
            f"strategy {strategy.name} picked {len(rows)} rows that are not {P} distinct "
            "available pool rows"
        )
    if len(picked.score) != P:
        raise AlfkError(f"strategy {strategy.name} gave {len(picked.score)} scores for {P} rows")
    return rows


def _no_score(rows: np.ndarray) -> np.ndarray:
    return np.full(len(rows), np.nan, dtype=np.float32)


def _top(scores_avail: np.ndarray, data: RoundData, P: int, passes: int) -> Picked:
    """The P best available rows by a score computed for the available rows (in row order)."""
    avail_rows = np.flatnonzero(data.available)
    scores = np.full(len(data.available), -np.inf)
    scores[avail_rows] = scores_avail
    rows = baselines.top_p(scores, P, data.available)
    return Picked(rows, scores[rows].astype(np.float32), passes)


@register_strategy("random")
class Random(Strategy):
    """P available rows drawn uniformly (seeded)."""

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        rows = baselines.random_rows(P, data.available, seed)
        return Picked(rows, _no_score(rows))


class _Softmax(Strategy):
    score: Callable[[np.ndarray], np.ndarray]

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        avail = np.flatnonzero(data.available)
        return _top(type(self).score(data.probs(avail)), data, P, len(avail))


@register_strategy("entropy")
class Entropy(_Softmax):
    """Highest predictive entropy."""

    score = staticmethod(baselines.entropy)


@register_strategy("margin")
class Margin(_Softmax):
    """Smallest gap between the two most likely classes."""

    score = staticmethod(baselines.margin)


class _MonteCarlo(Strategy):
    uses_mc = True
    score: Callable[[np.ndarray], np.ndarray]

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        avail = np.flatnonzero(data.available)
        mc = data.mc_probs(avail, data.mc_samples, seed)
        return _top(type(self).score(mc), data, P, data.mc_samples * len(avail))


@register_strategy("varR")
class VariationRatio(_MonteCarlo):
    """Largest variation ratio over MC-dropout samples."""

    score = staticmethod(baselines.variation_ratio)


@register_strategy("bald")
class BALD(_MonteCarlo):
    """Largest mutual information between prediction and weights (MC dropout)."""

    score = staticmethod(baselines.bald)


@register_strategy("coreset")
class Coreset(Strategy):
    """Sener & Savarese core-set: greedy k-center over z, labelled rows as the first centres."""

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        z = data.features()
        rows = baselines.coreset_rows(z, data.labelled, P, data.available)
        return Picked(rows, _no_score(rows), len(data.labelled))


@register_strategy("balanced-entropy")
@dataclass
class BalancedEntropy(Strategy):
    """Highest entropy within per-predicted-class quotas: ``balanced-entropy[:val|equal]``,
    quotas in proportion to the validation set's classes (default) or equal."""

    quotas: str = "val"
    name: str = field(default="balanced-entropy", repr=False)

    @classmethod
    def from_args(cls, args: Sequence[str], defaults: dict[str, str | None]) -> Strategy:
        if len(args) > 1 or (args and args[0] not in ("", "val", "equal")):
            raise AlfkError("use balanced-entropy[:val|equal]")
        return cls(args[0] if args and args[0] else "val")

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        avail = np.flatnonzero(data.available)
        probs = data.probs(avail)
        D = data.num_classes
        if self.quotas == "equal":
            weights = np.ones(D)
        else:
            y = np.asarray(data.val_labels, dtype=np.int64)
            weights = np.bincount(y[(y >= 0) & (y < D)], minlength=D).astype(np.float64)
        scores = np.full(len(data.available), -np.inf)
        scores[avail] = baselines.entropy(probs)
        predicted = np.full(len(data.available), -1, dtype=np.int64)
        predicted[avail] = probs.argmax(axis=1)
        quotas = class_quotas(P, weights)
        rows = baselines.balanced_top(scores, predicted, quotas, data.available)
        return Picked(rows, scores[rows].astype(np.float32), len(avail))


@register_strategy("badge")
class Badge(Strategy):
    """BADGE: k-means++ seeding over last-layer gradient embeddings at the predicted label."""

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        avail = np.flatnonzero(data.available)
        emb = badge.grad_embedding(*data.last_layer(avail))
        rows = avail[badge.kmeanspp_rows(emb, P, seed)]
        return Picked(rows, _no_score(rows), len(avail))


@register_strategy("similar")
@dataclass
class Similar(Strategy):
    """SIMILAR: ``similar[:flqmi|gcmi]``, submodular mutual information with the misclassified
    validation images as the query set, over bias+linear gradient embeddings."""

    function: str = "flqmi"
    name: str = field(default="similar", repr=False)

    @classmethod
    def from_args(cls, args: Sequence[str], defaults: dict[str, str | None]) -> Strategy:
        if len(args) > 1 or (args and args[0] not in ("", *similar.SMI_FUNCTIONS)):
            raise AlfkError(f"use similar[:{'|'.join(similar.SMI_FUNCTIONS)}]")
        return cls(args[0] if args and args[0] else "flqmi")

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        avail = np.flatnonzero(data.available)
        vp, vf, vy = data.validation()
        wrong = vp.argmax(axis=1) != vy
        q = wrong if wrong.any() else np.ones(len(vy), dtype=bool)  # as FK's centres do
        query = badge.grad_embedding(vp[q], vf[q], vy[q], bias=True)
        pool = badge.grad_embedding(*data.last_layer(avail), bias=True)
        maximise = similar.flqmi_greedy if self.function == "flqmi" else similar.gcmi_top
        picks, gains = maximise(pool, query, P)
        return Picked(avail[picks], gains.astype(np.float32), len(avail) + data.n_val)


# alfk's default centre rule (docs/benchmarks.md §4); the paper's is "kcenter"
DEFAULT_CENTER_RULE = "sample"


@register_strategy("fk")
@dataclass
class FisherKernel(Strategy):
    """The paper's method: ``fk[:ESTIMATOR[:KERNEL[:CENTRES]]]``; CENTRES is a rule of
    :data:`alfk_cli.strategies.acquisition.CENTER_RULES`. alfk's defaults are p_yz_knn, sum and sample
    (chosen on validation data, docs/benchmarks.md §4); the paper's method is
    ``fk:p_yz:sum:kcenter``."""

    estimator: str | None = DEFAULT_ESTIMATOR
    kernel: str = "sum"
    centers: str = DEFAULT_CENTER_RULE
    name: str = field(default="fk", repr=False)
    every_rank = True  # the pool search is split by rank (shardsearch)

    @classmethod
    def from_args(cls, args: Sequence[str], defaults: dict[str, str | None]) -> Strategy:
        if len(args) > 3:
            raise AlfkError("use fk[:ESTIMATOR[:KERNEL[:CENTRES]]]")
        est = (args[0] if args and args[0] else None) or defaults.get("estimator")
        kernel = (args[1] if len(args) > 1 and args[1] else None) or defaults.get("kernel")
        rule = (args[2] if len(args) > 2 and args[2] else None) or defaults.get("centers")
        if (rule or DEFAULT_CENTER_RULE) not in CENTER_RULES:
            raise AlfkError(f"unknown centre rule {rule!r}; use one of {', '.join(CENTER_RULES)}")
        est = get_estimator(est or DEFAULT_ESTIMATOR).name
        return cls(est, get_kernel(kernel or "sum").name, rule or DEFAULT_CENTER_RULE)

    @staticmethod
    def relies_on_defaults(name: str) -> bool:
        """Whether the strategy name ``name`` (``fk...``) leaves its estimator or centre rule to
        the defaults, which changed once (p_yz and kcenter before): a run must record them."""
        head, *args = name.strip().split(":")
        return head == "fk" and (len(args) < 3 or not args[0] or not args[2])

    @property
    def uses_mc(self) -> bool:  # type: ignore[override]
        return get_estimator(self.estimator or DEFAULT_ESTIMATOR).uses_mc

    def key_fields(self) -> dict[str, str | None]:
        fields: dict[str, str | None] = {"estimator": self.estimator, "kernel": self.kernel}
        # kcenter (the only rule once) is left out, so scores files made before the rules stay
        # valid
        if self.centers != "kcenter":
            fields["centers"] = self.centers
        return fields

    def choose(self, data: RoundData, P: int, seed: int) -> Picked:
        if not isinstance(data, FisherRound):
            raise AlfkError(
                f"strategy {self.name} needs a round that runs the Fisher-kernel search"
            )
        est = get_estimator(self.estimator or DEFAULT_ESTIMATOR)
        sel, pseudo_acc = data.fisher(est, get_kernel(self.kernel), P, seed, self.centers)
        n_avail = int(np.count_nonzero(data.available))
        passes = 2 * (data.n_val + n_avail)
        if est.uses_mc:
            passes += data.mc_samples * (1 + data.num_classes) * n_avail
        return Picked(sel.selected, sel.score, passes, pseudo_acc, sel)


@register_strategy("pcc")
class PCC(FisherKernel):
    """The paper's PCC baseline: ``fk:p_yz:pcc``."""

    @classmethod
    def from_args(cls, args: Sequence[str], defaults: dict[str, str | None]) -> Strategy:
        if any(args):
            raise AlfkError("pcc takes no ':' arguments (it is fk:p_yz:pcc:kcenter)")
        return cls("p_yz", "pcc", "kcenter")
