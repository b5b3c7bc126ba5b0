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


def test_prune_state_follows_view_rules_of_run_json():
    # a transposed conv whose name does not say so (the UNet trainer writes such rules)
    w = weight(3, 5, 2, 2)  # (c_in, c_out, kh, kw)
    state = {"up.0.weight": torch.from_numpy(w), "out.weight": torch.from_numpy(weight(2, 5))}
    rules = {"up.0.weight": "conv_transpose", "elsewhere.weight": "conv_transpose"}
    got = prune_state(state, keep="top-half", rules=rules)["up.0.weight"].numpy()
    half = np_half(w.transpose(1, 0, 2, 3).reshape(5, 12), "top-half")
    np.testing.assert_allclose(got, half.reshape(5, 3, 2, 2).transpose(1, 0, 2, 3), atol=1e-12)


def test_float32_weights_stay_float32():
    w = torch.from_numpy(weight(5, 7)).float()
    spec = whole("fc.weight", (5, 7))
    got = prune_param(spec, w, keep="top-half")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_half(w.double().numpy(), "top-half"), atol=1e-5)


# -- losses of pruned models per checkpoint --------------------------------------------------
def _np_mlp_loss(weights: dict, x: np.ndarray, y: np.ndarray, depth: int) -> float:
    h = x.reshape(len(x), -1).astype(np.float64)
    for i in range(depth):
        h = h @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
        if i < depth - 1:
            h = np.maximum(h, 0)
    return float(((h - np.eye(10)[y]) ** 2).mean())


def test_prune_losses_of_an_mlp_match_numpy(tmp_path):
    from safetensors.numpy import load_file

    from specan.prune import prune_losses
    from specan_trainers import deep_mlp

    out = tmp_path / "mlp"
    args = ["--depth", "3", "--width", "16", "--n-train", "100", "--batch-size", "50"]
    deep_mlp.main(
        [*args, "--max-steps", "2", "--save-at", "0,2", "--save-log", "0", "--out", str(out)]
    )
    calls = []

    class Progress:
        def start(self, *a):
            calls.append(("start", a))

        def advance(self, *a):
            calls.append(("advance", a))

        def finish(self):
            calls.append(("finish",))

    ds = prune_losses(out, progress=Progress())
    assert list(ds["keep"].values) == ["full", "top-half", "bottom-half"]
    assert list(ds["step"].values) == [0, 2]
    assert calls[0] == ("start", (2, 3, 0)) and calls[-1] == ("finish",) and len(calls) == 4
    data = deep_mlp.eval_data({"data": "", "n_train": 100})
    for j, step in enumerate([0, 2]):
        raw = load_file(str(out / f"checkpoints/step-{step:08d}.safetensors"))
        raw = {k: v.astype(np.float64) for k, v in raw.items()}
        for i, keep in enumerate(["full", "top-half", "bottom-half"]):
            w = dict(raw)
            if keep != "full":
                for layer in (0, 1):  # layers.2 is the output layer: spared
                    w[f"layers.{layer}.weight"] = np_half(raw[f"layers.{layer}.weight"], keep)
            for split in ("train", "val"):
                x, y = data[f"x_{split}"].numpy(), data[f"y_{split}"].numpy()
                expected = _np_mlp_loss(w, x, y, depth=3)
                got = float(ds[f"{split}_loss"].values[i, j])
                assert got == pytest.approx(expected, rel=1e-5), (keep, step, split)
    np.testing.assert_array_equal(ds["value"].values, ds["train_loss"].values)
