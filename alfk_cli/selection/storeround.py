"""What ``select`` and ``score`` know about a pool, as a strategy's :class:`RoundData`.

The feature stores already hold every pool image's logits, z and g, so most strategies read
them and run no model at all. MC-dropout strategies (``varR``, ``bald``) need the model and the
images: they decode the available images in chunks and run the checkpoint the stores were
embedded with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import Estimator
from alfk_cli.models.archs import penultimate_tap
from alfk_cli.store.reader import FeatureStore, read_rows
from alfk_cli.strategies import acquisition, baselines
from alfk_cli.strategies.kernels import Kernel

__all__ = ["MC_CHUNK", "StoreRound"]

#: Images decoded at once for MC dropout (bounded memory whatever the pool's size).
MC_CHUNK = 4096


class StoreRound:
    """A pool's stores with the rows left out (already sent, or validation images)."""

    def __init__(
        self,
        val: FeatureStore,
        pool: FeatureStore,
        left_out: np.ndarray,
        *,
        device: str = "cpu",
        checkpoint: str | os.PathLike | None = None,
        mc_samples: int = 32,
        workers: int | None = 0,
    ):
        self.val, self.pool = val, pool
        self.labelled = np.asarray(left_out, dtype=bool)
        self.available = ~self.labelled
        self.device = device
        self.checkpoint = checkpoint
        self.mc_samples = int(mc_samples)
        self.workers = workers
        self.num_classes = len(pool.classes)
        self.n_val = len(val)

    def probs(self, rows: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.asarray(self.pool.logits[np.sort(rows)], dtype=np.float32))
        probs = torch.softmax(logits, 1).numpy()
        return probs[np.argsort(np.argsort(rows))]  # back to the order asked for

    def features(self) -> np.ndarray:
        return np.asarray(self.pool.z[:])

    @property
    def val_labels(self) -> np.ndarray:
        return np.asarray(self.val.labels[:], dtype=np.int64)

    def last_layer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = self._penultimate_columns()
        feats = np.asarray(read_rows(self.pool.z, np.asarray(rows, dtype=np.int64)))
        return self.probs(rows), feats[:, cols]

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols = self._penultimate_columns()
        logits = torch.from_numpy(np.asarray(self.val.logits[:], dtype=np.float32))
        feats = np.asarray(self.val.z[:])[:, cols]
        return torch.softmax(logits, 1).numpy(), feats, self.val_labels

    def _penultimate_columns(self) -> slice:
        """The z columns that hold the classifier's input (the last stage's tap)."""
        tap = penultimate_tap(self.pool.arch)
        taps = list(self.pool.taps)
        if tap is None or tap not in taps:
            need = f"taps that include {tap}" if tap else "an architecture whose head only pools"
            raise AlfkError(
                f"this strategy needs the classifier's input features, which {self.pool.path} "
                f"does not hold (taps {','.join(taps)}): embed the stores with {need}"
            )
        i = taps.index(tap)
        start = sum(self.pool.scale_dims[:i])
        return slice(start, start + self.pool.scale_dims[i])

    def fisher(
        self, estimator: Estimator, kernel: Kernel, P: int, seed: int, center_rule: str = "kcenter"
    ) -> tuple[acquisition.Selection, float | None]:
        if self.pool.pseudo_label != estimator.name:
            raise AlfkError(
                f"the pool store {self.pool.path} holds g for {self.pool.pseudo_label} "
                f"pseudo-labels, not {estimator.name}; embed it again with that estimator"
            )
        exclude = np.flatnonzero(self.labelled)
        sel = acquisition.select(
            self.val,
            self.pool,
            P,
            kernel=kernel,
            exclude=exclude if exclude.size else None,
            seed=seed,
            device=self.device,
            center_rule=center_rule,
        )
        return sel, None

    def mc_probs(self, rows: np.ndarray, samples: int, seed: int) -> np.ndarray:
        model, spec, dev = self._model()
        out = []
        for c, a in enumerate(range(0, len(rows), MC_CHUNK)):
            x = self._decode(rows[a : a + MC_CHUNK], spec)
            # one seed per chunk: the probabilities do not depend on how many chunks came before
            chunk_seed = int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
            out.append(baselines.mc_dropout_probs(model, x, spec, samples, chunk_seed, dev))
        if not out:
            return np.empty((samples, 0, self.num_classes), dtype=np.float32)
        return np.concatenate(out, axis=1)

    def _model(self) -> tuple[Any, Any, torch.device]:
        from alfk_cli.models.checkpoint import load_checkpoint, task_model
        from alfk_cli.util.devices import resolve_device

        if self.checkpoint is None:
            raise AlfkError(
                "this strategy runs the model on the pool images: give the checkpoint the pool "
                "store was embedded with"
            )
        ckpt = load_checkpoint(self.checkpoint)
        if ckpt.sha256 != self.pool.checkpoint_sha256:
            raise AlfkError(
                f"{self.pool.path} was embedded with another checkpoint than {self.checkpoint}"
            )
        model = task_model(ckpt, self.pool.classes, seed=self.pool.seed or 0)
        return model, ckpt.input, resolve_device(self.device)

    def _decode(self, rows: np.ndarray, spec: Any) -> torch.Tensor:
        from alfk_cli.data.decode import preload
        from alfk_cli.data.scan import ImageSet

        paths = self.pool.paths
        chosen = [paths[r] for r in rows]
        images = ImageSet(Path(self.pool.image_root), chosen, np.full(len(rows), -1), [])
        x, ok = preload(images, spec, self.workers)
        if not ok.all():
            bad = chosen[int(np.flatnonzero(~ok)[0])]
            raise AlfkError(f"pool image {bad} can no longer be decoded; embed the pool again")
        return x
