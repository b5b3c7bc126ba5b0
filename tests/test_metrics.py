"""Metrics and alignment pairs against hand-built matrices whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from specan import metrics
from specan.pairs import Pair, pairs_for, per_head_vo, resolve
from specan.views import ViewFacts, ViewSpec

rng = np.random.default_rng(0)


def orthonormal(n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def test_effective_rank_of_k_equal_singular_values_is_k() -> None:
    sigma = np.array([[3.0, 3.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(metrics.effective_rank(sigma), [3.0, 5.0])
    np.testing.assert_allclose(metrics.normalized_effective_rank(sigma), [0.6, 1.0])
    assert metrics.effective_rank(np.zeros(4)) == 0.0


def test_effective_rank_uses_sigma_not_sigma_squared() -> None:
    s = np.array([2.0, 1.0, 1.0])
    p = s / 4.0
    expected = np.exp(-(p * np.log(p)).sum())  # by hand: p = (1/2, 1/4, 1/4) -> 2^(1.5)
    assert metrics.effective_rank(s) == pytest.approx(expected)
    assert expected == pytest.approx(2**1.5)


def test_sva_equals_frobenius_inner_product_of_outer_products() -> None:
    u_t, v_t, u_r, v_r = orthonormal(7, 3), orthonormal(5, 3), orthonormal(7, 3), orthonormal(5, 3)
    s = metrics.sva(u_t, v_t, u_r, v_r)
    for j in range(3):
        for k in range(3):
            fro = np.sum(np.outer(u_t[:, j], v_t[:, j]) * np.outer(u_r[:, k], v_r[:, k]))
            assert s[j, k] == pytest.approx(abs(fro))
    np.testing.assert_allclose(np.diagonal(metrics.sva(u_t, v_t, u_t, v_t)), 1.0)
    assert metrics.diagonal_score(np.eye(20)) == 1.0


def svd_loader(mats: dict[str, np.ndarray]):
    """Vectors from NumPy's SVD, with a leading checkpoint axis of length 1."""

    def load(which: str, key: str) -> np.ndarray:
        u, _, vt = np.linalg.svd(mats[key], full_matrices=False)
        return (u if which == "U" else np.swapaxes(vt, -1, -2))[None]

    return load


def view(param: str, rule: str, shape, heads: int | None = None, **facts) -> ViewSpec:
    if "kernel" in facts:
        facts["kernel"] = tuple(facts["kernel"])
    return ViewSpec(param, param, rule, tuple(shape), heads, ViewFacts(**facts))


def test_linear_pair_next_is_transpose_gives_diagonal_one() -> None:
    w1 = orthonormal(8, 6) @ np.diag([6, 5, 4, 3, 2, 1.0]) @ orthonormal(6, 6).T  # (8, 6)
    # W2 = W1^T: its right singular vectors are exactly W1's left ones
    views = {"a": view("fc1", "linear", (8, 6)), "b": view("fc2", "linear", (6, 8))}
    prev, nxt = resolve(Pair("fc1", "fc2"), views, svd_loader({"a": w1, "b": w1.T}))
    a = metrics.alignment(prev, nxt)[0]
    np.testing.assert_allclose(np.diagonal(a), 1.0, atol=1e-10)


def test_conv_pair_uses_the_centre_position_of_the_next_kernel() -> None:
    c0, c1, c2 = 3, 4, 4
    prev = rng.standard_normal((c1, c0, 3, 3))
    u_prev = np.linalg.svd(prev.reshape(c1, -1), full_matrices=False)[0]
    nxt = np.zeros((c2, c1, 3, 3))
    nxt[:, :, 1, 1] = np.diag([4.0, 3.0, 2.0, 1.0]) @ u_prev.T  # right vectors = U_prev
    nxt[:, :, 0, 0] = 1e-3 * rng.standard_normal((c2, c1))  # off-centre taps: small
    views = {
        "p": view("c1", "conv", (c1, c0 * 9), c_in=c0, kernel=[3, 3]),
        "n": view("c2", "conv", (c2, c1 * 9), c_in=c1, kernel=[3, 3]),
    }
    mats = {"p": prev.reshape(c1, -1), "n": nxt.reshape(c2, -1)}
    p, n = resolve(Pair("c1", "c2", "conv"), views, svd_loader(mats))
    assert n.shape[-2] == c1
    np.testing.assert_allclose(np.diagonal(metrics.alignment(p, n)[0]), 1.0, atol=1e-4)


