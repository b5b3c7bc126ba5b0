"""The paper's quantities (SPEC §2), vectorised over checkpoints; numpy in, numpy out.

Nothing here reads files or draws: `specan.analysis` feeds these from the store and
`specan.plots` draws what they return.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "alignment",
    "diagonal_score",
    "effective_rank",
    "normalized_effective_rank",
    "sva",
]

SCORE_TOP = 10  # Eqn 4 and the SVA summary average the first 10 diagonal entries


def effective_rank(sigma: np.ndarray) -> np.ndarray:
    """Roy & Vetterli's effective rank, Eqn 1-2: ``exp(H(p))`` with ``p = σ / Σσ`` (σ, not σ²).

    ``sigma`` is ``[..., R]``; the result is ``[...]``. Zero singular values contribute nothing
    (0 log 0 = 0); an all-zero matrix has effective rank 0.
    """
    s = np.asarray(sigma, dtype=np.float64)
    total = s.sum(axis=-1, keepdims=True)
    p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    h = -terms.sum(axis=-1)
    return np.where(total[..., 0] > 0, np.exp(h), 0.0)


def normalized_effective_rank(sigma: np.ndarray) -> np.ndarray:
    """Effective rank divided by ``R = min(m, n)`` (the length of the σ axis), in (0, 1]."""
    s = np.asarray(sigma)
    return effective_rank(s) / s.shape[-1]


def alignment(prev_left: np.ndarray, next_right: np.ndarray) -> np.ndarray:
    """Eqn 3: ``A = |V_{l+1}ᵀ U_l|``: rows index the next layer's right vectors, columns the
    previous layer's left vectors.

    ``prev_left`` is ``[..., d, k1]`` (columns u_j), ``next_right`` ``[..., d, k2]`` (columns
    v_i); returns ``[..., k2, k1]``. Absolute values because SVD signs are arbitrary.
    """
    return np.abs(np.swapaxes(next_right, -1, -2) @ prev_left)


def sva(u_t: np.ndarray, v_t: np.ndarray, u_ref: np.ndarray, v_ref: np.ndarray) -> np.ndarray:
    """Eqn 5, factorised: ``S_jk = |u_j(t)ᵀ u_k(ref)| · |v_j(t)ᵀ v_k(ref)|``.

    Equal to ``|⟨u_j v_jᵀ, u_k v_kᵀ⟩_F|`` without forming any outer product. Inputs are
    ``[..., m, k]`` and ``[..., n, k]`` (``ref`` broadcasts over leading axes); returns
    ``[..., k, k]``.
    """
    left = np.abs(np.swapaxes(u_t, -1, -2) @ u_ref)
    right = np.abs(np.swapaxes(v_t, -1, -2) @ v_ref)
    return left * right


def diagonal_score(matrix: np.ndarray, top: int = SCORE_TOP) -> np.ndarray:
    """Mean of the first ``top`` diagonal entries (Eqn 4 for alignment, s(t) for SVA)."""
    diag = np.diagonal(matrix, axis1=-2, axis2=-1)
    return diag[..., :top].mean(axis=-1)
