"""The one entry point: ``svd`` over a stack of same-shaped matrices, and its backends."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import registry
from .registry import FULL_ROUTES, TOPK_ROUTES
from .threads import thread_budget

logger = logging.getLogger(__name__)

ROUTES: tuple[str, ...] = ("auto", *FULL_ROUTES, *TOPK_ROUTES)
SIGMA_MODES = ("all", "top-k")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def known_backends() -> tuple[str, ...]:
    """Every backend name ``svd`` knows, ``"auto"`` first (available here or not)."""
    return ("auto", *(b.name for b in registry.registered()))


# Kept for callers of the first API: the names known at import time.
BACKENDS: tuple[str, ...] = known_backends()


@dataclass
class SVDResult:
    """Singular values (and top-k vectors) of a stack of matrices.

    Attributes
    ----------
    sigma
        ``[B, R]`` float32, descending, ``R = min(m, n)``; ``[B, k]`` when only the top k were
        computed (``sigma="top-k"`` and the randomized route ran).
    U
        ``[B, m, k]`` float32 left singular vectors of the matrices as given, or None.
    V
        ``[B, n, k]`` float32 right singular vectors, or None.
    tail
        ``[B]`` float64 ``‖A‖²_F − Σ_{i≤k} σ_i²``: the energy beyond the top k (0 when k = R),
        exact from the data's Frobenius norm whatever the route.
    backend
        Name of the backend that ran, e.g. ``"torch-cpu"``.
    routes
        The route that produced each matrix (``"gesdd"``, ``"gram32"``, ``"gram64"``,
        ``"randomized"``); a route's fallback for a matrix
        it cannot do accurately names the route that redid it.
    k
        Number of vectors (and the k of ``tail``).
    """

    sigma: torch.Tensor
    U: torch.Tensor | None
    V: torch.Tensor | None
    tail: torch.Tensor
    backend: str
    routes: tuple[str, ...]
    k: int

    @property
    def route(self) -> str:
        """The distinct routes that ran, in order of first use, joined by ``+``."""
        return "+".join(dict.fromkeys(self.routes))


def available_backends() -> list[str]:
    """Backends that can run here, ``"auto"`` first.

    Returns
    -------
    list of str
    """
    return ["auto", *(b.name for b in registry.registered() if b.available())]


def resolve_backend(backend: str = "auto", *, on_cuda: bool = False) -> str:
    """The backend that `svd` runs for ``backend`` on data that is (or is not) on a GPU.

    Callers record this name next to their results, so "auto" never hides which kernel ran.
    ``auto`` follows the data: the first available backend (in registration order) for the
    data's device type, so it never adds a host<->device copy the caller did not ask for.

    Raises
    ------
    ValueError
        An unknown name, or one that cannot run on this machine (the message lists those that can).
    """
    available = available_backends()
    if backend not in available:
        if backend in ROUTES:
            hint = f" ({backend!r} is a route: pass route={backend!r})"
        elif backend in known_backends():
            hint = ""
        else:
            hint = " (unknown name)"
        raise ValueError(
            f"SVD backend {backend!r} is not available{hint}; "
            f"available here: {', '.join(available)}"
        )
    if backend != "auto":
        return backend
    want = "cuda" if on_cuda else "cpu"
    for b in registry.registered():
        if b.device_type == want and b.available():
            return b.name
    raise ValueError(f"no SVD backend available for {want} data")  # pragma: no cover


def choose_route(
    backend: str, shape: tuple[int, int, int], *, k: int | None = None, vectors: bool = True,
    sigma: str = "all",
) -> str:  # fmt: skip
    """The route ``svd(..., route="auto")`` runs for a stack of ``shape = (B, m, n)``.

    The pipeline can record it per view before computing; the result's ``routes`` also say
    which route each matrix actually took (fallbacks included).
    """
    b, m, n = shape
    r = min(m, n)
    kk = r if k is None else max(0, min(int(k), r))
    be = registry.get(resolve_backend(backend))
    return be.choose_route(b, max(m, n), r, k=kk, vectors=vectors, sigma=sigma)


def svd(
    batch: torch.Tensor,
    *,
    k: int | None = None,
    vectors: bool = True,
    backend: str = "auto",
    route: str = "auto",
    sigma: str = "all",
    threads: int | None = None,
) -> SVDResult:
    """Thin SVD of every matrix in a stack.

    Parameters
    ----------
    batch
        ``[B, m, n]`` or a single ``[m, n]`` (treated as B=1), any float dtype; computed in
        float32 (float16/bfloat16 are upcast on the backend's device, float64 is rounded to
        float32 before it is moved there).
    k
        Number of singular vectors to keep, and the k of ``tail``; None means all
        ``R = min(m, n)``, larger is clamped.
    vectors
        False returns only σ (``U`` and ``V`` are None), which is much cheaper.
    backend
        A name from :func:`available_backends`; ``"auto"`` runs where the batch lives.
    route
        ``"auto"`` lets the backend pick per shape, k and vectors (see
        ``specan_kernels.registry``); or one of :data:`ROUTES` to force it.
    sigma
        ``"all"``: every σ (the randomized route is refused). ``"top-k"``: only the top k are
        needed, so ``auto`` may pick the randomized route for very large matrices (then
        ``sigma`` has k columns; ``tail`` is exact either way).
    threads
        torch intra-op threads for this call (process-wide, restored after; see
        :class:`thread_budget`). None leaves torch's setting as the caller made it.

    Returns
    -------
    SVDResult
        float32 results on the device of ``batch`` (``tail`` float64).

    Raises
    ------
    ValueError
        Unavailable backend or route, non-float or non-finite input, wrong number of dims.
    """
    if batch.ndim == 2:
        batch = batch.unsqueeze(0)
    if batch.ndim != 3:
        raise ValueError(f"expected a [B, m, n] or [m, n] tensor, got shape {tuple(batch.shape)}")
    if batch.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expected a floating-point tensor, got {batch.dtype}")
    if sigma not in SIGMA_MODES:
        raise ValueError(f"sigma must be one of {', '.join(SIGMA_MODES)}, not {sigma!r}")
    chosen = resolve_backend(backend, on_cuda=batch.is_cuda)
    be = registry.get(chosen)
    if route != "auto" and route not in be.routes:
        raise ValueError(
            f"unknown SVD route {route!r} for {chosen}; choose one of auto, {', '.join(be.routes)}"
        )
    if route in TOPK_ROUTES and sigma != "top-k":
        raise ValueError(f"route {route!r} computes only the top k σ: pass sigma='top-k'")
    out_device = batch.device

    with thread_budget(threads):
        # Cast on whichever side holds fewer bytes: float16/bfloat16 cross to the device as
        # they are and are upcast there, float64 is rounded before it crosses. One
        # ``.to(device, float32)`` would convert on the host (aten's blocking host->device
        # copy converts on the CPU), sending twice the bytes of a half-precision checkpoint.
        if batch.element_size() < 4:
            a = batch.to(be.device).to(torch.float32)
        else:
            a = batch.to(torch.float32).to(be.device)
        if not bool(torch.isfinite(a.sum())):  # NaN and Inf survive a sum: 5x cheaper than
            # isfinite(a).all() on a 50304 x 768 embedding
            # LAPACK either fails to converge or returns garbage on NaN/Inf; say so plainly.
            raise ValueError("SVD input contains NaN or Inf")
        b, m, n = a.shape
        r = min(m, n)
        kk = r if k is None else max(0, min(int(k), r))
        # Always decompose the tall orientation: torch's CPU SVD was ~2x slower (svdvals ~3x) on
        # (512, 2048) than on its transpose here, and the Gram routes need the small side last.
        wide = m < n
        tall = a.mT if wide else a
        if route == "auto":
            route = be.choose_route(b, max(m, n), r, k=kk, vectors=vectors, sigma=sigma)
        if route in TOPK_ROUTES and kk == 0:
            route = "gesdd"  # nothing to sketch; σ of all is what k = 0 asks for anyway
        dec = be.decompose(tall, k=kk, vectors=vectors, route=route)
    u, v = (dec.V, dec.U) if wide else (dec.U, dec.V)

    def _out(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(out_device)

    return SVDResult(
        sigma=_out(dec.sigma),
        U=_out(u),
        V=_out(v),
        tail=_out(dec.tail),
        backend=chosen,
        routes=tuple(dec.routes),
        k=kk,
    )


def flops(m: int, n: int, vectors: bool) -> float:
    """Nominal flop count of one thin SVD of an ``m × n`` matrix.

    With ``p = max(m, n)``, ``q = min(m, n)``, the Golub-Reinsch counts of Golub & Van Loan,
    *Matrix Computations* (4th ed., Fig. 8.6.1):

    * σ only: ``4pq² − 4q³/3`` (Householder bidiagonalisation; the σ iteration is lower order).
    * σ and vectors: ``4pq² + 8q³`` (GVL's "Σ, V" row). Thin U adds a back-transformation
      that GVL count at up to ``10pq²`` more; LAPACK's gesdd does it with blocked BLAS-3 and
      QR-first paths, and with the larger count the measured rates here exceeded the matmul
      peak, so the smaller count is the nominal one (rates from it are conservative).

    These are counts of the *whole* thin SVD whatever ``k`` or route is used, so GFLOP/s from
    them compare equal work across methods ("effective" GFLOP/s for the Gram route).

    Returns
    -------
    float
    """
    p, q = float(max(m, n)), float(min(m, n))
    if not vectors:
        return 4.0 * p * q * q - 4.0 * q**3 / 3.0
    return 4.0 * p * q * q + 8.0 * q**3