def test_embedding_meets_with_its_right_vectors() -> None:
    d = 6
    emb = rng.standard_normal((20, d))
    v_emb = np.linalg.svd(emb, full_matrices=False)[2].T
    in_proj = np.diag(np.arange(3 * d, 0, -1.0))[:, :d] @ v_emb.T  # (3d, d), right vecs = V_emb
    views = {"e": view("embed", "embedding", (20, d)), "q": view("attn", "in_proj", (3 * d, d))}
    p, n = resolve(Pair("embed", "attn", "embedding"), views, svd_loader({"e": emb, "q": in_proj}))
    np.testing.assert_allclose(np.diagonal(metrics.alignment(p, n)[0]), 1.0, atol=1e-10)


def test_qk_pair_is_left_with_left_per_head() -> None:
    heads, hd, d = 2, 3, 8
    q, k = np.zeros((heads, hd, d)), np.zeros((heads, hd, d))
    for h in range(heads):
        u = orthonormal(hd, hd)
        q[h] = u @ np.diag([3.0, 2.0, 1.0]) @ orthonormal(d, hd).T
        k[h] = u @ np.diag([5.0, 4.0, 0.5]) @ orthonormal(d, hd).T  # same left vectors
    views = {
        "q": view("attn", "q_heads", (hd, d), heads=heads),
        "k": view("attn", "k_heads", (hd, d), heads=heads),
    }
    p, n = resolve(Pair("attn", "attn", "qk"), views, svd_loader({"q": q, "k": k}))
    a = metrics.alignment(p, n)[0]  # [H, hd, hd]
    np.testing.assert_allclose(np.diagonal(a, axis1=-2, axis2=-1), 1.0, atol=1e-10)


@pytest.mark.parametrize(("direction", "half"), [("forward", 0), ("reverse", 1)])
def test_lstm_g_block_meets_the_directions_half(direction: str, half: int) -> None:
    h, n_in = 4, 5
    g = np.diag([4.0, 3.0, 2.0, 1.0]) @ orthonormal(n_in, h).T  # (h, in); U_g = I up to sign
    g = orthonormal(h, h) @ g
    ih = np.zeros((4 * h, n_in))
    ih[2 * h : 3 * h] = g  # only the g gate: the g block of U is U_g exactly
    u_g = np.linalg.svd(g, full_matrices=False)[0]
    nxt = np.zeros((4 * h, 2 * h))
    nxt[:h, half * h : (half + 1) * h] = np.diag([8.0, 6.0, 4.0, 2.0]) @ u_g.T
    nxt[h:, (1 - half) * h : (2 - half) * h] = rng.standard_normal((3 * h, h))  # other direction
    views = {
        "a": view("rnn.weight_ih_l0", "lstm", (4 * h, n_in), hidden=h),
        "b": view("rnn.weight_ih_l1", "lstm", (4 * h, 2 * h), hidden=h),
        "f": view("rnn.weight_ih_l1", "col_half", (4 * h, h), direction="forward"),
        "r": view("rnn.weight_ih_l1", "col_half", (4 * h, h), direction="reverse"),
    }
    halves = {"f": nxt[:, :h], "r": nxt[:, h:]}  # the next side is the SVD of the half
    pair = Pair("rnn.weight_ih_l0", "rnn.weight_ih_l1", "lstm", direction=direction)
    p, n = resolve(pair, views, svd_loader({"a": ih, "b": nxt, **halves}))
    a = metrics.alignment(p, n)[0]
    np.testing.assert_allclose(np.diagonal(a)[:h], 1.0, atol=1e-10)


def test_dimension_mismatch_is_a_reason_not_a_crash() -> None:
    views = {"a": view("fc1", "linear", (8, 6)), "b": view("fc2", "linear", (3, 5))}
    mats = {"a": rng.standard_normal((8, 6)), "b": rng.standard_normal((3, 5))}
    with pytest.raises(ValueError, match="do not meet"):
        resolve(Pair("fc1", "fc2"), views, svd_loader(mats))


def test_inferred_pairs_follow_state_dict_order() -> None:
    views = {"a": view("fc1", "linear", (8, 6)), "b": view("fc2", "linear", (3, 8))}
    pairs, rule = pairs_for({}, views)
    assert pairs == [Pair("fc1", "fc2")] and "inferred" in rule


