"""Matrix products of bfloat16 operands with float32 accumulation *and* float32 output, on CPUs
with AMX: MKL's ``cblas_gemm_bf16bf16f32``, which torch's own library carries.

torch has no such product on a CPU: ``bf16 @ bf16`` returns bfloat16 (its output rounded to 8
bits), and ``mm(..., out_dtype=float32)`` is CUDA-only. The rounding of the output is what
matters to a Krylov method: ``A Aᵀ q`` is dominated by the top σ², and the new direction that
survives projection off the basis is ~σ_k²/σ₁² of it; rounded to bfloat16 it is noise (the
block Krylov loop on a 4096 x 16384 matrix, σᵢ = 1/i, never settled: 26-32 blocks instead of 6),
while rounding only the operands left the top-128 σ within 6.5e-5 (`randomized`). MKL's product
keeps the output in float32 and reads half the bytes through AMX tiles: 16384 x 4096 times 48
columns in 10-12 ms against 33-47 ms for float32 (2 threads; this module's test checks it is
the float64 product of the rounded operands to float32 accuracy).

:func:`available` says whether it runs here: the symbol is found (torch builds without MKL,
macOS and Windows builds: no) and the CPU has AMX-BF16 (without it MKL emulates bfloat16,
slower than float32).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from pathlib import Path

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_INT32_MAX = 2**31 - 1  # torch's MKL is the LP64 interface: 32-bit sizes


def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


@functools.cache
def _gemm() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """MKL's ``cblas_gemm_bf16bf16f32`` from torch's CPU library, or None."""
    if os.environ.get("SPECAN_NO_BF16") or not _cpu_has_amx_bf16():
        return None
    lib_path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(lib_path)).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    c_int, c_float, c_ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [c_int] * 6 + [c_float, c_ptr, c_int, c_ptr, c_int, c_float, c_ptr, c_int]
    fn.restype = None
    return fn


def available() -> bool:
    """Whether :func:`matmul` runs here (at AMX speed)."""
    return _gemm() is not None


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x [r, c]`` as CBLAS takes it in row-major order: the tensor to pass (``x`` itself when
    either axis is unit-stride, a compact copy otherwise), its transpose flag and leading
    dimension."""
    r, c = x.shape
    if x.stride(1) == 1 and x.stride(0) >= max(1, c):
        return x, _NO_TRANS, x.stride(0)
    if x.stride(0) == 1 and x.stride(1) >= max(1, r):
        return x, _TRANS, x.stride(1)
    x = x.contiguous()
    return x, _NO_TRANS, max(1, c)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 for bfloat16 CPU tensors ``a [.., r, s]`` and ``b [.., s, c]`` (the
    same leading dims), each matrix read in place whichever of its axes is contiguous."""
    fn = _gemm()
    if fn is None:
        raise RuntimeError("no bfloat16 product with float32 output on this machine")
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise TypeError(f"bfloat16 operands expected, got {a.dtype} and {b.dtype}")
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError("CPU tensors expected")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    r, s, c = a.shape[-2], a.shape[-1], b.shape[-1]
    if max(r, s, c, *a.stride(), *b.stride()) > _INT32_MAX:
        raise ValueError("a dimension or stride beyond MKL's 32-bit sizes")
    out = torch.empty((*a.shape[:-2], r, c), dtype=torch.float32)
    if out.numel() == 0:
        return out
    if s == 0:
        return out.zero_()
    for idx in itertools.product(*(range(d) for d in out.shape[:-2])):
        x, tx, ldx = _operand(a[idx])
        y, ty, ldy = _operand(b[idx])
        o = out[idx]
        fn(_ROW_MAJOR, tx, ty, r, c, s, 1.0, x.data_ptr(), ldx, y.data_ptr(), ldy, 0.0,
           o.data_ptr(), c)  # fmt: skip
    return out
