"""Randomized top-k SVD by randomized block Krylov iteration, batched; one implementation for
torch (CPU and CUDA), CuPy and NumPy arrays (see :mod:`specan_kernels.xp`).

Halko, Martinsson & Tropp (2011) sketch ``Y = A Ω`` and refine it with power iterations, keeping
only the last block ``(AAᵀ)^q A Ω``. Musco & Musco (2015, "Randomized block Krylov methods for
stronger and faster approximate SVD") keep every block: the Rayleigh–Ritz step runs over the
whole Krylov space ``span[AΩ, (AAᵀ)AΩ, …]``, which converges with the square root of the
spectral gap instead of the gap, so a thinner block reaches the same accuracy with fewer
columns multiplied by A. Measured on a 4096×16384 matrix with σᵢ = 1/i, top-128 σ to 1e-3
(2 threads): blocks of 64 reached 3.5e-5 after 12 products with A (768 columns in all), against
8 products of 256 columns (2048) for power iterations with 2k sketch columns. An 800×400 matrix,
top-32 σ in blocks of 16: 5 iterations on a trained-like spectrum (σ from 1 to 1e-4), 13 on a
flat Gaussian one, each within 1e-4 of NumPy (tests/test_kernels.py).

For a tall float32 stack ``A [B, m, n]``:

1. ``Q₀ = orth(A Ω)`` with a Gaussian ``Ω [n, b]``;
2. each iteration: ``Wᵢ = AᵀQᵢ``, then ``Qᵢ₊₁ = orth(A Wᵢ)`` orthogonalised against all earlier
   blocks twice (block classical Gram–Schmidt with re-orthogonalisation: a float32 Krylov basis
   loses orthogonality within a few blocks without it);
3. the Ritz values are the singular values of ``W = [W₀ … Wᵢ] = AᵀQ``, which every iteration
   already holds: they only grow towards the true σ. The loop stops when the top-k Ritz values
   are estimated within ``tol`` (relative) of their limit, or after ``iterations``;
4. vectors: ``W = V Σ Ũᵀ`` gives ``A ≈ Q Wᵀ = (Q Ũ) Σ Vᵀ``.

The tail energy is exact for the data: ``‖A‖²_F − Σ_{i≤k} σ_i²`` (Ritz values are below the true
σ, so the tail is over-, never under-estimated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import xp
from .routes import Array, Decomposition, tail_energy

if TYPE_CHECKING:
    import torch

ITERATIONS = 32  # at most this many Krylov blocks after the first (each: one Aᵀ· and one A·)
TOL = 3e-4  # stop when the top-k Ritz values are estimated within this (relative) of σ


def _orth(x: Array) -> Array:
    return xp.namespace(x).linalg.qr(x)[0]


def _ritz(gram: Array, k: int) -> Array:
    """Top-k singular values of ``W`` from its float64 Gram matrix ``WᵀW [B, L, L]``, descending."""
    ns = xp.namespace(gram)
    lam = ns.flip(ns.linalg.eigvalsh(gram), (-1,))
    return ns.sqrt(ns.clip(lam, 0, None))[..., :k]


def _grow(gram: Array | None, ws: list[Array]) -> Array:
    """``WᵀW`` of ``W = [W₀ … Wᵢ]`` from that of ``[W₀ … Wᵢ₋₁]``: only the new block's products
    (n·L·b flops instead of n·L² for the whole Gram every iteration)."""
    # products in float64: the Gram of the float32 W exactly (to eps64), so that its
    # eigenvectors are W's right singular vectors as accurately as an SVD of W would give them
    new = xp.as_f64(ws[-1])
    if gram is None:
        return xp.mT(new) @ new
    ns = xp.namespace(new)
    cross = xp.mT(xp.as_f64(ns.concatenate(ws[:-1], -1))) @ new  # [B, L_old, b]
    top = ns.concatenate([gram, cross], -1)
    bottom = ns.concatenate([xp.mT(cross), xp.mT(new) @ new], -1)
    return ns.concatenate([top, bottom], -2)


def default_block(k: int) -> int:
    """Block width for top-k: k/2 (measured fastest at k = 128 against k/4, k and k + 16)."""
    return max(8, (k + 1) // 2)


def randomized_svd(
    a: Array,
    k: int,
    vectors: bool = True,
    *,
    block: int | None = None,
    iterations: int = ITERATIONS,
    tol: float | None = TOL,
    generator: torch.Generator | None = None,
) -> tuple[Decomposition, int]:
    """Top-k singular values (and vectors) of every matrix in a tall float32 stack.

    Parameters
    ----------
    a
        ``[B, m, n]`` float32 with ``m >= n``: a torch tensor (CPU or CUDA), a NumPy or a CuPy
        array; the results are arrays of the same library.
    k
        Number of singular triplets, ``1 <= k <= n``.
    block
        Columns per Krylov block; None: :func:`default_block`. The basis never grows past n
        columns (there the Rayleigh–Ritz step is exact).
    iterations
        Most blocks after the first; 0 is the plain range finder with a block of
        ``max(block, k)`` columns.
    tol
        Stop once the top-k Ritz values are estimated within this relative amount of their
        limit; None always runs ``iterations``.
    generator
        For the Gaussian test matrix of a torch input (seeded from 0 when None, so results are
        repeatable; NumPy and CuPy inputs are always seeded from 0).

    Returns
    -------
    Decomposition, int
        σ ``[B, k]``, U ``[B, m, k]``, V ``[B, n, k]`` (None without vectors), the tail energy,
        and the number of iterations that ran.
    """
    b, m, n = a.shape
    k = max(1, min(k, n))
    width = default_block(k) if block is None else max(1, int(block))
    if iterations == 0:
        width = max(width, k)
    width = min(width, n)
    ns = xp.namespace(a)
    omega = xp.gaussian(a, (b, n, width), generator)
    qs = [_orth(a @ omega)]
    ws = [xp.mT(a) @ qs[0]]
    ritz, last, done = None, None, 0
    gram = _grow(None, ws)
    while True:
        cols = sum(q.shape[-1] for q in qs)
        if cols >= k:
            new = _ritz(gram, k)
            if ritz is not None and tol is not None:
                # Ritz values rise towards σ; from two successive steps δ the remaining error is
                # about δ·ρ/(1 − ρ) with ρ = δ/δ_prev (Aitken). Krylov convergence speeds up as
                # it goes, so this overestimates it: the stop comes at most a block late.
                step = abs(new - ritz) / ns.clip(new, 1e-30, None)
                rho = 0.5
                if last is not None:
                    rho = ns.clip(step / ns.clip(last, 1e-30, None), 0, 0.99)
                if float((step * rho / (1 - rho)).max()) < tol:
                    break
                last = step
            ritz = new
        if done >= iterations or cols >= n:
            break
        y = a @ ws[-1]
        basis = ns.concatenate(qs, -1)
        for _ in range(2):  # block classical Gram-Schmidt, twice is enough
            y = y - basis @ (xp.mT(basis) @ y)
        y = y[..., : min(width, n - cols)]
        qs.append(_orth(y))
        ws.append(xp.mT(a) @ qs[-1])
        gram = _grow(gram, ws)
        done += 1
    if vectors:
        # W = AᵀQ = V Σ Ũᵀ, so A ≈ Q Wᵀ = (Q Ũ) Σ Vᵀ; Ũ and Σ from the float64 Gram WᵀW the
        # loop already holds (an L x L eigenproblem instead of an SVD of the n x L W: 28 ms
        # against 90 ms at n = 4096, L = 384), then V = W Ũ Σ⁻¹.
        lam, vecs = ns.linalg.eigh(gram)
        lam, vecs = ns.flip(lam, (-1,))[..., :k], ns.flip(vecs, (-1,))[..., :k]
        s64 = ns.sqrt(ns.clip(lam, 0, None))
        sigma = xp.as_f32(s64)
        u = xp.contiguous(ns.concatenate(qs, -1) @ xp.as_f32(vecs))
        w = xp.as_f64(ns.concatenate(ws, -1))
        # a zero σ (a matrix of rank below k) leaves its v undefined: 0, not a division by 0
        inv = ns.where(s64 > 0, 1 / ns.where(s64 > 0, s64, 1), 0)
        v = xp.contiguous(xp.as_f32((w @ vecs) * inv[..., None, :]))
    else:
        sigma, u, v = xp.as_f32(_ritz(gram, k)), None, None
    dec = Decomposition(sigma, u, v, tail_energy(a, sigma, k), ["randomized"] * b)
    return dec, done
