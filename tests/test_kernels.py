"""specan_kernels.svd against numpy.linalg.svd in float64 on small random matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import specan_kernels as sk
from specan_kernels.torch_svd import GRAM_REL_FLOOR

METHODS = ["auto", "gram", "gesdd"]
SIGMA_TOL = 1e-4  # relative, both to σ₁ and elementwise for σ > σ₁·1e-3
COS_MIN = 0.999  # |cos| between matching vectors with distinct σ
GAP = 1e-3  # relative gap above which a singular vector counts as well defined


def _reference(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy float64 SVD of the float32 matrix the kernel actually sees."""
    a = w.to(torch.float32).double().numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    return u, s, vh.T


def _distinct(s: np.ndarray, k: int) -> np.ndarray:
    """Indices < k whose σ is separated from both neighbours by more than GAP·σ₁."""
    d = np.abs(np.diff(s)) / (s[0] if s[0] > 0 else 1.0)
    gaps = np.minimum(np.r_[np.inf, d], np.r_[d, np.inf])
    return np.nonzero(gaps[:k] > GAP)[0]


def _check_one(w: torch.Tensor, res: sk.SVDResult, b: int, k: int) -> None:
    u_ref, s_ref, v_ref = _reference(w)
    sigma = res.sigma[b].double().numpy()
    assert sigma.shape == s_ref.shape
    assert np.all(np.diff(sigma) <= 0), "σ must be descending"
    s1 = s_ref[0]
    np.testing.assert_array_less(np.abs(sigma - s_ref), SIGMA_TOL * s1 + 1e-30)
    big = s_ref > 1e-3 * s1
    np.testing.assert_array_less(np.abs(sigma - s_ref)[big], SIGMA_TOL * s_ref[big])
    if res.U is None:
        assert res.V is None
        return
    u, v = res.U[b].double().numpy(), res.V[b].double().numpy()
    assert u.shape == (w.shape[0], k) and v.shape == (w.shape[1], k)
    idx = _distinct(s_ref, k)
    for got, ref in ((u, u_ref), (v, v_ref)):
        cos = np.abs(np.sum(got[:, idx] * ref[:, idx], axis=0))
        cos /= np.linalg.norm(got[:, idx], axis=0) * np.linalg.norm(ref[:, idx], axis=0)
        assert np.all(cos >= COS_MIN), cos.min()


def _random(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 40, 12), (4, 12, 40), (3, 25, 25), (1, 30, 7)])
@pytest.mark.parametrize("k", [None, 3, 1000])
@pytest.mark.parametrize("vectors", [True, False])
def test_matches_numpy(shape, k, vectors, method) -> None:
    batch = _random(shape, seed=sum(shape))
    res = sk.svd(batch, k=k, vectors=vectors, method=method)
    r = min(shape[1:])
    kk = r if k is None else min(k, r)
    assert res.sigma.shape == (shape[0], r) and res.sigma.dtype == torch.float32
    assert res.backend == "torch-cpu"
    if vectors:
        assert res.U.dtype == torch.float32 and res.V.dtype == torch.float32
    else:
        assert res.U is None and res.V is None
    for b in range(shape[0]):
        _check_one(batch[b], res, b, kk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype) -> None:
    batch = _random((2, 30, 18), seed=3, dtype=dtype)
    res = sk.svd(batch, k=5)
    assert res.sigma.dtype == res.U.dtype == res.V.dtype == torch.float32
    for b in range(2):
        # The reference is taken from the same rounded values the kernel received.
        _check_one(batch[b], res, b, 5)


def test_single_matrix_is_batch_of_one() -> None:
    w = _random((20, 9), seed=5)
    res = sk.svd(w)
    assert res.sigma.shape == (1, 9) and res.U.shape == (1, 20, 9) and res.V.shape == (1, 9, 9)
    _check_one(w, res, 0, 9)


