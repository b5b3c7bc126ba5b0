"""Tests for specan.prune: rebuilding from singular triplets, checked against NumPy float64 SVDs of
views built by hand in the test (SPEC §1), never against specan's own extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specan.errors import PruneError
from specan.prune import prunable, prune_param, prune_state, rebuild
from specan.views import plan_views

RNG = np.random.default_rng(0)


def weight(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


# name, stored shape, plan_views keywords, the view by hand (NumPy), its expected rule
CASES = [
    ("fc.weight", (5, 7), {}, lambda w: w, "linear"),
    ("tok_embed.weight", (11, 4), {}, lambda w: w, "embedding"),
    ("conv.weight", (6, 3, 3, 3), {}, lambda w: w.reshape(6, 27), "conv"),
    ("conv1d.weight", (4, 2, 5), {}, lambda w: w.reshape(4, 10), "conv"),
    (
        "up.convtranspose.weight",
        (3, 5, 2, 2),  # (c_in, c_out, kh, kw)
        {},
        lambda w: w.transpose(1, 0, 2, 3).reshape(5, 12),
        "conv_transpose",
    ),
    ("rnn.weight_ih_l0", (16, 6), {}, lambda w: w, "lstm"),
    ("rnn.weight_hh_l1_reverse", (16, 4), {}, lambda w: w, "lstm"),
    ("attn.in_proj_weight", (24, 8), {"heads": 2}, lambda w: w, "in_proj"),
    # GPT-NeoX interleaved rows: a row permutation of [Q; K; V], the whole view as stored
    ("layers.0.attention.query_key_value.weight", (24, 8), {"heads": 2}, lambda w: w, "in_proj"),
    # GPT-2 Conv1D stores (in, out): the view is the transpose
    ("h.0.mlp.c_proj.weight", (6, 9), {"family": "gpt2"}, lambda w: w.T, "linear_t"),
    ("h.0.attn.c_attn.weight", (8, 24), {"family": "gpt2", "heads": 2}, lambda w: w.T, "in_proj"),
]


def whole(name: str, shape: tuple[int, ...], **kw):
    spec = plan_views({name: shape}, **kw)[0]
    return spec


def np_half(matrix: np.ndarray, keep: str) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    num = math.ceil(len(s) / 2)
    part = slice(0, num) if keep == "top-half" else slice(num, len(s))
    return (u[:, part] * s[part]) @ vt[part]


@pytest.mark.parametrize(("name", "shape", "kw", "view", "rule"), CASES, ids=[c[0] for c in CASES])
def test_all_triplets_rebuild_the_raw_weight(name, shape, kw, view, rule):
    w = weight(*shape)
    spec = whole(name, shape, **kw)
    assert spec.rule == rule
    u, s, vt = np.linalg.svd(view(w), full_matrices=False)
    t = torch.from_numpy
    got = rebuild(spec, t(s), t(u), t(vt.T.copy()), keep="full")
    assert tuple(got.shape) == shape
    np.testing.assert_allclose(got.numpy(), w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        prune_param(spec, torch.from_numpy(w), keep="full").numpy(), w, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("keep", ["top-half", "bottom-half"])
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[0].startswith(("conv.", "up.", "attn.", "h.0.attn", "layers.0"))],
    ids=lambda c: c[0],
)  # fmt: skip
def test_halves_match_numpy(case, keep):
    name, shape, kw, view, _ = case
    w = weight(*shape)
    spec = whole(name, shape, **kw)
    got = prune_param(spec, torch.from_numpy(w), keep=keep).numpy()
    # back to the stored shape by hand
    half = np_half(view(w), keep)
    if name == "conv.weight":
        expected = half.reshape(shape)
    elif name == "up.convtranspose.weight":
        expected = half.reshape(5, 3, 2, 2).transpose(1, 0, 2, 3)
    elif name == "h.0.attn.c_attn.weight":
        expected = half.T
    else:
        expected = half
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.linalg.norm(got) < np.linalg.norm(w)  # a real half, not the whole


def test_halves_add_up_and_odd_rank_gives_the_top_the_extra_one():
    w = weight(5, 3, 2, 2)  # transposed conv view (3, 20)... c_out = 3 here: R = 3
    spec = whole("dec.tconv1.weight", (5, 3, 2, 2))
    top = prune_param(spec, torch.from_numpy(w), keep="top-half").numpy()
    bottom = prune_param(spec, torch.from_numpy(w), keep="bottom-half").numpy()
    np.testing.assert_allclose(top + bottom, w, atol=1e-12)
    view = w.transpose(1, 0, 2, 3).reshape(3, 20)
    assert np.linalg.matrix_rank(top.transpose(1, 0, 2, 3).reshape(3, 20)) == 2
    assert np.linalg.matrix_rank(bottom.transpose(1, 0, 2, 3).reshape(3, 20)) == 1
    np.testing.assert_allclose(
        top.transpose(1, 0, 2, 3).reshape(3, 20), np_half(view, "top-half"), atol=1e-12
    )


def test_top_k_triplets_refuse_the_bottom_half():
    w = weight(6, 3, 3, 3)
    spec = whole("conv.weight", w.shape)
    u, s, vt = np.linalg.svd(w.reshape(6, 27), full_matrices=False)
    t = torch.from_numpy
    k = 3  # a store that kept the top 3 of R = 6
    top = rebuild(spec, t(s[:k]), t(u[:, :k].copy()), t(vt[:k].T.copy()), keep="top-half")
    np.testing.assert_allclose(top.numpy(), np_half(w.reshape(6, 27), "top-half").reshape(w.shape))
    with pytest.raises(PruneError, match="only the top 3 of 6 .* bottom-half .* not available"):
        rebuild(spec, t(s[:k]), t(u[:, :k].copy()), t(vt[:k].T.copy()), keep="bottom-half")
    with pytest.raises(PruneError, match="not available"):
        rebuild(spec, t(s[:2]), t(u[:, :2].copy()), t(vt[:2].T.copy()), keep="top-half")


def test_prune_state_spares_the_last_layer_and_one_d_entries():
    state = {
        "features.0.weight": torch.from_numpy(weight(4, 3, 3, 3)),
        "features.0.bias": torch.from_numpy(weight(4)),
        "features.1.running_mean": torch.from_numpy(weight(4)),
        "features.1.num_batches_tracked": torch.tensor(7),
        "features.3.weight": torch.from_numpy(weight(6, 4, 3, 3)),
        "classifier.weight": torch.from_numpy(weight(10, 6)),
    }
    assert [s.param for s in prunable(state)] == ["features.0.weight", "features.3.weight"]
    out = prune_state(state, keep="bottom-half")
    for name in ("features.0.bias", "features.1.running_mean", "classifier.weight"):
        assert out[name] is state[name]
    assert out["features.1.num_batches_tracked"].item() == 7
    w = state["features.3.weight"].numpy()
    np.testing.assert_allclose(
        out["features.3.weight"].numpy(),
        np_half(w.reshape(6, 36), "bottom-half").reshape(w.shape),
        atol=1e-12,
    )
    assert prune_state(state, keep="full") == state
    with pytest.raises(ValueError, match="expected one of"):
        prune_state(state, keep="middle")


def test_float32_weights_stay_float32():
    w = torch.from_numpy(weight(5, 7)).float()
    spec = whole("fc.weight", (5, 7))
    got = prune_param(spec, w, keep="top-half")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_half(w.double().numpy(), "top-half"), atol=1e-5)
