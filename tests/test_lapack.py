"""The GIL-free BLAS/LAPACK calls of the CPU Gram routes, against NumPy in float64."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from specan_kernels import lapack


def _lower_only(g: np.ndarray) -> np.ndarray:
    """``g`` with only its Fortran lower (C upper) triangle kept, as `lapack.syrk` writes it."""
    return np.ascontiguousarray(np.triu(g))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mn", [(50, 7), (7, 7), (300, 64), (1, 1)])
def test_syrk_is_the_gram_matrix_in_the_fortran_lower_triangle(dtype, mn) -> None:
    a = np.random.default_rng(0).standard_normal(mn).astype(dtype)
    g = lapack.syrk(a)
    ref = a.astype(np.float64).T @ a.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert g.dtype == dtype
    np.testing.assert_allclose(np.triu(g), np.triu(ref), atol=tol * np.abs(ref).max())
    assert not np.tril(g, -1).any()  # the other triangle is left as it was (zeros)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_syrk_reads_a_transposed_matrix_in_place(dtype) -> None:
    wide = np.random.default_rng(1).standard_normal((40, 300)).astype(dtype)
    tall = wide.T  # Fortran-ordered, as a wide weight's tall orientation is
    g = lapack.syrk(tall)
    ref = wide.astype(np.float64) @ wide.astype(np.float64).T
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.triu(g), np.triu(ref), atol=tol * np.abs(ref).max())


def test_syrk_refuses_what_it_cannot_read_in_place() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        lapack.syrk(np.zeros((6, 8))[:, ::2])
    with pytest.raises(ValueError, match="float32 or float64"):
        lapack.syrk(np.zeros((6, 4), dtype=np.int64))


def _spd(n: int, seed: int, spectrum: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.uniform(0.1, 10.0, n) if spectrum is None else spectrum
    return (q * lam) @ q.T


@pytest.mark.parametrize("n, k", [(1, 1), (2, 0), (9, 3), (64, 0), (64, 8), (64, 32), (64, 40),
                                  (64, 64), (200, 25)])  # fmt: skip
def test_eigh_top_values_and_top_k_vectors(n, k) -> None:
    g = _spd(n, n + k)
    ref_lam, ref_vec = np.linalg.eigh(g)
    lam, vec = lapack.eigh_top(_lower_only(g), k)
    np.testing.assert_allclose(lam, ref_lam[::-1], rtol=0, atol=1e-12 * ref_lam[-1])
    if k == 0:
        assert vec is None
        return
    assert vec.shape == (n, k)
    ref = ref_vec[:, ::-1][:, :k]
    np.testing.assert_allclose(np.abs(np.sum(vec * ref, axis=0)), 1.0, atol=1e-9)
    np.testing.assert_allclose(g @ vec, vec * lam[:k], atol=1e-10 * ref_lam[-1])


def test_eigh_top_on_a_clustered_and_decaying_spectrum() -> None:
    # four orders of magnitude, and a cluster of equal values inside the top k: the vectors of
    # the cluster are not unique, the subspace they span is
    spectrum = np.concatenate([[5.0, 5.0, 5.0], np.logspace(0, -4, 97)])
    g = _spd(100, 3, spectrum)
    lam, vec = lapack.eigh_top(_lower_only(g), 10)
    np.testing.assert_allclose(lam, np.sort(spectrum)[::-1], rtol=0, atol=1e-12 * 5)
    np.testing.assert_allclose(vec.T @ vec, np.eye(10), atol=1e-10)
    np.testing.assert_allclose(g @ vec, vec * lam[:10], atol=1e-10)


@pytest.mark.parametrize(
    "g",
    [
        # already tridiagonal with every off-diagonal zero: the reduction leaves a matrix that
        # splits into 1 x 1 blocks, with a value repeated across them
        np.diag([3.0, 1.0, 3.0, 2.0, 0.5, 3.0, 0.25, 2.0]),
        # rank 3 of 12: zero eigenvalues inside the top 6
        (lambda x: x.T @ x)(np.random.default_rng(4).standard_normal((3, 12))),
    ],
    ids=["splits", "rank-deficient"],
)
def test_eigh_top_on_matrices_that_split_or_lack_rank(g) -> None:
    k = 6
    lam, vec = lapack.eigh_top(_lower_only(g), k)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(g)[::-1], rtol=0, atol=1e-12 * lam[0])
    np.testing.assert_allclose(vec.T @ vec, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(g @ vec, vec * lam[:k], atol=1e-10 * lam[0])


@pytest.mark.parametrize("n, k", [(9, 3), (200, 25)])
def test_eigh_top_falls_back_to_mrrr_when_inverse_iteration_fails(monkeypatch, n, k) -> None:
    monkeypatch.setattr(lapack, "_stein", lambda *args: None)
    g = _spd(n, n + k)
    ref_lam, ref_vec = np.linalg.eigh(g)
    lam, vec = lapack.eigh_top(_lower_only(g), k)
    np.testing.assert_allclose(lam, ref_lam[::-1], rtol=0, atol=1e-12 * ref_lam[-1])
    ref = ref_vec[:, ::-1][:, :k]
    np.testing.assert_allclose(np.abs(np.sum(vec * ref, axis=0)), 1.0, atol=1e-9)


@pytest.mark.parametrize("n, k", [(9, 0), (64, 8), (200, 25), (300, 200)])
def test_eigh_top_in_float32_within_float32_rounding(n, k) -> None:
    g = _spd(n, 7 * n + k)
    ref_lam, ref_vec = np.linalg.eigh(g)
    lam, vec = lapack.eigh_top(_lower_only(g).astype(np.float32), k)
    assert lam.dtype == np.float32
    # backward stable in float32: every λ within a small multiple of eps32·λ₁ (3e-6·λ₁ here)
    np.testing.assert_allclose(lam, ref_lam[::-1], rtol=0, atol=3e-6 * ref_lam[-1])
    if k:
        ref = ref_vec[:, ::-1][:, :k]
        assert vec.dtype == np.float32 and vec.shape == (n, k)
        np.testing.assert_allclose(np.abs(np.sum(vec * ref, axis=0)), 1.0, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symv_reads_the_triangle_syrk_writes(dtype) -> None:
    g = _spd(40, 2)
    x = np.random.default_rng(3).standard_normal(40)
    y = lapack.symv(_lower_only(g).astype(dtype), x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, g @ x, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-12) * 40)


def test_exceeds_is_a_lower_bound_on_the_spectrum() -> None:
    g = _lower_only(_spd(50, 3, np.linspace(0.5, 10.0, 50)))
    kept = g.copy()
    for dtype in (np.float64, np.float32):
        assert lapack.exceeds(g.astype(dtype), 0.45)
        assert not lapack.exceeds(g.astype(dtype), 0.55)
    np.testing.assert_array_equal(g, kept)  # the test works on a copy


def test_eigh_top_refuses_a_matrix_it_would_misread() -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        lapack.eigh_top(np.eye(4, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="square"):
        lapack.eigh_top(np.zeros((4, 3)), 1)


def test_eigh_top_lets_other_threads_run() -> None:
    """The point of the module: while one thread is inside LAPACK, another runs Python. With the
    GIL held for the call (SciPy's own wrappers) the counting thread is stopped for all of it."""
    from threadpoolctl import threadpool_limits

    g = _lower_only(_spd(1200, 0))
    stamps: list[float] = []
    call: list[float] = []
    done = threading.Event()

    def count() -> None:
        n = 0
        while not done.is_set():
            n += 1
            if n % 1000 == 0:
                stamps.append(time.perf_counter())

    def work() -> None:
        time.sleep(0.05)  # the counter is running before the call starts
        call.append(time.perf_counter())
        lapack.eigh_top(g.copy(), 1200)
        call.append(time.perf_counter())
        done.set()

    with threadpool_limits(1):
        threads = [threading.Thread(target=count), threading.Thread(target=work)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    t0, t1 = call
    quarter = (t1 - t0) / 4
    inside = [s for s in stamps if t0 + quarter < s < t1 - quarter]
    assert t1 - t0 > 0.02  # long enough to tell
    assert len(inside) >= 3, f"{len(inside)} counter steps during {t1 - t0:.3f} s in LAPACK"
