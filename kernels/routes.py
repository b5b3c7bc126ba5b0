"""Dense SVD routes in plain torch, shared by every torch backend (CPU and CUDA).

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
* ``gram32-evr`` / ``gram64-evr`` (CPU only): as above, but only the top-k eigenvectors are
  computed (LAPACK ``syevr`` through SciPy, beside torch's ``eigvalsh`` for all λ), which pays off
  when k ≪ n and n is large (2048: the full ``eigh`` costs ~3x ``eigvalsh``).

Threads: every route runs on torch's intra-op thread pool (and SciPy's BLAS pool for ``-evr``,
limited to the same count); ``specan_kernels.svd(threads=...)`` sets it for one call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# gram32: σᵢ error ≈ c·eps32·σ₁²/σᵢ with c ≤ 0.4 measured (MKL sgemm; 768-column Grams of up to
# 50304 rows, random and decaying spectra), so every σ meets max(1e-4·σᵢ, 1e-5·σ₁) while
# σ_min ≥ 0.02·σ₁ (there the error is ≈ 3e-6·c·σ₁, inside 1e-5·σ₁ up to c ≈ 3). 0.02 is far
# above the noise floor sqrt(eps32)·σ₁ ≈ 2.4e-4·σ₁ that a rank-deficient matrix's computed σ_min
# sits at, so a computed ratio above it proves the true one is there too.
GRAM32_MIN_RATIO = 2e-2
# gram64 vectors: U = A v / σ has error ≈ eps32·σ₁/σₖ from the float32 data; at 1e-4 that is
# ~1e-3 in angle, inside the |cos| ≥ 0.999 contract.
GRAM_VEC_FLOOR = 1e-4

DENSE_ROUTES = ("gesdd", "gram32", "gram64", "gram32-evr", "gram64-evr")


@dataclass
class Decomposition:
    """What a route returns for a tall stack (all float32 except ``tail``).

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

    sigma: torch.Tensor
    U: torch.Tensor | None
    V: torch.Tensor | None
    tail: torch.Tensor
    routes: list[str]


def frobenius_sq(a: torch.Tensor) -> torch.Tensor:
    """``‖A‖²_F`` per matrix, accumulated in float64: ``[B]``."""
    return torch.linalg.vector_norm(a, dim=(-2, -1), dtype=torch.float64).square()


