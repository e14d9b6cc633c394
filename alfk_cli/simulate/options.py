"""``SimulateOptions``: everything an ``alfk simulate`` run depends on, checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alfk_cli.data.decode import PRELOAD_LIMIT_BYTES
from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import DEFAULT_ESTIMATOR
from alfk_cli.models.archs import resolve_taps
from alfk_cli.strategies.registry import DEFAULT_CENTER_RULE, FisherKernel, Strategy, make_strategy
from alfk_cli.train.balance import check_balance

__all__ = ["DEFAULT_CACHE_MIB", "INITS", "NOT_COMPARED", "InitName", "SimulateOptions"]

#: How each seed's initial model is made: rotation pretraining on the pool, or random weights.
InitName = Literal["pretrain", "random"]
INITS: tuple[InitName, ...] = ("pretrain", "random")
# Options that change how a run is computed, not what it computes (not compared on resume).
NOT_COMPARED = ("device", "workers", "cache_mib")
#: Decoded images kept in memory by default (MiB): ``images.PRELOAD_LIMIT_BYTES``, as ``train``.
DEFAULT_CACHE_MIB = PRELOAD_LIMIT_BYTES >> 20


@dataclass(frozen=True, kw_only=True)
class SimulateOptions:
    """Everything a simulation run depends on (``config.json`` is its serialised form)."""

    pool: str | Path
    val: str | Path
    test: str | Path
    out: str | Path
    strategies: tuple[str, ...] = ("random", "fk")
    rounds: int = 10
    P: int = 125
    seeds: tuple[int, ...] = (0,)
    arch: str = "lenet"
    taps: str | tuple[str, ...] | None = None
    init: InitName = "pretrain"
    epochs: int = 50
    pretrain_epochs: int = 8
    eval_every: int = 1
    batch_size: int | None = None  # the arch's; in config.json only when set (runs resume)
    lr: float | None = None  # likewise
    balance: str = "none"  # class balancing of each round's training (train/balance.py)
    freeze: str = "none"  # stages that never train, their activations cached (models/freeze.py)
    imbalance: float | None = None
    rare: tuple[str | int, ...] = (5, 6, 7, 8, 9)
    mc_samples: int = 32
    device: str = "auto"
    workers: int | None = None
    # decoded images kept in memory (MiB); folders over it are decoded again at each read
    cache_mib: float = DEFAULT_CACHE_MIB
    parsed: tuple[Strategy, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed", tuple(make_strategy(s) for s in self.strategies))
        self._check()

    def _check(self) -> None:
        if not self.parsed:
            raise AlfkError("give at least one strategy")
        if len({s.name for s in self.parsed}) != len(self.parsed):
            raise AlfkError("a strategy is named twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise AlfkError("give one or more distinct seeds")
        if not 0 <= self.cache_mib < math.inf:
            raise AlfkError(f"cache_mib must be a number of MiB, at least 0, not {self.cache_mib}")
        for name in ("rounds", "P", "epochs", "eval_every", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise AlfkError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise AlfkError(f"lr must be positive, got {self.lr}")
        check_balance(self.balance)
        if self.freeze != "none":
            from alfk_cli.models.freeze import check_freeze

            check_freeze(self.arch, self.freeze)
        if self.init not in INITS:
            raise AlfkError(f"init must be pretrain or random, not {self.init!r}")
        if self.init == "pretrain" and self.pretrain_epochs < 1:
            raise AlfkError("pretrain_epochs must be at least 1")
        if self.imbalance is not None and not self.imbalance > 0:
            raise AlfkError(f"the imbalance ratio must be positive, got {self.imbalance}")
        if any(s.uses_mc for s in self.parsed) and self.mc_samples < 2:
            raise AlfkError("mc_samples must be at least 2")

    def config(self) -> dict[str, Any]:
        """The options as written to ``config.json``; a re-run must repeat them."""
        return {
            "pool": str(Path(self.pool).resolve()),
            "val": str(Path(self.val).resolve()),
            "test": str(Path(self.test).resolve()),
            "strategies": [s.name for s in self.parsed],
            "rounds": int(self.rounds),
            "P": int(self.P),
            "seeds": [int(s) for s in self.seeds],
            "arch": self.arch,
            "taps": list(resolve_taps(self.arch, self.taps)),
            "init": self.init,
            "epochs": int(self.epochs),
            "pretrain_epochs": int(self.pretrain_epochs) if self.init == "pretrain" else None,
            "eval_every": int(self.eval_every),
            **({"batch_size": int(self.batch_size)} if self.batch_size is not None else {}),
            **({"lr": float(self.lr)} if self.lr is not None else {}),
            **({"balance": self.balance} if self.balance != "none" else {}),
            **({"freeze": self.freeze} if self.freeze != "none" else {}),
            "imbalance": None
            if self.imbalance is None or self.imbalance == 1
            else float(self.imbalance),
            "rare": [str(r) for r in self.rare],
            "mc_samples": int(self.mc_samples),
            "device": self.device,
            "workers": self.workers,
            # what an fk name leaves out meant p_yz and kcenter before they changed: such runs
            # record what it means now, so an older folder is not resumed with other defaults
            **(
                {"fk_defaults": f"{DEFAULT_ESTIMATOR}:{DEFAULT_CENTER_RULE}"}
                if any(FisherKernel.relies_on_defaults(s.name) for s in self.parsed)
                else {}
            ),
            # how, not what: recorded only when set, so default runs keep their config.json
            **({"cache_mib": float(self.cache_mib)} if self.cache_mib != DEFAULT_CACHE_MIB else {}),
        }
