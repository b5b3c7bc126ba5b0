"""The backend registry: each backend says whether it can run here and decomposes a tall stack.

A backend is a device + library (``torch-cpu``, ``torch-cuda``, ``cupy``); a *route* is an
algorithm inside it (``gesdd``, ``gram32``, ``randomized``, ...). ``specan_kernels.svd`` looks the
backend up here, asks it for a route when the caller said ``"auto"`` and hands it the stack, so a
new backend is one :func:`register` call and nothing in the pipeline changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import ModuleType

import torch

from . import bf16
from .randomized import randomized_svd
from .routes import DENSE_ROUTES, Decomposition, run_dense

# Routes that return every σ; the randomized ones return only the top k ("randomized-bf16":
# its Krylov loop multiplies a bfloat16 copy of A, on CPUs with AMX; see randomized_svd).
FULL_ROUTES = DENSE_ROUTES
TOPK_ROUTES = ("randomized", "randomized-bf16")


class Backend(ABC):
    """One way to run the SVD routes.

    Attributes
    ----------
    name
        Registry key, recorded in the store next to the results.
    device_type
        Where its inputs and outputs live (``"cpu"``, ``"cuda"``); ``auto`` picks the first
        available backend of the data's device type.
    routes
        Route names :meth:`decompose` accepts.
    """

    name: str
    device_type: str
    routes: tuple[str, ...]

    @abstractmethod
    def available(self) -> bool:
        """Whether this backend can run on this machine now."""

    @abstractmethod
    def choose_route(self, b: int, m: int, n: int, *, k: int, vectors: bool, sigma: str) -> str:
        """The route ``auto`` runs for ``b`` tall ``m × n`` matrices (``m >= n``)."""

    @abstractmethod
    def decompose(self, tall: torch.Tensor, *, k: int, vectors: bool, route: str) -> Decomposition:
        """Decompose a tall float32 stack already on :attr:`device`."""

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)


# Per-shape choice for torch on a CPU, from `specan bench` on a 2-core x86-64 (AVX-512, MKL)
# under load (see the README's Speed section and specan/bench.py):
#   * tall (m >= 2n): float32 Gram + eigh (gram32), 2-4x gesdd, with its own conditioning check
#     sending ill-conditioned (trained) matrices to gram64;
#   * near-square: gram64 (float32 Gram is inaccurate there: random-init σ_min/σ₁ ~ 1/n), whose
#     float64 eigensolver is 2x+ faster than svdvals; with vectors too, since it computes only
#     the top-k eigenvectors (768 x 768, k = 128, one thread: 0.077 s against gesdd's 0.114 s;
#     k = n: even; 2048 x 2048, k = 128: 0.87 s against 2.47 s);
#   * σ top-k only of a very large matrix (n >= RANDOMIZED_MIN_N, k <= n/8): randomized, with
#     bfloat16 products where the CPU has AMX (top-128 of 4096 x 16384, σᵢ = 1/i: 0.39-0.48 s
#     against 0.55-0.66 s; Gaussian: 2.4 s against 3.4 s).
RANDOMIZED_MIN_N = 4096
TALL_RATIO = 2


class TorchBackend(Backend):
    """``torch.linalg`` on one device type; every route of :mod:`specan_kernels.routes`."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.name = f"torch-{device_type}"

    @property
    def routes(self) -> tuple[str, ...]:  # type: ignore[override]
        # bfloat16 products only where they run at AMX speed (found on first use, not import)
        low = self.device_type == "cpu" and bf16.available()
        return DENSE_ROUTES + (TOPK_ROUTES if low else TOPK_ROUTES[:1])

    def available(self) -> bool:
        return self.device_type == "cpu" or torch.cuda.is_available()

    def choose_route(self, b: int, m: int, n: int, *, k: int, vectors: bool, sigma: str) -> str:
        if sigma == "top-k" and n >= RANDOMIZED_MIN_N and k <= n // 8:
            return self.routes[-1]  # randomized-bf16 where it runs, else randomized
        if self.device_type == "cuda":
            # Unmeasured on a GPU yet: cuSOLVER's batched gesvdj only for tiny matrices, a loop
            # above (DESIGN.md); a batched Gram + eigh is the likely winner once measured.
            return "gesdd"
        return "gram32" if m >= TALL_RATIO * n else "gram64"

    def decompose(self, tall: torch.Tensor, *, k: int, vectors: bool, route: str) -> Decomposition:
        if route in TOPK_ROUTES:
            products = "bfloat16" if route == "randomized-bf16" else "float32"
            dec, _ = randomized_svd(tall, k, vectors, products=products)
            return dec
        return run_dense(tall, route, k, vectors)


