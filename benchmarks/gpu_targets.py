"""The two GPU targets of the batched-SVD issue, each against the per-matrix torch loop.

1. ``conv``: a stack of 4096 matrices 64×576 (a conv layer's views), every σ and vector, with
   each backend and route of ``specan_kernels`` for the device, against
   ``torch.linalg.svd(W, full_matrices=False)`` called once per matrix on the same device.
   Target on an H100: ≥ 10x the loop.
2. ``pythia``: one Pythia-1.4b-shaped checkpoint (24 layers, d 2048, embeddings 50304×2048,
   fp16 as published), every σ and the top-256 vectors of every weight matrix, end to end: read
   the file (or make the weights, without ``--checkpoint``), stack same-shaped matrices, move
   them to the device, decompose, bring σ, U, V back to the host. Against the loop doing the
   same one matrix at a time. Target on an H100: under 10 s and ≥ 10x the loop.

Every row has σ's worst error against float64 NumPy on one matrix (relative to σ₁) and ``ok``
when all σ meet the kernels' contract ``max(1e-4·σᵢ, 1e-5·σ₁)``.

    python benchmarks/pythia_like.py --size 1.4b --steps 0 --out /tmp/p14   # optional
    python benchmarks/gpu_targets.py --device cuda [--checkpoint /tmp/p14/step0/model.safetensors]
    python benchmarks/gpu_targets.py --device cpu --tiny        # smoke test of the script itself

(The per-head Q/K views that ``specan ingest`` adds for alignment are left out here: the targets
are about the weight matrices themselves.)
"""

from __future__ import annotations

import argparse
import json
import platform
from functools import partial
from typing import Any

import numpy as np
import torch

import specan_kernels as sk
from specan.bench import _sync, _timed
from specan_kernels import registry

PYTHIA_14B = {"d": 2048, "layers": 24, "vocab": 50304}
TINY = {"d": 64, "layers": 2, "vocab": 512, "conv_batch": 32, "top_k": 16}


def pythia_shapes(d: int, layers: int, vocab: int) -> dict[str, tuple[int, int, int]]:
    """GPT-NeoX's weight matrices, name -> (rows, cols, how many per checkpoint)."""
    return {
        "embed_in/out": (vocab, d, 2),
        "query_key_value": (3 * d, d, layers),
        "attention.dense": (d, d, layers),
        "dense_h_to_4h": (4 * d, d, layers),
        "dense_4h_to_h": (d, 4 * d, layers),
    }


def _sigma_error(got: torch.Tensor, w: torch.Tensor) -> tuple[float, bool]:
    ref = np.linalg.svd(w.float().double().cpu().numpy(), compute_uv=False)
    err = np.abs(got.double().cpu().numpy() - ref)
    return float(err.max() / ref[0]), bool(np.all(err <= np.maximum(1e-4 * ref, 1e-5 * ref[0])))


def _backends(device: str) -> list[str]:
    return [b for b in sk.available_backends()[1:] if registry.get(b).device_type == device]


def _routes(backend: str) -> list[str]:
    return ["auto", *(r for r in registry.get(backend).routes if r not in registry.TOPK_ROUTES)]


def bench_conv(device: str, b: int, repeats: int) -> list[dict[str, Any]]:
    """Target 1: a stack of b matrices 64×576, all σ and vectors."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(b, 64, 576, generator=g) / 576**0.5).to(device)
    rows = []
    loop_s, loop = _timed(
        lambda: [torch.linalg.svd(w, full_matrices=False) for w in batch], repeats, _sync(device)
    )
    err, ok = _sigma_error(loop[0][1], batch[0])
    rows.append({"target": "conv", "method": "loop torch.linalg.svd", "seconds": loop_s,
                 "speedup": 1.0, "max_dsigma_rel": err, "ok": ok})  # fmt: skip
    for backend in _backends(device):
        for route in _routes(backend):
            run = partial(sk.svd, batch, backend=backend, route=route)
            s, res = _timed(run, repeats, _sync(device))
            err, ok = _sigma_error(res.sigma[0], batch[0])
            rows.append({"target": "conv", "method": f"{backend} {route}", "ran": res.route,
                         "seconds": s, "speedup": loop_s / s, "max_dsigma_rel": err,
                         "ok": ok})  # fmt: skip
    return rows


def _checkpoint(args: argparse.Namespace) -> dict[str, list[torch.Tensor]]:
    """The weights by shape group, on the host, in the checkpoint's dtype (fp16)."""
    if args.checkpoint:
        from safetensors.torch import load_file

        groups: dict[str, list[torch.Tensor]] = {}
        for name, t in load_file(args.checkpoint).items():
            if t.ndim == 2 and t.is_floating_point() and "layernorm" not in name:
                groups.setdefault(f"{t.shape[0]}x{t.shape[1]}", []).append(t)
        return groups
    g = torch.Generator().manual_seed(1)
    return {
        name: [(0.02 * torch.randn(m, n, generator=g)).half() for _ in range(count)]
        for name, (m, n, count) in pythia_shapes(args.d, args.layers, args.vocab).items()
    }


