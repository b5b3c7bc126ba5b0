"""specan_kernels: batched SVD of stacks of same-shaped matrices behind one function."""

from __future__ import annotations

from .api import (
    BACKENDS,
    ROUTES,
    SIGMA_MODES,
    SVDResult,
    available_backends,
    choose_route,
    flops,
    known_backends,
    resolve_backend,
    svd,
    thread_budget,
)
from .randomized import randomized_svd
from .registry import Backend, register

__all__ = [
    "BACKENDS",
    "ROUTES",
    "SIGMA_MODES",
    "Backend",
    "SVDResult",
    "available_backends",
    "choose_route",
    "flops",
    "known_backends",
    "randomized_svd",
    "register",
    "resolve_backend",
    "svd",
    "thread_budget",
]
