"""BLAS ``syrk`` and the LAPACK symmetric eigensolver, called without holding the GIL.

SciPy's Python wrappers (``scipy.linalg.blas.ssyrk``, ``lapack.dsyevr``) hold the GIL for the
whole call: two pipeline threads decomposing small matrices side by side then take as long as
one (2 x 10 ``dsyevr`` at n = 768: 0.57 s one after the other, 0.58 s in two threads), so the
many-small-matrix phase of an ingest used about one core of two. SciPy also exports the same
routines as C function pointers for Cython (``scipy.linalg.cython_blas`` / ``cython_lapack``,
one capsule each); ctypes calls a C function pointer with the GIL released. So this module
calls SciPy's own BLAS and LAPACK (same library, same thread pool as ``threadpoolctl`` sets)
through those pointers, with nothing new to build or install.

The eigensolver is also cheaper than ``dsyevr`` called twice (once for all values, once for
the top-k vectors): one Householder tridiagonalisation (``dsytrd``) serves both, then
``dsterf`` gives every eigenvalue, inverse iteration from the top k of them (``dstein``) their
eigenvectors of the tridiagonal matrix and ``dormtr`` carries them back: at n = 768, k = 128,
0.045 s against 0.062 s with MRRR (``dstemr``, what ``dsyevr`` runs inside, which bisects the k
values again), the fallback when an inverse iteration does not converge. With k above
``n / 2`` the divide-and-conquer ``dsyevd`` is faster for vectors and is used instead.

Matrices are Fortran-ordered throughout: a C-contiguous ``(m, n)`` array is the Fortran
``(n, m)`` array ``Aᵀ``, so ``syrk`` reads a weight (or its transpose) without a copy and writes
``AᵀA`` into the lower triangle (in Fortran terms) that the eigensolver reads.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

__all__ = ["eigh_top", "exceeds", "symv", "syrk"]

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@functools.cache
def _routine(module: str, name: str) -> Callable[..., None]:
    """SciPy's exported C function ``name`` as a ctypes function (every argument a pointer,
    as Fortran passes them). CFUNCTYPE, not PYFUNCTYPE: the call releases the GIL."""
    import importlib

    capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
    address = _capsule_pointer(capsule, _capsule_name(capsule))
    nargs = _capsule_name(capsule).decode().count("*")
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * nargs))(address)


def _p(a: np.ndarray) -> int:
    return a.ctypes.data


def _ints(*values: int) -> np.ndarray:
    """Integer arguments (Fortran passes them by address); LAPACK's ``int`` is 32-bit here."""
    return np.array(values, dtype=np.intc)


def _char(c: str) -> ctypes.Array:
    return ctypes.create_string_buffer(c.encode())


_L, _N, _T, _V, _I = _char("L"), _char("N"), _char("T"), _char("V"), _char("I")


def _check(info: np.ndarray, name: str) -> None:
    if info[0] != 0:
        raise RuntimeError(f"LAPACK {name} failed (info={int(info[0])})")


