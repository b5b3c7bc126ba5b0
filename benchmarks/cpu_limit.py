"""This CPU's limit for an ingest: the least compute time the Gram routes take on a store's views.

    python benchmarks/cpu_limit.py /tmp/p160                  # per checkpoint and for the run
    python benchmarks/cpu_limit.py /tmp/p160 --seconds 24.1   # and a measured ingest against it

For every view the store holds (shape, heads, k and the route that ran), the Gram routes do
three things: the Gram matrix ``AᵀA`` (``m·n²`` flops with ``syrk``; in float64 for ``gram64``,
counted at half the float32 rate), ``U = A V`` for the top k (``2·m·n·k``), both at this
machine's float32 matmul peak with every core, and the symmetric eigenproblem of the ``n × n``
Gram matrix (the ``n³`` part), timed here on one core with the same LAPACK calls and assumed to
run on every core side by side: in float32 for ``gram32`` views whose stored spectra are well
conditioned enough for the route to have taken it (``EIG32_MIN_RATIO``), float64 otherwise.
The limit is their sum: it leaves out reading and converting the weights, the route's checks
and writing the store, so no real ingest reaches it. ``gesdd`` views (fallbacks) are counted as
Gram views: the limit stays a lower bound.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def eig_seconds(n: int, k: int, single: bool = False, repeats: int = 3) -> float:
    """Best single-thread CPU time of the eigen part (all values, top-k vectors) at size n, in
    float32 with ``single``."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from specan_kernels import lapack

    a = np.random.default_rng(0).standard_normal((2 * n, n))
    g = np.ascontiguousarray(np.triu(a.T @ a), dtype=np.float32 if single else np.float64)
    best = float("inf")
    with threadpool_limits(1):
        for _ in range(repeats):
            h = g.copy()
            start = time.thread_time()  # CPU time of this thread: LAPACK runs in it
            lapack.eigh_top(h, k)
            best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder (or store) that specan ingested")
    ap.add_argument("--seconds", type=float, help="a measured ingest time of the whole run")
    args = ap.parse_args()

    import specan
    from specan.bench import matmul_peak
    from specan_kernels.routes import EIG32_MARGIN, EIG32_MIN_N, EIG32_MIN_RATIO

    run = specan.open(args.run)
    store = run._store  # noqa: SLF001 - shapes, heads, k, routes and σ of every view
    views = store.views
    checkpoints = len(run.steps)
    cores = os.cpu_count() or 1

    def single(key: str, v) -> bool:
        """Whether gram32 took the float32 eigenproblem for every matrix of this view."""
        if "gram32" not in v.routes or min(v.shape) < EIG32_MIN_N or v.sigma_top:
            return False
        s = store.read_sigma(key)
        ratio = s[..., -1] / s[..., 0]
        return bool((ratio >= EIG32_MIN_RATIO * EIG32_MARGIN).all())

    plan = {key: (min(v.shape), min(v.sigma_top or v.k, min(v.shape)), single(key, v))
            for key, v in views.items()}  # fmt: skip
    eig_cache: dict[tuple[int, int, bool], float] = {}
    for job in plan.values():  # first: torch's threads spinning after the matmuls slow LAPACK
        if job not in eig_cache:
            eig_cache[job] = eig_seconds(*job)
    peak = matmul_peak("cpu", 2048) * 1e9
    flop_s = eig_total = 0.0
    for key, v in views.items():
        m, n = sorted(v.shape, reverse=True)
        b = v.heads or 1
        k = plan[key][1]
        double = "gram64" in v.routes or "gesdd" in v.routes
        flop_s += b * (m * n * n * (2 if double else 1) + 2 * m * n * k) / peak
        eig_total += b * eig_cache[plan[key]]
    per_ckpt = flop_s + eig_total / cores
    n32 = sum(job[2] for job in plan.values())
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s on {cores} cores; {len(views)} views "
          f"({n32} with the eigenproblem in float32)")  # fmt: skip
    print(f"per checkpoint: Gram + U {flop_s:.2f} s, eigen {eig_total:.2f} core-s "
          f"({eig_total / cores:.2f} s on {cores} cores): limit {per_ckpt:.2f} s")  # fmt: skip
    print(f"{checkpoints} checkpoints: limit {per_ckpt * checkpoints:.1f} s")
    if args.seconds:
        print(f"measured {args.seconds:.1f} s = {args.seconds / (per_ckpt * checkpoints):.2f}x "
              "the limit")  # fmt: skip


if __name__ == "__main__":
    main()