def bench_pythia(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Target 2, end to end for one backend (its ``auto`` routes) and for the loop."""
    device, k = args.device, args.top_k

    def batched() -> dict[str, Any]:
        out = {}
        for name, mats in _checkpoint(args).items():
            res = sk.svd(torch.stack(mats), k=k, backend=backend)  # host stack -> device
            out[name] = (res.sigma.cpu(), res.U.cpu(), res.V.cpu(), res.route)
        return out

    def loop() -> dict[str, Any]:
        out = {}
        for name, mats in _checkpoint(args).items():
            for i, w in enumerate(mats):
                u, s, vh = torch.linalg.svd(w.to(device).float(), full_matrices=False)
                out[f"{name}[{i}]"] = (s.cpu(), u[:, :k].cpu(), vh[:k].cpu())
        return out

    row: dict[str, Any] = {"target": "pythia", "backend": backend, "top_k": k}
    row["seconds"], res = _timed(batched, 1, _sync(device))
    row["routes"] = {name: r[3] for name, r in res.items()}
    checks = [_sigma_error(res[name][0][0], mats[0]) for name, mats in _checkpoint(args).items()]
    row["max_dsigma_rel"] = max(e for e, _ in checks)
    row["ok"] = all(ok for _, ok in checks)
    if not args.no_loop:
        row["loop_seconds"], _ = _timed(loop, 1, _sync(device))
        row["speedup"] = row["loop_seconds"] / row["seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke test)")
    parser.add_argument("--conv-batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=PYTHIA_14B["d"])
    parser.add_argument("--layers", type=int, default=PYTHIA_14B["layers"])
    parser.add_argument("--vocab", type=int, default=PYTHIA_14B["vocab"])
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--checkpoint", help="a model.safetensors from benchmarks/pythia_like.py")
    parser.add_argument("--repeats", type=int, default=3, help="best of, for the conv stack")
    parser.add_argument("--no-loop", action="store_true", help="skip the Pythia loop baseline")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        platform.processor() or platform.machine())  # fmt: skip
    head = {
        "device": f"{args.device}: {device_name}", "torch": torch.__version__,
        "numpy": np.__version__, "cuda": torch.version.cuda, "dtype": "float32 compute",
        "backends": _backends(args.device),
    }  # fmt: skip
    try:
        import cupy

        head["cupy"] = cupy.__version__
    except Exception:  # optional
        head["cupy"] = None
    print(json.dumps(head))
    # warm-up: library handles, kernels, threads
    torch.linalg.svd(torch.randn(2, 64, 32, device=args.device))
    rows = bench_conv(args.device, args.conv_batch, args.repeats)
    for r in rows:
        ok = "ok" if r["ok"] else "BAD"
        print(f"conv {args.conv_batch}x64x576  {r['method']:<28} {r['seconds']:9.4f} s  "
              f"x{r['speedup']:7.2f}  dσ/σ₁ {r['max_dsigma_rel']:.1e} {ok}")  # fmt: skip
    shapes = pythia_shapes(args.d, args.layers, args.vocab)
    print(f"pythia d={args.d} layers={args.layers} vocab={args.vocab} top-{args.top_k}: "
          + ", ".join(f"{n} {m}x{c} x{b}" for n, (m, c, b) in shapes.items()))  # fmt: skip
    for backend in _backends(args.device):
        r = bench_pythia(args, backend)
        rows.append(r)
        loop = f"loop {r['loop_seconds']:.2f} s x{r['speedup']:.2f}" if "speedup" in r else ""
        print(
            f"pythia {backend:<12} {r['seconds']:8.2f} s  {loop}  dσ/σ₁ "
            f"{r['max_dsigma_rel']:.1e} {'ok' if r['ok'] else 'BAD'}  routes {r['routes']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
