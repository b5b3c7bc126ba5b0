"""Peak memory of `specan ingest` on one Pythia-shaped checkpoint (random weights, fp16).

    python benchmarks/pythia_memory.py --out /tmp/pythia-mem            # 1.4b: ~2.8 GB on disk

writes ``OUT/step1000/`` with `pythia_like.py`, then runs ``/usr/bin/time -v specan ingest`` twice
with the store in ``OUT/``: once on one small matrix (``--layers``; the fixed cost: Python, torch,
dask, zarr, one small task) and once on everything. It prints peak RSS of both beside the
float32 stacks that may be in flight at once, F = max(``pipeline.IN_FLIGHT_BYTES``, the largest
batch a task stacks), so that the peak reads as ``constant + factor x F``. The checkpoint is
deleted at the end unless ``--keep``. Takes every core for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pythia_like  # noqa: E402

from specan import __version__, pipeline, store  # noqa: E402


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of a command, from GNU time -v."""
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    return kb * 1024, h * 3600 + m * 60 + s


def largest_batch(views: dict) -> tuple[int, list[str]]:
    """Bytes of the largest float32 stack one task decomposes, and its views."""
    return max((pipeline._batch_bytes(keys, views), keys) for keys in pipeline._groups(views))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(pythia_like.SIZES), default="1.4b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the stores")
    args = ap.parse_args()
    run = args.out / "run"
    pythia_like.write(run, pythia_like.config(args.size), [1000])
    size = sum(f.stat().st_size for f in (run / "step1000").iterdir())
    specan = [sys.executable, "-m", "specan.cli", "ingest", str(run)]
    one = "gpt_neox.layers.0.attention.dense.weight"
    small, t_small = peak_rss([*specan, "--store", str(args.out / "one.zarr"), "--layers", one])
    full, t_full = peak_rss([*specan, "--store", str(args.out / "all.zarr")])
    views = store.open_store(args.out / "all.zarr").views
    batch, keys = largest_batch(views)
    flight = max(pipeline.IN_FLIGHT_BYTES, batch)
    factor = (full - small) / flight
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"specan": __version__, "torch": torch.__version__},
        "checkpoint": f"pythia-{args.size}, fp16, {size / 2**30:.2f} GiB, {len(views)} views",
        "largest_batch_MiB": round(batch / 2**20, 1),
        "largest_batch_views": keys,
        "batch_bytes_bound_MiB": pipeline.BATCH_BYTES / 2**20,
        "in_flight_MiB": flight / 2**20,
        "peak_rss_one_small_matrix_MiB": round(small / 2**20),
        "peak_rss_full_MiB": round(full / 2**20),
        "seconds_full": round(t_full, 1),
        "seconds_one": round(t_small, 1),
        "formula": f"peak ~ {small / 2**20:.0f} MiB + {factor:.1f} x {flight / 2**20:.0f} MiB",
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
