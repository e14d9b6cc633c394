"""Last-layer gradient embeddings and BADGE's k-means++ seeding (docs/algorithm.md §9).

BADGE (Ash et al., ICLR 2020) embeds an image by the gradient of the cross-entropy at the model's
own prediction ŷ = argmax p with respect to the last linear layer's weights W [D, F]:

    ∂CE(f(x), ŷ)/∂W = (p − e_ŷ) ⊗ a        (a: the F penultimate features, the layer's input)

a D·F vector. alfk never materialises it: an embedding is held factored, as the pair (r, b) with
r = p − e_y [n, D] and b = a [n, F], because every quantity the strategies need is an inner
product, and <r₁ ⊗ b₁, r₂ ⊗ b₂> = <r₁, r₂>·<b₁, b₂>. SIMILAR's ``bias_linear`` embedding (DISTIL)
also holds the bias gradient p − e_y, which is the same outer product with b = [a, 1].

Memory is O(n·(D + F)) instead of O(n·D·F); k-means++ costs O(n·P·(D + F)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alfk_cli.errors import AlfkError

__all__ = ["CHUNK", "GradEmbedding", "grad_embedding", "kmeanspp_rows"]

#: Rows processed at once by the chunked products (bounded temporary memory).
CHUNK = 65536


@dataclass(frozen=True)
class GradEmbedding:
    """n embeddings r_i ⊗ b_i, held factored: ``r`` [n, D] float64, ``b`` [n, F]."""

    r: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return int(self.r.shape[0])

    def take(self, rows: np.ndarray | slice) -> GradEmbedding:
        return GradEmbedding(self.r[rows], self.b[rows])

    def dense(self) -> np.ndarray:
        """The materialised [n, D·F] vectors, index d·F + f (for tests and tiny sets)."""
        return np.einsum("nd,nf->ndf", self.r, self.b.astype(np.float64)).reshape(len(self), -1)

    def sq_norms(self) -> np.ndarray:
        """‖r_i ⊗ b_i‖² = ‖r_i‖²·‖b_i‖², float64 [n]."""
        return _rowdot(self.r, self.r) * _rowdot(self.b, self.b)

    def dots(self, other: GradEmbedding) -> np.ndarray:
        """Inner products [n, m] with another set, float64, computed in row chunks."""
        out = np.empty((len(self), len(other)))
        rq, bq = other.r.astype(np.float64), other.b.astype(np.float64)
        for s in range(0, len(self), CHUNK):
            e = s + CHUNK
            out[s:e] = (self.r[s:e] @ rq.T) * (self.b[s:e].astype(np.float64) @ bq.T)
        return out


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x64, y64 = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.einsum("ij,ij->i", x64, y64)


def grad_embedding(
    probs: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    bias: bool = False,
) -> GradEmbedding:
    """The last-layer cross-entropy gradient of each image, factored.

    ``probs`` [n, D] softmax outputs, ``features`` [n, F] the classifier's input; ``labels`` the
    class the loss is taken at (None: the prediction argmax p, first maximum on ties, as BADGE
    does for unlabelled images). ``bias`` appends the bias gradient (b = [a, 1]).
    """
    p = np.asarray(probs, dtype=np.float64)
    a = np.asarray(features)
    if p.ndim != 2 or a.ndim != 2 or p.shape[0] != a.shape[0]:
        raise AlfkError(f"probabilities {p.shape} and features {a.shape} do not match")
    y = p.argmax(axis=1) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) != len(p) or (len(y) and (y.min() < 0 or y.max() >= p.shape[1])):
        raise AlfkError("a label is outside the model's classes")
    r = p.copy()
    r[np.arange(len(y)), y] -= 1.0
    if bias:
        a = np.concatenate([a, np.ones((len(a), 1), dtype=a.dtype)], axis=1)
    return GradEmbedding(r, a)


def kmeanspp_rows(emb: GradEmbedding, P: int, seed: int) -> np.ndarray:
    """BADGE's k-means++ seeding (``init_centers``): P distinct rows of ``emb`` in pick order.

    The first centre is the row of largest norm (ties to the smaller row); each further centre is
    drawn with probability proportional to its squared Euclidean distance to the nearest chosen
    centre, by inverse CDF on one ``numpy.random.default_rng(seed).random()`` draw per pick.
    Chosen rows have weight exactly 0 and are never drawn again. When every row left coincides
    with a centre (total weight 0; BADGE's code stops in the debugger there), the draw is uniform
    among the rows not yet chosen.
    """
    n, P = len(emb), int(P)
    if P < 0 or P > n:
        raise AlfkError(f"cannot pick {P} of {n} rows")
    if P == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    norms = emb.sq_norms()
    first = int(np.argmax(norms))
    picked = [first]
    taken = np.zeros(n, dtype=bool)
    d2 = np.full(n, np.inf)
    while True:
        c = picked[-1]
        taken[c] = True
        new = norms + norms[c] - 2.0 * emb.dots(emb.take(np.array([c])))[:, 0]
        np.minimum(d2, np.maximum(new, 0.0), out=d2)
        d2[taken] = 0.0
        if len(picked) == P:
            break
        picked.append(_draw(d2, taken, rng))
    return np.asarray(picked, dtype=np.int64)


def _draw(weights: np.ndarray, taken: np.ndarray, rng: np.random.Generator) -> int:
    """One row drawn with probability ∝ ``weights`` by inverse CDF (uniform over the rows not
    taken when every weight is 0)."""
    cum = np.cumsum(weights)
    total = float(cum[-1])
    u = rng.random()
    if not total > 0.0:
        free = np.flatnonzero(~taken)
        return int(free[min(int(u * len(free)), len(free) - 1)])
    i = int(np.searchsorted(cum, u * total, side="right"))
    if i >= len(weights):  # u·total rounded up to the total
        i = int(np.flatnonzero(weights > 0)[-1])
    return i