def syrk(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``AᵀA`` of an ``(m, n)`` float32 or float64 matrix, in ``a``'s precision, read in place
    when it is C- or Fortran-contiguous (a wide weight's transpose is the latter).

    Returns an ``(n, n)`` array whose Fortran lower triangle holds the result (its C upper
    triangle; the other triangle is left as it was): the layout `eigh_top` reads. Half the
    flops of ``a.T @ a``.
    """
    m, n = a.shape
    if a.dtype == np.float64:
        fn, scalar = _routine("cython_blas", "dsyrk"), np.float64
    elif a.dtype == np.float32:
        fn, scalar = _routine("cython_blas", "ssyrk"), np.float32
    else:
        raise ValueError(f"syrk takes float32 or float64, not {a.dtype}")
    if a.flags.c_contiguous:
        # Fortran sees X = Aᵀ (n x m, leading dimension n): C = X Xᵀ
        trans, lda = _N, n
    elif a.flags.f_contiguous:
        # Fortran sees X = A (m x n, leading dimension m): C = Xᵀ X
        trans, lda = _T, m
    else:
        raise ValueError("syrk needs a C- or Fortran-contiguous matrix")
    if out is None:
        out = np.zeros((n, n), dtype=a.dtype)
    alpha, beta = np.ones(1, scalar), np.zeros(1, scalar)
    dims = _ints(n, m, lda)
    fn(_L, trans, _p(dims), _p(dims[1:]), _p(alpha), _p(a), _p(dims[2:]), _p(beta), _p(out),
       _p(dims))  # fmt: skip
    return out


def symv(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``G x`` for a symmetric matrix given by its Fortran lower triangle (as `syrk` writes
    it), in ``g``'s precision, by BLAS ``?symv``: SciPy's BLAS, so that a caller between
    LAPACK calls does not wake NumPy's, a second OpenBLAS whose threads spin after each call
    and, on two cores, slowed the next reductions 4x."""
    n = g.shape[0]
    if g.dtype not in (np.float32, np.float64) or not g.flags.c_contiguous or g.shape != (n, n):
        raise ValueError("symv takes a C-contiguous square float32 or float64 matrix")
    x = np.ascontiguousarray(x, dtype=g.dtype)
    y = np.empty(n, g.dtype)
    alpha, beta, dims = np.ones(1, g.dtype), np.zeros(1, g.dtype), _ints(n, 1)
    _routine("cython_blas", f"{_prefix(g.dtype.type)}symv")(
        _L, _p(dims), _p(alpha), _p(g), _p(dims), _p(x), _p(dims[1:]), _p(beta), _p(y),
        _p(dims[1:]),
    )  # fmt: skip
    return y


def exceeds(g: np.ndarray, mu: float) -> bool:
    """Whether every eigenvalue of a symmetric matrix given by its Fortran lower triangle (as
    `syrk` writes it) is above ``mu``: the Cholesky factorisation of ``g − μI`` exists
    (``?potrf`` on a copy, n³/3 flops: about 1.5 ms at n = 768 in float32)."""
    n = g.shape[0]
    if g.dtype not in (np.float32, np.float64) or not g.flags.c_contiguous or g.shape != (n, n):
        raise ValueError("exceeds takes a C-contiguous square float32 or float64 matrix")
    h = g.copy()
    h.flat[:: n + 1] -= mu
    info = np.zeros(1, np.intc)
    nn = _ints(n)
    _routine("cython_lapack", f"{_prefix(g.dtype.type)}potrf")(_L, _p(nn), _p(h), _p(nn), _p(info))
    return int(info[0]) == 0


def _workspace(
    query: Callable[[np.ndarray, np.ndarray], None], liwork: bool, dtype: type = np.float64
) -> tuple:
    """LAPACK's workspace query (lwork = -1): the optimal work (and iwork) arrays."""
    work, iwork = np.empty(1, dtype), np.empty(1, np.intc)
    query(work, iwork)
    w = np.empty(max(1, int(work[0])), dtype)
    return (w, np.empty(max(1, int(iwork[0])), np.intc)) if liwork else (w, None)


def eigh_top(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All eigenvalues (descending) and the top-k eigenvectors (``(n, k)``, descending, None
    for k = 0) of a symmetric float64 or float32 ``(n, n)`` matrix given by its Fortran lower
    triangle (as `syrk` writes it), in its precision. ``g`` is overwritten.

    float32 halves the tridiagonal reduction, which streams the matrix once per column
    (``dsytrd`` 20-26 ms against ``ssytrd`` 10-14 ms at n = 768 here): for callers that know
    float32's rounding, ≈ eps32·λ₁ in every λ, is within what they need.
    """
    n = g.shape[0]
    if g.dtype not in (np.float32, np.float64) or not g.flags.c_contiguous or g.shape != (n, n):
        raise ValueError("eigh_top takes a C-contiguous square float32 or float64 matrix")
    if k > n // 2:
        return _syevd(g, k)
    dt = g.dtype.type
    x = _prefix(dt)
    info = np.zeros(1, np.intc)
    nn = _ints(n)
    d, e, tau = np.empty(n, dt), np.empty(n, dt), np.empty(max(1, n - 1), dt)
    sytrd = _routine("cython_lapack", f"{x}sytrd")

    def _sytrd(work: np.ndarray, lwork: np.ndarray) -> None:
        sytrd(_L, _p(nn), _p(g), _p(nn), _p(d), _p(e), _p(tau), _p(work), _p(lwork), _p(info))

    work, _ = _workspace(lambda w, _: _sytrd(w, _ints(-1)), liwork=False, dtype=dt)
    _sytrd(work, _ints(len(work)))
    _check(info, f"{x}sytrd")

    lam, off = d.copy(), e.copy()
    _routine("cython_lapack", f"{x}sterf")(_p(nn), _p(lam), _p(off), _p(info))
    _check(info, f"{x}sterf")
    if not k:
        return lam[::-1].copy(), None

    # top-k eigenvectors of the tridiagonal matrix (d, e), by inverse iteration from their
    # eigenvalues (dstein): 13 ms at n = 768, k = 128 against 30 ms for MRRR's (dstemr) own
    # bisection of the same k values. dstein reorthogonalises within clusters; a vector it
    # cannot converge (info > 0) sends the matrix to dstemr.
    z = _stein(d, e, lam, k)
    if z is None:
        z = _stemr(d, e, k)

    # back to g's basis: z <- Q z, Q the product of dsytrd's reflectors kept in g and tau
    ormtr = _routine("cython_lapack", f"{x}ormtr")
    dims = _ints(n, k)

    def _ormtr(work: np.ndarray, lwork: np.ndarray) -> None:
        ormtr(
            _L, _L, _N, _p(dims), _p(dims[1:]), _p(g), _p(dims), _p(tau), _p(z), _p(dims),
            _p(work), _p(lwork), _p(info),
        )  # fmt: skip

    work, _ = _workspace(lambda w_, _: _ormtr(w_, _ints(-1)), liwork=False, dtype=dt)
    _ormtr(work, _ints(len(work)))
    _check(info, f"{x}ormtr")
    return lam[::-1].copy(), z[::-1].T.copy()


def _stein(d: np.ndarray, e: np.ndarray, lam: np.ndarray, k: int) -> np.ndarray | None:
    """The top-k eigenvectors (Fortran ``(n, k)``, ascending) of the tridiagonal matrix (d, e)
    by inverse iteration from its ascending eigenvalues ``lam``; None if one did not converge."""
    n, dt = len(d), d.dtype.type
    info = np.zeros(1, np.intc)
    w = np.ascontiguousarray(lam[n - k :])
    # one block: dstein's inverse iteration is right on a matrix that splits too, and its
    # cluster test (|λᵢ − λⱼ| < 1e-3·‖T‖₁) works on the eigenvalues, not on the blocks
    iblock, isplit = np.ones(k, np.intc), _ints(n)
    z = np.empty((k, n), dt)
    work, iwork, ifail = np.empty(5 * n, dt), np.empty(n, np.intc), np.empty(k, np.intc)
    dims = _ints(n, k)
    x = _prefix(dt)
    _routine("cython_lapack", f"{x}stein")(
        _p(dims), _p(d), _p(e), _p(dims[1:]), _p(w), _p(iblock), _p(isplit), _p(z), _p(dims),
        _p(work), _p(iwork), _p(ifail), _p(info),
    )  # fmt: skip
    if info[0] > 0:
        return None
    _check(info, f"{x}stein")
    return z


def _prefix(dt: type) -> str:
    """LAPACK's letter for a NumPy float type."""
    return "s" if dt is np.float32 else "d"


def _stemr(d: np.ndarray, e: np.ndarray, k: int) -> np.ndarray:
    """The top-k eigenvectors (Fortran ``(n, k)``, ascending) of the tridiagonal matrix (d, e)
    by MRRR (``dstemr``, index range n-k+1 .. n). d and e are overwritten."""
    n, dt = len(d), d.dtype.type
    x = _prefix(dt)
    info = np.zeros(1, np.intc)
    nn = _ints(n)
    z = np.empty((k, n), dt)
    w = np.empty(n, dt)
    isuppz = np.empty(2 * max(1, k), np.intc)
    found = np.zeros(1, np.intc)
    args = _ints(n - k + 1, n, n, k, 0)  # il, iu, ldz, nzc, tryrac
    vl = vu = np.zeros(1, dt)
    stemr = _routine("cython_lapack", f"{x}stemr")

    def _call(work: np.ndarray, iwork: np.ndarray, lwork: np.ndarray) -> None:
        stemr(
            _V, _I, _p(nn), _p(d), _p(e), _p(vl), _p(vu), _p(args), _p(args[1:]), _p(found),
            _p(w), _p(z), _p(args[2:]), _p(args[3:]), _p(isuppz), _p(args[4:]), _p(work),
            _p(lwork), _p(iwork), _p(lwork[1:]), _p(info),
        )  # fmt: skip

    work, iwork = _workspace(lambda w_, iw: _call(w_, iw, _ints(-1, -1)), liwork=True, dtype=dt)
    _call(work, iwork, _ints(len(work), len(iwork)))
    _check(info, f"{x}stemr")
    if found[0] != k:
        raise RuntimeError(f"LAPACK {x}stemr found {int(found[0])} of {k} eigenvectors")
    return z


def _syevd(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs by divide and conquer (``dsyevd``), the top k kept."""
    n, dt = g.shape[0], g.dtype.type
    x = _prefix(dt)
    info = np.zeros(1, np.intc)
    nn = _ints(n)
    lam = np.empty(n, dt)
    syevd = _routine("cython_lapack", f"{x}syevd")

    def _call(work: np.ndarray, iwork: np.ndarray, lwork: np.ndarray) -> None:
        syevd(_V, _L, _p(nn), _p(g), _p(nn), _p(lam), _p(work), _p(lwork), _p(iwork),
              _p(lwork[1:]), _p(info))  # fmt: skip

    work, iwork = _workspace(lambda w, iw: _call(w, iw, _ints(-1, -1)), liwork=True, dtype=dt)
    _call(work, iwork, _ints(len(work), len(iwork)))
    _check(info, f"{x}syevd")
    # g now holds the eigenvectors as Fortran columns, ascending: C rows
    return lam[::-1].copy(), g[::-1][:k].T.copy()