def test_inferred_neox_pairs_use_pythia_names() -> None:
    names = ["gpt_neox.embed_in.weight"]
    for i in range(2):
        pre = f"gpt_neox.layers.{i}."
        names += [
            pre + n
            for n in (
                "attention.query_key_value.weight",
                "attention.dense.weight",
                "mlp.dense_h_to_4h.weight",
                "mlp.dense_4h_to_h.weight",
            )
        ]
    names.append("embed_out.weight")
    rules = {n: "embedding" if "embed_in" in n else "linear" for n in names}
    rules["gpt_neox.layers.0.attention.query_key_value.weight"] = "in_proj"
    rules["gpt_neox.layers.1.attention.query_key_value.weight"] = "in_proj"
    views = {n: view(n, rules[n], (4, 4)) for n in names}
    pairs, rule = pairs_for({}, views)
    assert "GPT-NeoX" in rule
    l0, l1 = "gpt_neox.layers.0.", "gpt_neox.layers.1."
    assert pairs[0] == Pair("gpt_neox.embed_in.weight", l0 + "attention.query_key_value.weight",
                            "embedding")  # fmt: skip
    assert Pair(l0 + "attention.query_key_value.weight", l0 + "attention.query_key_value.weight",
                "qk") in pairs  # fmt: skip
    assert Pair(l0 + "attention.query_key_value.weight", l0 + "attention.dense.weight",
                prev_part="v") in pairs  # fmt: skip
    assert Pair(l0 + "mlp.dense_4h_to_h.weight", l1 + "attention.query_key_value.weight") in pairs
    assert pairs[-1] == Pair(l1 + "mlp.dense_4h_to_h.weight", "embed_out.weight")
    assert len(pairs) == 1 + 2 * 4 + 1 + 1


def test_inferred_lstm_pairs_per_direction() -> None:
    names = [f"rnn.weight_{g}_l{k}{s}" for k in range(2) for s in ("", "_reverse")
             for g in ("ih", "hh")] + ["out.weight"]  # fmt: skip
    views = {n: view(n, "linear" if n == "out.weight" else "lstm", (4, 4)) for n in names}
    pairs, rule = pairs_for({}, views)
    assert "LSTM" in rule
    fwd = {(p.prev, p.next) for p in pairs if p.direction == "forward"}
    assert fwd == {
        ("rnn.weight_ih_l0", "rnn.weight_hh_l0"), ("rnn.weight_ih_l0", "rnn.weight_ih_l1"),
        ("rnn.weight_hh_l0", "rnn.weight_ih_l1"),  # the last layer: no ih -> hh (paper)
        ("rnn.weight_ih_l1", "out.weight"), ("rnn.weight_hh_l1", "out.weight"),
    }  # fmt: skip
    assert len(pairs) == 10


def test_analyses_are_cached_until_the_store_changes(tmp_path, monkeypatch) -> None:
    import specan
    from specan import store
    from specan.demo import write_synthetic_run
    from specan.pipeline import ingest

    run = write_synthetic_run(tmp_path / "run", checkpoints=3, width=16)
    (run / "checkpoints" / "step-00000200.safetensors").rename(tmp_path / "later.safetensors")
    ingest(run)
    first = specan.open(run).rank()
    assert (store.store_path(run) / "derived" / "rank" / "zarr.json").exists()
    calls = []
    real = metrics.normalized_effective_rank
    monkeypatch.setattr(metrics, "normalized_effective_rank", lambda s: calls.append(1) or real(s))
    again = specan.open(run).rank()
    assert calls == [] and np.array_equal(again.values, first.values)  # served from derived/
    (tmp_path / "later.safetensors").rename(run / "checkpoints" / "step-00000200.safetensors")
    ingest(run)  # a new checkpoint changes the fingerprint: recomputed
    third = specan.open(run).rank()
    assert calls and third.values.shape[1] == 3
    np.testing.assert_array_equal(third.values[:, :2], first.values)
    a1, a2 = specan.open(run).align(), specan.open(run).align()
    assert a1.pair.values.tolist() == a2.pair.values.tolist()
    np.testing.assert_array_equal(a1.diag.values, a2.diag.values)
    s1 = specan.open(run).sva(against=run)
    np.testing.assert_allclose(s1.score.values, 1.0, atol=1e-5)


