"""Dense SVD routes, shared by every backend (torch on CPU and CUDA, CuPy).

Each route takes a stack that is already float32 and tall (``[B, m, n]``, ``m >= n``) and returns
a :class:`Decomposition`: all ``n`` singular values, the top-k vectors, the tail energy
``‖A‖²_F − Σ_{i≤k} σ_i²`` and the name of the route that produced each matrix.

* ``gesdd``: ``torch.linalg.svd(full_matrices=False)`` / ``torch.linalg.svdvals``. Accurate on every
  spectrum (σ error ≈ eps32·σ₁), the reference the others fall back to.
* ``gram32``: ``G = AᵀA`` in float32, its eigenvalues (and vectors) in float64, ``σ = sqrt(λ)``,
  ``U = A V / σ``. Forming G is one float32 matrix multiply, half the cost of a float64 one, but
  its rounding (≈ eps32·σ₁² in λ) makes σᵢ wrong by ≈ eps32·σ₁²/σᵢ: accurate only while the
  smallest σ is not too small. The route checks that on its own result: a matrix whose computed
  ``σ_min / σ₁ < GRAM32_MIN_RATIO`` is redone with ``gram64``.
* ``gram64``: the same with G formed in float64 from the float32 data (products of float32 are
  exact in float64), so λ is right to ≈ eps64·σ₁² and σ to far below the float32 rounding of the
  data on every spectrum. Vectors are the weak point: ``U = A v / σ`` loses accuracy as σ → 0, so
  a matrix whose k-th σ is below ``GRAM_VEC_FLOOR·σ₁`` is redone with ``gesdd`` when vectors are
  asked for.

For torch CPU tensors the Gram matrices come from BLAS ``syrk`` and the eigenproblems from LAPACK
(one tridiagonal reduction, then every eigenvalue and only the top-k eigenvectors), both SciPy's,
called without holding the GIL (:mod:`specan_kernels.lapack`). Everything else (torch CUDA
tensors, CuPy arrays, NumPy arrays) runs one array-generic code path (:mod:`specan_kernels.xp`):
a batched matrix product and the library's batched ``eigh``. NumPy runs it on a CPU, so CI tests
the code that the GPU backends run; results come back in the input's library.

Threads: every route runs on torch's intra-op thread pool and SciPy's BLAS pool, limited to the
same count (:mod:`specan_kernels.threads`); ``specan_kernels.svd(threads=...)`` sets it for one
call. On the CPU the Gram routes spend a budget of several threads on the matrices of a stack
side by side, one BLAS thread each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import lapack, threads, xp

logger = logging.getLogger(__name__)

# A torch tensor, NumPy or CuPy array (see specan_kernels.xp).
Array = Any

# gram32: σᵢ error ≈ c·eps32·σ₁²/σᵢ with c ≤ 0.4 measured (MKL sgemm; 768-column Grams of up to
# 50304 rows, random and decaying spectra), so every σ meets max(1e-4·σᵢ, 1e-5·σ₁) while
# σ_min ≥ 0.02·σ₁ (there the error is ≈ 3e-6·c·σ₁, inside 1e-5·σ₁ up to c ≈ 3). 0.02 is far
# above the noise floor sqrt(eps32)·σ₁ ≈ 2.4e-4·σ₁ that a rank-deficient matrix's computed σ_min
# sits at, so a computed ratio above it proves the true one is there too.
GRAM32_MIN_RATIO = 2e-2
# gram64 vectors: U = A v / σ has error ≈ eps32·σ₁/σₖ from the float32 data; at 1e-4 that is
# ~1e-3 in angle, inside the |cos| ≥ 0.999 contract.
GRAM_VEC_FLOOR = 1e-4

# gram32's eigenproblem in float32, for spectra with σ_min ≥ EIG32_MIN_RATIO·σ₁. Measured (float32
# Gram and eigenproblem, against float64 NumPy; 4n x n matrices): the worst σ error at n = 768 is
# 0.12 of the contract max(1e-4·σᵢ, 1e-5·σ₁) at a ratio of 0.15, 0.62 at 0.02 and 1.0-3.1 below
# 0.01 (values clustered at the bottom of the spectrum, where the error relative to σᵢ is
# largest). The ratio is checked on the computed σ (their error there is far below the margin);
# the Cholesky pre-test asks 10 % more (EIG32_MARGIN) because its λ₁ is estimated from below.
# Worth it from n = 64 on: the reduction streams the matrix once per column, and float32 halves
# that (Pythia-160m-shaped views: 39 -> 23 ms each for every σ, 62 -> 40 ms with the top 128
# vectors).
EIG32_MIN_RATIO = 0.15
EIG32_MARGIN = 1.1
EIG32_MIN_N = 64

DENSE_ROUTES = ("gesdd", "gram32", "gram64")


@dataclass
class Decomposition:
    """What a route returns for a tall stack (all float32 except ``tail``), as arrays of the
    input's library (torch, NumPy or CuPy).

    Attributes
    ----------
    sigma
        ``[B, n]`` descending (``[B, k]`` for the randomized route).
    U, V
        ``[B, m, k]``, ``[B, n, k]`` or None when vectors were not asked for.
    tail
        ``[B]`` float64, ``‖A‖²_F − Σ_{i≤k} σ_i²`` (clamped at 0).
    routes
        Route that produced each matrix (a fallback names the route that redid it).
    """

    sigma: Array
    U: Array | None
    V: Array | None
    tail: Array
    routes: list[str]


def tail_energy(a: Array, sigma: Array, k: int, energy: Array | None = None) -> Array:
    """``‖A‖²_F − Σ_{i≤k} σ_i²`` in float64, clamped at 0 (rounding can push it below);
    ``energy``: ``‖A‖²_F`` where the caller already has it."""
    top = xp.as_f64(sigma[..., :k])
    top = (top * top).sum(-1)
    energy = xp.frobenius_sq(a) if energy is None else energy
    return xp.namespace(a).clip(energy - top, 0, None)


def gesdd(a: Array, k: int, vectors: bool) -> Decomposition:
    """Thin SVD by the array library's own SVD: LAPACK gesdd on the CPU (torch, NumPy),
    cuSOLVER on CUDA (torch: gesvdj; CuPy: gesvd)."""
    if not vectors:
        s = xp.svdvals(a)
        return Decomposition(s, None, None, tail_energy(a, s, k), ["gesdd"] * len(a))
    u, s, vh = xp.namespace(a).linalg.svd(a, full_matrices=False)
    # Slice then copy: callers may keep these for a long time, and a view would pin the full U.
    u, v = xp.contiguous(u[..., :k]), xp.contiguous(xp.mT(vh[..., :k, :]))
    return Decomposition(s, u, v, tail_energy(a, s, k), ["gesdd"] * len(a))


def _gram_one(m: np.ndarray) -> np.ndarray:
    """``AᵀA`` of one CPU matrix with BLAS ``syrk`` in its precision (float32 or float64):
    ``[n, n]``, the Fortran lower triangle filled (see :mod:`specan_kernels.lapack`).

    syrk computes one triangle, half the flops of ``a.mT @ a`` (0.16 s against 0.31 s for a
    50304 x 768 float32 embedding on this project's 2-core CPU; float64: 0.75 s against 1.45 s),
    and is called without holding the GIL, so pipeline threads overlap. A wide weight's
    transpose is read in place (Fortran-ordered).
    """
    if not (m.flags.c_contiguous or m.flags.f_contiguous):
        m = np.ascontiguousarray(m)
    n = m.shape[-1]
    return lapack.syrk(m, np.zeros((n, n), dtype=m.dtype))


def _lambda_max(g: np.ndarray, steps: int = 8) -> float:
    """An estimate of the largest eigenvalue of a symmetric matrix given by its C upper
    triangle (as `_gram_one` writes it): the Rayleigh quotient after a few power steps, from
    below (a few per cent low on the clustered top of a random-init spectrum). The products
    are SciPy's BLAS (`lapack.symv`) and the reductions plain NumPy, not NumPy's BLAS."""
    x = np.full(len(g), 1 / np.sqrt(len(g)), dtype=g.dtype)
    lam = 0.0
    for _ in range(steps):
        y = lapack.symv(g, x)
        with np.errstate(over="ignore"):
            lam, norm = float(np.sum(x * y)), float(np.sqrt(np.sum(y * y)))
        if not np.isfinite(norm):  # squares past float32's range: a Gram of 1e19 and up
            y64 = y.astype(np.float64)
            lam, norm = float(np.dot(x, y64)), float(np.sqrt(np.dot(y64, y64)))
        if norm == 0:
            return 0.0
        x = y / norm
    return lam


def _eig_one(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigenvalues and top-k eigenvectors of one Gram matrix from `_gram_one`, in float64; a
    float32 Gram whose spectrum is well conditioned in float32 (see ``EIG32_MIN_RATIO``)."""
    if not np.isfinite(np.diagonal(g)).all():  # |g_ij| <= sqrt(g_ii g_jj): the rest is finite
        # a float32 Gram out of range (‖A‖²_F past 3.4e38: entries of 1e20 and up) gives NaN,
        # as the libraries' eigensolvers do, and run_dense's check hands the matrix to gram64
        n = len(g)
        return np.full(n, np.nan), np.full((n, k), np.nan) if k else None
    if g.dtype == np.float32 and len(g) >= EIG32_MIN_N:
        # a Cholesky test first, so that a matrix that would fail the check after the float32
        # eigenproblem costs ~2 ms instead of the float32 eigenproblem
        lam1 = _lambda_max(g)
        if lam1 > 0 and lapack.exceeds(g, (EIG32_MIN_RATIO * EIG32_MARGIN) ** 2 * lam1):
            w, z = lapack.eigh_top(g.copy(), k)  # a copy: the float64 redo needs the Gram
            # (float32 inverse iteration overflows on a Gram of 1e30: vectors of inf and NaN)
            finite = z is None or bool(np.isfinite(z).all())
            if finite and w[0] > 0 and w[-1] >= EIG32_MIN_RATIO**2 * w[0]:
                return w.astype(np.float64), None if z is None else z.astype(np.float64)
    return lapack.eigh_top(np.ascontiguousarray(g, dtype=np.float64), k)


def _gram_eig_cpu(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (descending ``[B, n]``) and top-k eigenvectors (``[B, n, k]``, or None for
    k = 0) of ``AᵀA`` for each CPU matrix: `_gram_one`, then `_eig_one` (one tridiagonal
    reduction for the values and the top-k vectors, GIL released).

    In float64, except a float32 Gram whose spectrum proves well conditioned (`_eig_one`,
    ``EIG32_MIN_RATIO``): far below it (σ_min < 0.01·σ₁) a float32 eigenproblem breaks the σ
    contract of ``gram32`` on values clustered at the bottom of the spectrum.

    With a budget of several threads (torch's count in this thread) the matrices of a stack
    run side by side, one BLAS thread each: the reduction of an n = 768 Gram gains nothing
    from a second OpenBLAS thread (12 x 2304 x 768: 0.59 s with two against 0.50 s with one),
    two at a time halve it.
    """
    data = a.numpy()  # strided as it is: a wide weight's transpose is Fortran-ordered
    b, _, n = data.shape
    lam = np.empty((b, n))
    vecs = np.empty((b, n, k)) if k else None

    def one(i: int) -> None:
        w, z = _eig_one(_gram_one(data[i]), k)
        lam[i] = w
        if vecs is not None:
            vecs[i] = z

    workers = min(b, torch.get_num_threads())
    if workers < 2:
        for i in range(b):
            one(i)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with threads.one_blas_thread(), ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(b)))
    return torch.from_numpy(lam), None if vecs is None else torch.from_numpy(vecs)


def _eig(g: Array, k: int) -> tuple[Array, Array | None]:
    """Descending eigenvalues and top-k eigenvectors (None for k = 0) of a float64 stack, with
    the array library's batched symmetric eigensolver (torch: cuSOLVER syevd per matrix above
    32 x 32; CuPy: batched syevj; NumPy: LAPACK per matrix)."""
    ns = xp.namespace(g)
    if not k:
        return ns.flip(ns.linalg.eigvalsh(g), (-1,)), None
    lam, vecs = ns.linalg.eigh(g)
    return ns.flip(lam, (-1,)), ns.flip(vecs, (-1,))[..., :k]


def gram(a: Array, k: int, vectors: bool, *, double: bool):
    """σ (and top-k vectors) from the eigendecomposition of ``AᵀA``, without fallbacks.

    The eigenproblem is float64 everywhere. A torch CPU tensor takes BLAS ``syrk`` and LAPACK
    (:mod:`specan_kernels.lapack`, one matrix at a time, measured fastest there); anything
    else (torch on CUDA, CuPy, NumPy) a batched matrix product and the library's batched
    ``eigh``: one code path, so NumPy on a CPU checks what CUDA runs.

    Returns
    -------
    sigma, U, V
        float64 σ ``[B, n]``; float32 U, V (None without vectors).
    """
    kk = k if vectors else 0
    a64 = xp.as_f64(a) if double else None  # once: the Gram and U = A v both take it
    if xp.is_torch(a) and a.device.type == "cpu":
        lam, v = _gram_eig_cpu(a64 if double else a, kk)
    else:
        g = xp.mT(a64) @ a64 if double else xp.as_f64(xp.mT(a) @ a)
        lam, v = _eig(g, kk)
    ns = xp.namespace(lam)
    # tiny negative λ are rounding of a PSD matrix, hence the clip
    sigma = ns.sqrt(ns.clip(lam, 0, None))
    if not vectors:
        return sigma, None, None
    if not kk:
        b, m, n = a.shape
        return sigma, xp.zeros(a, (b, m, 0)), xp.zeros(a, (b, n, 0))
    # A zero σ leaves u undefined (0 here, not a division by zero); run_dense redoes every
    # matrix with one among the top k (needs_redo).
    sk = ns.where(sigma > 0, sigma, ns.inf)[..., :kk][..., None, :]
    if double:
        u = (a64 @ xp.as_f64(v)) / sk
    else:
        u = xp.as_f64(a @ xp.as_f32(v)) / sk
    return sigma, xp.as_f32(u), xp.as_f32(v)


def needs_redo(sigma: Array, k: int, vectors: bool, *, double: bool) -> Array | None:
    """Which matrices a Gram route cannot vouch for (a bool ``[B]``), from its own float64 σ;
    None when there is nothing to check.

    float32 Gram: ``σ_min < GRAM32_MIN_RATIO·σ₁``; float64 Gram with vectors: the k-th σ below
    ``GRAM_VEC_FLOOR·σ₁``. A zero matrix (σ₁ = 0) is always redone, and so is NaN σ (a float32
    Gram out of range).
    """
    s1 = sigma[..., 0]
    if not double:
        return ~((sigma[..., -1] >= GRAM32_MIN_RATIO * s1) & (s1 > 0))
    if vectors and k > 0:
        return ~((sigma[..., k - 1] >= GRAM_VEC_FLOOR * s1) & (s1 > 0))
    return None


def run_dense(a: Array, route: str, k: int, vectors: bool) -> Decomposition:
    """Run one dense route on a tall float32 stack, redoing the matrices it cannot do accurately.

    ``gram32`` hands matrices with ``σ_min < GRAM32_MIN_RATIO·σ₁`` to ``gram64``; ``gram64``
    hands matrices whose k-th σ is below ``GRAM_VEC_FLOOR·σ₁`` to ``gesdd`` when vectors are
    asked for.
    """
    if route == "gesdd":
        return gesdd(a, k, vectors)
    if route not in DENSE_ROUTES:
        raise ValueError(f"unknown dense route {route!r}; choose one of {', '.join(DENSE_ROUTES)}")
    double = route == "gram64"
    sigma, u, v = gram(a, k, vectors, double=double)
    bad = needs_redo(sigma, k, vectors, double=double)
    redo = "gesdd" if double else "gram64"
    sigma = xp.as_f32(sigma)
    routes = [route] * len(a)
    idx = xp.nonzero(bad) if bad is not None else []
    if len(idx):
        logger.debug("%s: %d of %d matrices redone with %s", route, len(idx), len(a), redo)
        sub = run_dense(a[idx], redo, k, vectors)
        sigma[idx] = sub.sigma
        if vectors:
            u[idx], v[idx] = sub.U, sub.V
        for j, name in zip(idx.tolist(), sub.routes, strict=True):
            routes[j] = name
    return Decomposition(sigma, u, v, tail_energy(a, sigma, k), routes)
