"""Randomized top-k SVD by randomized block Krylov iteration, batched; one implementation for
torch (CPU and CUDA), CuPy and NumPy arrays (see :mod:`specan_kernels.xp`).

Halko, Martinsson & Tropp (2011) sketch ``Y = A Ω`` and refine it with power iterations, keeping
only the last block ``(AAᵀ)^q A Ω``. Musco & Musco (2015, "Randomized block Krylov methods for
stronger and faster approximate SVD") keep every block: the Rayleigh–Ritz step runs over the
whole Krylov space ``span[AΩ, (AAᵀ)AΩ, …]``, which converges with the square root of the
spectral gap instead of the gap, so a thinner block reaches the same accuracy with fewer
columns multiplied by A. Measured on a 4096×16384 matrix with σᵢ = 1/i, top-128 σ to 1e-3
(2 threads): blocks of 64 reached 3.5e-5 after 12 products with A (768 columns in all), blocks
of 48 1.3e-4 after 14 (672 columns), against 8 products of 256 columns (2048) for power
iterations with 2k sketch columns. An 800×400 matrix, top-32 σ alone in blocks of 16: 5 blocks
after the first on a trained-like spectrum (σ from 1 to 1e-4), 12 on a flat Gaussian one; with
vectors, to the tighter tolerance: 6 and 13 (tests/test_kernels.py).

For a tall float32 stack ``A [B, m, n]``:

1. ``Q₀ = orth(A Ω)`` with a Gaussian ``Ω [n, b]``;
2. each iteration: ``Wᵢ = AᵀQᵢ``, then ``Qᵢ₊₁ = orth(A Wᵢ)`` orthogonalised against all earlier
   blocks twice (block classical Gram–Schmidt with re-orthogonalisation: a float32 Krylov basis
   loses orthogonality within a few blocks without it; the first pass's coefficients are read
   off the Gram matrix the loop keeps), then within itself by Cholesky QR twice; a block that
   is partly rounding noise (A's rank exhausted by the basis) keeps its real directions and
   takes random ones for the rest;
3. the Ritz values are the singular values of ``W = [W₀ … Wᵢ] = AᵀQ``, which every iteration
   already holds: they only grow towards the true σ. The loop stops when the top-k Ritz values
   are estimated within ``tol`` (relative) of their limit, or after ``iterations``;
4. vectors: ``W = V Σ Ũᵀ`` gives ``A ≈ Q Wᵀ = (Q Ũ) Σ Vᵀ``.

With ``products="bfloat16"`` (route ``randomized-bf16``, CPUs with AMX) the loop multiplies a
bfloat16 copy of A with float32 accumulation and output (:mod:`specan_kernels.bf16`: 3-4x the
float32 speed on thin blocks, which are bound by reading A), leaving out of its stopping test
the Ritz values the rounding of A hides; then step 4 is taken again with the float32 A over the
loop's top k + EXTRA Ritz vectors, so that the σ, U and V returned are A's. If those σ part from
the loop's by more than the σ contract (rounding mattered: a common offset large against the
spectrum under it), the whole loop runs again with float32 products.

The tail energy is exact for the data: ``‖A‖²_F − Σ_{i≤k} σ_i²`` (Ritz values are below the true
σ, so the tail is over-, never under-estimated).
"""

from __future__ import annotations

import torch

from . import bf16, xp
from .routes import Array, Decomposition, run_dense, tail_energy

ITERATIONS = 32  # at most this many Krylov blocks after the first (each: one Aᵀ· and one A·)
# Stop when the top-k Ritz values are estimated within this (relative) of σ. σ alone: the 1e-3
# of the accuracy contract. With vectors, tighter: a Ritz vector's angle error is about the
# square root of its value's, and at 1e-3 the vectors of a flat Gaussian spectrum (600 x 300,
# top 16) fell to |cos| 0.997 where the contract asks 0.999; at 3e-4 every test spectrum meets it.
TOL = 1e-3
TOL_VECTORS = 3e-4
# A new block's direction whose singular value, after projection off the basis, is below this
# fraction of the block's largest row norm is taken as rounding noise. Two float32 Gram-Schmidt
# passes leave about eps32·√L ≈ 1e-6 of it; the smallest legitimate one measured was 6e-5 (the
# second block, 4096 x 2048 with σᵢ = 1/i, top 128).
RANK_TOL = 1e-5
# Ritz vectors past k that the float32 Rayleigh–Ritz after a bfloat16 loop keeps: 0, 16 and 32
# gave the same top-128 σ (error 4.3e-5, 4096 x 16384, σᵢ = 1/i); 32 keep the k-th vectors'
# neighbours in the basis, for 10 ms more
EXTRA = 32
DRIFT = 1.0  # of TOL: how far the float32 Ritz values may move from the bfloat16 loop's
BF16_NOISE = 2**-8
NOISE = 1e-6  # σ below this fraction of σ₁ are rounding in float32 data (eps32 = 6e-8)


