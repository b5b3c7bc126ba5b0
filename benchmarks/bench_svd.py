"""Batched SVD of weight-like stacks: the naive notebook loop against specan_kernels.svd.

Run as ``python benchmarks/bench_svd.py [--quick] [--json out.json]``. For each shape group it
times, on the same float32 data:

* ``naive_full``   for each matrix ``torch.linalg.svd(W)`` (full_matrices=True, as stored)
* ``naive_thin``   the same loop with full_matrices=False
* ``batched_thin`` one batched ``torch.linalg.svd(batch, full_matrices=False)``, as stored
* ``specan``       ``specan_kernels.svd(batch, k=128)`` (default route: gesdd, tall orientation)
* ``specan_gram``  ``specan_kernels.svd(batch, k=128, method="gram")`` (float64 Gram + eigh)
* ``specan_vals``  ``specan_kernels.svd(batch, vectors=False)``

GFLOP/s use ``specan_kernels.flops`` (nominal thin-SVD counts, the same for every row that
returns vectors, so they compare equal work) and are also shown as a fraction of this machine's
float32 matrix-multiply peak. Timings are the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import specan_kernels as sk

FULL_GROUPS: list[tuple[str, int, int, int]] = [
    ("square", 20, 512, 512),
    ("tall", 20, 2048, 512),
    ("wide", 20, 512, 2048),
    ("heads", 8, 128, 128),
    ("conv", 20, 64, 576),
]
QUICK_GROUPS: list[tuple[str, int, int, int]] = [
    ("square", 4, 512, 512),
    ("tall", 4, 2048, 512),
    ("wide", 4, 512, 2048),
    ("heads", 8, 128, 128),
    ("conv", 8, 64, 576),
]
TOP_K = 128


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_peak(n: int, repeats: int) -> float:
    """Best float32 ``torch.mm`` rate of two n×n matrices, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and MKL initialisation
    t, _ = best_time(lambda: torch.mm(a, b), repeats)
    return 2.0 * n**3 / t / 1e9


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_group(name: str, b: int, m: int, n: int, repeats: int, peak: float) -> list[dict[str, Any]]:
    """Time every method on one stack of ``b`` random ``m × n`` float32 matrices."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(b, m, n, generator=g) / n**0.5
    mats = list(batch.unbind(0))

    methods: dict[str, tuple[Callable[[], Any], bool]] = {
        "naive_full": (lambda: [torch.linalg.svd(w) for w in mats], True),
        "naive_thin": (lambda: [torch.linalg.svd(w, full_matrices=False) for w in mats], True),
        "batched_thin": (lambda: torch.linalg.svd(batch, full_matrices=False), True),
        "specan": (lambda: sk.svd(batch, k=TOP_K), True),
        "specan_gram": (lambda: sk.svd(batch, k=TOP_K, method="gram"), True),
        "specan_vals": (lambda: sk.svd(batch, vectors=False), False),
    }
    rows: list[dict[str, Any]] = []
    ref_sigma: torch.Tensor | None = None
    for method, (fn, vectors) in methods.items():
        seconds, out = best_time(fn, repeats)
        if method == "naive_thin":
            ref_sigma = torch.stack([s for _, s, _ in out])
        err = None
        if isinstance(out, sk.SVDResult) and ref_sigma is not None:
            # Sanity check, not an accuracy test: agreement with LAPACK's σ, relative to σ₁.
            err = float(((out.sigma - ref_sigma).abs().amax(-1) / ref_sigma[:, 0]).max())
        gflops = b * sk.flops(m, n, vectors) / seconds / 1e9
        rows.append(
            {
                "group": name,
                "batch": b,
                "m": m,
                "n": n,
                "method": method,
                "backend": out.backend if isinstance(out, sk.SVDResult) else "torch",
                "route": out.method if isinstance(out, sk.SVDResult) else "gesdd",
                "seconds": seconds,
                "gflops": gflops,
                "frac_peak": gflops / peak,
                "max_dsigma_rel": err,
            }
        )
    naive_full = rows[0]["seconds"]
    naive_thin = rows[1]["seconds"]
    for row in rows:
        row["x_vs_naive_full"] = naive_full / row["seconds"]
        row["x_vs_naive_thin"] = naive_thin / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small groups, one repeat (<20 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (best of)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    groups = QUICK_GROUPS if args.quick else FULL_GROUPS

    header = {
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} logical cores)",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "top_k": TOP_K,
        "repeats": repeats,
        "quick": args.quick,
        "groups": [{"name": g, "batch": b, "shape": [m, n]} for g, b, m, n in groups],
    }
    peak_n = 2048 if args.quick else 4096
    peak = matmul_peak(peak_n, 3)
    header["matmul_peak_gflops"] = peak
    header["matmul_peak_size"] = peak_n

    print("specan_kernels SVD benchmark")
    for key in ("device", "torch", "numpy", "python", "torch_threads", "dtype", "top_k", "repeats"):
        print(f"  {key:<14} {header[key]}")
    shapes = ", ".join(f"{g} {b}x({m},{n})" for g, b, m, n in groups)
    print(f"  {'shapes':<14} {shapes}")
    print(f"  {'mm peak':<14} {peak:.1f} GFLOP/s (float32 torch.mm {peak_n}x{peak_n}, best of 3)")
    print()

    torch.linalg.svd(torch.randn(2, 64, 32))  # warm-up: LAPACK workspace and threads
    rows: list[dict[str, Any]] = []
    title = (
        f"{'group':<7} {'B x (m, n)':<16} {'method':<13} {'route':<6} {'seconds':>8} "
        f"{'x full':>7} {'x thin':>7} {'GFLOP/s':>8} {'%peak':>6} {'dσ/σ1':>8}"
    )
    print(title)
    print("-" * len(title))
    for name, b, m, n in groups:
        for row in run_group(name, b, m, n, repeats, peak):
            rows.append(row)
            err = "" if row["max_dsigma_rel"] is None else f"{row['max_dsigma_rel']:.1e}"
            print(
                f"{name:<7} {f'{b} x ({m}, {n})':<16} {row['method']:<13} {row['route']:<6} "
                f"{row['seconds']:>8.3f} {row['x_vs_naive_full']:>7.2f} "
                f"{row['x_vs_naive_thin']:>7.2f} {row['gflops']:>8.2f} "
                f"{100 * row['frac_peak']:>5.1f}% {err:>8}"
            )
        print()
    print("x full / x thin: naive_full (resp. naive_thin) seconds divided by this row's seconds.")
    print("GFLOP/s: nominal thin-SVD flops (specan_kernels.flops) over the measured time.")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
