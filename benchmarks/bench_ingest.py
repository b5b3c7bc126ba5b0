"""specan ingest against the notebook loop it replaces, side by side on one synthetic run.

The notebook loop: for each checkpoint, load the whole file, for each >=2-D parameter reshape it to
(out, -1), call ``torch.linalg.svd`` (default full_matrices=True) and keep sigma and the top-k
vectors in a dict that is pickled at the end. specan computes more matrices than that loop (per-head
Q/K and W_V views of attention, conv-transpose and LSTM rules), so GFLOP/s, not only seconds, is
the fair comparison; both are printed, with this machine's fp32 matmul peak for scale.

    python benchmarks/bench_ingest.py                   # 20 checkpoints, ~5M parameters
    python benchmarks/bench_ingest.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import tempfile
import time
from pathlib import Path

from specan.bench import matmul_peak


def svd_flops(m: int, n: int) -> float:
    """Nominal thin-SVD flops with vectors: the count `specan bench` uses too."""
    from specan_kernels import flops

    return flops(m, n, True)


def notebook_loop(run: Path, out: Path, top_k: int) -> tuple[float, float]:
    import torch
    from safetensors.torch import load_file

    results: dict = {}
    flops = 0.0
    t = time.perf_counter()
    for path in sorted((run / "checkpoints").glob("*.safetensors")):
        state = load_file(str(path))
        for name, w in state.items():
            if w.dim() < 2:
                continue
            mat = w.float().reshape(w.shape[0], -1)
            u, s, vh = torch.linalg.svd(mat)
            results[(path.name, name)] = (s, u[:, :top_k], vh[:top_k])
            flops += svd_flops(*mat.shape)
    with open(out, "wb") as f:
        pickle.dump(results, f)
    return time.perf_counter() - t, flops


def specan_ingest(run: Path, top_k: int) -> tuple[float, float]:
    from specan import store
    from specan.pipeline import IngestOptions, ingest

    t = time.perf_counter()
    ingest(run, IngestOptions(top_k=top_k, overwrite=True))
    seconds = time.perf_counter() - t
    views = store.read_attrs(store.store_path(run))["views"]
    per_ckpt = sum((v["heads"] or 1) * svd_flops(*v["shape"]) for v in views.values())
    n_ckpt = len(list((run / "checkpoints").glob("*.safetensors")))
    return seconds, per_ckpt * n_ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 checkpoints of a ~1M model")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--width", type=int, default=320, help="320 gives ~5M parameters")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    if args.quick:
        args.checkpoints, args.width = 5, 128

    import numpy
    import torch

    from specan.demo import write_synthetic_run

    tmp = Path(tempfile.mkdtemp(prefix="specan-bench-"))
    try:
        run = write_synthetic_run(tmp / "run", checkpoints=args.checkpoints, width=args.width)
        n_params = sum(
            t.numel()
            for t in __import__("safetensors.torch", fromlist=["load_file"])
            .load_file(str(next((run / "checkpoints").glob("*.safetensors"))))
            .values()
        )
        peak = matmul_peak("cpu", 2048)  # the same measurement as specan bench
        header = {
            "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(),
            "checkpoints": args.checkpoints,
            "parameters": n_params,
            "top_k": args.top_k,
            "dtype": "float32",
            "matmul_peak_gflops": round(peak, 1),
        }
        print(" ".join(f"{k}={v}" for k, v in header.items()))
        rows = []
        for name, fn in (
            ("notebook loop (torch.linalg.svd per matrix, pickle)",
             lambda: notebook_loop(run, tmp / "results.pkl", args.top_k)),
            ("specan ingest (batched, Dask threads, Zarr)", lambda: specan_ingest(run, args.top_k)),
        ):  # fmt: skip
            seconds, flops = fn()
            rows.append({"name": name, "seconds": seconds, "gflops": flops / seconds / 1e9})
        base = rows[0]["seconds"]
        print(f"{'method':55s} {'seconds':>8s} {'speed-up':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
        for r in rows:
            r["speedup"] = base / r["seconds"]
            r["fraction_of_peak"] = r["gflops"] / peak
            print(
                f"{r['name']:55s} {r['seconds']:8.2f} {r['speedup']:8.2f} "
                f"{r['gflops']:8.2f} {r['fraction_of_peak']:8.1%}"
            )
        if args.json:
            args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
