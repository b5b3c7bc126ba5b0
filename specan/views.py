"""Parameter name + shape -> matrix views (SPEC §1); extraction of a view from a stored tensor.

Planning looks at names and shapes only, so it runs on checkpoint headers without reading weights.
Views are planned in model order (`specan.order`), not in the file's alphabetical order.
Only the standard library is imported at module level: the CLI plans views on its fast path and
importing torch costs over a second, so `extract` imports torch when it is called.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specan.errors import ViewRuleError
from specan.order import model_order

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "WHOLE_RULES",
    "StoredView",
    "ViewFacts",
    "ViewSpec",
    "detect_family",
    "extract",
    "lstm_output",
    "plan_views",
    "restore",
    "safe_key",
    "select",
]

FAMILIES = ("auto", "vgg", "mlp", "lstm", "transformer", "neox", "llama", "gpt2")
# The rules of the one view per parameter that covers the whole weight: spectra and model means
# (one matrix per parameter) take these; every other rule is an extra view for alignment.
# "linear_t" is a Linear stored transposed, (in, out): GPT-2's Conv1D.
WHOLE_RULES = ("linear", "linear_t", "embedding", "conv", "conv_transpose", "lstm", "in_proj")
# What a `rules` override may name. "qkv_interleaved" (GPT-NeoX) and "qkv_transposed" (GPT-2's
# c_attn, stored (d, 3d)) plan the same views as "in_proj" but read the fused weight in their own
# layout; "q_proj" / "k_proj" are separate Q / K projections (Llama): the whole Linear plus one
# view per head.
OVERRIDES = (*WHOLE_RULES, "qkv_interleaved", "qkv_transposed", "q_proj", "k_proj")
# The rules a ViewSpec carries: the whole ones, the per-head and W_V splits of attention, and
# "col_half", a column half of the next weight after a bidirectional LSTM layer (one direction's
# inputs), decomposed on its own; "o_grouped", W_O with the columns of each group of query
# heads that share one V head summed (grouped-query attention), for W_V -> W_O.
RULES = (*WHOLE_RULES, "q_heads", "k_heads", "v_heads", "v", "col_half", "o_grouped")
# Which third of a fused Q/K/V weight each split view takes (W_V whole is "v").
_QKV_PART = {"q_heads": 0, "k_heads": 1, "v_heads": 2, "v": 2}
_ATTENTION_FAMILIES = ("transformer", "neox", "llama", "gpt2")
KEY_MAX = 180  # well under the 255-byte file-name limit, leaving room for "-<sha1>" and "__q"

_LSTM = re.compile(r"(?:^|\.)weight_(ih|hh)_l(\d+)(_reverse)?$")
# "tconv4" is the paper's UNet naming of its transposed convolutions
_TRANSPOSE = re.compile(r"transpose|deconv|convt|upconv|(?:^|[._])tconv", re.IGNORECASE)
_EMBED = re.compile(r"embed|wte|wpe", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ViewFacts:
    """What a view's rule knows of its parameter beyond the matrix shape (SPEC §1, §3).

    Each rule sets the fields it needs to cut the view out of the stored tensor, or that later
    analyses read; every other field stays None (``heads_unknown`` False). `specan.store` alone
    turns these into JSON (a store's ``views[key]["info"]``) and back.

    Attributes
    ----------
    c_in : int, optional
        Convolutions: the input channels.
    kernel : tuple of int, optional
        Convolutions: the kernel's spatial shape.
    output_space : str, optional
        Embeddings: ``"V"``, the layer's output space is spanned by the right singular vectors
        (an embedding's output is its d columns).
    hidden : int, optional
        LSTM weights and column halves: the hidden size h.
    layer : int, optional
        LSTM weights: the layer index k of ``weight_ih_l<k>``.
    direction : {"forward", "reverse"}, optional
        LSTM weights and column halves: the direction whose inputs or weights they are.
    kind : {"ih", "hh"}, optional
        LSTM weights: input-to-hidden or hidden-to-hidden.
    gate_g_rows : tuple of int, optional
        LSTM weights: the rows ``[lo, hi)`` of the cell (g) gate.
    module : str, optional
        LSTM weights: the name prefix of the owning ``nn.LSTM`` (``""`` at top level).
    cols : tuple of int, optional
        Column halves: the columns ``[lo, hi)`` of one direction's inputs.
    width : int, optional
        Column halves: the input width 2h of the whole weight.
    of : {"lstm", "linear"}, optional
        Column halves: the kind of layer they are cut from.
    layout : {"stacked", "interleaved", "transposed", "split"}, optional
        Attention: how Q/K/V sit in the stored weight (torch's [Q; K; V], GPT-NeoX's per-head
        interleaving, GPT-2's transposed ``c_attn``, or separate Q and K projections).
    d : int, optional
        Attention: the model width.
    heads : int, optional
        Attention: the query head count (`ViewSpec.heads` is the count of stacked matrices,
        set on per-head views only).
    head_dim : int, optional
        Attention: the width of one head.
    kv_heads : int, optional
        Grouped W_O: the key/value head count.
    part : {"q", "k", "v"}, optional
        Attention: which projection a split view takes.
    heads_unknown : bool
        Attention: the head count was not known at planning, so no per-head views exist.
    """

    c_in: int | None = None
    kernel: tuple[int, ...] | None = None
    output_space: str | None = None
    hidden: int | None = None
    layer: int | None = None
    direction: str | None = None
    kind: str | None = None
    gate_g_rows: tuple[int, int] | None = None
    module: str | None = None
    cols: tuple[int, int] | None = None
    width: int | None = None
    of: str | None = None
    layout: str | None = None
    d: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    kv_heads: int | None = None
    part: str | None = None
    heads_unknown: bool = False


@dataclass(frozen=True)
class ViewSpec:
    """One matrix view of one parameter: what the store keeps spectra of.

    `facts` holds what the rule knows beyond the shape (`ViewFacts`); it is left out of
    equality and hash: two plans of one checkpoint compare by key, parameter, rule, shape and
    heads.
    """

    key: str
    param: str
    rule: str
    shape: tuple[int, int]
    heads: int | None = None
    facts: ViewFacts = field(default=ViewFacts(), compare=False)


@dataclass(frozen=True)
class StoredView(ViewSpec):
    """A view as a store holds it: the planned `ViewSpec` and what ingest decided for it.

    `specan.store` alone reads and writes it as JSON (the store's ``views`` attribute); every
    other module gets this object.
    """

    k: int = 0  # singular vectors kept per checkpoint (0: none)
    sigma_top: int | None = None  # only the top k σ are kept (effective rank is then a bound)
    routes: tuple[str, ...] = ()  # the kernel routes that computed it
    param_shape: tuple[int, ...] | None = None  # the parameter's shape, checked on every file

    @property
    def size(self) -> int:
        """Elements of the view's matrix or matrices (all heads)."""
        return self.shape[0] * self.shape[1] * (self.heads or 1)


def _digest(name: str, width: int) -> str:
    # surrogatepass: names decoded with surrogateescape must hash, not crash
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:width]


def safe_key(name: str) -> str:
    """Map a parameter name to one safe path component for the store.

    Keeps ``[A-Za-z0-9._-]`` and turns every other character into ``_``. The result is never empty,
    ``.`` or ``..``, never starts with ``.`` (hidden, path tricks), ``-`` (read as an option) or
    ``__`` (reserved by Zarr v3), and is at most `KEY_MAX` characters (a sha1 of `name` replaces
    the tail when cut). The mapping is lossy; `plan_views` makes keys unique.
    """
    key = _UNSAFE.sub("_", name)
    if not key or key[0] in ".-" or key.startswith("__"):
        key = "p" + key
    if key.endswith("."):  # Windows drops trailing dots, which would merge "a." with "a"
        key += "_"
    if len(key) > KEY_MAX:
        key = key[: KEY_MAX - 9] + "-" + _digest(name, 8)
    return key


def _shape(value: Any) -> tuple[int, ...]:
    # plan on plain tuples or on runs.TensorInfo (anything with .shape)
    return tuple(int(d) for d in getattr(value, "shape", value))


def _is_float(value: Any) -> bool:
    # Headers carry dtypes; integer buffers (e.g. HF "position_ids", shape (1, L)) are not weights.
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return True
    s = str(dtype).lower()
    return "float" in s or s.startswith(("f", "bf"))


def detect_family(names: Iterable[str], shapes: Mapping[str, Any] | None = None) -> str:
    """Guess the model family from parameter names (and shapes, to tell "mlp" from "vgg").

    A mapping name -> shape may be passed as `names`. Without shapes, "vgg" is guessed from a
    name containing "conv".
    """
    if shapes is None and isinstance(names, Mapping):
        shapes = names
    names = list(names)
    if any("query_key_value" in n for n in names):
        return "neox"
    if any(re.search(r"weight_ih_l\d", n) for n in names):
        return "lstm"
    if any(n.endswith("in_proj_weight") for n in names):
        return "transformer"
    if any(n.endswith("c_attn.weight") for n in names):
        return "gpt2"
    if any(n.endswith("q_proj.weight") for n in names) and any(
        n.endswith("k_proj.weight") for n in names
    ):
        return "llama"
    if shapes is not None:
        deep = any(len(_shape(shapes[n])) > 2 for n in names if n in shapes)
    else:
        deep = any("conv" in n.lower() for n in names)
    return "vgg" if deep else "mlp"


def select(names: Iterable[str], layers: str | None) -> list[str]:
    """Apply the layers selection: comma-separated globs (fnmatch) or ``re:<regex>`` (re.search).

    None or "all" keeps every name. A name is kept when any pattern matches it; order is kept.
    A pattern that matches no name is an error (it is most likely a typo).
    """
    names = list(names)
    if layers is None or layers.strip().lower() == "all":
        return names
    patterns = [p.strip() for p in layers.split(",") if p.strip()]
    if not patterns:
        raise ViewRuleError(
            f"the layers selection {layers!r}: no pattern (use 'all' for every parameter)"
        )
    keep: set[str] = set()
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                rx = re.compile(pat[3:])
            except re.error as e:
                raise ViewRuleError(
                    f"the layers selection: pattern {pat!r}: bad regex ({e})"
                ) from e
            hits = {n for n in names if rx.search(n)}
        else:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pat)}
        if not hits:
            sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ViewRuleError(
                f"the layers selection: pattern {pat!r} matches no parameter (names: {sample})"
            )
        keep |= hits
    return [n for n in names if n in keep]


def _auto_rule(param: str, ndim: int, family: str) -> str:
    if ndim > 2:  # shape cannot tell a transposed conv from a conv: only its name can
        return "conv_transpose" if _TRANSPOSE.search(param) else "conv"
    if _LSTM.search(param):
        return "lstm"
    if param.endswith("in_proj_weight"):
        return "in_proj"
    if param.endswith("query_key_value.weight"):
        # An explicit torch-style family means the fused rows are stacked [Q; K; V], not NeoX's.
        return "in_proj" if family == "transformer" else "qkv_interleaved"
    if family == "gpt2":  # Conv1D stores (in, out): the transpose of a Linear
        if param.endswith("c_attn.weight"):
            return "qkv_transposed"
        if param.endswith(("c_proj.weight", "c_fc.weight")):
            return "linear_t"
    if family == "llama" and param.endswith(("q_proj.weight", "k_proj.weight")):
        return param[-len("q_proj.weight") :].removesuffix(".weight")
    # Judge the module that owns the weight, so "time_embed.0.weight" (a Linear) stays linear.
    owner = param.removesuffix(".weight").rsplit(".", 1)[-1].lower()
    if owner == "encoder" and family in _ATTENTION_FAMILIES and param.endswith(".weight"):
        return "embedding"  # the paper's LMs name their token embedding "encoder"
    if _EMBED.search(owner) and owner not in ("embed_out", "unembed"):  # both output Linears
        return "embedding"
    return "linear"


Part = tuple  # (key suffix, rule, (m, n), heads or None, ViewFacts)


def _plan_param(param: str, shape: tuple[int, ...], rule: str, heads: int | None) -> list[Part]:
    where = f"{param} {shape}"
    if rule in ("conv", "conv_transpose"):
        c_in, c_out = (shape[0], shape[1]) if rule == "conv_transpose" else (shape[1], shape[0])
        kernel = shape[2:]
        facts = ViewFacts(c_in=c_in, kernel=kernel)
        return [("", rule, (c_out, c_in * math.prod(kernel)), None, facts)]
    if len(shape) != 2:
        raise ViewRuleError(f"{where}: rule {rule!r} needs a 2-D weight")
    rows, cols = shape
    if rule in ("linear", "embedding"):
        # an embedding's output is its d columns: the right singular vectors span it
        facts = ViewFacts(output_space="V") if rule == "embedding" else ViewFacts()
        return [("", rule, (rows, cols), None, facts)]
    if rule == "linear_t":  # stored (in, out): the view is the transpose, U spans the output
        return [("", rule, (cols, rows), None, ViewFacts())]
    if rule in ("q_proj", "k_proj"):
        return _plan_split_heads(param, shape, rule[0], heads)
    if rule == "lstm":
        m = _LSTM.search(param)
        if m is None:
            raise ViewRuleError(f"{where}: rule 'lstm' needs nn.LSTM names (weight_ih_l<k>...)")
        if rows % 4:
            raise ViewRuleError(
                f"{where}: an LSTM weight stacks 4 gates but {rows} rows is not a multiple of 4 "
                "(a GRU stacks 3: give it rule 'linear')"
            )
        h = rows // 4
        facts = ViewFacts(
            hidden=h,
            layer=int(m[2]),
            direction="reverse" if m[3] else "forward",
            kind=m[1],
            gate_g_rows=(2 * h, 3 * h),
            module=param[: m.start()],
        )
        return [("", "lstm", (rows, cols), None, facts)]
    # fused Q/K/V: "in_proj" (torch MultiheadAttention, stacked), "qkv_interleaved" (GPT-NeoX),
    # "qkv_transposed" (GPT-2's c_attn, (d, 3d): its transpose is stacked [Q; K; V])
    layout = {"qkv_interleaved": "interleaved", "qkv_transposed": "transposed"}.get(rule, "stacked")
    d, fused = (rows, cols) if layout == "transposed" else (cols, rows)
    if fused != 3 * d:
        raise ViewRuleError(f"{where}: a fused Q/K/V weight needs 3 x {d} = {3 * d} rows")
    if heads is not None and d % heads:
        raise ViewRuleError(f"{where}: width {d} is not divisible by {heads} heads")
    whole = ViewFacts(layout=layout, d=d, heads=heads, heads_unknown=heads is None)
    parts: list[Part] = [("", "in_proj", (3 * d, d), None, whole)]
    if heads is None and layout == "interleaved":
        # GPT-NeoX interleaves Q/K/V per head: without the head count not even W_V can be cut out
        return parts
    if heads is not None:
        hd = d // heads
        # W_V per head too: the per-head V -> O alignment, offered beside the whole one
        for part, suffix in (("q", "__q"), ("k", "__k"), ("v", "__vh")):
            facts = ViewFacts(layout=layout, d=d, heads=heads, head_dim=hd, part=part)
            parts.append((suffix, f"{part}_heads", (hd, d), heads, facts))
    parts.append(("__v", "v", (d, d), None, ViewFacts(layout=layout, d=d, heads=heads, part="v")))
    return parts


def _plan_split_heads(
    param: str, shape: tuple[int, ...], part: str, heads: int | None
) -> list[Part]:
    """A separate Q or K projection (Llama's q_proj / k_proj, (heads x head_dim, d)): the whole
    Linear, plus its rows cut per head, ``(heads, head_dim, d)``, each head its own SVD."""
    rows, d = shape
    if heads is None:
        return [("", "linear", (rows, d), None, ViewFacts(heads_unknown=True))]
    if rows % heads:
        raise ViewRuleError(f"{param} {shape}: {rows} rows are not divisible by {heads} heads")
    hd = rows // heads
    facts = ViewFacts(layout="split", d=d, heads=heads, head_dim=hd, part=part)
    return [
        ("", "linear", (rows, d), None, ViewFacts(heads=heads)),
        (f"__{part}", f"{part}_heads", (hd, d), heads, facts),
    ]


def plan_views(
    shapes: Mapping[str, Any],
    *,
    family: str = "auto",
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: str | None = None,
    rules: Mapping[str, str] | None = None,
) -> list[ViewSpec]:
    """Plan the matrix views of a checkpoint from its parameter names and shapes.

    Parameters
    ----------
    shapes : mapping
        Parameter name -> shape tuple (or an object with ``.shape``, e.g. `runs.TensorInfo`; one
        with a non-float ``.dtype`` is skipped), in any order (a file lists them alphabetically).
    family : str
        One of `FAMILIES`. "auto" detects it; an explicit "transformer" reads a fused
        ``query_key_value.weight`` as stacked [Q; K; V] instead of NeoX's per-head interleaving.
    heads : int, optional
        Attention (query) head count; without it attention weights get their whole views only.
    kv_heads : int, optional
        Key/value head count of grouped-query attention (Llama's ``num_key_value_heads``);
        checked against the shapes, which tell it anyway once `heads` is known.
    layers : str, optional
        The layers selection (see `select`), applied to names before planning.
    rules : mapping, optional
        Parameter name -> one of `OVERRIDES`; beats every name and shape rule.

    Returns
    -------
    list of ViewSpec
        In model order (`specan.order.model_order`), each parameter's whole view first, then
        its extra views: q_heads, k_heads, v_heads (when heads are known) and v of a fused Q/K/V
        weight; the per-head view of a separate Q or K projection; the two column halves
        (forward, reverse) of the weight after a bidirectional LSTM layer. Keys are unique, also
        ignoring case.
    """
    if family not in FAMILIES:
        raise ViewRuleError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    for what, n in (("head count", heads), ("key/value head count", kv_heads)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ViewRuleError(f"{what} must be a positive integer, not {n!r}")
    rules = dict(rules or {})
    for param, rule in rules.items():
        if rule not in OVERRIDES:
            raise ViewRuleError(f"{param}: unknown rule {rule!r}; expected one of {OVERRIDES}")
        if param not in shapes:
            raise ViewRuleError(
                f"{param}: rule {rule!r} given for a parameter not in the checkpoint"
            )
    if family == "auto":
        family = detect_family(shapes)
    planned: list[tuple[str, list[Part]]] = []
    for param in model_order(select(shapes, layers)):
        shape = _shape(shapes[param])
        if param in rules:
            if len(shape) < 2 or not _is_float(shapes[param]):
                raise ViewRuleError(
                    f"{param} {shape}: rule {rules[param]!r} needs a ≥2-D float weight"
                )
            rule = rules[param]
        elif len(shape) < 2 or 0 in shape or not _is_float(shapes[param]):
            continue  # biases, norms, scalars, empty and integer tensors have no spectrum
        elif param.rsplit(".", 1)[-1] in ("bias", "masked_bias"):
            continue  # a >=2-D "bias" is a buffer, e.g. GPT-2's causal mask (1, 1, n, n)
        else:
            rule = _auto_rule(param, len(shape), family)
        n_heads = heads
        if rule == "k_proj":
            n_heads = _kv_heads(param, shape, shapes, heads, kv_heads)
        planned.append((param, _plan_param(param, shape, rule, n_heads)))
        if family == "llama" and rule == "linear" and param.endswith("o_proj.weight") and heads:
            k_param = param.removesuffix("o_proj.weight") + "k_proj.weight"
            if k_param in shapes:
                kv = _kv_heads(k_param, _shape(shapes[k_param]), shapes, heads, kv_heads)
                if kv is not None and kv < heads:
                    planned[-1][1].append(_plan_grouped_o(param, shape, heads, kv))
    _plan_lstm_halves(planned)
    base = _unique_bases(planned)
    return [
        ViewSpec(base[p] + sfx, p, rule, shape, h, facts)
        for p, parts in planned
        for sfx, rule, shape, h, facts in parts
    ]


def _kv_heads(
    param: str,
    shape: tuple[int, ...],
    shapes: Mapping[str, Any],
    heads: int | None,
    kv_heads: int | None,
) -> int | None:
    """Key heads of a separate K projection: its rows over the head width of its block's Q."""
    if heads is None:
        return None
    q_param = param.removesuffix("k_proj.weight") + "q_proj.weight"
    q_rows = _shape(shapes[q_param])[0] if q_param in shapes else None
    if q_rows is None or q_rows % heads:
        return kv_heads if kv_heads is not None else heads
    hd = q_rows // heads
    if shape[0] % hd:
        raise ViewRuleError(
            f"{param} {tuple(shape)}: {shape[0]} rows are not whole heads of {hd} "
            f"({q_param} has {q_rows} rows for {heads} heads)"
        )
    kv = shape[0] // hd
    if kv_heads is not None and kv != kv_heads:
        raise ViewRuleError(
            f"{param} {tuple(shape)}: holds {kv} key/value heads of width {hd}, "
            f"not the {kv_heads} of num_key_value_heads"
        )
    if heads % kv:
        raise ViewRuleError(f"{param}: {heads} query heads do not share {kv} key/value heads")
    return kv


def _plan_grouped_o(param: str, shape: tuple[int, ...], heads: int, kv: int) -> Part:
    """W_O as the shared V heads see it under grouped-query attention: query head h reads V head
    h // (heads / kv), so O's input columns of the heads of one group add up,
    ``(d, kv x head_dim)``. W_V -> W_O meets V's outputs with this view's right vectors."""
    d, cols = shape
    if cols % heads:
        raise ViewRuleError(f"{param} {tuple(shape)}: {cols} columns are not {heads} heads")
    hd = cols // heads
    facts = ViewFacts(heads=heads, kv_heads=kv, head_dim=hd)
    return ("__grouped", "o_grouped", (d, kv * hd), None, facts)


def lstm_output(
    order: Sequence[str], after: str, width: int, in_width: Mapping[str, int | None]
) -> str | None:
    """The layer an LSTM feeds: the first parameter after ``after`` (its last LSTM weight) in
    model ``order`` whose input is ``width`` wide (h, or 2h when bidirectional); ``in_width``
    gives the input width of the linear parameters (None or missing for any other)."""
    start = list(order).index(after) + 1
    return next((p for p in order[start:] if in_width.get(p) == width), None)


def _plan_lstm_halves(planned: list[tuple[str, list[Part]]]) -> None:
    """Add the column halves of what a bidirectional LSTM layer feeds (SPEC §3, LSTM).

    The next layer's input is [forward output; reverse output], 2h wide. As in the paper's code,
    alignment takes that weight's columns of one direction and decomposes them on their own, so
    a direction's score does not depend on the other direction's weights: for ``weight_ih_l{k}``
    (k >= 1) of both directions, and for the linear layer after the last LSTM layer.
    """
    order = [p for p, _ in planned]
    parts_of = dict(planned)
    whole = {p: parts[0] for p, parts in planned}  # (suffix, rule, shape, heads, facts)
    modules: dict[str, list[str]] = {}
    for p, (_, rule, _shape, _heads, facts) in whole.items():
        if rule == "lstm":
            modules.setdefault(facts.module, []).append(p)

    def halves(p: str, h: int, of: str) -> None:
        rows = whole[p][2][0]
        for sfx, direction, lo in (("__fwd", "forward", 0), ("__rev", "reverse", h)):
            facts = ViewFacts(cols=(lo, lo + h), width=2 * h, direction=direction, of=of, hidden=h)
            parts_of[p].append((sfx, "col_half", (rows, h), None, facts))

    for params in modules.values():
        facts = {p: whole[p][4] for p in params}
        if not any(f.direction == "reverse" for f in facts.values()):
            continue  # unidirectional: the next layer takes h inputs, nothing to cut
        for p, f in facts.items():
            if f.kind == "ih" and f.layer >= 1 and whole[p][2][1] == 2 * f.hidden:
                halves(p, f.hidden, "lstm")
        last = max(params, key=order.index)
        h = max(facts.values(), key=lambda f: f.layer).hidden
        linear = {p: whole[p][2][1] for p in order if whole[p][1] == "linear"}
        out = lstm_output(order, last, 2 * h, linear)
        if out is not None:
            halves(out, h, "linear")


def _unique_bases(planned: list[tuple[str, list[Part]]]) -> dict[str, str]:
    # Keys compare case-insensitively: on macOS/Windows "W" and "w" are one folder.
    base = {p: safe_key(p) for p, _ in planned}
    for width in (8, 16, 40, 0):
        owners: dict[str, set[str]] = {}
        for p, parts in planned:
            for sfx, *_ in parts:
                owners.setdefault((base[p] + sfx).lower(), set()).add(p)
        clash = sorted({p for ps in owners.values() if len(ps) > 1 for p in ps})
        if not clash:
            return base
        if not width:
            raise ViewRuleError(f"cannot give unique store keys to parameters {clash}")
        for p in clash:
            base[p] = safe_key(p) + "-" + _digest(p, width)
    raise AssertionError("unreachable")


# The facts each rule cannot be cut out without (a hand-built or damaged spec may lack them).
_NEEDS = {
    "conv": ("c_in", "kernel"),
    "conv_transpose": ("c_in", "kernel"),
    "col_half": ("cols", "width"),
    "o_grouped": ("heads", "kv_heads", "head_dim"),
}


def _stored_shape(spec: ViewSpec) -> tuple[int, ...]:
    # What the raw tensor must look like, from the spec alone (it may come back from a store).
    m, n = spec.shape
    f = spec.facts
    lacking = [name for name in _NEEDS.get(spec.rule, ()) if getattr(f, name) is None]
    if lacking:
        raise ViewRuleError(
            f"{spec.param} (view {spec.key}, rule {spec.rule}): the view's facts lack "
            + ", ".join(lacking)
        )
    if spec.rule == "conv":
        return (m, f.c_in, *f.kernel)
    if spec.rule == "conv_transpose":
        return (f.c_in, m, *f.kernel)
    if spec.rule == "linear_t" or (spec.rule == "in_proj" and f.layout == "transposed"):
        return (n, m)
    if spec.rule == "col_half":
        return (m, f.width)
    if spec.rule == "o_grouped":
        return (m, f.heads * f.head_dim)
    if spec.rule in _QKV_PART and f.layout == "split":
        return (spec.heads * m, n)
    if spec.rule in _QKV_PART:
        return (n, 3 * n) if f.layout == "transposed" else (3 * n, n)
    return (m, n)


def extract(
    spec: ViewSpec,
    tensor: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut the view `spec` out of the raw stored `tensor` (any float dtype).

    Returns a contiguous tensor of shape ``spec.shape``, or ``(spec.heads, *spec.shape)`` for a
    per-head stack, in `dtype` (float32 when None). It may share memory with a contiguous input
    of that dtype (no copy is made). With ``out`` (a contiguous buffer of that many elements,
    any float dtype) the view is converted straight into it and ``out`` is returned: one pass
    from a memory-mapped fp16 weight into an ingest's float32 stack, with no float32 copy of
    the whole parameter between them. Raises ViewRuleError when the tensor's shape is not what
    the plan expects.
    """
    import torch

    t = torch.as_tensor(tensor)
    where = f"{spec.param} (view {spec.key}, rule {spec.rule})"
    if spec.rule not in RULES:
        raise ViewRuleError(f"{where}: unknown rule")
    if not t.is_floating_point():
        raise ViewRuleError(f"{where}: dtype {t.dtype} is not a floating-point weight")
    expected = _stored_shape(spec)
    if tuple(t.shape) != expected:
        got = tuple(t.shape)
        raise ViewRuleError(f"{where}: the plan expects shape {expected}, the tensor has {got}")
    m, n = spec.shape
    f = spec.facts
    rule, layout, h = spec.rule, f.layout, spec.heads or f.heads
    want = (spec.heads, m, n) if spec.heads else (m, n)
    if layout == "split":  # a separate Q or K projection: rows [head][head_dim]
        if not spec.heads:
            raise ViewRuleError(f"{where}: a per-head view needs its head count")
    elif rule in ("q_heads", "k_heads", "v_heads") or (rule == "v" and layout == "interleaved"):
        if not h or n % h or (spec.heads and spec.heads * m != n):
            raise ViewRuleError(f"{where}: head count {h} does not split width {n}")
    if layout == "transposed":  # GPT-2's c_attn (d, 3d): its transpose is stacked [Q; K; V]
        t = t.T
    if rule == "conv":
        view = t.reshape(m, n)  # storage order: a row reshapes back to (c_in, *k)
    elif rule == "conv_transpose":
        view = t.transpose(0, 1).reshape(m, n)
    elif rule == "linear_t":
        view = t.T
    elif rule == "col_half":
        lo, hi = f.cols
        view = t[:, lo:hi]  # one direction's inputs of the layer after a bidirectional LSTM
    elif layout == "split":
        view = t.reshape(spec.heads, m, n)
    elif rule == "o_grouped":  # input columns [head][head_dim], head h = group j * g + r
        # summed in at least float32, whatever the stored precision
        acc = torch.promote_types(t.dtype, torch.float32)
        grouped = t.reshape(m, f.kv_heads, f.heads // f.kv_heads, f.head_dim)
        view = grouped.sum(dim=2, dtype=acc).reshape(m, n)
    elif rule in _QKV_PART and layout == "interleaved":
        # NeoX rows are [head][q|k|v][head_dim]: W.view(H, 3, hd, d)
        part = t.reshape(h, 3, n // h, n)[:, _QKV_PART[rule]]
        view = part.reshape(n, n) if rule == "v" else part
    elif rule in _QKV_PART:
        i = _QKV_PART[rule]
        block = t[i * n : (i + 1) * n]  # stacked [W_Q; W_K; W_V]
        view = block if rule == "v" else block.reshape(spec.heads, m, n)
    else:
        view = t
    if tuple(view.shape) != want:  # a hand-built spec whose shape disagrees with its own facts
        raise ViewRuleError(f"{where}: view has shape {tuple(view.shape)}, the spec says {want}")
    if out is not None:
        return out.view(want).copy_(view).view(out.shape)
    return view.to(torch.float32 if dtype is None else dtype).contiguous()


def restore(spec: ViewSpec, matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of `extract` for a whole view (`WHOLE_RULES`): the parameter, in its stored
    shape, whose view is `matrix` (``spec.shape``, any dtype, which is kept).

    Conv: the rows reshape back to ``(c_in, *k)``; transposed conv: the same, then the first two
    dimensions swap back; GPT-2's Conv1D and c_attn: transposed back; LSTM, stacked or
    interleaved fused Q/K/V and embeddings are views as stored. Extra views (per head, W_V, column
    halves, grouped W_O) cover part of a parameter or sum parts of it, so nothing inverts them:
    ViewRuleError.
    """
    where = f"{spec.param} (view {spec.key}, rule {spec.rule})"
    if spec.rule not in WHOLE_RULES:
        raise ViewRuleError(f"{where}: not a whole view of its parameter, so it cannot be restored")
    if tuple(matrix.shape) != tuple(spec.shape):
        raise ViewRuleError(f"{where}: restore takes shape {spec.shape}, not {tuple(matrix.shape)}")
    stored = _stored_shape(spec)
    if spec.rule == "conv":
        out = matrix.reshape(stored)
    elif spec.rule == "conv_transpose":
        out = matrix.reshape(stored[1], stored[0], *stored[2:]).transpose(0, 1)
    elif spec.rule == "linear_t" or spec.facts.layout == "transposed":
        out = matrix.T
    else:
        out = matrix
    return out.contiguous()
