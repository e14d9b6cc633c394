"""One simulated round's data for a strategy: the pool's images and the current model.

:class:`FolderRound` is the simulation's :class:`alfk_cli.strategies.registry.RoundData`: every number a
strategy asks for is computed here with the current model from the pool folder's images, held
in memory or decoded batch by batch on demand (``simulate.data.Folder``). Each pass reads its
rows in the same batches either way, so the numbers are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alfk_cli.data.decode import normalizer
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.features.descriptors import concat_pooled
from alfk_cli.features.estimators import Estimator, describe_images
from alfk_cli.features.montecarlo import MCConfig
from alfk_cli.features.pseudolabels import NearestReference
from alfk_cli.models.nets import TapNet
from alfk_cli.simulate.data import Folder
from alfk_cli.strategies import baselines
from alfk_cli.strategies.acquisition import Descriptors, Selection
from alfk_cli.strategies.acquisition import select as fk_select
from alfk_cli.strategies.kernels import Kernel
from alfk_cli.train.loops import TrainConfig, predict
from alfk_cli.train.loops import fit as train_fit
from alfk_cli.train.sources import ImageSource

__all__ = [
    "DESCRIBE_BATCH",
    "FolderRound",
    "fit",
    "last_layer_of",
    "logits_of",
    "pooled_features",
]

# The batch sizes of each pass: part of the results (a batch's floating-point sums may depend
# on its size), so they are the same whether images are held or streamed.
DESCRIBE_BATCH = 256
PREDICT_BATCH = 512


def logits_of(model: TapNet, source: ImageSource, device: torch.device) -> torch.Tensor:
    """Eval-mode logits of a source's images (float32, CPU)."""
    return predict(model, source, device, batch_size=PREDICT_BATCH)


def fit(
    model: TapNet,
    train: ImageSource,
    held: ImageSource,
    cfg: TrainConfig,
    device: torch.device,
    transform=None,
) -> tuple[int, float]:
    """``training.fit``; returns (best epoch, its held-out accuracy)."""
    result = train_fit(
        model, train, held, cfg, device=device, description="fit", transform=transform
    )
    return result.best_epoch, result.best_accuracy


