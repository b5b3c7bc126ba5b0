"""The few array operations whose spelling differs between torch, NumPy and CuPy.

The GPU numerics (the Gram routes' ``AᵀA`` + ``eigh`` + ``U = A V / σ``, their conditioning
fallbacks, the reference SVD and randomized block Krylov) are written once, against whichever
array module the input belongs to: torch tensors on CUDA (``torch-cuda``), CuPy arrays
(``cupy``) and NumPy arrays (the CPU stand-in that lets CI check the code CuPy runs). Most calls
are spelled the same in all three (``@``, ``xp.linalg.eigh``, ``eigvalsh``, ``qr``,
``svd(full_matrices=False)``, ``swapaxes``, ``flip``, ``clip``, ``concatenate``, ``sqrt``);
the rest are here, one small function each. Nothing here imports CuPy: it is recognised by the
arrays it is given.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import torch


def namespace(x: Any) -> ModuleType:
    """The array module ``x`` belongs to: ``torch``, ``numpy`` or ``cupy``."""
    if isinstance(x, torch.Tensor):
        return torch
    if isinstance(x, np.ndarray):
        return np
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        import cupy

        return cupy
    raise TypeError(f"not a torch, NumPy or CuPy array: {type(x).__name__}")


def is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def as_f32(x: Any) -> Any:
    return x.float() if is_torch(x) else x.astype("float32", copy=False)


def as_f64(x: Any) -> Any:
    return x.double() if is_torch(x) else x.astype("float64", copy=False)


def mT(x: Any) -> Any:  # noqa: N802 (torch's name for the matrix transpose)
    """Transpose of the last two axes (a view)."""
    return x.mT if is_torch(x) else x.swapaxes(-1, -2)


def contiguous(x: Any) -> Any:
    """A compact copy of a slice: a kept view would pin the whole array it came from."""
    return x.contiguous() if is_torch(x) else namespace(x).ascontiguousarray(x)


def svdvals(x: Any) -> Any:
    if is_torch(x):
        return torch.linalg.svdvals(x)
    return namespace(x).linalg.svd(x, compute_uv=False)


def cholesky(g: Any) -> Any | None:
    """Lower Cholesky factors of a stack of symmetric matrices, or None where any of them is not
    numerically positive definite (torch reports it in a flag, NumPy and CuPy raise)."""
    try:
        if is_torch(g):
            factor, info = torch.linalg.cholesky_ex(g)
            if bool((info != 0).any()):
                return None
        else:
            factor = namespace(g).linalg.cholesky(g)
    except np.linalg.LinAlgError:  # CuPy raises NumPy's
        return None
    return factor if bool(namespace(factor).isfinite(factor).all()) else None


def _element_strides(a: Any) -> tuple[int, int]:
    """Strides of the last two axes, in elements."""
    if is_torch(a):
        return tuple(a.stride()[-2:])
    return tuple(st // a.itemsize for st in a.strides[-2:])


def row_major(a: Any) -> bool:
    """Whether a stack's rows are contiguous (a wide matrix taken as tall is column-major)."""
    return _element_strides(a)[-1] == 1


def frobenius_sq(a: Any) -> Any:
    """``‖A‖²_F`` per matrix, ``[B]`` float64: row norms in float32 (each a sum of at most a few
    thousand squares: relative error ≈ 1e-7), summed in float64. Upcasting the whole matrix
    first took 0.17 s on a 50304 x 768 embedding against 0.007 s (torch, CPU)."""
    # norms along the contiguous axis: a transposed view (a wide matrix taken as tall) reduced
    # across its strides took 0.25 s for 4096 x 16384 against 0.02 s along them
    steps = _element_strides(a)
    if steps[-1] != 1 and steps[-2] == 1:
        a = mT(a)
    rows = as_f64(row_norms(a))
    energy = (rows * rows).sum(-1)
    # a float32 sum of squares overflows past 1.8e19 and underflows below 1e-19: entries that
    # large or that small are summed again in float64 (a zero matrix costs one more look)
    ns = namespace(energy)
    odd = ~ns.isfinite(energy) | (energy == 0)
    if bool(odd.any()):
        idx = nonzero(odd)
        sub = as_f64(a[idx])
        energy[idx] = (sub * sub).sum((-2, -1))
    return energy


def row_norms(a: Any) -> Any:
    """Euclidean norms along the last axis, in ``a``'s precision."""
    if is_torch(a):
        return torch.linalg.vector_norm(a, dim=-1)
    return namespace(a).linalg.norm(a, axis=-1)


def nonzero(mask: Any) -> Any:
    """Indices where a 1-D bool array is true."""
    return mask.nonzero().flatten() if is_torch(mask) else namespace(mask).nonzero(mask)[0]


def empty(like: Any, shape: tuple[int, ...], double: bool = False) -> Any:
    """Uninitialised, on ``like``'s device, of its dtype (float64 with ``double``)."""
    if is_torch(like):
        return like.new_empty(shape, dtype=torch.float64 if double else like.dtype)
    return namespace(like).empty(shape, dtype="float64" if double else like.dtype)


def zeros(like: Any, shape: tuple[int, ...]) -> Any:
    if is_torch(like):
        return like.new_zeros(shape)
    return namespace(like).zeros(shape, dtype=like.dtype)


def gaussian(
    like: Any, shape: tuple[int, ...], generator: torch.Generator | None = None, seed: int = 0
) -> Any:
    """Standard normal samples of ``like``'s dtype and device, repeatable: seeded from ``seed``
    unless a torch ``generator`` is given (torch inputs only)."""
    if is_torch(like):
        if generator is None:
            generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
    rng = namespace(like).random.default_rng(seed)
    return rng.standard_normal(shape, dtype=like.dtype)