def _householder_rows(yt: Array) -> Array:
    """``Qᵀ`` of the thin Householder QR of ``Y``, given and returned as block rows ``Yᵀ [B, c, m]``
    (``Yᵀ.mT`` is the column-major matrix LAPACK's QR takes, so it is read without a transpose)."""
    return xp.mT(xp.namespace(yt).linalg.qr(xp.mT(yt))[0])


def _cholesky_pass(qt: Array, floor: Array | None = None) -> tuple[Array, float] | None:
    """One Cholesky QR step on block rows ``Qᵀ [B, c, m]``: ``L⁻¹ Qᵀ`` with ``L Lᵀ = Q Qᵀ``
    (float32 products, the factor in float64; Cholesky needs no scaling of rows whose norms
    differ, it is invariant to it). Returns the new rows and how far ``QᵀQ`` was from the
    identity; None where it is not numerically positive definite, or where a diagonal entry of
    L, an upper bound of the block's smallest singular value, falls below ``floor [B]``."""
    ns = xp.namespace(qt)
    g = xp.as_f64(qt @ xp.mT(qt))
    factor = xp.cholesky(g)
    if factor is None:
        return None
    if floor is not None and bool((ns.diagonal(factor, 0, -2, -1) < floor[..., None]).any()):
        return None
    eye = ns.eye(g.shape[-1], dtype=g.dtype)
    if xp.is_torch(g):
        eye = eye.to(g.device)
    return xp.as_f32(ns.linalg.inv(factor)) @ qt, float(ns.abs(g - eye).max())


def _project_out(qt: Array, basis: Array | None) -> Array:
    """The block rows ``qt`` less their components along the orthonormal rows of ``basis``."""
    return qt if basis is None else qt - (qt @ xp.mT(basis)) @ basis


def _fresh_rows(yt: Array, basis: Array | None, floor: Array, seed: int) -> Array:
    """Orthonormal rows, orthogonal to ``basis``, for a block that is numerically rank deficient:
    its directions whose singular values exceed ``floor [B]``, and Gaussian ones in place of the
    rest. Where A has run out of new directions (its rank is below the basis size: a low-rank
    matrix, a zero one) the block is rounding noise, and normalising noise gives directions that
    are not orthogonal to the basis; Rayleigh–Ritz over such a basis returned σ₁ five times too
    large on a rank-20 matrix. Any direction orthogonal to the basis keeps it valid."""
    ns = xp.namespace(yt)
    _, s, vt = ns.linalg.svd(yt, full_matrices=False)  # [B, c], [B, c, m]
    keep = s > floor[..., None]
    q = ns.where(keep[..., None], vt, xp.gaussian(yt, yt.shape, seed=seed))
    for _ in range(2):
        q = _householder_rows(_project_out(_project_out(q, basis), basis))
    return q


def _orth_rows(
    yt: Array, basis: Array | None = None, floor: Array | None = None, seed: int = 0
) -> Array:
    """``Qᵀ`` of the thin QR of ``Y``, given and returned as block rows ``Yᵀ [B, c, m]``.

    Cholesky QR twice (CholQR2): two ``c x c`` Gram matrices and two products instead of a
    Householder QR, which runs at a fraction of the matrix-multiply speed on such thin blocks
    (16384 x 48, 2 threads: 3.5 ms against 1.6 for both passes). One pass leaves an error of
    about eps·κ(Y)² in orthogonality; the second removes it when the first left ``QQᵀ`` within
    0.5 of the identity. A block conditioned worse than that, or with a singular value below
    ``floor [B]`` (Krylov blocks of a matrix whose rank the basis has exhausted), goes to
    `_fresh_rows`, which keeps it orthogonal to ``basis`` (the earlier blocks, already
    projected out of ``yt``) and draws its random rows from ``seed``.
    """
    first = _cholesky_pass(yt, floor)
    if first is not None:
        second = _cholesky_pass(first[0])
        if second is not None and second[1] < 0.5:
            return second[0]
    if floor is None:
        floor = xp.zeros(yt, (yt.shape[0],))
    return _fresh_rows(yt, basis, floor, seed)


