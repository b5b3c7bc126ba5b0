"""SVD throughput of this machine: every route per weight shape, beside the per-matrix baselines.

``specan bench`` and ``benchmarks/bench_svd.py`` call :func:`run` and print what it returns. For
each shape (a stack of B same-shaped matrices, as the pipeline batches them) it times, on the same
float32 data:

* ``loop svd``: ``torch.linalg.svd(W, full_matrices=False)`` per matrix (the notebook loop);
* ``loop svdvals``: ``torch.linalg.svdvals(W)`` per matrix;
* ``auto`` and every dense route of the backend, with vectors (top-k) and σ only.

Each row has matrices/s, GFLOP/s from the nominal thin-SVD flop count
(:func:`specan_kernels.flops`, the same work for every route, so rates compare), its fraction of
this machine's float32 matrix-multiply peak measured in the same run, its speed-up over the
matching loop, and σ's worst error against float64 NumPy (relative to σ₁, on the first matrix),
with ``ok`` when every σ meets the kernel contract ``max(1e-4·σᵢ, 1e-5·σ₁)``.

The randomized section compares top-k σ of one large matrix with a known spectrum against
scikit-learn's ``randomized_svd`` (2k columns, the fewest power iterations that reach the same
accuracy, 1e-3 relative on the top k) and ``torch.svd_lowrank`` (at 1-4 power iterations, the
fewest columns that reach it on three seeds), and at their defaults.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# name -> (B, m, n): Pythia-160m … 1.4b views (attention in/out, MLP up/down, QKV, embeddings),
# conv stacks and per-head stacks.
SHAPES: dict[str, tuple[int, int, int]] = {
    "768x768": (12, 768, 768),
    "3072x768": (12, 3072, 768),
    "768x3072": (12, 768, 3072),
    "2304x768": (12, 2304, 768),
    "50304x768": (2, 50304, 768),
    "2048x2048": (4, 2048, 2048),
    "8192x2048": (4, 8192, 2048),
    "6144x2048": (4, 6144, 2048),
    "50304x2048": (1, 50304, 2048),
    "conv64x576": (32, 64, 576),
    "heads12x64x768": (12, 64, 768),
}
QUICK_SHAPES: dict[str, tuple[int, int, int]] = {
    "256x256": (4, 256, 256),
    "1024x256": (4, 1024, 256),
    "256x1024": (4, 256, 1024),
    "conv64x576": (8, 64, 576),
    "heads12x64x768": (12, 64, 768),
}
RANDOMIZED_SHAPE = (4096, 16384, 128)  # m, n, k
QUICK_RANDOMIZED_SHAPE = (512, 2048, 32)
TARGET = 1e-3  # relative error on the top-k σ that every randomized method must reach


@dataclass(frozen=True)
class BenchOptions:
    """What ``specan bench`` measures."""

    device: str = "cpu"  # "cpu" or "cuda"
    shapes: Sequence[str] | None = None  # names from SHAPES or "BxMxN"; None: all (or quick)
    quick: bool = False  # small shapes, one repeat: a check that everything runs
    k: int = 128  # vectors kept, as ingest's --top-k
    repeats: int | None = None  # best of; default 3 (1 with quick)
    randomized: bool = True  # the randomized top-k comparison
    spectrum: str = "random"  # "random" (init) or "decaying" (trained-like, 1 → 1e-4)


def parse_shape(name: str) -> tuple[int, int, int]:
    """A known shape name, or ``MxN`` / ``BxMxN``."""
    if name in SHAPES:
        return SHAPES[name]
    if name in QUICK_SHAPES:
        return QUICK_SHAPES[name]
    try:
        dims = [int(x) for x in name.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or min(dims) < 1:
        known = ", ".join(SHAPES)
        raise ValueError(f"shape {name!r}: give MxN, BxMxN or one of {known}")
    return dims[0], dims[1], dims[2]


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_peak(device: str, n: int, repeats: int = 3) -> float:
    """Best float32 ``torch.mm`` rate of two n×n matrices on ``device``, in GFLOP/s."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = _sync(device)
    torch.mm(a, b)  # warm-up: thread pool, MKL/cuBLAS initialisation
    t, _ = _timed(lambda: torch.mm(a, b), repeats, sync)
    return 2.0 * n**3 / t / 1e9


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name()}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({os.cpu_count()} logical cores)"


