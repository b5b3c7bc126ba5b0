"""How many threads the CPU kernels use: torch's and SciPy's BLAS counts, set together.

`thread_budget` is what ``specan_kernels.svd(threads=...)`` and the pipeline's workers run under;
`one_blas_thread` is for a kernel that runs the matrices of a stack side by side in threads of
its own, each with one BLAS thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@functools.cache
def _blas() -> Any:
    """SciPy's BLAS thread pools (OpenBLAS or MKL), found once: the scan of loaded libraries
    costs a millisecond, setting a count then microseconds. SciPy is imported first so that
    its BLAS is loaded when the scan runs."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


class thread_budget:
    """Run torch and SciPy's BLAS with ``n`` threads inside the block (``None``: BLAS follows
    torch's current count).

    torch's count lives in the calling thread (an OpenMP setting): it is set on entry and
    restored on exit, per block. SciPy's BLAS (OpenBLAS) has one count for the process, and
    blocks may be open in several threads at once (the pipeline runs small decompositions side
    by side, one thread each): they must ask for the same ``n``, and that count is restored
    only when the last of them leaves. Restoring as the first one left handed the others a
    multi-threaded BLAS under single-threaded callers, which ran the eigensolvers of the Gram
    routes 4x slower. The BLAS count is set through threadpoolctl, unconditionally: read from
    another thread it was seen stale.
    """

    _lock = threading.Lock()
    _open = 0
    _saved: list[int] = []

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        n = self.old if self.n is None else max(1, int(self.n))
        if n != self.old:
            torch.set_num_threads(n)
        cls = thread_budget
        with cls._lock:
            libs = _blas().lib_controllers
            if cls._open == 0:
                cls._saved = [c.num_threads for c in libs]
            cls._open += 1
            for c in libs:
                c.set_num_threads(n)

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)
        cls = thread_budget
        with cls._lock:
            cls._open -= 1
            if cls._open == 0:
                for c, n in zip(_blas().lib_controllers, cls._saved, strict=True):
                    c.set_num_threads(n)


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """SciPy's BLAS at one thread inside the block, back to what it was after: for a caller
    holding a budget of several threads that spends them on matrices side by side. Callers
    with a budget of one (the pipeline's workers) never need it."""
    with thread_budget._lock:
        libs = _blas().lib_controllers
        before = [c.num_threads for c in libs]
        for c in libs:
            c.set_num_threads(1)
    try:
        yield
    finally:
        with thread_budget._lock:
            for c, n in zip(libs, before, strict=True):
                c.set_num_threads(n)
