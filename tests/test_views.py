"""Tests for specan.views: each rule on hand-built tensors whose views are known by construction."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from specan.errors import ViewRuleError
from specan.views import (
    FAMILIES,
    KEY_MAX,
    WHOLE_RULES,
    ViewFacts,
    ViewSpec,
    detect_family,
    extract,
    plan_views,
    restore,
    safe_key,
    select,
)


def arange(*shape: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return torch.arange(n, dtype=torch.float32).reshape(shape)


def one(shapes: dict, **kw) -> ViewSpec:
    (spec,) = plan_views(shapes, **kw)
    return spec


# --- module hygiene --------------------------------------------------------------------------


def test_import_does_not_load_torch():
    code = "import sys, specan.views; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_viewspec_is_frozen_and_facts_not_compared():
    a = ViewSpec("k", "p", "linear", (2, 3), None, ViewFacts(hidden=1))
    b = ViewSpec("k", "p", "linear", (2, 3), None, ViewFacts(hidden=2))
    assert a == b and hash(a) == hash(b)
    assert a != ViewSpec("k", "p", "linear", (3, 2), None, ViewFacts(hidden=1))
    with pytest.raises(AttributeError):
        a.key = "z"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.facts.hidden = 3  # type: ignore[misc]
    assert ViewSpec("k", "p", "linear", (2, 3)).facts == ViewFacts()


# --- linear and embedding --------------------------------------------------------------------


def test_linear_as_stored():
    w = torch.randn(5, 3)
    spec = one({"fc.weight": (5, 3), "fc.bias": (5,)})
    assert (spec.key, spec.rule, spec.shape, spec.heads) == ("fc.weight", "linear", (5, 3), None)
    out = extract(spec, w)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, w)


@pytest.mark.parametrize(
    "name",
    ["embed.weight", "wte.weight", "transformer.wpe.weight", "embedding.weight", "embed_in.weight"]
    + ["model.embed_tokens.weight", "encoder.tok_embeddings.weight", "pos_embed"],
)
def test_embedding_names(name):
    spec = one({name: (11, 4)})
    assert spec.rule == "embedding" and spec.shape == (11, 4)
    assert spec.facts.output_space == "V"
    w = torch.randn(11, 4)
    assert torch.equal(extract(spec, w), w)


@pytest.mark.parametrize("name", ["embed_out.weight", "time_embed.0.weight", "gpt_neox.fc.weight"])
def test_not_embeddings(name):
    assert one({name: (7, 4)}).rule == "linear"


def test_one_d_and_empty_and_integer_skipped():
    @dataclass
    class Info:  # like runs.TensorInfo
        shape: tuple
        dtype: str

    shapes = {
        "bn.weight": (4,),
        "scale": (),
        "empty.weight": (0, 3),
        "position_ids": Info((1, 8), "I64"),
        "fc.weight": Info((2, 3), "BF16"),
    }
    assert [s.param for s in plan_views(shapes)] == ["fc.weight"]


# --- convolutions ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(3,), (3, 2), (2, 3, 2)])
def test_conv_rows_reshape_back(kernel):
    c_out, c_in = 4, 3
    w = arange(c_out, c_in, *kernel)
    spec = one({"features.0.weight": w.shape})
    k = 1
    for x in kernel:
        k *= x
    assert spec.rule == "conv" and spec.shape == (c_out, c_in * k)
    assert spec.facts == ViewFacts(c_in=c_in, kernel=tuple(kernel))
    view = extract(spec, w)
    for i in range(c_out):
        assert torch.equal(view[i].reshape(c_in, *kernel), w[i])
    # column j is input channel j // k at kernel offset j % k, in storage order
    flat_k = w.reshape(c_out, c_in, k)
    for j in range(c_in * k):
        assert torch.equal(view[:, j], flat_k[:, j // k, j % k])


@pytest.mark.parametrize(
    "name", ["up.0.ConvTranspose.weight", "dec.deconv1.weight", "u.convT2.weight", "upconv.weight"]
)
def test_conv_transpose_by_name(name):
    c_in, c_out, kernel = 3, 5, (2, 2)
    w = torch.randn(c_in, c_out, *kernel)
    spec = one({name: w.shape})
    assert spec.rule == "conv_transpose" and spec.shape == (c_out, c_in * 4)
    assert spec.facts == ViewFacts(c_in=c_in, kernel=(2, 2))
    view = extract(spec, w)
    swapped = w.transpose(0, 1).contiguous()
    for o in range(c_out):
        assert torch.equal(view[o].reshape(c_in, *kernel), swapped[o])
        for i in range(c_in):
            assert torch.equal(view[o, i * 4 : (i + 1) * 4], w[i, o].flatten())


def test_rules_override_beats_name():
    w = torch.randn(3, 5, 2)
    spec = one({"blocks.2.weight": w.shape}, rules={"blocks.2.weight": "conv_transpose"})
    assert spec.rule == "conv_transpose" and spec.shape == (5, 6)
    assert torch.equal(extract(spec, w), w.transpose(0, 1).reshape(5, 6))
    spec = one({"up.deconv.weight": w.shape}, rules={"up.deconv.weight": "conv"})
    assert spec.rule == "conv" and spec.shape == (3, 10)
    assert one({"wte.weight": (4, 2)}, rules={"wte.weight": "linear"}).rule == "linear"


def test_rules_errors():
    with pytest.raises(ViewRuleError, match="unknown rule"):
        plan_views({"a.weight": (2, 2)}, rules={"a.weight": "magic"})
    with pytest.raises(ViewRuleError, match="not in the checkpoint"):
        plan_views({"a.weight": (2, 2)}, rules={"b.weight": "linear"})
    with pytest.raises(ViewRuleError, match="a.bias"):
        plan_views({"a.bias": (2,)}, rules={"a.bias": "linear"})
    with pytest.raises(ViewRuleError, match="2-D"):
        plan_views({"c.weight": (2, 2, 3)}, rules={"c.weight": "linear"})


# --- LSTM ------------------------------------------------------------------------------------


def test_lstm_views():
    h, n_in = 3, 5
    shapes = {
        "rnn.weight_ih_l0": (4 * h, n_in),
        "rnn.weight_hh_l0": (4 * h, h),
        "rnn.bias_ih_l0": (4 * h,),
        "rnn.weight_ih_l0_reverse": (4 * h, n_in),
        "rnn.weight_ih_l1_reverse": (4 * h, 2 * h),
        "weight_hh_l2": (4 * h, h),
        "fc.weight": (7, 2 * h),
    }
    specs = plan_views(shapes)
    assert [s.key for s in specs] == [
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0_reverse",
        "rnn.weight_ih_l1_reverse", "rnn.weight_ih_l1_reverse__fwd",
        "rnn.weight_ih_l1_reverse__rev", "weight_hh_l2", "fc.weight", "fc.weight__fwd",
        "fc.weight__rev",
    ]  # fmt: skip
    by = {s.param: s for s in specs if s.rule in WHOLE_RULES}
    s = by["rnn.weight_ih_l1_reverse"]
    assert s.rule == "lstm" and s.shape == (4 * h, 2 * h)
    assert s.facts == ViewFacts(
        hidden=h, layer=1, direction="reverse", kind="ih", gate_g_rows=(2 * h, 3 * h), module="rnn"
    )
    assert by["rnn.weight_hh_l0"].facts.kind == "hh"
    assert by["rnn.weight_hh_l0"].facts.direction == "forward"
    assert by["weight_hh_l2"].facts.layer == 2 and by["weight_hh_l2"].facts.module == ""
    assert by["fc.weight"].rule == "linear"
    # one view of the whole matrix; the g block is rows 2h:3h of it
    w = torch.randn(4 * h, 2 * h)
    view = extract(s, w)
    assert torch.equal(view, w)
    lo, hi = s.facts.gate_g_rows
    assert torch.equal(view[lo:hi], w[2 * h : 3 * h])


def test_lstm_matches_torch_naming():
    lstm = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    shapes = {f"lstm.{k}": tuple(v.shape) for k, v in lstm.state_dict().items()}
    specs = [s for s in plan_views(shapes) if s.rule in WHOLE_RULES]
    assert len(specs) == 8 and all(s.rule == "lstm" and s.facts.hidden == 6 for s in specs)
    assert sum(s.facts.direction == "reverse" for s in specs) == 4


def test_lstm_rows_not_multiple_of_four():
    with pytest.raises(ViewRuleError, match=r"gru\.weight_ih_l0 \(9, 4\)"):
        plan_views({"gru.weight_ih_l0": (9, 4)})


# --- torch MultiheadAttention in_proj --------------------------------------------------------


def test_in_proj_views():
    d, heads = 8, 2
    hd = d // heads
    w = torch.randn(3 * d, d)
    name = "layers.0.self_attn.in_proj_weight"
    specs = plan_views({name: w.shape, "layers.0.self_attn.in_proj_bias": (3 * d,)}, heads=heads)
    assert [(s.key, s.rule, s.shape, s.heads) for s in specs] == [
        (name, "in_proj", (3 * d, d), None),
        (name + "__q", "q_heads", (hd, d), heads),
        (name + "__k", "k_heads", (hd, d), heads),
        (name + "__vh", "v_heads", (hd, d), heads),
        (name + "__v", "v", (d, d), None),
    ]
    assert specs[0].facts.heads == heads and not specs[0].facts.heads_unknown
    whole, q, k, vh, v = (extract(s, w) for s in specs)
    assert torch.equal(whole, w)
    assert q.shape == (heads, hd, d) and k.shape == (heads, hd, d) and vh.shape == (heads, hd, d)
    for h in range(heads):
        assert torch.equal(q[h], w[h * hd : (h + 1) * hd])
        assert torch.equal(k[h], w[d + h * hd : d + (h + 1) * hd])
        assert torch.equal(vh[h], w[2 * d + h * hd : 2 * d + (h + 1) * hd])
    assert torch.equal(v, w[2 * d : 3 * d])


def test_in_proj_matches_torch_mha():
    d, heads = 8, 2
    mha = torch.nn.MultiheadAttention(d, heads, bias=False)
    w = mha.in_proj_weight.detach()
    x = torch.randn(1, 3, d)
    specs = plan_views({"attn.in_proj_weight": w.shape}, heads=heads)
    q = extract(specs[1], w)
    # torch's own per-head split of the projected queries
    ref = torch.nn.functional.linear(x, w[:d]).reshape(1, 3, heads, d // heads)
    for h in range(heads):
        assert torch.allclose(x @ q[h].T, ref[:, :, h], atol=1e-6)


def test_in_proj_heads_unknown():
    d = 6
    w = torch.randn(3 * d, d)
    specs = plan_views({"attn.in_proj_weight": w.shape})
    assert [s.rule for s in specs] == ["in_proj", "v"]
    assert specs[0].facts.heads_unknown is True
    assert torch.equal(extract(specs[1], w), w[2 * d :])


def test_in_proj_errors():
    with pytest.raises(ViewRuleError, match=r"attn\.in_proj_weight \(10, 4\)"):
        plan_views({"attn.in_proj_weight": (10, 4)})
    with pytest.raises(ViewRuleError, match="not divisible by 4 heads"):
        plan_views({"attn.in_proj_weight": (18, 6)}, heads=4)
    with pytest.raises(ViewRuleError, match="positive integer"):
        plan_views({"attn.in_proj_weight": (18, 6)}, heads=0)


# --- GPT-NeoX interleaved query_key_value ----------------------------------------------------


def _neox_weight(heads: int, hd: int, d: int):
    """Interleave known per-head Q, K, V the way GPT-NeoX stores them: rows [head][q|k|v][hd]."""
    Q = torch.randn(heads, hd, d)
    K = torch.randn(heads, hd, d)
    V = torch.randn(heads, hd, d)
    rows = []
    for h in range(heads):
        rows.append(torch.stack([Q[h], K[h], V[h]]).reshape(3 * hd, d))
    return torch.cat(rows), Q, K, V


def test_neox_deinterleave():
    heads, d = 4, 8
    hd = d // heads
    w, Q, K, V = _neox_weight(heads, hd, d)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    shapes = {name: w.shape, name.replace("weight", "bias"): (3 * d,)}
    specs = plan_views(shapes, heads=heads)
    assert [s.rule for s in specs] == ["in_proj", "q_heads", "k_heads", "v_heads", "v"]
    assert specs[0].facts.layout == "interleaved"
    whole, q, k, vh, v = (extract(s, w) for s in specs)
    assert torch.equal(whole, w)
    assert torch.equal(q, Q) and torch.equal(k, K) and torch.equal(vh, V)
    # whole W_V: head h's rows are h*hd:(h+1)*hd
    assert torch.equal(v, torch.cat([V[h] for h in range(heads)]))
    # and per row, straight from the stored layout
    for h in range(heads):
        for r in range(hd):
            assert torch.equal(v[h * hd + r], w[h * 3 * hd + 2 * hd + r])


def test_neox_without_heads_and_family_choices():
    name = "layers.0.attention.query_key_value.weight"
    # without the head count: the whole matrix only (not even W_V can be cut out), no error
    (whole,) = plan_views({name: (24, 8)})
    assert (whole.rule, whole.facts.layout, whole.facts.heads_unknown) == (
        "in_proj", "interleaved", True)  # fmt: skip
    w = torch.randn(24, 8)
    assert torch.equal(extract(whole, w), w)
    # an explicit torch-style family reads the same name as stacked [Q; K; V]
    specs = plan_views({name: (24, 8)}, family="transformer", heads=2)
    assert specs[0].facts.layout == "stacked"
    w = torch.randn(24, 8)
    assert torch.equal(extract(specs[1], w)[1], w[4:8])
    # the interleaved layout can also be asked for by rule
    specs = plan_views(
        {"attn.qkv.weight": (24, 8)}, heads=2, rules={"attn.qkv.weight": "qkv_interleaved"}
    )
    assert specs[0].facts.layout == "interleaved"
    # family=neox without any fused weight is fine
    assert one({"fc.weight": (2, 3)}, family="neox").rule == "linear"


# --- family detection ------------------------------------------------------------------------


def test_detect_family():
    assert detect_family(["gpt_neox.layers.0.attention.query_key_value.weight"]) == "neox"
    assert detect_family(["rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc.weight"]) == "lstm"
    assert detect_family(["layers.0.self_attn.in_proj_weight", "embed.weight"]) == "transformer"
    assert detect_family({"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (2, 4)}) == "mlp"
    assert detect_family({"features.0.weight": (8, 3, 3, 3), "fc.weight": (2, 8)}) == "vgg"
    assert detect_family(["fc.weight"], {"fc.weight": (2, 3)}) == "mlp"
    assert detect_family(["features.conv1.weight"]) == "vgg"  # names only: a guess


def test_unknown_family():
    with pytest.raises(ViewRuleError, match="unknown family 'resnet'"):
        plan_views({"fc.weight": (2, 3)}, family="resnet")
    for fam in FAMILIES:
        assert one({"fc.weight": (2, 3)}, family=fam).rule == "linear"


# --- the --layers filter ---------------------------------------------------------------------

NAMES = ["features.0.weight", "features.0.bias", "features.3.weight", "classifier.weight"]


def test_select_all():
    assert select(NAMES, None) == NAMES
    assert select(NAMES, "all") == NAMES
    assert select(NAMES, " ALL ") == NAMES


def test_select_glob_and_regex_keep_order():
    assert select(NAMES, "features.*.weight") == ["features.0.weight", "features.3.weight"]
    assert select(NAMES, "classifier.*, features.0.*") == [
        "features.0.weight",
        "features.0.bias",
        "classifier.weight",
    ]
    assert select(NAMES, r"re:\.3\.") == ["features.3.weight"]
    assert select(NAMES, "re:^classifier,features.3.weight") == [
        "features.3.weight",
        "classifier.weight",
    ]
    # glob matches the whole name, regex searches inside it
    assert select(NAMES, "re:weight") == [n for n in NAMES if "weight" in n]
    with pytest.raises(ViewRuleError):
        select(NAMES, "weight")


def test_select_errors_name_the_pattern():
    with pytest.raises(ViewRuleError, match="'fc.*'"):
        select(NAMES, "features.*,fc.*")
    with pytest.raises(ViewRuleError, match="bad regex"):
        select(NAMES, "re:(")
    with pytest.raises(ViewRuleError, match="no pattern"):
        select(NAMES, " , ")


def test_plan_views_filters_before_planning():
    shapes = {"features.0.weight": (4, 3, 3, 3), "classifier.weight": (2, 4)}
    assert [s.param for s in plan_views(shapes, layers="classifier.*")] == ["classifier.weight"]
    # a bad fused weight outside the filter does not matter
    bad = {"attn.in_proj_weight": (10, 4), "fc.weight": (2, 3)}
    assert [s.param for s in plan_views(bad, layers="fc.*")] == ["fc.weight"]


# --- safe keys -------------------------------------------------------------------------------

HOSTILE = ["../../etc/passwd", "/abs", "a/b", "__init__", "Gewicht.ä€😀", "", ".", "..", "-rf"]
HOSTILE += ["a\\b", "x:y", "con\x00trol", "a b", "trail.", "\udcff", "a" * 500]


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_key_hostile(name):
    key = safe_key(name)
    assert key and key not in (".", "..")
    assert not key.startswith((".", "__", "-")) and not key.endswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in key)
    assert len(key) <= KEY_MAX
    assert safe_key(name) == key  # deterministic


def test_safe_key_examples():
    assert safe_key("features.0.weight") == "features.0.weight"
    assert safe_key("a/b") == "a_b"
    assert safe_key("__init__") == "p__init__"
    assert safe_key("") == "p"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert safe_key(long_a) != safe_key(long_b) and len(safe_key(long_a)) == KEY_MAX


def test_plan_keys_unique():
    shapes = {name: (2, 3) for name in HOSTILE}
    shapes.update({"a_b": (2, 3), "A_B": (2, 3), "fc.W": (2, 3), "fc.w": (2, 3)})
    # a parameter whose plain key equals another's derived key
    shapes.update({"att.in_proj_weight": (12, 4), "att.in_proj_weight__q": (2, 3)})
    specs = plan_views(shapes, heads=2)
    keys = [s.key for s in specs]
    assert len({k.lower() for k in keys}) == len(keys)  # unique even on case-folding file systems
    assert all(s.key.startswith(safe_key(s.param)) for s in specs)
    by = {s.param: s.key for s in specs if s.rule in ("linear", "in_proj")}
    for name in ("a/b", "a b", "a\\b", "a_b"):
        assert by[name].startswith("a_b-")
    assert by["A_B"].startswith("A_B-") and by["fc.W"] != by["fc.w"]
    assert by["att.in_proj_weight"].startswith("att.in_proj_weight-")
    assert by["x:y"] == "x_y"  # no clash, no suffix


# --- extract: dtypes and mismatches ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_extract_casts_to_float32(dtype):
    w = torch.randn(3 * 4, 4).to(dtype)
    specs = plan_views({"attn.in_proj_weight": w.shape}, heads=2)
    for s in specs:
        out = extract(s, w)
        assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(extract(specs[1], w)[1], w[2:4].float())
    conv = torch.randn(2, 3, 2, 2).to(dtype)
    out = extract(one({"c.weight": conv.shape}), conv)
    assert out.dtype == torch.float32 and torch.equal(out, conv.float().reshape(2, 12))


def _half_model() -> dict[str, torch.Tensor]:
    """fp16 weights of every layout that a rule reads differently (conv, transposed conv,
    LSTM, embedding, GPT-2 Conv1D, NeoX interleaved and stacked Q/K/V, Llama grouped W_O)."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).half()

    b = "model.layers.0.self_attn."
    return {
        "features.0.weight": w(4, 3, 3, 3), "up.tconv1.weight": w(4, 2, 2, 2),
        "rnn.weight_ih_l0": w(12, 5), "embed.weight": w(20, 6), "h.0.mlp.c_fc.weight": w(6, 12),
        "gpt_neox.layers.0.attention.query_key_value.weight": w(24, 8),
        "attn.in_proj_weight": w(24, 8), f"{b}q_proj.weight": w(8, 6),
        f"{b}k_proj.weight": w(4, 6), f"{b}o_proj.weight": w(6, 8),
    }  # fmt: skip


