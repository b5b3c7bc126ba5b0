"""specan_kernels: batched SVD of stacks of same-shaped matrices behind one function."""

from __future__ import annotations

from .api import BACKENDS, SVDResult, available_backends, flops, resolve_backend, svd

__all__ = [
    "BACKENDS",
    "SVDResult",
    "available_backends",
    "flops",
    "resolve_backend",
    "svd",
]
