"""The maths of the pseudo-label estimators S (docs/algorithm.md §3; registered in ``estimators``).

``true``
    the image's own label (ablation; a pool with class sub-folders, e.g. in simulation).
``yhat``
    argmax of the model's logits.
``p_yz`` (default)
    the true label of the most similar validation image: 1-nearest neighbour over the whole
    validation set by the inner product of standardised z (exact: blocked matrix product).
``p_yz_knn``
    soft labels: each class's share of the 10 most similar validation images (a k-NN estimate
    of p(y|z)); g is then the expected Fisher score under that distribution.
``mc_trace``, ``mc_mi``
    Monte-Carlo: K perturbed copies of the image (uniform rotations in ±5 **degrees** and
    Gaussian pixel noise σ = 0.01 on the [0, 1] scale, before normalisation). For every class d
    the K z-samples and the K Fisher-score samples s(d) give a score; the label is argmax_d.
    ``mc_trace`` scores tr C_zs, the trace of the cross-moment between the z-samples and the
    s(d)-samples; ``mc_mi`` scores the Gaussian mutual information
    0.5·log(|C_zz||C_ss| / |C_[zs][zs]|).

How this differs from the authors' public code, on purpose (the paper's intent):

- rotation angles are drawn uniformly in ±5 degrees and converted to radians (the code drew
  5·N(0, 1) and used it as radians: rotations of hundreds of degrees);
- the Fisher score is s(d) = ∂ log p(d|x)/∂z = −∂CE(d)/∂z (the paper's g(θ) = ∂ log p/∂θ).
  The code correlated z with the *loss* gradient; for ReLU networks (Euler's identity, up to
  bias terms) z·∂CE(d)/∂z ≈ E_p[logit] − logit_d, so its argmax picked the least likely class;
- tr C_zs is the code's *uncentred* cross-moment Σ_k z_k·s_k(d)/(K−1) (the paper's "linear
  correlation between features and Fisher scores"). ``MCConfig.trace_centered`` centres the
  samples over the K copies (the textbook cross-covariance) instead. Measured on MNIST t10k with
  a LeNet trained to 94% (400 images, K=32, L80): uncentred 93.8% pseudo-label accuracy (yhat:
  94.2%), centred 7.0% (below chance; with the loss-gradient sign 5.8%); the code's sign 0.0%;
- the mutual information uses the full covariance matrices (the code's diagonal variant is
  identically zero: the diagonal of C_[zs][zs] is the concatenation of the other two). A ridge
  makes the determinants exist when K − 1 < 2L: λ_z = ε·tr(C_zz)/L and λ_s = ε·tr(C_ss)/L
  (scale-free; ε = ``ridge``), added to the diagonal blocks of all three matrices. With the
  matrix determinant lemma every log-determinant is computed on K×K matrices by Cholesky:
  I = ½[logdet(I+A_z) + logdet(I+A_s) − logdet(I+A_z+A_s)], A_z = Z_c Z_cᵀ/((K−1)λ_z), which
  equals the L- and 2L-dimensional formula exactly (see tests) and costs O(K²L) per class.
  The paper writes argmax_d (``MCConfig.mi_pick="max"``), but measured as above argmax picks a
  wrong class almost always (1.0% pseudo-label accuracy) while argmin picks the true one 89.5% of
  the time (ε=1e-3; 92.5% at ε=1e-6): as p_d → 1 the true class's Fisher score vanishes and
  varies least with z under perturbation. The paper's intent is a label estimator, so the
  default is argmin (``mi_pick="min"``); "max" keeps the literal reading for ablations.

MC noise is seeded per image (``image_keys``: a hash of the seed and the image's relative path)
so an image gets the same pseudo-label whatever batch it lands in, on a resumed run or when
its rows are recomputed after the pool changed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alfk_cli.data.inputspec import InputSpec
from alfk_cli.errors import AlfkError
from alfk_cli.features.descriptors import concat_pooled, frozen_eval
from alfk_cli.features.montecarlo import MCConfig  # re-exported: the settings of the MC estimators
from alfk_cli.features.standardize import (
    standardize,  # per vector, per scale slice (docs/algorithm.md §4)
)
from alfk_cli.models.nets import TapNet
from alfk_cli.util.devices import full_precision

# --- yhat and p_yz -----------------------------------------------------------------------------


def yhat(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The model's own prediction: argmax of the logits (``z`` is unused)."""
    return logits.argmax(dim=1)


