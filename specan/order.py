"""Model order of parameter names (SPEC §3, "Order").

safetensors files list their keys alphabetically (`layers.10` before `layers.2`, `embed_out`
before `gpt_neox`), so file order is not the order in which a model computes. Model order is
decided level by level on the dotted names, among the children of one module:

1. the input side first: embeddings (token before position), then `encoder`, `input*`, `*_in`;
2. then the blocks' parts in the family's order: attention before the MLP, fused Q/K/V or
   q, k, v before the attention output; an MLP's input projections (gate, up, `c_fc`,
   `dense_h_to_4h`) before its output projection (down, `c_proj`, `dense_4h_to_h`); LSTM weights
   by layer, then direction, ih before hh (as torch lists them);
3. the output side last: `decoder`, then `embed_out`, `lm_head`, `classifier`, `head`, `fc`,
   `out`, `linear` (the paper's LSTM output) and the like.

Names the rules do not know keep the order in which they were given, except that names differing
only in their numbers (`layers.2`, `layers.10`; `fc1`, `fc2`) are sorted by those numbers.
Only the standard library is used: the CLI orders listings on its fast path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from specan.views import StoredView

V = TypeVar("V", bound="StoredView")

__all__ = ["model_index", "model_order", "views_in_model_order"]

_DIGITS = re.compile(r"(\d+)")
_LSTM = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")
_EMBED = re.compile(r"embed|^wte$|^wpe$", re.IGNORECASE)
_POSITION = re.compile(r"^wpe$|pos", re.IGNORECASE)

# Rank of a child among its siblings; 50 is "not known" (kept in the given order).
_UNKNOWN = 50
_RANKS = {
    # the input side beyond embeddings (embeddings themselves are 0 and 1, by pattern)
    "encoder": 3, "stem": 3,
    # attention comes before the MLP inside a block
    "attention": 10, "self_attn": 10, "attn": 10, "self_attention": 10, "selfattention": 10,
    # fused Q/K/V, then separate q, k, v
    "query_key_value": 20, "in_proj_weight": 20, "c_attn": 20, "qkv": 20, "wqkv": 20,
    "qkv_proj": 20, "w_pack": 20,
    "q_proj": 21, "q": 21, "query": 21, "wq": 21, "q_lin": 21,
    "k_proj": 22, "k": 22, "key": 22, "wk": 22, "k_lin": 22,
    "v_proj": 23, "v": 23, "value": 23, "wv": 23, "v_lin": 23,
    # an MLP's input projections
    "gate_proj": 30, "up_proj": 31, "c_fc": 31, "dense_h_to_4h": 31, "fc_in": 31,
    # the output projection of an attention or an MLP: last in its block
    "o_proj": 90, "out_proj": 90, "c_proj": 90, "dense": 90, "down_proj": 90,
    "dense_4h_to_h": 90, "fc_out": 90, "proj": 90, "o": 90, "wo": 90, "out_lin": 90,
    # the output side of a model
    "decoder": 98,
    "embed_out": 100, "unembed": 100, "lm_head": 100, "classifier": 100, "head": 100,
    "heads": 100, "fc": 100, "out": 100, "output": 100, "linear": 100, "logits": 100,
    "score": 100, "cls": 100, "readout": 100,
    # a module's own parameters: the weight before the bias
    "weight": 48, "bias": 49,
}  # fmt: skip


def _rank(token: str) -> int:
    low = token.lower()
    if low in _RANKS:
        return _RANKS[low]
    if low.startswith(("output", "final")) or low.endswith("_out"):
        return 99
    if _EMBED.search(low):
        return 1 if _POSITION.search(low) else 0
    if low.startswith("input") or low.endswith("_in"):
        return 3
    return _UNKNOWN


def _group_and_key(token: str) -> tuple[str, tuple]:
    """Siblings of one group are sorted among themselves by the key (numbers compared as such)."""
    m = _LSTM.match(token)
    if m:  # torch's order: per layer, per direction: weight_ih, weight_hh, bias_ih, bias_hh
        return "<lstm>", (int(m[3]), bool(m[4]), m[1] == "bias", ("ih", "hh", "hr").index(m[2]))
    parts = _DIGITS.split(token)
    stem = "#".join(parts[0::2])
    return stem, tuple(int(p) for p in parts[1::2])


class _Node:
    __slots__ = ("children", "first", "leaf")

    def __init__(self, first: int) -> None:
        self.children: dict[str, _Node] = {}
        self.first = first
        self.leaf: str | None = None


def _emit(node: _Node, out: list[str]) -> None:
    if node.leaf is not None:
        out.append(node.leaf)
    groups: dict[str, int] = {}  # group -> first appearance among the siblings
    keyed = []
    for token, child in node.children.items():
        group, key = _group_and_key(token)
        groups[group] = min(groups.get(group, child.first), child.first)
        keyed.append((_rank(token), group, key, child.first, child))
    keyed.sort(key=lambda t: (t[0], groups[t[1]], t[1], t[2], t[3]))
    for *_, child in keyed:
        _emit(child, out)


def model_order(names: Iterable[str]) -> list[str]:
    """The parameter names in model order (each once); see the module docstring for the rules.

    Stable: names the rules cannot tell apart keep their given order, so ordering a list that is
    already in model order changes nothing.

    Examples
    --------
    >>> model_order(["layers.10.weight", "layers.2.weight", "layers.1.weight"])
    ['layers.1.weight', 'layers.2.weight', 'layers.10.weight']
    >>> model_order(["embed_out.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
    ...              "gpt_neox.embed_in.weight"])
    ['gpt_neox.embed_in.weight', 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight', 'embed_out.weight']
    """
    root = _Node(0)
    for i, name in enumerate(dict.fromkeys(names)):
        node = root
        for token in name.split("."):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(i)
            node = child
        node.leaf = name
    out: list[str] = []
    _emit(root, out)
    return out


def model_index(names: Iterable[str]) -> dict[str, int]:
    """Each name's position in model order: a sort key for anything listed per parameter
    (``sorted(views, key=lambda k: idx[views[k]["param"]])`` keeps a parameter's views
    together, in their given order)."""
    return {name: i for i, name in enumerate(model_order(names))}


def views_in_model_order(views: Mapping[str, V]) -> dict[str, V]:
    """A store's views (key -> `specan.views.StoredView`) ordered by their parameters' model
    order.

    Stores written before views were planned in model order list them in file order; every
    listing goes through this, so old and new stores read alike. A parameter's own views
    (whole, per head, halves) keep their stored order.
    """
    index = model_index(v.param for v in views.values())
    keys = sorted(enumerate(views), key=lambda iv: (index[views[iv[1]].param], iv[0]))
    return {k: views[k] for _, k in keys}