def _floor(yt: Array) -> Array:
    """``[B]``: the singular value below which a direction of the block ``yt``, once projected
    off the basis, is rounding noise: RANK_TOL times its largest row norm before."""
    return xp.as_f64(xp.namespace(yt).amax(xp.row_norms(yt), -1)) * RANK_TOL


def _low(a: Array) -> bool:
    return xp.is_torch(a) and a.dtype == torch.bfloat16


def _rows(a: Array, xt: Array) -> Array:
    """``(A X)ᵀ [B, c, m]`` from the block rows ``Xᵀ [B, c, n]``, with A read as it lies in
    memory: a thin product runs faster with the large operand untransposed (4096 x 16384 stored
    row-major, 48 columns: 171-190 GFLOP/s as ``Xᵀ Aᵀ`` against 150-165 as ``A X``, 2 threads).
    A bfloat16 A (a torch CPU tensor): through :mod:`specan_kernels.bf16`, as ``A X`` then
    transposed, which MKL runs faster either way A lies (16384 x 4096 times 48 columns: 10-12 ms
    against 12-20 as ``Xᵀ Aᵀ``)."""
    if _low(a):
        return xp.mT(bf16.matmul(a, xp.mT(xt).to(torch.bfloat16)))
    if xp.row_major(a):
        return xp.mT(a @ xp.mT(xt))
    return xt @ xp.mT(a)


def _rows_t(a: Array, yt: Array) -> Array:
    """``(Aᵀ Y)ᵀ [B, c, n]`` from the block rows ``Yᵀ [B, c, m]``, A read as it lies (`_rows`)."""
    if _low(a):
        return xp.mT(bf16.matmul(xp.mT(a), xp.mT(yt).to(torch.bfloat16)))
    if xp.row_major(a):
        return yt @ a
    return xp.mT(xp.mT(a) @ xp.mT(yt))


def _ritz(gram: Array, k: int) -> Array:
    """Top-k singular values of ``W`` from its float64 Gram matrix ``WᵀW [B, L, L]``, descending."""
    ns = xp.namespace(gram)
    lam = ns.flip(ns.linalg.eigvalsh(gram), (-1,))
    return ns.sqrt(ns.clip(lam, 0, None))[..., :k]


def _grow(gram: Array | None, w64: Array, cols: int, new: int) -> Array:
    """``WᵀW`` of ``W = [W₀ … Wᵢ]`` (the first ``cols + new`` rows of the float64 block rows
    ``w64 [B, L, n]``) from that of its first ``cols``: only the new block's products (n·L·b
    flops instead of n·L² for the whole Gram every iteration)."""
    # products in float64: the Gram of the float32 W exactly (to eps64), so that its
    # eigenvectors are W's right singular vectors as accurately as an SVD of W would give them
    ns = xp.namespace(w64)
    block = w64[..., cols : cols + new, :]
    corner = block @ xp.mT(block)
    if gram is None:
        return corner
    cross = w64[..., :cols, :] @ xp.mT(block)  # [B, cols, b]
    top = ns.concatenate([gram, cross], -1)
    bottom = ns.concatenate([xp.mT(cross), corner], -1)
    return ns.concatenate([top, bottom], -2)


def _more_rows(buf: Array, rows: int, used: int) -> Array:
    """``buf [B, R, x]`` moved into a buffer of ``rows`` rows, its first ``used`` rows copied."""
    out = xp.empty(buf, (buf.shape[0], rows, buf.shape[-1]))
    out[..., :used, :] = buf[..., :used, :]
    return out