@torch.no_grad()
def pooled_features(
    model: TapNet,
    batches: Iterable[torch.Tensor],
    spec: InputSpec,
    taps: Sequence[str],
    device: torch.device,
) -> np.ndarray:
    """z (concatenated pooled taps) of uint8 image batches, float32 numpy."""
    model.eval().to(device)
    norm = normalizer(spec)
    out = []
    for x in batches:
        _, feats = model.forward_taps(norm(x.to(device)), taps)
        out.append(concat_pooled(feats).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def last_layer_of(
    model: TapNet, batches: Iterable[torch.Tensor], spec: InputSpec, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode softmax probabilities and classifier inputs (``model.head`` of the last stage)
    of uint8 image batches, float32 numpy."""
    model.eval().to(device)
    norm = normalizer(spec)
    last = (model.stage_names[-1],)
    probs, feats = [], []
    for x in batches:
        _, (h,) = model.forward_taps(norm(x.to(device)), last)
        a = model.head(h)
        probs.append(torch.softmax(model.classifier(a).float(), 1).cpu())
        feats.append(a.float().cpu())
    if not probs:
        return np.empty((0, model.num_classes), np.float32), np.empty((0, 0), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@dataclass
class FolderRound:
    """One seed's pool (rows ``keep`` of the pool folder, hidden labels included), the model and
    the options. Rows of the strategy interface index ``keep``."""

    model: TapNet
    spec: InputSpec
    taps: tuple[str, ...]
    dims: list[int]
    val: Folder
    pool: Folder  # the whole pool folder
    keep: np.ndarray  # its rows in this seed's (biased) pool
    pool_y: torch.Tensor  # hidden labels: only the ``true`` estimator reads them
    pool_names: list[str]
    device: torch.device
    mc_samples: int
    num_classes: int
    labelled: np.ndarray

    @property
    def available(self) -> np.ndarray:
        return ~self.labelled

    @property
    def n_val(self) -> int:
        return len(self.val)

    def source(self, rows: np.ndarray, hold: bool = False) -> ImageSource:
        """The images of pool rows ``rows`` (see ``Folder.source``)."""
        return self.pool.source(self.keep[rows], hold)

    def _batches(self, rows: np.ndarray, size: int) -> Iterable[torch.Tensor]:
        return self.pool.batches(self.keep[rows], size)

    def probs(self, rows: np.ndarray) -> np.ndarray:
        logits = logits_of(self.model, self.source(rows), self.device)
        return torch.softmax(logits, 1).numpy()

    def mc_probs(self, rows: np.ndarray, samples: int, seed: int) -> np.ndarray:
        return baselines.mc_dropout_batches(
            self.model, self._batches(rows, PREDICT_BATCH), len(rows), self.spec, samples, seed,
            self.device,
        )  # fmt: skip

    def features(self) -> np.ndarray:
        every = np.arange(len(self.keep))
        batches = self._batches(every, DESCRIBE_BATCH)
        return pooled_features(self.model, batches, self.spec, self.taps, self.device)

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.y.numpy()

    def last_layer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batches = self._batches(rows, DESCRIBE_BATCH)
        return last_layer_of(self.model, batches, self.spec, self.device)

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batches = self.val.batches(None, DESCRIBE_BATCH)
        probs, feats = last_layer_of(self.model, batches, self.spec, self.device)
        return probs, feats, self.val.y.numpy()

    def describe(
        self,
        batches: Iterable[torch.Tensor],
        method: str | Estimator,
        labels: torch.Tensor | None = None,
        reference: NearestReference | None = None,
        names: Sequence[str] = (),
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """z, g, logits and the labels g used, for uint8 batches of ``DESCRIBE_BATCH`` images
        (``labels`` and ``names`` by image)."""
        self.model.to(self.device)
        mc_cfg = MCConfig(samples=self.mc_samples)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        s = 0
        for x in batches:
            part = slice(s, s + len(x))
            s += len(x)
            out = describe_images(
                self.model, x.to(self.device), self.spec, self.taps, method,
                labels=labels[part].to(self.device) if labels is not None else None,
                reference=reference, names=names[part], seed=seed, mc_cfg=mc_cfg,
            )  # fmt: skip
            for acc, t in zip(parts, out, strict=True):
                acc.append(t.float().cpu() if t.is_floating_point() else t.cpu())
        z, g, lg, used = (torch.cat(p).numpy() for p in parts)
        return z, g, lg, used

    def fisher(
        self, estimator: Estimator, kernel: Kernel, P: int, seed: int, center_rule: str = "kcenter"
    ) -> tuple[Selection, float | None]:
        """Validation described with true labels, the available pool with the estimator."""
        val_batches = self.val.batches(None, DESCRIBE_BATCH)
        vz, vg, vl, _ = self.describe(val_batches, "true", labels=self.val.y)
        avail = np.flatnonzero(self.available)
        hidden = self.pool_y[torch.from_numpy(avail)]
        ref = None
        if estimator.needs_reference:
            ref = NearestReference(vz, self.val.y.numpy(), self.dims)
        names = [self.pool_names[i] for i in avail]
        batches = self._batches(avail, DESCRIBE_BATCH)
        pz, pg, _, used = self.describe(batches, estimator, hidden, ref, names, seed)
        pseudo_acc = float((used == hidden.numpy()).mean()) if len(avail) else None
        sel = fk_select(
            Descriptors(vz, vg, self.dims, vl, self.val.y.numpy()),
            Descriptors(pz, pg, self.dims),
            P,
            kernel=kernel,
            seed=seed,
            device="auto" if self.device.type == "cuda" else "cpu",
            center_rule=center_rule,
        )
        return dataclasses.replace(sel, selected=avail[sel.selected].astype(np.int64)), pseudo_acc