def _load_cupy() -> ModuleType:
    """CuPy, when it imports and sees a CUDA device (anything else raises)."""
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("CuPy sees no CUDA device")
    return cupy


class ArrayBackend(Backend):
    """The array-generic routes on another library's arrays (CuPy; NumPy in the tests).

    :func:`specan_kernels.svd` moves the stack to :attr:`device` with torch; :meth:`decompose`
    hands it to the library by DLPack (no copy), runs :func:`~specan_kernels.routes.run_dense`
    or :func:`~specan_kernels.randomized.randomized_svd` there (the same functions the torch
    backends run) and hands the results back the same way. Both libraries work on the device's
    default stream unless a caller changes it, so the hand-over needs no synchronisation.

    Parameters
    ----------
    name, device_type
        As for every backend.
    load
        Returns the array module (``cupy``); raising means the backend is unavailable.
    """

    routes = ("gesdd", "gram32", "gram64", "randomized")

    def __init__(self, name: str, device_type: str, load: Callable[[], ModuleType]) -> None:
        self.name = name
        self.device_type = device_type
        self._load = load
        self._ok: bool | None = None

    def available(self) -> bool:
        if self._ok is None:
            try:
                on_device = self.device_type == "cpu" or torch.cuda.is_available()
                self._ok = on_device and self._load() is not None
            except Exception:  # ImportError, a CUDA driver error, ...: not usable here
                self._ok = False
        return self._ok

    def choose_route(self, b: int, m: int, n: int, *, k: int, vectors: bool, sigma: str) -> str:
        if sigma == "top-k" and n >= RANDOMIZED_MIN_N and k <= n // 8:
            return "randomized"
        # Unmeasured on a GPU yet: a batched Gram product + CuPy's batched eigh, float32 Gram
        # where the matrix is tall enough (its conditioning check sends the rest to gram64).
        return "gram32" if m >= TALL_RATIO * n else "gram64"

    def decompose(self, tall: torch.Tensor, *, k: int, vectors: bool, route: str) -> Decomposition:
        if route not in self.routes:
            raise ValueError(f"route {route!r} is not one of {self.name}'s: {self.routes}")
        mod = self._load()
        a = mod.from_dlpack(tall)
        if route == "randomized":
            dec, _ = randomized_svd(a, k, vectors)
        else:
            dec = run_dense(a, route, k, vectors)

        def back(x: object) -> torch.Tensor | None:
            return None if x is None else torch.from_dlpack(x)

        return Decomposition(back(dec.sigma), back(dec.U), back(dec.V), back(dec.tail), dec.routes)


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> None:
    """Add a backend; ``auto`` prefers backends registered earlier for the same device type."""
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend


def get(name: str) -> Backend:
    """The registered backend called ``name`` (KeyError if none)."""
    return _REGISTRY[name]


def registered() -> list[Backend]:
    """Every registered backend, in registration order."""
    return list(_REGISTRY.values())


register(TorchBackend("cpu"))
register(TorchBackend("cuda"))
# After torch-cuda: `auto` on CUDA data keeps torch until CuPy is measured faster there.
register(ArrayBackend("cupy", "cuda", _load_cupy))