def default_block(k: int) -> int:
    """Block width for top-k: k/2. Measured at k = 128 on a 4096 x 16384 matrix with σᵢ = 1/i
    at each tolerance, best of 3, 2 threads, 2026-12-07 (float32 products; bfloat16 in
    brackets): with vectors (3e-4) 0.61 s (0.47) in 6 blocks, against 0.65 s (0.49) for 3k/8
    in 8 and 0.74 s (0.52) for 5k/8 in 6; σ alone (1e-3) 0.59 s (0.44) in 6, against 0.64 s
    (0.49) for 3k/8 in 8 and 0.55 s (0.42) for 5k/8 in 5, but wider blocks lose on flat
    spectra (Gaussian, bfloat16: 2.4 s at k/2 against 2.6 s at 3k/4)."""
    return max(8, (k + 1) // 2)


def randomized_svd(
    a: Array,
    k: int,
    vectors: bool = True,
    *,
    block: int | None = None,
    iterations: int | None = None,
    tol: float | None | str = "auto",
    generator: torch.Generator | None = None,
    products: str = "float32",
) -> tuple[Decomposition, int]:
    """Top-k singular values (and vectors) of every matrix in a tall float32 stack.

    Parameters
    ----------
    a
        ``[B, m, n]`` float32 with ``m >= n``: a torch tensor (CPU or CUDA), a NumPy or a CuPy
        array; the results are arrays of the same library.
    k
        Number of singular triplets, ``1 <= k <= n``.
    block
        Columns per Krylov block; None: :func:`default_block`.
        The basis never grows past n columns (there the Rayleigh–Ritz step is exact).
    iterations
        Most blocks after the first; 0 is the plain range finder with a block of
        ``max(block, k)`` columns. None: ``ITERATIONS``, and a stack whose estimate is still
        above ``tol`` after them is decomposed densely (``gesdd``, recorded as its route)
        rather than returned outside the contract; a number given is run as asked.
    tol
        Stop once the top-k Ritz values are estimated within this relative amount of their
        limit; ``"auto"``: ``TOL`` for σ alone, ``TOL_VECTORS`` with vectors; None always runs
        ``iterations``.
    generator
        For the Gaussian test matrix of a torch input (seeded from 0 when None, so results are
        repeatable; NumPy and CuPy inputs are always seeded from 0).
    products
        ``"float32"``; or ``"bfloat16"`` (torch CPU tensors where :func:`bf16.available`): the
        Krylov loop multiplies a bfloat16 copy of A, with float32 accumulation and output,
        then the Rayleigh–Ritz step is taken again with the float32 A on the top
        ``k + EXTRA`` Ritz vectors of the loop, so the σ and vectors are those of A.

    Returns
    -------
    Decomposition, int
        σ ``[B, k]``, U ``[B, m, k]``, V ``[B, n, k]`` (None without vectors), the tail energy,
        and the number of iterations that ran.
    """
    b, m, n = a.shape
    k = max(1, min(k, n))
    held = iterations is None  # to the contract: dense where the loop does not get there
    iterations = ITERATIONS if iterations is None else iterations
    width = default_block(k) if block is None else max(1, int(block))
    if tol == "auto":
        tol = TOL_VECTORS if vectors else TOL
    if iterations == 0:
        width = max(width, k)
    width = min(width, n)
    ns = xp.namespace(a)
    if products not in ("float32", "bfloat16"):
        raise ValueError(f"products must be 'float32' or 'bfloat16', not {products!r}")
    low = a
    if products == "bfloat16":
        if not (xp.is_torch(a) and a.device.type == "cpu" and bf16.available()):
            raise ValueError("bfloat16 products need a torch CPU tensor and a CPU with AMX-BF16")
        low = a.to(torch.bfloat16)  # its layout kept: products read it as A lies
    energy = xp.frobenius_sq(a)
    # The loop works on A / ‖A‖_F: every product is divided by it, so that the Krylov blocks
    # (σ² in size) and their Gram matrices (σ⁴) stay inside float32's range whatever A's scale
    # (entries of 1e15 overflowed a Cholesky Gram, of 1e30 a product; of 1e-30 underflowed).
    norm = ns.sqrt(energy)
    norm = ns.where(norm > 0, norm, 1)
    inv = xp.as_f32(1 / norm)[..., None, None]

    def times_a(x_rows: Array, by: Array = low) -> Array:
        return _rows(by, x_rows) * inv

    def times_at(y_rows: Array, by: Array = low) -> Array:
        return _rows_t(by, y_rows) * inv

    # Ritz values (of A / ‖A‖_F) below this are not resolved by the loop: NOISE of σ₁ in
    # float32; with bfloat16 products, about the spectral norm of the rounding error E of A
    # (entries within 2⁻⁹ of theirs: a random-like E of ‖E‖₂ ≈ 1.1e-3 ‖A‖_F (1/√m + 1/√n),
    # here doubled), which a matrix of rank below k would otherwise leave as a flat spectrum
    # the loop never settles
    resolved = None
    if low is not a:
        resolved = ns.sqrt(energy) / norm * (BF16_NOISE * (m**-0.5 + n**-0.5))
    # The bases are kept as block rows, Qᵀ [B, L, m] and Wᵀ [B, L, n] (float32, and Wᵀ again in
    # float64 for the Gram), in buffers that double when full: a new block is written in place
    # instead of the whole basis being concatenated every iteration.
    most = min(n, width * (iterations + 1))
    start = min(most, 8 * width)
    qt, wt = xp.empty(a, (b, start, m)), xp.empty(a, (b, start, n))
    w64 = xp.empty(a, (b, start, n), double=True)

    def append(q_rows: Array, cols: int) -> int:
        nonlocal qt, wt, w64
        new = q_rows.shape[-2]
        if cols + new > qt.shape[-2]:
            rows = min(most, max(cols + new, 2 * qt.shape[-2]))
            qt, wt, w64 = (_more_rows(buf, rows, cols) for buf in (qt, wt, w64))
        qt[..., cols : cols + new, :] = q_rows
        wt[..., cols : cols + new, :] = times_at(qt[..., cols : cols + new, :])
        w64[..., cols : cols + new, :] = wt[..., cols : cols + new, :]
        return new

    omega = xp.mT(xp.gaussian(a, (b, n, width), generator))  # as rows Ωᵀ
    yt = times_a(omega)
    first, cols = 0, append(_orth_rows(yt, None, _floor(yt)), 0)  # the newest block: first .. cols
    gram = _grow(None, w64, 0, cols)
    ritz, last, rate, done = None, None, None, 0
    converged = tol is None or not held  # nothing to hold the result to
    while True:
        if cols >= k:
            new = _ritz(gram, k)
            if ritz is not None and tol is not None:
                # Ritz values rise towards σ; from two successive steps δ the remaining error is
                # about δ·ρ/(1 − ρ) with ρ = δ/δ_prev (Aitken). Krylov convergence mostly speeds
                # up as it goes, so this overestimates it. Not inside a cluster of near-equal σ:
                # the basis first takes the cluster (a step of 0.4) and then resolves it slowly
                # and unevenly (steps of 2e-4, 3e-4, 6e-4, 1e-4, ...), so a ratio that falls by
                # more than 4x is taken for such a change of phase and the step before's ratio
                # kept. Top-64 of a 4096 x 1024 matrix whose top 256 σ are 1 ± 1e-3 (vectors):
                # a stop after 5 blocks at 2.5e-3 became 19 blocks at 4e-5. With vectors a
                # 4096 x 16384 matrix with σᵢ = 1/i (top 128) and Gaussian ones stop where they
                # did; σ alone of the former in blocks of 48 a block later (8, error 1.4e-6),
                # which made k/2 the width for σ alone too (`default_block`).
                step = abs(new - ritz) / ns.clip(new, 1e-30, None)
                rho = 0.5
                if last is not None:
                    raw = ns.clip(step / ns.clip(last, 1e-30, None), 0, 0.99)
                    rho = raw if rate is None else ns.where(raw < rate / 4, rate, raw)
                    rate = raw
                # Values below NOISE·θ₁ are left out: float32 data holds no smaller σ, and the
                # zero σ of a matrix of rank below k are rounding that never settles; nor, with
                # bfloat16 products, those the rounding of A hides (`resolved`).
                floor = NOISE * new[..., :1]
                if resolved is not None:
                    floor = ns.maximum(floor, xp.as_f32(resolved)[..., None])
                est = ns.where(new > floor, step * rho / (1 - rho), 0)
                if float(est.max()) < tol:
                    converged = True
                    break
                last = step
            ritz = new
        if done >= iterations or cols >= n:
            converged = converged or cols >= n  # a basis of n columns is exact
            break
        yt = times_a(wt[..., first:cols, :])  # expand from the newest block
        basis, floor = qt[..., :cols, :], _floor(yt)
        # Block classical Gram-Schmidt, twice. The first pass needs no product with the basis:
        # its coefficients ⟨A wᵣ, qₛ⟩ = ⟨wᵣ, Aᵀqₛ⟩ = ⟨wᵣ, wₛ⟩ are entries of the Gram WᵀW the
        # loop already holds. The second takes them from the data, which removes what rounding
        # in the products and in the first pass left along the basis.
        yt = _project_out(yt - xp.as_f32(gram[..., first:cols, :]) @ basis, basis)
        yt = yt[..., : min(width, n - cols), :]
        added = append(_orth_rows(yt, basis, floor, seed=cols), cols)
        gram = _grow(gram, w64, cols, added)
        first, cols = cols, cols + added
        done += 1
    if not converged:
        # `iterations` blocks left the estimate above tol: a spectrum the Krylov basis resolves
        # too slowly for float32 (1200 x 400, 100 + a Gaussian matrix: σ₁/σ₂ = 1283 and a flat
        # bulk, top-16 σ at 2.2e-3 after 32 blocks, where the bulk alone takes 16). Rather than
        # return σ outside the contract, decompose densely; the route says so.
        dense = run_dense(a, "gesdd", k, vectors)
        sigma = xp.contiguous(dense.sigma[..., :k])
        return Decomposition(sigma, dense.U, dense.V, dense.tail, dense.routes), done
    if low is not a:
        # The loop's basis holds A's top-k directions as well as float32 products would have
        # found them (rounding A to bfloat16 moved the top-128 σ of a 4096 x 16384 matrix by
        # 6.5e-5), but its Ritz values are those of the rounded A: take them again with A
        # itself, over the top k + EXTRA Ritz vectors (one float32 product of that width
        # instead of one of the whole basis).
        lam, vecs = ns.linalg.eigh(gram)
        rounded = ns.sqrt(ns.clip(ns.flip(lam, (-1,))[..., :k], 0, None))
        top = xp.as_f32(ns.flip(vecs, (-1,))[..., : min(cols, k + EXTRA)])
        qt = xp.mT(top) @ qt[..., :cols, :]
        wt = xp.contiguous(times_at(qt, a))
        cols = qt.shape[-2]
        w64 = xp.as_f64(wt)
        gram = w64 @ xp.mT(w64)
        new = _ritz(gram, k)
        # Where rounding A mattered, the two sets of values part: A's over a basis fitted to
        # the rounded A fall short of the rounded A's own (a large common offset, 1000 + a
        # Gaussian matrix: 0.56 of σ₆₄ lost). Then the whole loop runs again in float32. The
        # parting overstates the error (it holds the rounded A's own shift of σ, first order,
        # where A's values over the basis err at second order: heavy-tailed entries parted by
        # 3.3e-3 with an error of 5e-5), so it is held to the σ contract, not the vectors' tol.
        drift = ns.abs(new - rounded) / ns.clip(new, 1e-30, None)
        drift = ns.where(new > NOISE * new[..., :1], drift, 0)
        if float(drift.max()) > DRIFT * TOL:
            again, more = randomized_svd(
                a, k, vectors, block=block, iterations=None if held else iterations, tol=tol,
                generator=generator,
            )  # fmt: skip
            return again, done + more
    if vectors:
        # W = AᵀQ = V Σ Ũᵀ, so A ≈ Q Wᵀ = (Q Ũ) Σ Vᵀ; Ũ and Σ from the float64 Gram WᵀW the
        # loop already holds (an L x L eigenproblem instead of an SVD of the n x L W: 28 ms
        # against 90 ms at n = 4096, L = 384), then V = W Ũ Σ⁻¹.
        lam, vecs = ns.linalg.eigh(gram)
        lam, vecs = ns.flip(lam, (-1,))[..., :k], ns.flip(vecs, (-1,))[..., :k]
        s64 = ns.sqrt(ns.clip(lam, 0, None))
        sigma = xp.as_f32(s64 * norm[..., None])
        u = xp.contiguous(xp.mT(qt[..., :cols, :]) @ xp.as_f32(vecs))
        # a zero σ (a matrix of rank below k) leaves its v undefined: 0, not a division by 0
        inv = ns.where(s64 > 0, 1 / ns.where(s64 > 0, s64, 1), 0)
        v = (xp.mT(wt[..., :cols, :]) @ xp.as_f32(vecs)) * xp.as_f32(inv)[..., None, :]
    else:
        # the loop ends right after the Ritz values of the final basis were taken (when it
        # held k columns): an eigenproblem of up to thousands of columns not done twice
        sigma = xp.as_f32((new if cols >= k else _ritz(gram, k)) * norm[..., None])
        u = v = None
    route = "randomized" if low is a else "randomized-bf16"
    dec = Decomposition(sigma, u, v, tail_energy(a, sigma, k, energy), [route] * b)
    return dec, done
