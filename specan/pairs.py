"""Which views are consecutive for alignment (SPEC §3), and how their vectors meet.

Runs written by specan's trainers list their pairs in run.json; for other runs they are inferred
from parameter names, taken in model order (`specan.order`: a file lists them alphabetically):
torch Transformer, GPT-NeoX, GPT-2 and Llama-style blocks, LSTM layers, and otherwise the MLP/VGG
rule (consecutive >=2-D parameters). Each pair is resolved here into the two vector sets that
Eqn 3 multiplies, following SPEC §3's special cases: an embedding meets with its right vectors,
Q meets K left with left per head (a K head shared by its group of Q heads), an LSTM contributes
the g block of U, a convolution's right vectors are sliced at the kernel centre, and a layer after
a bidirectional LSTM layer contributes the SVD of its direction's column half. A pair whose
dimensions do not meet is skipped with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from specan.order import model_order
from specan.views import WHOLE_RULES, ViewSpec, lstm_output

__all__ = ["Pair", "pairs_for", "per_head_vo", "resolve"]


@dataclass(frozen=True)
class Pair:
    """Layer ``prev`` feeds layer ``next`` (parameter names)."""

    prev: str
    next: str
    kind: str = "linear"  # linear | embedding | qk | vo_heads | lstm | conv | skip | time | ...
    prev_part: str | None = None  # "v": the W_V block of a fused in_proj
    direction: str | None = None  # LSTM: "forward" | "reverse", the previous layer's direction

    @property
    def label(self) -> str:
        prev = self.prev + (f"[{self.prev_part}]" if self.prev_part else "")
        if self.kind == "qk":
            return f"{self.prev} Q·K" if self.prev == self.next else f"{self.prev} Q·K {self.next}"
        if self.kind == "vo_heads":
            return f"{self.prev}[v per head] -> {self.next}"
        return f"{prev} -> {self.next}"


# A loader returns the stacked top-k vectors of a view: ("U" | "V", key) -> [T, (H,) d, k].
Loader = Callable[[str, str], np.ndarray]


# Per-block parameter names of the fused-attention families (SPEC §3): fused QKV, attention
# output, MLP in, MLP out.
BLOCK_NAMES = {
    "torch Transformer": ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                          "linear1.weight", "linear2.weight"),
    "GPT-NeoX": ("attention.query_key_value.weight", "attention.dense.weight",
                 "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"),
    "GPT-2": ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
}  # fmt: skip
# Llama-style blocks: separate q, k, v, o and a gated MLP.
LLAMA_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight")  # fmt: skip
_LSTM_NAME = re.compile(r"^(.*?)weight_(ih|hh)_l(\d+)(_reverse)?$")


def pairs_for(config: Mapping[str, Any], views: Mapping[str, ViewSpec]) -> tuple[list[Pair], str]:
    """The run's pairs and a sentence saying where they came from (run.json, or which rule).

    Inferred pairs follow model order whatever the order of ``views`` (stores made before
    views were planned in model order list them alphabetically).
    """
    listed = config.get("pairs")
    if listed:
        fields = ("prev", "next", "kind", "prev_part", "direction")
        pairs = [Pair(**{k: p[k] for k in fields if k in p}) for p in listed]
        return pairs, "pairs listed by the trainer in run.json"
    whole = {v.param: v for v in views.values() if v.rule in WHOLE_RULES}
    params = model_order(whole)
    rules = {p: whole[p].rule for p in params}
    for family, names in BLOCK_NAMES.items():
        if any(p.endswith(names[0]) for p in params):
            return _fused_pairs(params, rules, names), (
                f"inferred from names: {family} blocks in model order (embedding -> QKV, Q·K per "
                "head, V -> O, O -> MLP in -> MLP out -> next block's QKV, last -> output layer)"
            )
    if any(p.endswith(LLAMA_NAMES[0]) for p in params):
        return _llama_pairs(params, rules), (
            "inferred from names: Llama-style blocks in model order (embedding -> q/k/v, Q·K per "
            "head with grouped K/V heads, V -> O, O -> gate/up -> down -> next block's q/k/v, "
            "last -> lm_head)"
        )
    if "lstm" in rules.values():
        return _lstm_pairs(params, rules, whole), (
            "inferred from names: LSTM layers per direction (g gate of U; ih -> hh, ih/hh -> "
            "next layer's ih, last layer -> output layer; a bidirectional next input by the "
            "direction's column half)"
        )
    return [Pair(a, b, _kind(a, b, rules)) for a, b in zip(params, params[1:], strict=False)], (
        "inferred: consecutive parameters in model order (MLP/VGG rule)"
    )


def _kind(prev: str, nxt: str, rules: Mapping[str, str]) -> str:
    # the kinds specan's trainers write; resolve() itself goes by the views' shapes
    conv = ("conv", "conv_transpose")
    if rules[prev] in conv:
        return "conv" if rules[nxt] in conv else "conv_to_linear"
    return "linear"


def _is_embedding(param: str, rules: Mapping[str, str]) -> bool:
    # a store made before "encoder.weight" was read as the paper's token embedding calls it linear
    return rules[param] == "embedding" or param.split(".")[-2:] == ["encoder", "weight"]


def _input_layer(params: Sequence[str], first: str, rules: Mapping[str, str]) -> str | None:
    """What feeds the first block: the first embedding before it in model order (the token
    embedding, before a position embedding), else the parameter just before it."""
    before = params[: params.index(first)]
    embeds = [p for p in before if _is_embedding(p, rules)]
    return embeds[0] if embeds else (before[-1] if before else None)


def _fused_pairs(
    params: Sequence[str], rules: Mapping[str, str], names: Sequence[str]
) -> list[Pair]:
    qkv, out, w1, w2 = names
    prefixes = [p[: -len(qkv)] for p in params if p.endswith(qkv)]
    have = set(params)
    pairs: list[Pair] = []
    first, last = prefixes[0] + qkv, prefixes[-1] + w2
    source = _input_layer(params, first, rules)
    if source is not None:
        kind = "embedding" if _is_embedding(source, rules) else "linear"
        pairs.append(Pair(source, first, kind))
    for i, pre in enumerate(prefixes):
        pairs += [
            Pair(pre + qkv, pre + qkv, "qk"),
            Pair(pre + qkv, pre + out, "linear", prev_part="v"),
            Pair(pre + out, pre + w1),
            Pair(pre + w1, pre + w2),
        ]
        if i + 1 < len(prefixes):
            pairs.append(Pair(pre + w2, prefixes[i + 1] + qkv))
    pairs += _chain(last, params, have)
    return [p for p in pairs if p.prev in have and p.next in have]


def _chain(last: str, params: Sequence[str], have: set[str]) -> list[Pair]:
    # the last block's output -> whatever follows it in model order (the output layer)
    if last not in have:
        return []
    after = params[params.index(last) + 1 :]
    return [Pair(a, b) for a, b in zip([last, *after], after, strict=False)]


def _llama_pairs(params: Sequence[str], rules: Mapping[str, str]) -> list[Pair]:
    q, k, v, o, gate, up, down = LLAMA_NAMES
    prefixes = [p[: -len(q)] for p in params if p.endswith(q)]
    have = set(params)
    source = _input_layer(params, prefixes[0] + q, rules)
    kind = "embedding" if source is not None and _is_embedding(source, rules) else "linear"
    pairs: list[Pair] = []
    for pre in prefixes:
        if source is not None:
            pairs += [Pair(source, pre + n, kind) for n in (q, k, v)]
        pairs += [
            Pair(pre + q, pre + k, "qk"),
            Pair(pre + v, pre + o),
            Pair(pre + o, pre + gate),
            Pair(pre + o, pre + up),
            Pair(pre + gate, pre + down),
            Pair(pre + up, pre + down),
        ]
        source, kind = pre + down, "linear"
    pairs += _chain(prefixes[-1] + down, params, have)
    return [p for p in pairs if p.prev in have and p.next in have]


def _lstm_pairs(
    params: Sequence[str], rules: Mapping[str, str], whole: Mapping[str, ViewSpec]
) -> list[Pair]:
    layers: dict[tuple[str, str, int], str] = {}
    for p in params:
        m = _LSTM_NAME.match(p)
        if m and rules[p] == "lstm":
            direction = "reverse" if m.group(4) else "forward"
            layers[(direction, m.group(2), int(m.group(3)))] = p
    top = max(k for _, _, k in layers)
    last = max(layers.values(), key=params.index)
    hidden = whole[last].facts.hidden or whole[last].shape[0] // 4
    width = hidden * (2 if any(d == "reverse" for d, _, _ in layers) else 1)
    linear = {p: whole[p].shape[1] for p in params if rules[p] in ("linear", "linear_t")}
    output = lstm_output(params, last, width, linear)
    if output is None:  # no layer takes the LSTM's width: the first linear after it (skipped)
        output = next((p for p in params[params.index(last) + 1 :] if p in linear), None)
    # The paper's list and order (and specan's LSTM trainer's): layer by layer, forward then
    # reverse; ih_k -> hh_k only below the last layer, whose ih and hh pair with the output.
    pairs = []
    for k in range(top + 1):
        for d in ("forward", "reverse"):
            ih, hh = layers.get((d, "ih", k)), layers.get((d, "hh", k))
            if ih is None or hh is None or (k == top and output is None):
                continue
            if k < top:
                nxt = layers.get((d, "ih", k + 1))
                pairs.append(Pair(ih, hh, "lstm", direction=d))
                if nxt is not None:
                    pairs += [
                        Pair(ih, nxt, "lstm", direction=d),
                        Pair(hh, nxt, "lstm", direction=d),
                    ]
            else:
                pairs += [
                    Pair(ih, output, "lstm", direction=d),
                    Pair(hh, output, "lstm", direction=d),
                ]
    return pairs


def per_head_vo(pairs: Sequence[Pair]) -> list[Pair]:
    """The same pairs with each whole W_V -> W_O pair taken per head instead (SPEC §3 offers it;
    the paper's figures use whole matrices, the default)."""
    return [Pair(p.prev, p.next, "vo_heads") if p.prev_part == "v" else p for p in pairs]


_MISSING = {
    "q_heads": "per-head Q views need the head count at ingest (config.json, or heads=N)",
    "k_heads": "per-head K views need the head count at ingest (config.json, or heads=N)",
    "v_heads": "per-head V views need the head count at ingest (config.json, or heads=N)",
    "v": "GPT-NeoX's W_V is cut out per head: it needs the head count at ingest (heads=N)",
}


def _view(views: Mapping[str, ViewSpec], param: str, rules: Sequence[str]) -> str:
    for key, v in views.items():
        if v.param == param and v.rule in rules:
            return key
    why = _MISSING.get(rules[0], "") if len(rules) == 1 else ""
    if not any(v.param == param for v in views.values()):
        why = "not in the store (left out by the layers selection?)"
    raise KeyError(f"no {'/'.join(rules)} view of {param}" + (f": {why}" if why else ""))


def _half(views: Mapping[str, ViewSpec], param: str, direction: str) -> str | None:
    for key, v in views.items():
        if v.param == param and v.rule == "col_half":
            if v.facts.direction == direction:
                return key
    return None


def resolve(
    pair: Pair, views: Mapping[str, ViewSpec], load: Loader
) -> tuple[np.ndarray, np.ndarray]:
    """The (previous-layer, next-layer) vector sets whose |product| is Eqn 3's matrix.

    Returns ``prev_left [T, (H,) d, k1]`` and ``next_right [T, (H,) d, k2]``; raises ValueError
    (with the reason) when the dimensions do not meet.
    """
    if pair.kind == "qk":
        q = _view(views, pair.prev, ("q_heads",))
        k = _view(views, pair.next, ("k_heads",))
        # left with left: the attention score is x' W_Q' W_K x, so A_h = |U_Q,h' U_K,h|
        u_q, u_k = load("U", q), load("U", k)
        heads, kv = u_q.shape[-3], u_k.shape[-3]
        if kv != heads:  # grouped K/V: Q head h reads K head h // (H / KV)
            if heads % kv:
                raise ValueError(f"{heads} query heads do not share {kv} key heads evenly")
            u_k = np.repeat(u_k, heads // kv, axis=-3)
        return u_k, u_q
    if pair.kind == "vo_heads":
        v_key = _view(views, pair.prev, ("v_heads",))
        u_v = load("U", v_key)  # [T, H, hd, k]
        heads, hd = u_v.shape[-3], u_v.shape[-2]
        v_o = load("V", _view(views, pair.next, WHOLE_RULES))  # [T, d, k2]
        # head h writes into O's input columns h*hd:(h+1)*hd: slice O's right vectors there,
        # not renormalised, as the conv centre tap and the LSTM halves are
        per_head = np.stack([v_o[..., h * hd : (h + 1) * hd, :] for h in range(heads)], axis=-3)
        return u_v, per_head
    if pair.prev_part == "v":
        prev_key = _view(views, pair.prev, ("v",))
    else:
        prev_key = _view(views, pair.prev, WHOLE_RULES)
    prev_view = views[prev_key]
    if prev_view.rule == "embedding" or pair.kind == "embedding":
        prev = load("V", prev_key)  # an embedding's output space is spanned by V
    else:
        prev = load("U", prev_key)
    if prev_view.rule == "lstm":
        h = prev_view.facts.hidden
        prev = prev[..., 2 * h : 3 * h, :]  # the g gate's block of U, not renormalised
    next_key = _view(views, pair.next, WHOLE_RULES)
    if pair.direction in ("forward", "reverse"):
        # after a bidirectional LSTM layer: the SVD of the columns fed by this direction,
        # decomposed on their own (SPEC §3), so the other direction's weights play no part
        next_key = _half(views, pair.next, pair.direction) or next_key
    nxt = load("V", next_key)
    d = prev.shape[-2]
    if nxt.shape[-2] == d:
        return prev, nxt
    kernel = views[next_key].facts.kernel
    if kernel and views[next_key].facts.c_in == d:
        # a conv's right vector reshapes to (c_in, *kernel): take the centre position
        centre = int(np.ravel_multi_index(tuple(s // 2 for s in kernel), tuple(kernel)))
        size = int(np.prod(kernel))
        return prev, nxt[..., centre::size, :]
    grouped = next((k for k, v in views.items() if v.param == pair.next
                    and v.rule == "o_grouped" and v.shape[1] == d), None)  # fmt: skip
    if grouped is not None:  # shared V heads (grouped-query attention) meet their O columns
        return prev, load("V", grouped)
    if nxt.shape[-2] == 2 * d and pair.direction in ("forward", "reverse"):
        raise ValueError(
            f"{pair.next} takes both directions ({2 * d} inputs) but the store has no column-half "
            "views of it (made by an older specan): re-ingest with overwrite=True"
        )
    raise ValueError(
        f"dimensions do not meet: {pair.prev} gives {d}, {pair.next} takes {nxt.shape[-2]}"
    )