def make_stack(b: int, m: int, n: int, spectrum: str, seed: int = 0):
    """``b`` float32 ``m × n`` matrices: Gaussian (random init) or with σ decaying 1 → 1e-4."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, m, n, generator=g) / max(m, n) ** 0.5
    if spectrum == "random":
        return x
    if spectrum != "decaying":
        raise ValueError(f"spectrum must be random or decaying, not {spectrum!r}")
    # Scale the columns of a Gaussian (σ ≈ the scales when m ≥ n) and rotate: ill-conditioned
    # like a trained weight, cheap to build at any size.
    r = min(m, n)
    scales = torch.logspace(0, -4, r)
    if m >= n:
        q = torch.linalg.qr(torch.randn(b, n, n, generator=g)).Q
        return (x * scales) @ q.mT
    q = torch.linalg.qr(torch.randn(b, m, m, generator=g)).Q
    return q @ (x * scales[:, None])


def _sigma_error(sigma, ref) -> tuple[float, bool]:
    import numpy as np

    got = sigma.double().cpu().numpy()
    err = np.abs(got - ref[: len(got)])
    tol = np.maximum(1e-4 * ref[: len(got)], 1e-5 * ref[0])
    return float(err.max() / ref[0]), bool(np.all(err <= tol))


def bench_shape(
    name: str, shape: tuple[int, int, int], opts: BenchOptions, peak: float, repeats: int
) -> list[dict[str, Any]]:
    """Every route and both loops on one stack; one row each."""
    import numpy as np
    import torch

    import specan_kernels as sk

    b, m, n = shape
    batch = make_stack(b, m, n, opts.spectrum).to(opts.device)
    mats = list(batch.unbind(0))
    ref = np.linalg.svd(batch[0].double().cpu().numpy(), compute_uv=False)
    k = min(opts.k, m, n)
    backend = sk.resolve_backend("auto", on_cuda=opts.device.startswith("cuda"))
    from specan_kernels import registry

    routes = [r for r in registry.get(backend).routes if r not in registry.TOPK_ROUTES]
    sync = _sync(opts.device)
    runs: list[tuple[str, bool, Callable[[], Any]]] = [
        ("loop svd", True, lambda: [torch.linalg.svd(w, full_matrices=False) for w in mats]),
        ("loop svdvals", False, lambda: [torch.linalg.svdvals(w) for w in mats]),
    ]
    for vectors in (True, False):
        for route in ("auto", *routes):
            runs.append((route, vectors, partial_svd(batch, k=k, vectors=vectors, route=route)))
    rows: list[dict[str, Any]] = []
    base: dict[bool, float] = {}
    for label, vectors, fn in runs:
        seconds, out = _timed(fn, repeats, sync)
        if isinstance(out, sk.SVDResult):
            sigma, ran = out.sigma[0], out.route
        elif vectors:
            sigma, ran = out[0][1], "gesdd"
        else:
            sigma, ran = out[0], "gesdd"
        err, ok = _sigma_error(sigma, ref)
        if label.startswith("loop"):
            base[vectors] = seconds
        gflops = b * sk.flops(m, n, vectors) / seconds / 1e9
        rows.append(
            {
                "shape": name, "batch": b, "m": m, "n": n, "k": k if vectors else 0,
                "method": label, "vectors": vectors, "route": ran, "seconds": seconds,
                "matrices_per_s": b / seconds, "gflops": gflops, "frac_peak": gflops / peak,
                "speedup": base[vectors] / seconds, "max_dsigma_rel": err, "ok": ok,
            }
        )  # fmt: skip
    return rows


def partial_svd(batch, **kw) -> Callable[[], Any]:
    import specan_kernels as sk

    return lambda: sk.svd(batch, **kw)


def known_spectrum_matrix(m: int, n: int, s, seed: int = 0):
    """A float32 ``m × n`` matrix (m ≤ n) with singular values ``s`` (length m), cheaply.

    ``U diag(s) Vᵀ`` with U and V Kronecker products of small orthogonal factors (so V's
    orthonormal columns cost no large QR), applied without forming U.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def orth(a: int, b: int):
        return torch.linalg.qr(torch.randn(a, b, generator=g, dtype=torch.float64)).Q

    def split(x: int) -> tuple[int, int]:
        f = int(round(x**0.5))
        while x % f:
            f -= 1
        return f, x // f

    (ma, mb), (na, nb) = split(m), split(n)
    # V = kron(Va, Vb): n × m with orthonormal columns needs a factorisation m = ca * cb.
    ca = min(na, ma * mb)
    while m % ca:
        ca -= 1
    cb = m // ca
    if cb > nb:
        raise ValueError(f"cannot build a {m}x{n} known-spectrum matrix")
    v = torch.kron(orth(na, ca), orth(nb, cb))  # n × m
    u1, u2 = orth(ma, ma), orth(mb, mb)
    core = torch.as_tensor(s, dtype=torch.float64)[:, None] * v.T  # m × n
    a = torch.einsum("ai,bj,ijn->abn", u1, u2, core.reshape(ma, mb, n)).reshape(m, n)
    return a.float()