def _known(m: int, n: int, s: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    q2, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return torch.from_numpy((q1 * s) @ q2.T), q1, q2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mn", [(60, 24), (24, 60)])
def test_known_spectrum(mn, method) -> None:
    m, n = mn
    s = np.linspace(10.0, 0.5, min(m, n))
    w, q1, q2 = _known(m, n, s, seed=7)
    res = sk.svd(w, method=method)
    np.testing.assert_allclose(res.sigma[0].double().numpy(), s, rtol=SIGMA_TOL)
    for got, ref in ((res.U[0], q1), (res.V[0], q2)):
        cos = np.abs(np.sum(got.double().numpy() * ref, axis=0))
        assert cos.min() >= COS_MIN
    # Full rank k = R: the factors must rebuild the matrix.
    rebuilt = (res.U[0] * res.sigma[0]) @ res.V[0].T
    torch.testing.assert_close(rebuilt.double(), w, rtol=0, atol=1e-5 * s[0])


def test_graded_and_rank_deficient_spectra() -> None:
    # σ spanning 1e0..1e-7 and exact zeros: the Gram route must hand small-σ matrices to gesdd
    # and still meet the bar on σ everywhere.
    m, n = 48, 16
    graded, _, _ = _known(m, n, np.logspace(0, -7, n), seed=11)
    deficient, _, _ = _known(m, n, np.r_[np.linspace(5, 1, 8), np.zeros(8)], seed=12)
    batch = torch.stack([graded, deficient, torch.zeros(m, n, dtype=torch.float64)])
    for method in METHODS:
        res = sk.svd(batch, method=method)
        assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
        for b in range(2):
            _check_one(batch[b], res, b, n)
        assert res.sigma[2].abs().max() == 0
        # Top vectors of the graded matrix are well above the Gram floor: fine either route.
        res_top = sk.svd(batch[:1], k=3, method=method)
        assert res_top.sigma[0, 2] > GRAM_REL_FLOOR * res_top.sigma[0, 0]
        _check_one(batch[0], res_top, 0, 3)


def test_k_zero_and_errors() -> None:
    res = sk.svd(_random((2, 8, 5)), k=0)
    assert res.U.shape == (2, 8, 0) and res.V.shape == (2, 5, 0)
    with pytest.raises(ValueError, match="available here"):
        sk.svd(_random((2, 8, 5)), backend="no-such-backend")
    with pytest.raises(ValueError, match="torch-cpu"):
        sk.svd(_random((2, 8, 5)), backend="randomized")
    with pytest.raises(ValueError, match="method"):
        sk.svd(_random((2, 8, 5)), method="qr")
    with pytest.raises(ValueError, match="NaN"):
        sk.svd(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        sk.svd(torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        sk.svd(torch.zeros(3, 3, dtype=torch.int64))


def test_backends_listed() -> None:
    assert set(sk.available_backends()) <= set(sk.BACKENDS)
    assert sk.available_backends()[:2] == ["auto", "torch-cpu"]
    assert sk.svd(_random((4, 3)), backend="torch-cpu").backend == "torch-cpu"


def test_flops() -> None:
    # Symmetric in orientation, and σ only is cheaper than σ with vectors.
    assert sk.flops(2048, 512, True) == sk.flops(512, 2048, True)
    assert sk.flops(512, 512, False) < sk.flops(512, 512, True)
    assert sk.flops(100, 100, False) == pytest.approx(4e6 - 4e6 / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_numpy(method) -> None:
    batch = _random((3, 40, 16), seed=21)
    res = sk.svd(batch, k=6, backend="torch-cuda", method=method)
    assert res.backend == "torch-cuda" and res.sigma.device.type == "cpu"
    for b in range(3):
        _check_one(batch[b], res, b, 6)
    on_gpu = sk.svd(batch.cuda(), k=6)
    assert on_gpu.backend == "torch-cuda" and on_gpu.U.is_cuda
    torch.testing.assert_close(on_gpu.sigma.cpu(), res.sigma, rtol=1e-4, atol=1e-5)


def test_hugging_face_kernels_package_beside_specan_breaks_neither(tmp_path) -> None:
    """`kernels/` ships as `specan_kernels`: HF's top-level `kernels` must keep its name."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("HF_KERNEL_HUB = True\n")
    code = (
        "import kernels, torch\n"
        "assert kernels.HF_KERNEL_HUB\n"
        "from specan_kernels import svd\n"
        "assert svd(torch.eye(3)).sigma.shape == (1, 3)\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
