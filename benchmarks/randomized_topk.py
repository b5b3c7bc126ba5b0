"""specan's randomized top-k route against ``torch.svd_lowrank`` at the accuracy the README states.

    python benchmarks/randomized_topk.py

A 4096 x 16384 float32 matrix with σᵢ = 1/i (random orthogonal factors), top-128 σ to 1e-3
relative: specan's block Krylov route at several block widths and stopping tolerances (blocks
of 64 to 3e-4 are the defaults with vectors, blocks of 48 to 1e-3 those for σ alone, here with
vectors too), through ``specan_kernels.svd`` at its defaults, and
``torch.svd_lowrank(q=256, niter=2)`` (the cheapest torch setting that reaches 1e-3;
``q=224, niter=2`` and ``q=192, niter=3`` stop above it), and scikit-learn's
``randomized_svd(n_oversamples=128, n_iter=3)`` (the fewest iterations that reach 1e-3 with
that oversampling), on the same float32 matrix. Three rounds in one process, in turn;
prints each setting's error and best time.
"""

from __future__ import annotations

import time

import torch
from sklearn.utils.extmath import randomized_svd as sklearn_randomized_svd

import specan_kernels as sk
from specan_kernels.randomized import randomized_svd

M, N, K = 16384, 4096, 128
SETTINGS = ((64, 3e-4), (48, 1e-3), (64, 1e-3), (80, 1e-3))  # (block, tol)


def main() -> None:
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(M, N))[0]
    v = torch.linalg.qr(torch.randn(N, N))[0]
    s = 1 / torch.arange(1, N + 1).float()
    wide = ((u * s) @ v.T).T.contiguous()  # the user's 4096 x 16384
    wide_np = wide.numpy()

    def err(sigma: torch.Tensor) -> float:
        ref = s[:K].double()
        return ((sigma[:K].double() - ref).abs() / ref).max().item()

    times: dict[str, list[float]] = {}
    errors: dict[str, list[float]] = {}

    def record(label: str, seconds: float, error: float) -> None:
        times.setdefault(label, []).append(seconds)
        errors.setdefault(label, []).append(error)

    for _ in range(3):
        for block, tol in SETTINGS:
            t = time.perf_counter()
            dec, done = randomized_svd(wide.T[None], K, vectors=True, block=block, tol=tol)
            dt = time.perf_counter() - t
            record(f"specan block={block} tol={tol} blocks={done + 1}", dt, err(dec.sigma[0]))
        t = time.perf_counter()
        res = sk.svd(wide, k=K, route="randomized", sigma="top-k")
        dt = time.perf_counter() - t
        record("specan_kernels.svd defaults", dt, err(res.sigma[0]))
        t = time.perf_counter()
        _, sigma, _ = torch.svd_lowrank(wide, q=256, niter=2)
        dt = time.perf_counter() - t
        record("torch.svd_lowrank q=256 niter=2", dt, err(sigma))
        t = time.perf_counter()
        _, sigma_np, _ = sklearn_randomized_svd(
            wide_np, K, n_oversamples=128, n_iter=3, random_state=0
        )
        dt = time.perf_counter() - t
        record("sklearn randomized_svd p=128 it=3", dt, err(torch.from_numpy(sigma_np)))
    for label, ts in times.items():
        print(f"{label:36s} best {min(ts):.3f} s  max error {max(errors[label]):.1e}")


if __name__ == "__main__":
    main()
