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
    "normalized_effective_rank_bound",
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


def normalized_effective_rank_bound(
    sigma: np.ndarray, tail: np.ndarray | float, rank: int
) -> np.ndarray:
    """Upper bound on the normalized effective rank from the top-k σ and the tail energy: what a
    top-k store reports instead of the exact value (SPEC §2).

    ``sigma`` is ``[..., k]`` (descending, k <= rank), ``tail`` ``[...]`` = T = Σ_{i>k} σ_i²
    (exact, from ‖W‖²_F), ``rank`` R = min(m, n). Returns ``[...]`` float64 in [0, 1]:
    ``exp(H)/R`` of the top-k σ followed by R − k copies of ``c = sqrt(T/(R − k))``.

    Why it bounds from above: for a fixed tail sum t = Σ_{i>k} σ_i the entropy of p = σ/Σσ is
    largest with the tail spread evenly, so H ≤ F(c), the entropy of (σ_1 … σ_k, c … c) with
    c = t/(R − k). dF/dc = ((R−k)/S)·(Σ p_i log x_i − log c) ≥ 0 while c ≤ σ_k. Cauchy–Schwarz
    gives t ≤ sqrt((R − k)·T), so c ≤ sqrt(T/(R − k)), and T ≤ (R − k)·σ_k² keeps that ≤ σ_k,
    where F still increases. The bound is sharp (the flat tail is itself a feasible spectrum),
    exact when T = 0 or the true tail is flat, and 0 for an all-zero matrix. With randomized σ
    (slightly below the true ones) it holds up to their error.

    Tightness (bound / exact − 1, tests/test_metrics.py): random init 0.7–2.4 %, random bulk
    with 3 spikes 1.2–4.2 %, trained-like σ decaying 1 → 1e-4: +3 % at R = 256, k = 128 but
    +79 % at R = 768, k = 128 and +111 % at R = 256, k = 32 — loose unless k covers the decay.
    """
    s = np.clip(np.asarray(sigma, dtype=np.float64), 0, None)
    k = s.shape[-1]
    if k > rank:
        raise ValueError(f"{k} singular values for rank {rank}")
    t = np.clip(np.asarray(tail, dtype=np.float64), 0, None)
    rest = rank - k
    c = np.sqrt(t / rest) if rest else np.zeros_like(t)
    total = s.sum(axis=-1) + rest * c
    safe = np.where(total > 0, total, 1.0)
    p = s / safe[..., None]
    pc = c / safe
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
        tail_term = np.where(pc > 0, rest * pc * np.log(pc), 0.0)
    h = -(plogp + tail_term)
    return np.where(total > 0, np.exp(h) / rank, 0.0)


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
