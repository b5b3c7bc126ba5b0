"""Tests for specan.pairs: inferred pairs of each model family, from checkpoints whose keys are
stored alphabetically (as safetensors stores them), through `specan ingest` and the store."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from specan import store
from specan.pairs import Pair, pairs_for, resolve
from specan.pipeline import IngestOptions, ingest
from specan.views import WHOLE_RULES, plan_views

Tensors = dict[str, torch.Tensor]


def write_run(root: Path, states: list[Tensors], config: dict | None = None) -> Path:
    """A flat folder of checkpoints, keys sorted alphabetically; config.json beside them."""
    root.mkdir(parents=True)
    for step, state in enumerate(states):
        tensors = {k: state[k].detach().contiguous().clone() for k in sorted(state)}
        save_file(tensors, root / f"step-{step}.safetensors", metadata={"step": str(step)})
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def ingested(root: Path, states: list[Tensors], config: dict | None = None, **opts) -> store.Store:
    run = write_run(root, states, config)
    ingest(run, IngestOptions(workers=1, **opts))
    return store.open_store(store.store_path(run))


def labels(views: dict) -> list[str]:
    pairs, _ = pairs_for({}, views)
    return [p.label for p in pairs]


def pair_list(listed: list[dict]) -> list[Pair]:
    return [Pair(**p) for p in listed]


def loader(st: store.Store):
    def load(which: str, key: str) -> np.ndarray:
        return st.read_vectors(key)[0 if which == "U" else 1]

    return load


def chain(names: list[str]) -> list[str]:
    return [f"{a} -> {b}" for a, b in zip(names, names[1:], strict=False)]


# --- MLP and VGG -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        [f"{i}.weight" for i in (0, 2, 4, 6, 8, 10, 12)],
        [f"layers.{i}.weight" for i in range(12)],
        ["fc1.weight", "fc2.weight", "fc3.weight", "fc10.weight"],
        ["model.layers.0.weight", "model.layers.1.weight", "model.layers.2.weight",
         "model.out.weight"],
    ],
)  # fmt: skip
def test_mlp_pairs_follow_model_order_not_file_order(names: list[str]) -> None:
    views = {s.key: s for s in plan_views({n: (3, 3) for n in sorted(names)})}
    assert [v.param for v in views.values()] == names  # planned in model order
    assert labels(views) == chain(names)


def test_deep_mlp_trainer_names(tmp_path: Path) -> None:
    from specan_trainers import deep_mlp

    config = asdict(deep_mlp.Config(depth=12, width=6))
    model = deep_mlp.build_model(config)
    st = ingested(tmp_path / "run", [model.state_dict()])
    names = [f"layers.{i}.weight" for i in range(12)]
    assert [v.param for v in st.views.values()] == names
    pairs, rule = pairs_for({}, st.views)
    assert "model order" in rule
    assert [p.label for p in pairs] == chain(names)
    assert pairs == pair_list(deep_mlp.pairs(config))  # what the trainer lists itself


def test_vgg_in_a_flat_folder(tmp_path: Path) -> None:
    from specan_trainers import vgg

    config = asdict(vgg.Config(width_mult=1 / 16))
    model = vgg.build_model(config)
    st = ingested(tmp_path / "run", [model.state_dict()])
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    names = [*convs, "classifier.weight"]
    assert len(convs) == 13 and [v.param for v in st.views.values()] == names
    assert labels(st.views) == chain(names)
    assert labels(st.views)[-1] == f"{convs[-1]} -> classifier.weight"
    assert pairs_for({}, st.views)[0] == pair_list(vgg.pairs(config))


# --- LSTM ------------------------------------------------------------------------------------


class PaperASR(nn.Module):
    """The paper's speech model naming: model.lstm (4 bidirectional layers), model.linear."""

    def __init__(self, n_in: int = 5, hidden: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.lstm = nn.LSTM(n_in, hidden, num_layers=layers, bidirectional=True)
        self.model.linear = nn.Linear(2 * hidden, 3)


def lstm_labels(prefix: str, out: str, layers: int, directions: int = 2) -> list[str]:
    """The paper's `inter_layer_pairs` for an LSTM, written out: layer by layer, forward then
    reverse; ih_k -> hh_k only below the last layer, whose ih and hh pair with the output."""
    expected = []
    for k in range(layers):
        for sfx in ("", "_reverse")[:directions]:
            ih, hh = f"{prefix}weight_ih_l{k}{sfx}", f"{prefix}weight_hh_l{k}{sfx}"
            if k + 1 < layers:
                nxt = f"{prefix}weight_ih_l{k + 1}{sfx}"
                expected += [f"{ih} -> {hh}", f"{ih} -> {nxt}", f"{hh} -> {nxt}"]
            else:
                expected += [f"{ih} -> {out}", f"{hh} -> {out}"]
    return expected


def test_paper_lstm_keeps_its_output_pairs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    st = ingested(tmp_path / "run", [PaperASR().state_dict()])
    params = list(dict.fromkeys(v.param for v in st.views.values()))
    assert params[-1] == "model.linear.weight"  # alphabetically it comes first
    pairs, rule = pairs_for({}, st.views)
    assert "LSTM" in rule
    assert [p.label for p in pairs] == lstm_labels("model.lstm.", "model.linear.weight", 4)
    assert [p.direction for p in pairs] == (["forward"] * 3 + ["reverse"] * 3) * 3 + (
        ["forward"] * 2 + ["reverse"] * 2
    )
    for pair in pairs:  # every pair resolves: the halves meet the g block
        prev, nxt = resolve(pair, st.views, loader(st))
        assert prev.shape[-2] == nxt.shape[-2] == 4


def test_lstm_trainer_names(tmp_path: Path) -> None:
    from specan_trainers import lstm

    config = asdict(lstm.Config(hidden=4, layers=3))
    st = ingested(tmp_path / "run", [lstm.build_model(config).state_dict()])
    pairs, _ = pairs_for({}, st.views)
    assert [p.label for p in pairs] == lstm_labels("lstm.", "out.weight", 3)
    assert pairs == pair_list(lstm.pairs(config))


def test_unidirectional_lstm_has_no_halves() -> None:
    lstm = nn.LSTM(5, 4, num_layers=2)
    shapes = {f"rnn.{k}": tuple(v.shape) for k, v in lstm.state_dict().items()}
    shapes["fc.weight"] = (3, 4)
    specs = plan_views(dict(sorted(shapes.items())))
    assert [s.rule for s in specs] == ["lstm"] * 4 + ["linear"]
    views = {s.key: s for s in specs}
    assert labels(views) == lstm_labels("rnn.", "fc.weight", 2, directions=1)


def lstm_state(seed: int = 0) -> Tensors:
    torch.manual_seed(seed)
    model = nn.Module()
    model.lstm = nn.LSTM(6, 4, num_layers=2, bidirectional=True)
    model.out = nn.Linear(8, 5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bidirectional_forward_score_ignores_the_reverse_half(tmp_path: Path) -> None:
    import specan

    h = 4
    base = lstm_state()
    states = []
    for scale in (1.0, 10.0, 0.01):  # scale only the next layers' reverse-direction columns
        s = {k: v.clone() for k, v in base.items()}
        s["lstm.weight_ih_l1"][:, h:] *= scale
        s["out.weight"][:, h:] *= scale
        states.append(s)
    run = write_run(tmp_path / "run", states)
    ingest(run, IngestOptions(workers=1))
    a = specan.open(run).align()
    scores = dict(zip(a.pair.values.tolist(), a.score.values, strict=True))
    assert not a.attrs["skipped"]

    def numpy_score(state: Tensors, prev: str, nxt: str, half: slice) -> float:
        # independent: the g block of U of the previous weight's SVD against V of the SVD of
        # the next weight's column half
        u = np.linalg.svd(state[prev].double().numpy(), full_matrices=False)[0][2 * h : 3 * h]
        v = np.linalg.svd(state[nxt].double().numpy()[:, half], full_matrices=False)[2].T
        return float(np.diagonal(np.abs(v.T @ u))[:10].mean())

    forward = [
        ("lstm.weight_ih_l0", "lstm.weight_ih_l1"),
        ("lstm.weight_hh_l0", "lstm.weight_ih_l1"),
        ("lstm.weight_hh_l1", "out.weight"),
        ("lstm.weight_ih_l1", "out.weight"),  # its own weight is scaled: its U moves
    ]
    for prev, nxt in forward:
        score = scores[Pair(prev, nxt, "lstm", direction="forward").label]
        for t, state in enumerate(states):
            assert score[t] == pytest.approx(numpy_score(state, prev, nxt, slice(0, h)), abs=1e-5)
        if prev != "lstm.weight_ih_l1":
            np.testing.assert_allclose(score, score[0], atol=1e-6)  # the same at every scale
    # the output layer after the last layer: each direction its own half (reverse: h:2h)
    prev = "lstm.weight_ih_l1_reverse"
    rev = scores[Pair(prev, "out.weight", "lstm", direction="reverse").label]
    for t, state in enumerate(states):
        assert rev[t] == pytest.approx(numpy_score(state, prev, "out.weight", slice(h, 2 * h)),
                                       abs=1e-5)  # fmt: skip


# --- torch Transformer -----------------------------------------------------------------------


def transformer_labels(pre: str, layers: int, embed: str, out: str) -> list[str]:
    qkv, o = "self_attn.in_proj_weight", "self_attn.out_proj.weight"
    expected = [f"{embed} -> {pre}0.{qkv}"]
    for i in range(layers):
        b = f"{pre}{i}."
        nxt = f"{pre}{i + 1}.{qkv}" if i + 1 < layers else out
        w1, w2 = f"{b}linear1.weight", f"{b}linear2.weight"
        expected += [f"{b}{qkv} Q·K", f"{b}{qkv}[v] -> {b}{o}", f"{b}{o} -> {w1}",
                     f"{w1} -> {w2}", f"{w2} -> {nxt}"]  # fmt: skip
    return expected


def test_lm_trainer_names_without_run_json(tmp_path: Path) -> None:
    from specan_trainers import lm

    config = asdict(lm.Config(d_model=8, n_layers=12, n_heads=2, d_mlp=8, context=4))
    model = lm.build_model(config)
    st = ingested(tmp_path / "run", [model.state_dict()], heads=2)
    pairs, rule = pairs_for({}, st.views)
    assert "torch Transformer" in rule
    assert [p.label for p in pairs] == transformer_labels(
        "layers.", 12, "embed.weight", "decoder.weight"
    )
    assert pairs == pair_list(lm.pairs(config))


def test_paper_lm_encoder_is_the_embedding(tmp_path: Path) -> None:
    d, layers = 8, 12
    model = nn.Module()
    model.model = nn.Module()
    model.model.encoder = nn.Embedding(11, d)
    layer = nn.TransformerEncoderLayer(d, 2, 8, 0.0, norm_first=True)
    stack = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    model.model.transformer_encoder = stack
    model.model.decoder = nn.Linear(d, 11)
    st = ingested(tmp_path / "run", [model.state_dict()], heads=2)
    rule = {v.param: v.rule for v in st.views.values() if v.rule in WHOLE_RULES}
    assert rule["model.encoder.weight"] == "embedding"
    pairs, _ = pairs_for({}, st.views)
    assert [p.label for p in pairs] == transformer_labels(
        "model.transformer_encoder.layers.", layers, "model.encoder.weight", "model.decoder.weight"
    )
    assert pairs[0].kind == "embedding"
    for pair in pairs:
        resolve(pair, st.views, loader(st))  # every pair meets


def test_autoencoder_encoder_stays_linear() -> None:
    (spec,) = plan_views({"encoder.weight": (4, 9)})
    assert spec.rule == "linear"


# --- GPT-NeoX --------------------------------------------------------------------------------


def neox_state(layers: int = 12, d: int = 8, vocab: int = 11) -> Tensors:
    g = torch.Generator().manual_seed(0)
    s = {"gpt_neox.embed_in.weight": torch.randn(vocab, d, generator=g),
         "embed_out.weight": torch.randn(vocab, d, generator=g)}  # fmt: skip
    for i in range(layers):
        b = f"gpt_neox.layers.{i}."
        s[b + "attention.query_key_value.weight"] = torch.randn(3 * d, d, generator=g)
        s[b + "attention.query_key_value.bias"] = torch.zeros(3 * d)
        s[b + "attention.dense.weight"] = torch.randn(d, d, generator=g)
        s[b + "mlp.dense_h_to_4h.weight"] = torch.randn(4 * d, d, generator=g)
        s[b + "mlp.dense_4h_to_h.weight"] = torch.randn(d, 4 * d, generator=g)
        s[b + "input_layernorm.weight"] = torch.ones(d)
    return s


def neox_labels(layers: int) -> list[str]:
    qkv, o = "attention.query_key_value.weight", "attention.dense.weight"
    w1, w2 = "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"
    expected = [f"gpt_neox.embed_in.weight -> gpt_neox.layers.0.{qkv}"]
    for i in range(layers):
        b = f"gpt_neox.layers.{i}."
        nxt = f"gpt_neox.layers.{i + 1}.{qkv}" if i + 1 < layers else "embed_out.weight"
        expected += [f"{b}{qkv} Q·K", f"{b}{qkv}[v] -> {b}{o}", f"{b}{o} -> {b}{w1}",
                     f"{b}{w1} -> {b}{w2}", f"{b}{w2} -> {nxt}"]  # fmt: skip
    return expected


def test_neox_pairs_end_with_embed_out(tmp_path: Path) -> None:
    st = ingested(tmp_path / "run", [neox_state()], {"num_attention_heads": 2})
    pairs, rule = pairs_for({}, st.views)
    assert "GPT-NeoX" in rule
    assert [p.label for p in pairs] == neox_labels(12)
    for pair in pairs:
        resolve(pair, st.views, loader(st))


def test_neox_without_config_computes_whole_spectra_and_says_what_it_skipped(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from specan.cli import app

    run = write_run(tmp_path / "run", [neox_state(layers=2)])
    result = CliRunner().invoke(app, ["ingest", str(run)])
    assert result.exit_code == 0, result.output
    assert "per-head Q/K views and GPT-NeoX's W_V view skipped" in result.output
    assert "--heads N" in result.output
    views = store.open_store(store.store_path(run)).views
    assert all(v.rule in WHOLE_RULES for v in views.values()) and len(views) == 2 + 2 * 4
    result = CliRunner().invoke(app, ["align", str(run)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "pairs: inferred from names: GPT-NeoX blocks in model order" in said
    for i in range(2):
        qkv = f"gpt_neox.layers.{i}.attention.query_key_value.weight"
        assert f"skipped pair {qkv} Q·K: no q_heads view of {qkv}: per-head Q" in said
        dense = f"gpt_neox.layers.{i}.attention.dense.weight"
        assert f"-> {dense}: no v view of {qkv}: GPT-NeoX's W_V is cut out per head" in said
    assert said.count("skipped pair") == 4


# --- Llama-style ------------------------------------------------------------------------------

H, KV, HD, D = 4, 2, 2, 8  # query heads, key/value heads, head width, model width


def llama_state(layers: int, vocab: int = 11, mlp: int = 12) -> Tensors:
    g = torch.Generator().manual_seed(1)
    s = {"model.embed_tokens.weight": torch.randn(vocab, D, generator=g),
         "lm_head.weight": torch.randn(vocab, D, generator=g),
         "model.norm.weight": torch.ones(D)}  # fmt: skip
    for i in range(layers):
        b = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (H * HD, D)), ("self_attn.k_proj", (KV * HD, D)),
                            ("self_attn.v_proj", (KV * HD, D)), ("self_attn.o_proj", (D, H * HD)),
                            ("mlp.gate_proj", (mlp, D)), ("mlp.up_proj", (mlp, D)),
                            ("mlp.down_proj", (D, mlp))):  # fmt: skip
            s[f"{b}{name}.weight"] = torch.randn(*shape, generator=g)
        s[b + "input_layernorm.weight"] = torch.ones(D)
    return s


def llama_labels(layers: int) -> list[str]:
    src, expected = "model.embed_tokens.weight", []
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q, k, v, o = (f"{a}{n}_proj.weight" for n in "qkvo")
        gate, up, down = (f"{m}{n}_proj.weight" for n in ("gate", "up", "down"))
        expected += [f"{src} -> {q}", f"{src} -> {k}", f"{src} -> {v}", f"{q} Q·K {k}",
                     f"{v} -> {o}", f"{o} -> {gate}", f"{o} -> {up}", f"{gate} -> {down}",
                     f"{up} -> {down}"]  # fmt: skip
        src = down
    return [*expected, f"{src} -> lm_head.weight"]


def test_llama_pairs_and_grouped_query_heads(tmp_path: Path) -> None:
    state = llama_state(layers=11)
    config = {"num_attention_heads": H, "num_key_value_heads": KV}
    st = ingested(tmp_path / "run", [state], config)
    pairs, rule = pairs_for({}, st.views)
    assert "Llama-style" in rule
    assert [p.label for p in pairs] == llama_labels(11)
    views = st.views
    b = "model.layers.10.self_attn."
    q_view, k_view = views[b + "q_proj.weight__q"], views[b + "k_proj.weight__k"]
    assert (q_view.rule, q_view.heads, q_view.shape) == ("q_heads", H, (HD, D))
    assert (k_view.rule, k_view.heads, k_view.shape) == ("k_heads", KV, (HD, D))
    w_q, w_k = state[b + "q_proj.weight"].numpy(), state[b + "k_proj.weight"].numpy()
    # each stored head is the SVD of the raw weight's rows of that head, sliced in NumPy
    sq, sk = st.read_sigma(b + "q_proj.weight__q")[0], st.read_sigma(b + "k_proj.weight__k")[0]
    for h in range(H):
        np.testing.assert_allclose(sq[h], np.linalg.svd(w_q[h * HD : (h + 1) * HD])[1], 1e-5)
    for j in range(KV):
        np.testing.assert_allclose(sk[j], np.linalg.svd(w_k[j * HD : (j + 1) * HD])[1], 1e-5)
    # Q·K per query head h meets key head h // (H / KV)
    qk = next(p for p in pairs if p.kind == "qk" and p.prev.startswith(b))
    prev, nxt = resolve(qk, views, loader(st))
    a = np.abs(np.swapaxes(nxt, -1, -2) @ prev)[0]  # [H, k_q, k_k]
    for h in range(H):
        u_q = np.linalg.svd(w_q[h * HD : (h + 1) * HD], full_matrices=False)[0]
        j = h // (H // KV)
        u_k = np.linalg.svd(w_k[j * HD : (j + 1) * HD], full_matrices=False)[0]
        np.testing.assert_allclose(a[h], np.abs(u_q.T @ u_k), atol=1e-5)
    # V -> O: the shared V heads meet O's columns summed over each group of query heads
    w_v, w_o = state[b + "v_proj.weight"].numpy(), state[b + "o_proj.weight"].numpy()
    grouped = w_o.reshape(D, KV, H // KV, HD).sum(axis=2).reshape(D, KV * HD)
    vo = Pair(b + "v_proj.weight", b + "o_proj.weight")
    prev, nxt = resolve(vo, views, loader(st))
    u_v = np.linalg.svd(w_v, full_matrices=False)[0]
    v_o = np.linalg.svd(grouped, full_matrices=False)[2].T
    np.testing.assert_allclose(np.abs(nxt[0].T @ prev[0]), np.abs(v_o.T @ u_v), atol=1e-5)
    for pair in pairs:
        resolve(pair, views, loader(st))


def test_llama_heads_option_and_a_config_that_disagrees() -> None:
    shapes = {k: tuple(v.shape) for k, v in llama_state(layers=1).items()}
    specs = plan_views(shapes, heads=H)  # the K/V head count follows from the shapes
    k = next(s for s in specs if s.rule == "k_heads")
    assert k.heads == KV
    from specan.errors import ViewRuleError

    with pytest.raises(ViewRuleError, match="not the 4 of num_key_value_heads"):
        plan_views(shapes, heads=H, kv_heads=4)
    whole = plan_views(shapes)  # no head count: whole matrices only
    assert all(s.rule in WHOLE_RULES for s in whole)
    assert [s.facts.heads_unknown for s in whole if "_proj" in s.param][:2] == [True, True]


# --- GPT-2 -----------------------------------------------------------------------------------


def gpt2_state(layers: int, d: int = 8, vocab: int = 11, n_ctx: int = 6) -> Tensors:
    g = torch.Generator().manual_seed(2)
    s = {"transformer.wte.weight": torch.randn(vocab, d, generator=g),
         "transformer.wpe.weight": torch.randn(n_ctx, d, generator=g),
         "lm_head.weight": torch.randn(vocab, d, generator=g)}  # fmt: skip
    for i in range(layers):
        b = f"transformer.h.{i}."
        s[b + "attn.c_attn.weight"] = torch.randn(d, 3 * d, generator=g)  # Conv1D: (in, out)
        s[b + "attn.c_proj.weight"] = torch.randn(d, d, generator=g)
        s[b + "mlp.c_fc.weight"] = torch.randn(d, 4 * d, generator=g)
        s[b + "mlp.c_proj.weight"] = torch.randn(4 * d, d, generator=g)
        s[b + "attn.bias"] = torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)
    return s


def test_gpt2_conv1d_is_transposed_and_pairs(tmp_path: Path) -> None:
    d, heads, layers = 8, 2, 11
    state = gpt2_state(layers, d)
    st = ingested(tmp_path / "run", [state], {"n_head": heads})
    views = st.views
    assert not any(v.param.endswith("attn.bias") for v in views.values())  # a mask buffer
    b = "transformer.h.10."
    assert views[b + "mlp.c_fc.weight"].rule == "linear_t"
    assert views[b + "mlp.c_fc.weight"].shape == (4 * d, d)  # (out, in), as a Linear
    assert views[b + "attn.c_attn.weight"].shape == (3 * d, d)
    # K head 1 is the transposed weight's columns d + hd .. d + 2 hd, sliced in NumPy
    w = state[b + "attn.c_attn.weight"].numpy()
    hd = d // heads
    sk = st.read_sigma(b + "attn.c_attn.weight__k")[0]
    np.testing.assert_allclose(sk[1], np.linalg.svd(w[:, d + hd : d + 2 * hd].T)[1], 1e-5)
    expected = ["transformer.wte.weight -> transformer.h.0.attn.c_attn.weight"]
    for i in range(layers):
        c = f"transformer.h.{i}."
        nxt = f"transformer.h.{i + 1}.attn.c_attn.weight" if i + 1 < layers else "lm_head.weight"
        expected += [f"{c}attn.c_attn.weight Q·K",
                     f"{c}attn.c_attn.weight[v] -> {c}attn.c_proj.weight",
                     f"{c}attn.c_proj.weight -> {c}mlp.c_fc.weight",
                     f"{c}mlp.c_fc.weight -> {c}mlp.c_proj.weight",
                     f"{c}mlp.c_proj.weight -> {nxt}"]  # fmt: skip
    pairs, rule = pairs_for({}, views)
    assert "GPT-2" in rule
    assert [p.label for p in pairs] == expected
    for pair in pairs:
        resolve(pair, views, loader(st))


def test_every_parameter_has_exactly_one_whole_view() -> None:
    for state, kw in ((gpt2_state(2), {"heads": 2}), (llama_state(2), {"heads": H}),
                      (neox_state(2), {"heads": 2}), (lstm_state(), {})):  # fmt: skip
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        specs = plan_views(shapes, **kw)
        whole = [s.param for s in specs if s.rule in WHOLE_RULES]
        assert len(whole) == len(set(whole)) == len({s.param for s in specs})
        assert len(specs) > len(whole)  # and the extra views are not whole ones