class NearestReference:
    """p_yz: the true label of the reference (validation) image nearest by standardised z.

    Usable as ``describe_batch``'s ``label_fn``. Exact 1-NN by inner product over the whole
    reference set, as a blocked matrix product + argmax on the device the batch is on (a copy of
    the standardised reference is kept per device). On one CPU core this is 2.3× faster than a
    FAISS ``IndexFlatIP`` search with k=1 (256 queries × 10,000 × 80: 6.9 vs 15.9 ms), and on a
    GPU it avoids a round trip through host memory. Ties go to the lowest reference row.
    """

    def __init__(
        self,
        ref_z: np.ndarray,
        ref_labels: np.ndarray,
        scale_dims: Sequence[int],
        block_elems: int = 1 << 24,
    ):
        ref_labels = np.asarray(ref_labels, dtype=np.int64)
        if len(ref_labels) == 0:
            raise AlfkError("the reference set is empty")
        if (ref_labels < 0).any():
            raise AlfkError(
                "the reference set has images without labels; p_yz needs a labelled validation set"
            )
        if len(ref_z) != len(ref_labels):
            raise ValueError(f"{len(ref_z)} reference vectors but {len(ref_labels)} labels")
        self.scale_dims = list(scale_dims)
        self.labels = ref_labels
        self.block_elems = block_elems  # similarities held at once (queries × reference rows)
        self._ref = {"cpu": torch.from_numpy(standardize(ref_z, self.scale_dims))}
        self._labels = {"cpu": torch.from_numpy(ref_labels)}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._ref:
            self._ref[key] = self._ref["cpu"].to(device)
            self._labels[key] = self._labels["cpu"].to(device)
        return self._ref[key], self._labels[key]

    def _nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best similarity, reference row) of standardised queries q [B, L] (float32)."""
        ref, _ = self._on(q.device)
        step = max(1, self.block_elems // max(1, q.shape[0]))
        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        where = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
        for s in range(0, ref.shape[0], step):
            sim, idx = (q @ ref[s : s + step].T).max(dim=1)
            better = sim > best  # strict: an earlier block keeps a tie
            best = torch.where(better, sim, best)
            where = torch.where(better, idx + s, where)
        return best, where

    def _standardized(self, z: torch.Tensor) -> torch.Tensor:
        q = standardize(z.detach().float().cpu().numpy(), self.scale_dims)
        return torch.from_numpy(q).to(z.device)

    def search(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity [B], reference row [B]) of the nearest reference image of each row of z."""
        sim, idx = self._nearest(self._standardized(torch.as_tensor(np.asarray(z))))
        return sim.numpy(), idx.numpy()

    def __call__(self, z: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        _, idx = self._nearest(self._standardized(z))
        return self._on(z.device)[1][idx]

    def neighbours(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities [B, k], reference rows [B, k]) of the k nearest reference images of each
        row of z, by similarity descending, ties to the lower reference row."""
        q = self._standardized(z)
        ref, _ = self._on(q.device)
        k = min(int(k), ref.shape[0])
        step = max(k, self.block_elems // max(1, q.shape[0]))
        best_s = torch.empty((q.shape[0], 0), device=q.device)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=q.device)
        for s in range(0, ref.shape[0], step):
            sim = q @ ref[s : s + step].T
            # k + 1 per block, so that a tie at the k-th place keeps its lower row in the merge
            top_s, top_i = sim.topk(min(k + 1, sim.shape[1]), dim=1)
            cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + s], 1)
            by_row = torch.argsort(cat_i, dim=1, stable=True)
            cat_s, cat_i = cat_s.gather(1, by_row), cat_i.gather(1, by_row)
            order = torch.argsort(-cat_s, dim=1, stable=True)[:, :k]
            best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        return best_s, best_i

    def soft(self, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``label_fn`` of soft labels [B, D]: each class's share of the k nearest reference
        images (a k-NN estimate of p(y|z)); D is read off the logits."""

        def label_fn(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            _, rows = self.neighbours(z, k)
            labels = self._on(z.device)[1][rows]
            out = torch.zeros((z.shape[0], logits.shape[1]), device=z.device)
            out.scatter_add_(1, labels, torch.ones_like(labels, dtype=out.dtype))
            return out / rows.shape[1]

        return label_fn


# --- Monte-Carlo estimators ---------------------------------------------------------------------


#: Per-image RNG seeds, as :func:`image_keys` makes them (int64 array) or as plain ints.
ImageKeys = Sequence[int] | np.ndarray


def image_keys(seed: int, names: Sequence[str]) -> np.ndarray:
    """One 63-bit RNG seed per image from the run seed and the image's name (relative path)."""
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        h = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "little") >> 1
    return out


def draw_perturbations(
    keys: ImageKeys, cfg: MCConfig, shape: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles in degrees [B, K] and unit Gaussian noise [B, K, C, H, W] for images of
    ``shape`` (C, H, W); image i's come from its own generator seeded by ``keys[i]``.

    Drawn on the CPU and then moved to ``device``: CUDA's generators give other numbers for the
    same seed, and an image's pseudo-label must not depend on where it was embedded.
    """
    k = cfg.samples
    degrees = torch.empty(len(keys), k)
    noise = torch.empty(len(keys), k, *shape)
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(int(key))
        degrees[i] = (torch.rand(k, generator=gen) * 2 - 1) * cfg.max_degrees
        noise[i] = torch.randn(k, *shape, generator=gen)
    return degrees.to(device), noise.to(device)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image [N, C, H, W] about its centre by ``degrees`` [N] (counter-clockwise as
    displayed; bilinear, zero fill)."""
    rad = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(rad)
    # affine_grid maps output to input coordinates (x right, y down): sample the input at the
    # output point rotated clockwise, so the content turns counter-clockwise on screen
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perturb(images: torch.Tensor, keys: ImageKeys, cfg: MCConfig) -> torch.Tensor:
    """K perturbed copies of each image: [B, C, H, W] in [0, 1] -> [B·K, C, H, W] (image-major).

    Each copy is rotated about the image centre by an angle uniform in ±``max_degrees`` degrees,
    then Gaussian noise of std ``noise_std`` is added (not clipped, so it stays zero-mean).
    """
    b, c, h, w = images.shape
    degrees, noise = draw_perturbations(keys, cfg, (c, h, w), images.device)
    x = rotate(images.repeat_interleave(cfg.samples, dim=0), degrees.reshape(-1))
    return x + noise.reshape(b * cfg.samples, c, h, w) * cfg.noise_std


def cross_cov_trace(z: torch.Tensor, s: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """tr C_zs of K paired samples: z, s [n, K, L] -> [n], normalised by K−1.

    ``centered`` subtracts the sample means over K first (the textbook cross-covariance);
    the default is the uncentred cross-moment (see the module notes)."""
    k = z.shape[1]
    if centered:
        z = z - z.mean(dim=1, keepdim=True)
        s = s - s.mean(dim=1, keepdim=True)
    return (z * s).sum(dim=(1, 2)) / (k - 1)


def _ridge_gram(x: torch.Tensor, ridge: float) -> torch.Tensor:
    """A = X_c X_cᵀ / ((K−1)λ) with λ = ridge·tr(C)/L, for x [n, K, L] -> [n, K, K]."""
    xc = x - x.mean(dim=1, keepdim=True)
    gram = xc @ xc.transpose(1, 2)
    tr = gram.diagonal(dim1=1, dim2=2).sum(-1)  # = (K-1)·tr(C)
    scale = torch.where(tr > 0, x.shape[2] / (ridge * tr.clamp_min(1e-300)), torch.zeros_like(tr))
    return gram * scale[:, None, None]


def _logdet_eye_plus(a: torch.Tensor) -> torch.Tensor:
    """log|I + A| of symmetric positive semi-definite A [n, K, K] by Cholesky."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    chol, _ = torch.linalg.cholesky_ex(a + eye)
    return 2 * chol.diagonal(dim1=1, dim2=2).log().sum(-1)


def gaussian_mi(
    z: torch.Tensor, s: torch.Tensor, ridge: float = 1e-3, a_z: torch.Tensor | None = None
) -> torch.Tensor:
    """0.5·log(|C_zz||C_ss|/|C_[zs][zs]|) with the scale-free ridge, z, s [n, K, L] -> [n].

    ``a_z`` may pass a precomputed ``_ridge_gram(z, ridge)`` (it does not depend on the class).
    """
    a_z = _ridge_gram(z, ridge) if a_z is None else a_z
    a_s = _ridge_gram(s, ridge)
    return 0.5 * (_logdet_eye_plus(a_z) + _logdet_eye_plus(a_s) - _logdet_eye_plus(a_z + a_s))


def mc_scores(
    model: TapNet,
    images: torch.Tensor,
    spec: InputSpec,
    taps: Sequence[str],
    keys: ImageKeys,
    cfg: MCConfig = MCConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class MC scores (trace [B, D], mutual information [B, D]; float64, on the CPU).

    ``images`` are uint8 [B, C, H, W] (as decoded, not normalised) on the model's device.
    Images are processed in chunks of b so that one forward holds b·K perturbed copies (at most
    ``cfg.pixel_budget`` input values); each chunk gets one forward and one backward per class.
    """
    if cfg.samples < 2:
        raise AlfkError("Monte-Carlo pseudo-labels need at least 2 samples per image")
    if cfg.mi_pick not in ("max", "min"):
        raise AlfkError(f"mi_pick must be 'max' or 'min', not {cfg.mi_pick!r}")
    b_all, c, h, w = images.shape
    k = cfg.samples
    per_chunk = max(1, cfg.pixel_budget // (k * c * h * w))
    mean = torch.tensor(spec.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, -1, 1, 1)
    traces, mis = [], []
    with frozen_eval(model), torch.enable_grad(), full_precision():
        for start in range(0, b_all, per_chunk):
            x01 = images[start : start + per_chunk].float() / 255.0
            b = x01.shape[0]
            xk = (perturb(x01, keys[start : start + b], cfg) - mean) / std
            logits, feats = model.forward_taps(xk, taps, leaf_first_tap=True)
            z = concat_pooled([f.detach() for f in feats]).double().reshape(b, k, -1)
            logp = torch.log_softmax(logits.float(), dim=1)
            a_z = _ridge_gram(z, cfg.ridge)
            num_classes = logits.shape[1]
            tr = torch.empty(b, num_classes, dtype=torch.float64, device=z.device)
            mi = torch.empty_like(tr)
            for d in range(num_classes):
                # Fisher score of class d: ∂ log p(d|x)/∂tap (the sum separates the images)
                grads = torch.autograd.grad(
                    logp[:, d].sum(), feats, retain_graph=d < num_classes - 1
                )
                s = concat_pooled(grads).double().reshape(b, k, -1)
                tr[:, d] = cross_cov_trace(z, s, cfg.trace_centered)
                mi[:, d] = gaussian_mi(z, s, cfg.ridge, a_z=a_z)
            traces.append(tr.cpu())
            mis.append(mi.cpu())
            del logits, feats, logp
    return torch.cat(traces), torch.cat(mis)


def mc_labels(
    method: str,
    model: TapNet,
    images: torch.Tensor,
    spec: InputSpec,
    taps: Sequence[str],
    keys: ImageKeys,
    cfg: MCConfig = MCConfig(),
) -> torch.Tensor:
    """``mc_trace`` or ``mc_mi`` pseudo-labels [B] (int64, on the images' device)."""
    if method not in ("mc_trace", "mc_mi"):
        raise ValueError(f"{method!r} is not a Monte-Carlo method")
    tr, mi = mc_scores(model, images, spec, taps, keys, cfg)
    if method == "mc_trace":
        return tr.argmax(dim=1).to(images.device)
    return (mi.argmin(dim=1) if cfg.mi_pick == "min" else mi.argmax(dim=1)).to(images.device)


__all__ = [
    "NearestReference",
    "cross_cov_trace",
    "draw_perturbations",
    "gaussian_mi",
    "image_keys",
    "mc_labels",
    "mc_scores",
    "perturb",
    "rotate",
    "yhat",
]
