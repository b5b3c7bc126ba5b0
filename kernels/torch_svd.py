"""Batched thin SVD routines in plain torch, shared by the CPU and CUDA backends.

Two routes, both on a stack that is already float32 and tall (``m >= n``):

* ``gesdd``: ``torch.linalg.svd(full_matrices=False)`` / ``torch.linalg.svdvals``.
* ``gram``: ``G = AᵀA`` in float64, ``eigh(G)``, ``σ = sqrt(λ)``, ``V = eigvecs``,
  ``U = A V / σ``. On this project's 2-core CPU it ran 1.2-1.8x faster than gesdd on tall
  weight-like shapes and tied on square ones (``benchmarks/bench_svd.py``). Because the product
  is formed in float64 from float32 data it is exact to ~1e-16·σ₁², so σ comes out *more*
  accurate than float32 gesdd (measured: 5e-8 vs 5e-7 worst relative error on σ > 1e-3·σ₁).
  Vectors are the weak point: ``U = A v / σ`` loses accuracy as σ → 0, so the route is
  refused per matrix whenever one of the requested top-k σ falls below ``GRAM_REL_FLOOR · σ₁``;
  those matrices are redone with gesdd.

``auto`` is gesdd. The Gram route is opt-in because its float64 ``eigh`` showed large stalls
when the machine was loaded by other processes (one 20 x 512² batched ``eigh`` took 24.6 s
against 0.6 s the next run; a benchmark group ran 3.4x *slower* than gesdd), and the pipeline
runs kernels under exactly that kind of load. Re-measure before making it the default.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Error of a Gram eigenvector is about eps64·σ₁² / (σᵢ² − σⱼ²); at σᵢ = 1e-4·σ₁ and a relative
# gap of 1e-3 that is ~1e-5, far inside the |cos| ≥ 0.999 bar the tests hold vectors to.
GRAM_REL_FLOOR = 1e-4

METHODS = ("auto", "gesdd", "gram")


def svd_gesdd(
    a: torch.Tensor, k: int, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Thin SVD of a tall float32 stack ``[B, m, n]`` with LAPACK/cuSOLVER via torch.

    Returns
    -------
    sigma, U, V
        ``[B, n]``, ``[B, m, k]``, ``[B, n, k]`` (U, V are None when ``vectors`` is False).
    """
    if not vectors:
        return torch.linalg.svdvals(a), None, None
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    # Slice then copy: callers may keep these for a long time, and a view would pin the full U.
    return s, u[..., :k].contiguous(), vh[..., :k, :].mT.contiguous()


def svd_gram(
    a: torch.Tensor, k: int, vectors: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Thin SVD of a tall float32 stack via a float64 Gram matrix and ``eigh``.

    Matrices whose k-th singular value is below ``GRAM_REL_FLOOR`` times their largest are
    redone with :func:`svd_gesdd` (only when vectors are asked for; σ alone stays accurate).

    Returns
    -------
    sigma, U, V
        As :func:`svd_gesdd`.
    """
    a64 = a.double()
    gram = a64.mT @ a64
    if not vectors:
        lam = torch.linalg.eigvalsh(gram)
        # eigvalsh is ascending; tiny negative λ are rounding of a PSD matrix, hence the clamp.
        return lam.flip(-1).clamp_min(0).sqrt().float(), None, None

    lam, vecs = torch.linalg.eigh(gram)
    sigma = lam.flip(-1).clamp_min(0).sqrt()
    v = vecs.flip(-1)[..., :k]
    sk = sigma[..., :k]
    if k == 0:
        b, m, n = a.shape
        return sigma.float(), a.new_zeros(b, m, 0), a.new_zeros(b, n, 0)
    ok = (sk[..., -1] >= GRAM_REL_FLOOR * sk[..., 0]) & (sk[..., 0] > 0)
    # Where the guard fails the division may produce inf/nan; those rows are replaced below.
    u = (a64 @ v) / sk.unsqueeze(-2)
    sigma32, u32, v32 = sigma.float(), u.float(), v.float()
    bad = (~ok).nonzero().flatten()
    if bad.numel():
        logger.debug("gram route refused for %d of %d matrices (small σ_k)", bad.numel(), len(a))
        s_b, u_b, v_b = svd_gesdd(a[bad], k, True)
        sigma32[bad], u32[bad], v32[bad] = s_b, u_b, v_b
    return sigma32, u32, v32


def svd_tall(
    a: torch.Tensor, k: int, vectors: bool, method: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, str]:
    """Dispatch a tall float32 stack to one route; ``auto`` means gesdd (see module doc).

    Returns
    -------
    sigma, U, V, method
        The arrays of the route that ran and its name.
    """
    if method == "auto":
        method = "gesdd"
    if method == "gram":
        return (*svd_gram(a, k, vectors), "gram")
    if method == "gesdd":
        return (*svd_gesdd(a, k, vectors), "gesdd")
    raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}")
