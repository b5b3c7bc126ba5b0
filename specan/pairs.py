"""Which views are consecutive for alignment (SPEC §3), and how their vectors meet.

Runs written by specan's trainers list their pairs in run.json; for other runs they are inferred
from parameter names: torch Transformer and GPT-NeoX blocks, LSTM layers, and otherwise the
MLP/VGG rule (consecutive >=2-D parameters in state-dict order). Each pair is resolved here into
the two vector sets that Eqn 3 multiplies, following SPEC §3's special cases: an embedding meets
with its right vectors, Q meets K left with left per head, an LSTM contributes the g block of U,
a convolution's right vectors are sliced at the kernel centre, and a bidirectional next layer is
sliced to the direction's half. A pair whose dimensions do not meet is skipped with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WHOLE_RULES = ("linear", "embedding", "conv", "conv_transpose", "lstm", "in_proj")


@dataclass(frozen=True)
class Pair:
    """Layer ``prev`` feeds layer ``next`` (parameter names)."""

    prev: str
    next: str
    kind: str = "linear"  # linear | embedding | qk | vo_heads | lstm | conv | skip | time | ...
    prev_part: str | None = None  # "v": the W_V block of a fused in_proj
    direction: str | None = None  # LSTM: "forward" | "reverse"

    @property
    def label(self) -> str:
        prev = self.prev + (f"[{self.prev_part}]" if self.prev_part else "")
        if self.kind == "qk":
            return f"{self.prev} Q·K"
        if self.kind == "vo_heads":
            return f"{self.prev}[v per head] -> {self.next}"
        return f"{prev} -> {self.next}"


# A loader returns the stacked top-k vectors of a view: ("U" | "V", key) -> [T, (H,) d, k].
Loader = Callable[[str, str], np.ndarray]


# Per-block parameter names of the transformer families (SPEC §3): fused QKV, attention output,
# MLP in, MLP out.
BLOCK_NAMES = {
    "transformer": ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                    "linear2.weight"),
    "neox": ("attention.query_key_value.weight", "attention.dense.weight",
             "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"),
}  # fmt: skip
_LSTM_NAME = re.compile(r"^(.*?)weight_(ih|hh)_l(\d+)(_reverse)?$")


def pairs_for(
    config: Mapping[str, Any], views: Mapping[str, Mapping[str, Any]]
) -> tuple[list[Pair], str]:
    """The run's pairs and a sentence saying where they came from (run.json, or which rule)."""
    listed = config.get("pairs")
    if listed:
        fields = ("prev", "next", "kind", "prev_part", "direction")
        pairs = [Pair(**{k: p[k] for k in fields if k in p}) for p in listed]
        return pairs, "pairs listed by the trainer in run.json"
    params = list(dict.fromkeys(v["param"] for v in views.values() if v["rule"] in WHOLE_RULES))
    rules = {v["param"]: v["rule"] for v in views.values() if v["rule"] in WHOLE_RULES}
    for family, names in BLOCK_NAMES.items():
        if any(p.endswith(names[0]) for p in params):
            return _transformer_pairs(params, rules, names), (
                f"inferred: {family} blocks (embedding -> QKV, Q·K, V -> O, O -> W1 -> W2 -> next)"
            )
    if "lstm" in rules.values():
        return _lstm_pairs(params, rules), "inferred: LSTM layers per direction (g gate)"
    return [Pair(a, b) for a, b in zip(params, params[1:], strict=False)], (
        "inferred: consecutive parameters in state-dict order (MLP/VGG rule)"
    )


def _transformer_pairs(
    params: Sequence[str], rules: Mapping[str, str], names: Sequence[str]
) -> list[Pair]:
    qkv, out, w1, w2 = names
    prefixes = [p[: -len(qkv)] for p in params if p.endswith(qkv)]
    inside = {prefix + n for prefix in prefixes for n in names}
    outside = [p for p in params if p not in inside]
    embeds = [p for p in outside if rules[p] == "embedding"]
    pairs: list[Pair] = []
    if embeds:
        pairs.append(Pair(embeds[0], prefixes[0] + qkv, "embedding"))
    for i, pre in enumerate(prefixes):
        pairs += [
            Pair(pre + qkv, pre + qkv, "qk"),
            Pair(pre + qkv, pre + out, "linear", prev_part="v"),
            Pair(pre + out, pre + w1),
            Pair(pre + w1, pre + w2),
        ]
        if i + 1 < len(prefixes):
            pairs.append(Pair(pre + w2, prefixes[i + 1] + qkv))
    last = [p for p in outside if p not in embeds[:1] and params.index(p) > params.index(
        prefixes[-1] + w2)]  # fmt: skip
    if last:
        pairs.append(Pair(prefixes[-1] + w2, last[0]))
    return pairs