def _cheapest_lowrank(a, k: int, err: Callable[[Any], float]) -> list[tuple[int, int]]:
    """``(niter, q)`` for ``torch.svd_lowrank`` at 1-4 power iterations: the smallest ``q`` (a
    multiple of 8 from k + 8 to 3k) whose top-k σ reach TARGET on three seeds, found by bisection
    (torch draws its test matrix from the global generator, so one seed can pass by luck: on a
    4096 x 16384 matrix with σᵢ = 1/i, q = 240 reached 1.0e-3 on one seed of three)."""
    import torch

    def reaches(q: int, niter: int) -> bool:
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            if err(torch.svd_lowrank(a, q=q, niter=niter)[1][:k].cpu().numpy()) > TARGET:
                return False
        return True

    found = []
    qs = list(range(k + 8, min(3 * k, min(a.shape)) + 1, 8))
    for niter in (1, 2, 3, 4):
        if not qs or not reaches(qs[-1], niter):
            continue
        lo, hi = 0, len(qs) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(qs[mid], niter) else (mid + 1, hi)
        found.append((niter, qs[lo]))
    return found


def bench_randomized(
    opts: BenchOptions, repeats: int, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Top-k σ of one wide matrix: ours vs sklearn and torch.svd_lowrank at equal accuracy."""
    import numpy as np
    import torch

    import specan_kernels as sk
    from specan_kernels import randomized

    m, n, k = QUICK_RANDOMIZED_SHAPE if opts.quick else RANDOMIZED_SHAPE
    s = np.arange(1, m + 1, dtype=np.float64) ** -1.0  # trained-like power-law decay
    a = known_spectrum_matrix(m, n, s)
    ref = np.asarray(s[:k])
    sync = _sync(opts.device)
    a_dev = a.to(opts.device)

    def err(sig) -> float:
        got = np.sort(np.asarray(sig, dtype=np.float64))[::-1][:k]
        return float(np.max(np.abs(got - ref) / ref))

    rows: list[dict[str, Any]] = []

    def add(method: str, settings: str, fn: Callable[[], Any], get, note=None) -> dict[str, Any]:
        """Time ``fn``; ``note`` adds to the settings what its output says (blocks, route)."""
        if progress:
            progress(f"randomized top-{k}: {method}, {settings}")
        seconds, out = _timed(fn, repeats, sync)
        settings += note(out) if note else ""
        row = {"method": method, "settings": settings, "seconds": seconds, "error": err(get(out))}
        rows.append(row)
        return row

    def ran(out: Any) -> str:
        return f"; ran {out[1] + 1} blocks, route {out[0].routes[0]}"

    from specan_kernels import registry

    # the route auto takes for such matrices at full size (the quick one is below its threshold)
    route = registry.get(sk.resolve_backend("auto", on_cuda=a_dev.is_cuda)).routes[-1]
    ours = add(
        "specan randomized",
        "block Krylov, defaults with vectors: blocks of k/2, adaptive (≤ 32 blocks, tol 3e-4)",
        lambda: sk.svd(a_dev, k=k, vectors=True, route=route, sigma="top-k"),
        lambda r: r.sigma[0].cpu().numpy(),
    )
    tall = a_dev.T[None]  # as svd decomposes it
    # on CPUs with AMX the route multiplies a bfloat16 copy of A (randomized-bf16); float32
    # products are timed too, as the route every other machine runs
    products = ["bfloat16", "float32"] if route == "randomized-bf16" else ["float32"]
    ours["settings"] += ran(sk.randomized_svd(tall, k, vectors=True, products=products[0]))
    # The others are run at the fewest iterations that reach the target; ours at the tolerance
    # that asks for it (the σ-only defaults), vectors still computed: equal accuracy
    block = randomized.default_block(k)
    for i, prod in enumerate(products):
        row = add(
            "specan randomized",
            f"same, blocks of {block}, tol {randomized.TOL:g} (the σ contract), with vectors, "
            f"{prod} products",
            lambda p=prod: sk.randomized_svd(
                tall, k, vectors=True, block=block, tol=randomized.TOL, products=p
            ),
            lambda r: r[0].sigma[0].cpu().numpy(),
            ran,
        )
        if i == 0:
            equal = row
            equal["equal_accuracy"] = True

    def first_ok(method, make, get, settings) -> None:
        for it in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16):
            row = add(method, settings(it), make(it), get)
            if row["error"] <= TARGET:
                row["equal_accuracy"] = True
                return
            rows.pop()
        rows.append({"method": method, "settings": "none reached", "seconds": None, "error": None})

    try:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd

        a_np = a.numpy()
        add(
            "sklearn randomized_svd",
            "defaults: n_oversamples=10, n_iter='auto' (7)",
            lambda: sk_rsvd(a_np, k, random_state=0),
            lambda r: r[1],
        )
        first_ok(
            "sklearn randomized_svd",
            lambda it: lambda: sk_rsvd(a_np, k, n_oversamples=k, n_iter=it, random_state=0),
            lambda r: r[1],
            lambda it: f"n_oversamples={k}, n_iter={it}",
        )
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        pass
    add(
        "torch.svd_lowrank",
        f"q={k + 10}, niter=2 (default niter)",
        lambda: torch.svd_lowrank(a_dev, q=k + 10, niter=2),
        lambda r: r[1][:k].cpu().numpy(),
    )
    if progress:
        progress(f"randomized top-{k}: torch.svd_lowrank, the fewest columns reaching {TARGET:g}")
    for niter, q in _cheapest_lowrank(a_dev, k, err):
        row = add(
            "torch.svd_lowrank",
            f"q={q}, niter={niter} (the smallest q that reaches the target on 3 seeds)",
            lambda q=q, niter=niter: torch.svd_lowrank(a_dev, q=q, niter=niter),
            lambda r: r[1][:k].cpu().numpy(),
        )
        row["equal_accuracy"] = row["error"] <= TARGET
    for row in rows:
        if row["seconds"]:
            row["x_ours"] = row["seconds"] / equal["seconds"]
    return {"m": m, "n": n, "k": k, "spectrum": "σ_i = 1/i", "target": TARGET, "rows": rows}


def run(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything ``opts`` asks for; returns ``{"header", "rows", "randomized"}``."""
    import numpy
    import torch

    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda': CUDA is not available here")
    repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.shapes:
        shapes = {name: parse_shape(name) for name in opts.shapes}
    else:
        shapes = QUICK_SHAPES if opts.quick else SHAPES
    peak_n = 1024 if opts.quick else 4096
    peak = matmul_peak(opts.device, peak_n)
    header = {
        "device": _device_name(opts.device),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "top_k": opts.k,
        "spectrum": opts.spectrum,
        "repeats": repeats,
        "quick": opts.quick,
        "matmul_peak_gflops": peak,
        "matmul_peak_size": peak_n,
        "shapes": {name: list(s) for name, s in shapes.items()},
    }
    torch.linalg.svd(torch.randn(2, 64, 32, device=opts.device))  # warm-up: LAPACK, threads
    rows: list[dict[str, Any]] = []
    for name, shape in shapes.items():
        if progress:
            progress(f"{name}: {shape[0]} x ({shape[1]}, {shape[2]})")
        rows.extend(bench_shape(name, shape, opts, peak, repeats))
    randomized = None
    if opts.randomized:
        randomized = bench_randomized(opts, repeats, progress)
    return {"header": header, "rows": rows, "randomized": randomized}


def table_lines(result: dict[str, Any]) -> list[str]:
    """The result as fixed-width text lines, for people."""
    h = result["header"]
    lines = ["specan bench: SVD throughput"]
    for key in ("device", "torch", "numpy", "torch_threads", "dtype", "top_k", "spectrum"):
        lines.append(f"  {key:<14} {h[key]}")
    lines.append(
        f"  {'matmul peak':<14} {h['matmul_peak_gflops']:.1f} GFLOP/s "
        f"(float32 torch.mm {h['matmul_peak_size']}², best of 3)"
    )
    lines.append("")
    title = (
        f"{'shape':<15} {'B':>3} {'method':<13} {'vec':<3} {'route':<17} {'seconds':>8} "
        f"{'mat/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'x loop':>7} {'dσ/σ1':>8} ok"
    )
    lines += [title, "-" * len(title)]
    shape = None
    for r in result["rows"]:
        if shape is not None and r["shape"] != shape:
            lines.append("")
        shape = r["shape"]
        vec = "yes" if r["vectors"] else "no"
        lines.append(
            f"{r['shape']:<15} {r['batch']:>3} {r['method']:<13} {vec:<3} "
            f"{r['route']:<17} {r['seconds']:>8.3f} {r['matrices_per_s']:>8.2f} "
            f"{r['gflops']:>8.1f} {100 * r['frac_peak']:>5.1f}% {r['speedup']:>7.2f} "
            f"{r['max_dsigma_rel']:>8.1e} {'ok' if r['ok'] else 'NO'}"
        )  # fmt: skip
    lines += [
        "",
        "x loop: the matching per-matrix loop's seconds (svd with vectors, svdvals without) over",
        "this row's. GFLOP/s: nominal thin-SVD flops (specan_kernels.flops) over the time.",
        "ok: every σ of the first matrix within max(1e-4·σ_i, 1e-5·σ_1) of float64 NumPy.",
    ]
    rnd = result.get("randomized")
    if rnd:
        lines += [
            "",
            f"randomized top-{rnd['k']} of a {rnd['m']}x{rnd['n']} matrix, {rnd['spectrum']}; "
            f"target: top-k σ within {rnd['target']:g} relative",
            "  (x ours: seconds over those of specan at the target's tolerance, the second row)",
        ]
        for r in rnd["rows"]:
            if r["seconds"] is None:
                lines.append(f"  {r['method']:<24} {r['settings']}")
                continue
            missed = "  [above the target]" if r["error"] > rnd["target"] else ""
            lines.append(
                f"  {r['method']:<24} {r['seconds']:>8.3f} s  {r['x_ours']:>5.2f}x ours  "
                f"error {r['error']:.1e}  {r['settings']}{missed}"
            )
    return lines
