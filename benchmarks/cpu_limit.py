"""This CPU's limit for an ingest: the least compute time the Gram routes take on a store's views.

    python benchmarks/cpu_limit.py /tmp/p160                  # per checkpoint and for the run
    python benchmarks/cpu_limit.py /tmp/p160 --seconds 24.1   # and a measured ingest against it

For every view the store holds (shape, heads, k and the route that ran), the Gram routes do
three things: the Gram matrix ``AᵀA`` (``m·n²`` flops with ``syrk``; in float64 for ``gram64``,
counted at half the float32 rate), ``U = A V`` for the top k (``2·m·n·k``), both at this
machine's float32 matmul peak with every core, and the symmetric eigenproblem of the ``n × n``
Gram matrix (the ``n³`` part), timed here on one core with the same LAPACK calls and assumed to
run on every core side by side. The limit is their sum: it leaves out reading and converting
the weights and writing the store, so no real ingest reaches it. ``gesdd`` views (fallbacks)
are counted as Gram views: the limit stays a lower bound.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def eig_seconds(n: int, k: int, repeats: int = 3) -> float:
    """Best single-thread CPU time of the eigen part (all values, top-k vectors) at size n."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from specan_kernels import lapack

    a = np.random.default_rng(0).standard_normal((2 * n, n))
    g = np.ascontiguousarray(np.triu(a.T @ a))
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

    run = specan.open(args.run)
    views = run._store.views  # noqa: SLF001 - shapes, heads, k and routes of every view
    checkpoints = len(run.steps)
    cores = os.cpu_count() or 1
    eig_cache: dict[tuple[int, int], float] = {}
    for v in views.values():  # first: torch's threads spinning after the matmuls slow LAPACK
        n = min(v.shape)
        k = min(v.sigma_top or v.k, n)
        if (n, k) not in eig_cache:
            eig_cache[(n, k)] = eig_seconds(n, k)
    peak = matmul_peak("cpu", 2048) * 1e9
    flop_s = eig_total = 0.0
    for v in views.values():
        m, n = sorted(v.shape, reverse=True)
        b = v.heads or 1
        k = min(v.sigma_top or v.k, n)
        double = "gram64" in v.routes or "gesdd" in v.routes
        flop_s += b * (m * n * n * (2 if double else 1) + 2 * m * n * k) / peak
        eig_total += b * eig_cache[(n, k)]
    per_ckpt = flop_s + eig_total / cores
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s on {cores} cores; {len(views)} views")
    print(f"per checkpoint: Gram + U {flop_s:.2f} s, eigen {eig_total:.2f} core-s "
          f"({eig_total / cores:.2f} s on {cores} cores): limit {per_ckpt:.2f} s")  # fmt: skip
    print(f"{checkpoints} checkpoints: limit {per_ckpt * checkpoints:.1f} s")
    if args.seconds:
        print(f"measured {args.seconds:.1f} s = {args.seconds / (per_ckpt * checkpoints):.2f}x "
              "the limit")  # fmt: skip


if __name__ == "__main__":
    main()
