"""What a pythia-12b trajectory costs as a top-k store (``--top-k 256 --sigma top-k``).

    python benchmarks/pythia_topk.py --out /tmp/pythia-topk     # ~1.2 GB on disk, minutes

writes one checkpoint holding one matrix of each distinct pythia-12b view shape (random fp16,
GPT-NeoX names: ``embed_in`` 50688 x 5120, layer 0's ``query_key_value`` 15360 x 5120 with its
per-head Q/K/V stacks 40 x 128 x 5120 and W_V 5120 x 5120, ``attention.dense`` 5120 x 5120,
``dense_h_to_4h`` 20480 x 5120, ``dense_4h_to_h`` 5120 x 20480), ingests it with `specan.pipeline`
at top-k 256, and measures per view the seconds its task took (read, SVD by the route the store
records, results) and the bytes the store holds for it (one row, zstd, float32 vectors). It then
projects per checkpoint (each layer's views x 36 layers, ``embed_out`` as ``embed_in``) and per
trajectory (154 revisions, each decomposed; duplicates would cost nothing). Prints JSON.
The checkpoint and store are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pythia_like  # noqa: E402

from specan import __version__, pipeline, store  # noqa: E402

REVISIONS = 154
TOP_K = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the store")
    args = ap.parse_args()
    cfg = pythia_like.config("12b", layers=1)
    run = args.out / "run" / "step143000"
    if not (run / "config.json").exists():
        sd = pythia_like.state_dict(cfg, seed=0)
        del sd["embed_out.weight"]  # the shape of embed_in: measured once, counted twice
        pythia_like.model_files(run, sd)
        (run / "config.json").write_text(json.dumps(cfg, indent=2))
        del sd

    seconds: dict[str, float] = {}
    svd_group = pipeline._svd_group

    def timed(ckpt, keys, *rest):  # a task's time, shared evenly by the views it stacks
        t0 = time.perf_counter()
        out = svd_group(ckpt, keys, *rest)
        for key in keys:
            seconds[key] = (time.perf_counter() - t0) / len(keys)
        return out

    pipeline._svd_group = timed
    sp = args.out / "topk.zarr"
    opts = pipeline.IngestOptions(top_k=TOP_K, sigma="top-k", store=sp, overwrite=True)
    report = pipeline.ingest(run.parent, opts)
    if report.bad:
        sys.exit(f"ingest failed: {report.bad}")
    st = store.open_store(sp)
    layers = pythia_like.SIZES["12b"][1]
    rows, per_checkpoint = [], {"seconds": 0.0, "bytes": 0}
    count = Counter()
    for key, v in st.views.items():
        n = layers if ".layers.0." in v.param else 1
        n *= 2 if v.param == "gpt_neox.embed_in.weight" else 1  # and embed_out
        nbytes = store._du(sp / "views" / key)
        rows.append({
            "view": key,
            "shape": [v.heads, *v.shape] if v.heads else list(v.shape),
            "route": "+".join(v.routes),
            "sigma_kept": v.sigma_top or min(v.shape),
            "seconds": round(seconds[key], 2),
            "stored_MiB": round(nbytes / 2**20, 1),
            "per_checkpoint": n,
        })  # fmt: skip
        count[key] = n
        per_checkpoint["seconds"] += n * seconds[key]
        per_checkpoint["bytes"] += n * nbytes
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"specan": __version__, "torch": torch.__version__},
        "settings": f"--top-k {TOP_K} --sigma top-k, float32 vectors, zstd",
        "measured_per_view": rows,
        "projected_per_checkpoint": {
            "views": sum(count.values()),
            "hours": round(per_checkpoint["seconds"] / 3600, 2),
            "GiB": round(per_checkpoint["bytes"] / 2**30, 1),
        },
        "projected_per_trajectory": {
            "revisions": REVISIONS,
            "hours": round(REVISIONS * per_checkpoint["seconds"] / 3600, 1),
            "GiB": round(REVISIONS * per_checkpoint["bytes"] / 2**30),
        },
        "ingest_seconds_measured": round(report.seconds, 1),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