def _lstm_pairs(params: Sequence[str], rules: Mapping[str, str]) -> list[Pair]:
    layers: dict[tuple[str, str, int], str] = {}
    for p in params:
        m = _LSTM_NAME.match(p)
        if m and rules[p] == "lstm":
            direction = "reverse" if m.group(4) else "forward"
            layers[(direction, m.group(2), int(m.group(3)))] = p
    top = max(k for _, _, k in layers)
    last_lstm = max(params.index(p) for p in layers.values())
    output = next((p for p in params[last_lstm + 1 :] if rules[p] == "linear"), None)
    pairs = []
    for d in ("forward", "reverse"):
        for k in range(top + 1):
            ih, hh = layers.get((d, "ih", k)), layers.get((d, "hh", k))
            if ih is None or hh is None:
                continue
            nxt = layers.get((d, "ih", k + 1)) if k < top else output
            pairs.append(Pair(ih, hh, "lstm", direction=d))
            if nxt is not None:
                pairs += [Pair(ih, nxt, "lstm", direction=d), Pair(hh, nxt, "lstm", direction=d)]
    return pairs


def per_head_vo(pairs: Sequence[Pair]) -> list[Pair]:
    """The same pairs with each whole W_V -> W_O pair taken per head instead (SPEC §3 offers it;
    the paper's figures use whole matrices, the default)."""
    return [Pair(p.prev, p.next, "vo_heads") if p.prev_part == "v" else p for p in pairs]


def _view(views: Mapping[str, Mapping[str, Any]], param: str, rules: Sequence[str]) -> str:
    for key, v in views.items():
        if v["param"] == param and v["rule"] in rules:
            return key
    raise KeyError(f"no {'/'.join(rules)} view of {param!r} in the store")


def resolve(
    pair: Pair, views: Mapping[str, Mapping[str, Any]], load: Loader
) -> tuple[np.ndarray, np.ndarray]:
    """The (previous-layer, next-layer) vector sets whose |product| is Eqn 3's matrix.

    Returns ``prev_left [T, (H,) d, k1]`` and ``next_right [T, (H,) d, k2]``; raises ValueError
    (with the reason) when the dimensions do not meet.
    """
    if pair.kind == "qk":
        q = _view(views, pair.prev, ("q_heads",))
        k = _view(views, pair.next, ("k_heads",))
        # left with left: the attention score is x' W_Q' W_K x, so A_h = |U_Q,h' U_K,h|
        return load("U", k), load("U", q)
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
    if prev_view["rule"] == "embedding" or pair.kind == "embedding":
        prev = load("V", prev_key)  # an embedding's output space is spanned by V
    else:
        prev = load("U", prev_key)
    if prev_view["rule"] == "lstm":
        h = prev_view["info"]["hidden"]
        prev = prev[..., 2 * h : 3 * h, :]  # the g gate's block of U, not renormalised
    next_key = _view(views, pair.next, WHOLE_RULES)
    nxt = load("V", next_key)
    d = prev.shape[-2]
    if nxt.shape[-2] == d:
        return prev, nxt
    info = views[next_key].get("info", {})
    kernel = info.get("kernel")
    if kernel and info.get("c_in") == d:
        # a conv's right vector reshapes to (c_in, *kernel): take the centre position
        centre = int(np.ravel_multi_index(tuple(s // 2 for s in kernel), tuple(kernel)))
        size = int(np.prod(kernel))
        return prev, nxt[..., centre::size, :]
    if nxt.shape[-2] == 2 * d and pair.direction in ("forward", "reverse"):
        half = slice(0, d) if pair.direction == "forward" else slice(d, 2 * d)
        return prev, nxt[..., half, :]  # the direction's half of a bidirectional input
    raise ValueError(
        f"dimensions do not meet: {pair.prev} gives {d}, {pair.next} takes {nxt.shape[-2]}"
    )