def test_vo_per_head_slices_the_output_projection_by_head() -> None:
    heads, hd = 2, 3
    d = heads * hd
    w_v = rng.standard_normal((heads, hd, d))
    w_o = rng.standard_normal((d, d))
    views = {
        "vh": view("attn.in_proj", "v_heads", (hd, d), heads=heads),
        "o": view("attn.out_proj", "linear", (d, d)),
    }
    pair = Pair("attn.in_proj", "attn.out_proj", "vo_heads")
    p, n = resolve(pair, views, svd_loader({"vh": w_v, "o": w_o}))
    a = metrics.alignment(p, n)[0]  # [H, k2, k1]
    v_o = np.linalg.svd(w_o)[2].T  # columns: O's right singular vectors
    for h in range(heads):
        u_vh = np.linalg.svd(w_v[h], full_matrices=False)[0]
        # by hand: head h's rows of O's right vectors, not renormalised, against U of W_V,h
        expected = np.abs(v_o[h * hd : (h + 1) * hd].T @ u_vh)
        np.testing.assert_allclose(a[h], expected, atol=1e-10)
    assert per_head_vo([Pair("a", "b", prev_part="v"), Pair("b", "c")]) == [
        Pair("a", "b", "vo_heads"),
        Pair("b", "c"),
    ]


# -- the effective-rank bound of a top-k store (SPEC §2) ------------------------------------------
def bound_spectrum(kind: str, r: int, seed: int) -> np.ndarray:
    """σ of a random-init (Gaussian, m = 4r) matrix, or a hand-built trained-like spectrum."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return np.linalg.svd(rng.standard_normal((4 * r, r)), compute_uv=False)
    if kind == "spiked":
        s = np.linspace(1.0, 0.3, r)
        s[:3] = [6.0, 4.0, 3.0]
        return np.sort(s)[::-1]
    if kind == "decaying":
        return np.sort(np.logspace(0, -4, r) * (1 + 0.01 * rng.random(r)))[::-1] * 3.0
    levels = np.logspace(0, -4, (r + 3) // 4)  # clustered: groups of 4 near-equal values
    return np.sort(np.repeat(levels, 4)[:r] * (1 + 1e-7 * np.tile(np.arange(4), r)[:r]))[::-1]


def exact_erank(s: np.ndarray) -> float:
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()) / len(s))


def bound_of(s: np.ndarray, k: int) -> float:
    return float(metrics.normalized_effective_rank_bound(s[:k], np.sum(s[k:] ** 2), len(s)))


@pytest.mark.parametrize("kind", ["random", "decaying", "clustered", "spiked"])
@pytest.mark.parametrize("k", [1, 8, 32, 128])
def test_erank_bound_holds(kind: str, k: int) -> None:
    for seed in range(3):
        s = bound_spectrum(kind, 256, seed)
        assert exact_erank(s) <= bound_of(s, k) + 1e-12 and bound_of(s, k) <= 1.0 + 1e-12


def test_erank_bound_tightness_as_documented() -> None:
    slack = {("random", 256, 32): 0.024, ("random", 256, 128): 0.0065,
             ("spiked", 256, 32): 0.042, ("decaying", 256, 32): 1.11,
             ("decaying", 256, 128): 0.032, ("decaying", 768, 128): 0.79}  # fmt: skip
    for (kind, r, k), expected in slack.items():
        s = bound_spectrum(kind, r, 0)
        assert bound_of(s, k) / exact_erank(s) - 1 == pytest.approx(expected, abs=0.01)


def test_erank_bound_is_sharp_and_exact_where_it_must_be() -> None:
    s = bound_spectrum("decaying", 100, 1)
    flat = np.r_[s[:10], np.full(90, np.sqrt(np.sum(s[10:] ** 2) / 90))]  # a feasible spectrum
    assert bound_of(s, 10) == pytest.approx(exact_erank(flat), abs=1e-12)
    full = np.array([4.0, 2.0, 1.0, 0.5])
    assert bound_of(full, 4) == pytest.approx(exact_erank(full), abs=1e-12)  # k = R
    assert float(metrics.normalized_effective_rank_bound(np.zeros(3), 0.0, 5)) == 0.0
    batch = metrics.normalized_effective_rank_bound(np.array([[3.0, 1.0], [1.0, 1.0]]),
                                                   np.array([1.0, 0.0]), 3)  # fmt: skip
    assert batch.shape == (2,)
    with pytest.raises(ValueError):
        metrics.normalized_effective_rank_bound(np.ones(4), 0.0, 3)