def tail_energy(a: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """``‖A‖²_F − Σ_{i≤k} σ_i²`` in float64, clamped at 0 (rounding can push it below)."""
    top = sigma[..., :k].double().square().sum(-1)
    return (frobenius_sq(a) - top).clamp_min(0)


def gesdd(a: torch.Tensor, k: int, vectors: bool) -> Decomposition:
    """Thin SVD with LAPACK (cuSOLVER on CUDA) via torch."""
    if not vectors:
        s = torch.linalg.svdvals(a)
        return Decomposition(s, None, None, tail_energy(a, s, k), ["gesdd"] * len(a))
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    # Slice then copy: callers may keep these for a long time, and a view would pin the full U.
    u, v = u[..., :k].contiguous(), vh[..., :k, :].mT.contiguous()
    return Decomposition(s, u, v, tail_energy(a, s, k), ["gesdd"] * len(a))


def _top_eigvecs_scipy(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors of each float64 matrix in ``gram`` (CPU), descending, ``[B, n, k]``."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    n = gram.shape[-1]
    out = torch.empty(*gram.shape[:-1], k, dtype=torch.float64)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for i, g in enumerate(gram.numpy()):
            _, w = scipy.linalg.eigh(g, subset_by_index=[n - k, n - 1], driver="evr")
            out[i] = torch.from_numpy(w[:, ::-1].copy())
    return out


def _gram32_syrk(a: torch.Tensor) -> torch.Tensor:
    """``AᵀA`` of each float32 CPU matrix with BLAS ``ssyrk``, as float64 ``[B, n, n]``.

    syrk computes one triangle, half the flops of ``a.mT @ a`` (0.16 s against 0.31 s for a
    50304 x 768 embedding on this project's 2-core CPU); a C-contiguous (m, n) matrix is the
    Fortran-ordered (n, m) ``Aᵀ`` that syrk takes without a copy. Only the lower triangle is
    filled: `eigh` and `eigvalsh` read only that one (UPLO="L", torch's default).
    """
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    out = torch.empty(a.shape[0], a.shape[-1], a.shape[-1], dtype=torch.float64)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for i, m in enumerate(a.contiguous().numpy()):
            out[i] = torch.from_numpy(blas.ssyrk(1.0, m.T, trans=0, lower=1))
    return out


def gram(a: torch.Tensor, k: int, vectors: bool, *, double: bool, evr: bool = False):
    """σ (and top-k vectors) from the eigendecomposition of ``AᵀA``, without fallbacks.

    Returns
    -------
    sigma, U, V
        float64 σ ``[B, n]``; float32 U, V (None without vectors).
    """
    if double:
        a64 = a.double()
        g = a64.mT @ a64
    elif a.device.type == "cpu":
        g = _gram32_syrk(a)
    else:
        g = (a.mT @ a).double()
    if not vectors or k == 0:
        lam = torch.linalg.eigvalsh(g)
        # eigvalsh is ascending; tiny negative λ are rounding of a PSD matrix, hence the clamp.
        sigma = lam.flip(-1).clamp_min(0).sqrt()
        if not vectors:
            return sigma, None, None
        b, m, n = a.shape
        return sigma, a.new_zeros(b, m, 0), a.new_zeros(b, n, 0)
    if evr and g.device.type == "cpu":
        lam = torch.linalg.eigvalsh(g)
        v = _top_eigvecs_scipy(g, k)
    else:
        lam, vecs = torch.linalg.eigh(g)
        v = vecs.flip(-1)[..., :k]
    sigma = lam.flip(-1).clamp_min(0).sqrt()
    sk = sigma[..., :k]
    # A zero σ makes u undefined (inf/nan here); callers replace such matrices (see run_dense).
    if double:
        u = (a64 @ v) / sk.unsqueeze(-2)
    else:
        u = (a @ v.float()).double() / sk.unsqueeze(-2)
    return sigma, u.float(), v.float()


def run_dense(a: torch.Tensor, route: str, k: int, vectors: bool) -> Decomposition:
    """Run one dense route on a tall float32 stack, redoing the matrices it cannot do accurately.

    ``gram32`` hands matrices with ``σ_min < GRAM32_MIN_RATIO·σ₁`` to ``gram64`` (same eigensolver
    flavour); ``gram64`` hands matrices whose k-th σ is below ``GRAM_VEC_FLOOR·σ₁`` to ``gesdd``
    when vectors are asked for.
    """
    if route == "gesdd":
        return gesdd(a, k, vectors)
    if route not in DENSE_ROUTES:
        raise ValueError(f"unknown dense route {route!r}; choose one of {', '.join(DENSE_ROUTES)}")
    evr = route.endswith("-evr")
    double = route.startswith("gram64")
    sigma, u, v = gram(a, k, vectors, double=double, evr=evr)
    s1 = sigma[..., 0]
    if not double:
        bad = ~((sigma[..., -1] >= GRAM32_MIN_RATIO * s1) & (s1 > 0))
        redo = "gram64-evr" if evr else "gram64"
    elif vectors and k > 0:
        bad = ~((sigma[..., k - 1] >= GRAM_VEC_FLOOR * s1) & (s1 > 0))
        redo = "gesdd"
    else:
        bad = torch.zeros_like(s1, dtype=torch.bool)
        redo = route
    sigma = sigma.float()
    routes = [route] * len(a)
    idx = bad.nonzero().flatten()
    if idx.numel():
        logger.debug("%s: %d of %d matrices redone with %s", route, idx.numel(), len(a), redo)
        sub = run_dense(a[idx], redo, k, vectors)
        sigma[idx] = sub.sigma
        if vectors:
            u[idx], v[idx] = sub.U, sub.V
        for j, name in zip(idx.tolist(), sub.routes, strict=True):
            routes[j] = name
    return Decomposition(sigma, u, v, tail_energy(a, sigma, k), routes)
