"""The one entry point: ``svd`` over a stack of same-shaped matrices, and its backends."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .torch_svd import METHODS, svd_tall

logger = logging.getLogger(__name__)

# Every name `svd` knows; `available_backends()` says which of them run on this machine.
# "cupy" and "randomized" are planned (DESIGN.md, Kernels) and refused with ValueError for now.
BACKENDS: tuple[str, ...] = ("auto", "torch-cpu", "torch-cuda", "cupy", "randomized")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class SVDResult:
    """Singular values (and top-k vectors) of a stack of matrices.

    Attributes
    ----------
    sigma
        ``[B, R]`` float32, descending, ``R = min(m, n)``.
    U
        ``[B, m, k]`` float32 left singular vectors of the matrices as given, or None.
    V
        ``[B, n, k]`` float32 right singular vectors, or None.
    backend
        Name of the backend that ran, e.g. ``"torch-cpu"``.
    method
        Route inside the backend: ``"gram"`` (float64 Gram + eigh) or ``"gesdd"``.
    """

    sigma: torch.Tensor
    U: torch.Tensor | None
    V: torch.Tensor | None
    backend: str
    method: str = "gesdd"


def available_backends() -> list[str]:
    """Backends that can run here, ``"auto"`` first.

    Returns
    -------
    list of str
    """
    names = ["auto", "torch-cpu"]
    if torch.cuda.is_available():
        names.append("torch-cuda")
    return names


def resolve_backend(backend: str = "auto", *, on_cuda: bool = False) -> str:
    """The backend that `svd` runs for ``backend`` on data that is (or is not) on a GPU.

    Callers record this name next to their results, so "auto" never hides which kernel ran.

    Raises
    ------
    ValueError
        An unknown name, or one that cannot run on this machine (the message lists those that can).
    """
    available = available_backends()
    if backend not in available:
        known = "" if backend in BACKENDS else " (unknown name)"
        raise ValueError(
            f"SVD backend {backend!r} is not available{known}; "
            f"available here: {', '.join(available)}"
        )
    if backend != "auto":
        return backend
    # Follow the data: a CUDA tensor stays on its device and a CPU one stays on the CPU, so
    # `auto` never adds a host<->device copy the caller did not ask for. Whether moving CPU
    # batches to a GPU pays off per shape is still to be measured on a GPU machine.
    return "torch-cuda" if on_cuda else "torch-cpu"


def svd(
    batch: torch.Tensor,
    *,
    k: int | None = None,
    vectors: bool = True,
    backend: str = "auto",
    method: str = "auto",
) -> SVDResult:
    """Thin SVD of every matrix in a stack.

    Parameters
    ----------
    batch
        ``[B, m, n]`` or a single ``[m, n]`` (treated as B=1), any float dtype; computed in
        float32 (float16/bfloat16 are upcast, float64 is rounded to float32 first).
    k
        Number of singular vectors to keep; None means all ``R = min(m, n)``, larger is clamped.
    vectors
        False returns only σ (``U`` and ``V`` are None), which is much cheaper.
    backend
        One of :data:`BACKENDS`; ``"auto"`` runs where the batch lives.
    method
        ``"auto"`` / ``"gesdd"``: plain ``torch.linalg.svd`` / ``svdvals``. ``"gram"``: float64
        Gram + ``eigh``, 1.2-1.8x faster on tall shapes on a quiet CPU and more accurate in σ,
        falling back per matrix to gesdd when small σ would spoil its vectors; opt-in because
        it stalled badly under CPU contention (see ``specan_kernels.torch_svd``).

    Returns
    -------
    SVDResult
        float32 results on the device of ``batch``.

    Raises
    ------
    ValueError
        Unavailable backend or method, non-float or non-finite input, wrong number of dims.
    """
    if batch.ndim == 2:
        batch = batch.unsqueeze(0)
    if batch.ndim != 3:
        raise ValueError(f"expected a [B, m, n] or [m, n] tensor, got shape {tuple(batch.shape)}")
    if batch.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expected a floating-point tensor, got {batch.dtype}")
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}")
    chosen = resolve_backend(backend, on_cuda=batch.is_cuda)
    device = torch.device("cuda") if chosen == "torch-cuda" else torch.device("cpu")
    out_device = batch.device

    a = batch.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(a).all()):
        # LAPACK either fails to converge or returns garbage on NaN/Inf; say so plainly instead.
        raise ValueError("SVD input contains NaN or Inf")

    _, m, n = a.shape
    r = min(m, n)
    kk = r if k is None else max(0, min(int(k), r))
    # Always decompose the tall orientation: torch's CPU SVD was ~2x slower (svdvals ~3x) on
    # (512, 2048) than on its transpose here, and the Gram route needs the small side last.
    wide = m < n
    tall = a.mT if wide else a
    sigma, u, v, ran = svd_tall(tall, kk, vectors, method)
    if wide:
        u, v = v, u

    def _out(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(out_device)

    return SVDResult(sigma=_out(sigma), U=_out(u), V=_out(v), backend=chosen, method=ran)


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
