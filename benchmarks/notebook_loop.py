"""The loop specan replaces, as researchers write it in a notebook: the baseline of speed claims.

    python benchmarks/notebook_loop.py RUN [--values] [--out results.pkl]

For each checkpoint of RUN (``stepN/model.safetensors`` folders or a flat folder of
``*.safetensors``, in step order), load the state dict, and for every tensor with two or more
dimensions call ``torch.linalg.svd(W.float(), full_matrices=False)`` (``--values``:
``torch.linalg.svdvals``), keep the results in a dict and pickle it at the end. Time it as a whole
process beside ``specan ingest RUN`` (e.g. with ``/usr/bin/time -v``): both read the same files
and decompose every weight matrix.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoints(run: Path) -> list[Path]:
    files = sorted(run.glob("*/model.safetensors")) or sorted(run.glob("*.safetensors"))
    return sorted(files, key=lambda p: int((re.findall(r"\d+", p.parent.name + p.stem) or [0])[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--values", action="store_true", help="singular values only (svdvals)")
    ap.add_argument("--out", type=Path, default=None, help="pickle file (default: RUN/loop.pkl)")
    args = ap.parse_args()
    results = {}
    for path in checkpoints(args.run):
        sd = load_file(str(path))
        for name, w in sd.items():
            if w.ndim < 2 or not w.is_floating_point():
                continue
            w = w.float().reshape(w.shape[0], -1)
            if args.values:
                results[(path.parent.name, name)] = torch.linalg.svdvals(w).numpy()
            else:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                results[(path.parent.name, name)] = (u.numpy(), s.numpy(), vh.numpy())
    out = args.out or args.run / "loop.pkl"
    with open(out, "wb") as f:
        pickle.dump(results, f)
    print(f"{len(results)} matrices -> {out}")


if __name__ == "__main__":
    main()