def test_extract_into_a_float32_buffer_equals_the_float32_view():
    weights = _half_model()
    llama = {k for k in weights if k.startswith("model.")}
    specs = plan_views({k: v.shape for k, v in weights.items() if k not in llama}, heads=4)
    specs += plan_views({k: weights[k].shape for k in llama}, heads=4, kv_heads=2)
    assert {"conv", "conv_transpose", "lstm", "embedding", "q_heads", "o_grouped"} <= {
        s.rule for s in specs
    }
    o_grouped = 0
    for s in specs:
        raw = weights[s.param]
        want = extract(s, raw.float())
        buf = torch.full((s.heads or 1, *s.shape), float("nan"))
        got = extract(s, raw, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.float32
        assert torch.equal(got.reshape(want.shape), want), s.key
        if s.rule == "o_grouped":  # summed in float32, not in the stored fp16: by hand
            o_grouped += 1
            o = raw.double().reshape(6, 2, 2, 2).sum(dim=2).reshape(6, 4)
            assert torch.allclose(got[0].double(), o, atol=1e-6)
    assert o_grouped == 1


def test_extract_non_contiguous_input():
    w = torch.randn(4, 6).T  # (6, 4), not contiguous
    assert torch.equal(extract(one({"fc.weight": (6, 4)}), w), w)


def test_extract_shape_mismatch():
    with pytest.raises(ViewRuleError, match=r"fc\.weight.*\(5, 3\).*\(3, 5\)"):
        extract(one({"fc.weight": (5, 3)}), torch.randn(3, 5))
    conv = one({"c.weight": (4, 3, 3, 3)})
    with pytest.raises(ViewRuleError, match="c.weight"):
        extract(conv, torch.randn(4, 27))  # same numel, wrong layout
    with pytest.raises(ViewRuleError):
        extract(conv, torch.randn(4, 3, 3, 2))
    q = plan_views({"a.in_proj_weight": (12, 4)}, heads=2)[1]
    with pytest.raises(ViewRuleError, match=r"\(12, 4\)"):
        extract(q, torch.randn(16, 4))
    with pytest.raises(ViewRuleError, match="floating"):
        extract(one({"fc.weight": (2, 2)}), torch.ones(2, 2, dtype=torch.int64))


def test_extract_from_json_round_trip_spec():
    # specs read back from the store's attrs have lists, not tuples
    w = torch.randn(2, 3, 2)
    spec = one({"up.deconv.weight": w.shape})
    back = ViewSpec(spec.key, spec.param, spec.rule, list(spec.shape), spec.heads, spec.facts)
    assert torch.equal(extract(back, w), extract(spec, w))
    broken = ViewSpec("k", "p", "conv", (2, 6))
    with pytest.raises(ViewRuleError, match=r"facts lack c_in, kernel"):
        extract(broken, torch.randn(2, 3, 2))
    half = ViewSpec("k", "p", "col_half", (4, 2), None, ViewFacts(cols=(0, 2)))
    with pytest.raises(ViewRuleError, match=r"rule col_half\): the view's facts lack width"):
        extract(half, torch.randn(4, 4))


# --- names of other families -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.tconv4.weight", "tconv1.weight", "up.tconv.weight"])
def test_paper_unet_tconv_is_a_transposed_conv(name):
    assert one({name: (4, 3, 3, 3)}).rule == "conv_transpose"


def test_paper_lm_encoder_is_an_embedding_only_beside_attention():
    lm = {"model.encoder.weight": (11, 8), "layers.0.self_attn.in_proj_weight": (24, 8)}
    assert plan_views(lm)[0].rule == "embedding"
    assert one({"model.encoder.weight": (11, 8)}).rule == "linear"  # an autoencoder's encoder


def test_views_are_planned_in_model_order():
    names = sorted(f"layers.{i}.weight" for i in range(12)) + ["embed_out.weight"]
    specs = plan_views(dict.fromkeys(names, (3, 3)))
    assert [s.param for s in specs][:3] == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert specs[-1].param == "embed_out.weight" and specs[-1].rule == "linear"


def test_a_multi_dimensional_bias_is_a_buffer_not_a_weight():
    specs = plan_views({"h.0.attn.bias": (1, 1, 4, 4), "h.0.attn.c_attn.weight": (8, 24)}, heads=2)
    assert "h.0.attn.bias" not in {s.param for s in specs}


def test_gpt2_conv1d_views_are_transposes():
    d, heads = 6, 3
    hd = d // heads
    w_attn, w_fc = torch.randn(d, 3 * d), torch.randn(d, 4 * d)  # Conv1D: (in, out)
    specs = plan_views({"h.0.attn.c_attn.weight": w_attn.shape, "h.0.mlp.c_fc.weight": w_fc.shape},
                       heads=heads)  # fmt: skip
    by = {s.key: s for s in specs}
    assert torch.equal(extract(by["h.0.mlp.c_fc.weight"], w_fc), w_fc.T)
    assert torch.equal(extract(by["h.0.attn.c_attn.weight"], w_attn), w_attn.T)
    q = extract(by["h.0.attn.c_attn.weight__q"], w_attn)
    vh = extract(by["h.0.attn.c_attn.weight__vh"], w_attn)
    for h in range(heads):
        assert torch.equal(q[h], w_attn[:, h * hd : (h + 1) * hd].T)
        assert torch.equal(vh[h], w_attn[:, 2 * d + h * hd : 2 * d + (h + 1) * hd].T)
    assert torch.equal(extract(by["h.0.attn.c_attn.weight__v"], w_attn), w_attn[:, 2 * d :].T)


def test_llama_split_heads_and_grouped_o():
    heads, kv, hd, d = 4, 2, 3, 5
    b = "model.layers.0.self_attn."
    rows = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d),
            "o_proj": (d, heads * hd)}  # fmt: skip
    w = {f"{b}{n}.weight": torch.randn(*shape) for n, shape in rows.items()}
    specs = plan_views({k: v.shape for k, v in w.items()}, heads=heads, kv_heads=kv)
    assert [s.key.removeprefix(b) for s in specs] == [
        "q_proj.weight", "q_proj.weight__q", "k_proj.weight", "k_proj.weight__k", "v_proj.weight",
        "o_proj.weight", "o_proj.weight__grouped"]  # fmt: skip
    by = {s.key.removeprefix(b): s for s in specs}
    q = extract(by["q_proj.weight__q"], w[b + "q_proj.weight"])
    k = extract(by["k_proj.weight__k"], w[b + "k_proj.weight"])
    assert q.shape == (heads, hd, d) and k.shape == (kv, hd, d)
    for h in range(heads):
        assert torch.equal(q[h], w[b + "q_proj.weight"][h * hd : (h + 1) * hd])
    o = w[b + "o_proj.weight"]
    grouped = extract(by["o_proj.weight__grouped"], o)
    for j in range(kv):  # query heads 2j and 2j + 1 read V head j
        cols = [o[:, h * hd : (h + 1) * hd] for h in range(heads) if h // (heads // kv) == j]
        assert torch.allclose(grouped[:, j * hd : (j + 1) * hd], sum(cols))


def test_bidirectional_lstm_next_layer_halves():
    h = 3
    lstm = torch.nn.LSTM(4, h, num_layers=2, bidirectional=True)
    shapes = {f"rnn.{k}": tuple(v.shape) for k, v in lstm.state_dict().items()}
    shapes["out.weight"] = (5, 2 * h)
    specs = plan_views(shapes)
    halves = [s for s in specs if s.rule == "col_half"]
    assert [s.key for s in halves] == [
        "rnn.weight_ih_l1__fwd", "rnn.weight_ih_l1__rev", "rnn.weight_ih_l1_reverse__fwd",
        "rnn.weight_ih_l1_reverse__rev", "out.weight__fwd", "out.weight__rev"]  # fmt: skip
    w = torch.randn(4 * h, 2 * h)
    assert torch.equal(extract(halves[0], w), w[:, :h])
    assert torch.equal(extract(halves[1], w), w[:, h:])
    assert halves[-1].shape == (5, h) and halves[-1].facts.of == "linear"


@pytest.mark.parametrize(
    ("shapes", "kw"),
    [
        ({"fc.weight": (5, 7), "tok_embed.weight": (11, 4)}, {}),
        ({"conv.weight": (6, 3, 3, 3), "up.convtranspose.weight": (3, 5, 2, 2)}, {}),
        ({"rnn.weight_ih_l0": (16, 6), "rnn.weight_hh_l0_reverse": (16, 4)}, {}),
        ({"attn.in_proj_weight": (24, 8)}, {"heads": 2}),
        ({"layers.0.attention.query_key_value.weight": (24, 8)}, {"heads": 2}),
        ({"h.0.attn.c_attn.weight": (8, 24), "h.0.mlp.c_fc.weight": (8, 6)}, {"family": "gpt2"}),
    ],
)
def test_restore_inverts_extract_of_every_whole_view(shapes, kw):
    specs = plan_views(shapes, **kw)
    tensors = {p: torch.randn(s, dtype=torch.float64) for p, s in shapes.items()}
    whole = [s for s in specs if s.rule in WHOLE_RULES]
    assert sorted(s.param for s in whole) == sorted(shapes)
    for spec in whole:
        back = restore(spec, extract(spec, tensors[spec.param], dtype=torch.float64))
        assert back.dtype == torch.float64
        assert torch.equal(back, tensors[spec.param])
    for spec in specs:
        if spec.rule not in WHOLE_RULES:
            with pytest.raises(ViewRuleError, match="not a whole view"):
                restore(spec, torch.zeros(spec.shape))
