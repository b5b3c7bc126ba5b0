"""The analyses of a run's store: rank, alignment and SVA over checkpoints, as plain arrays.

Each function opens the store, reads what it needs, and returns a small dataclass that
`specan.cli` prints and `specan.plots` draws. Steps are in step order (done checkpoints only).
Results are cached in the store's ``derived/`` under a fingerprint of their inputs (the done
checkpoints, the views, the pairs), so they are recomputed only after the store changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specan import metrics, runfile, store
from specan.errors import StoreError
from specan.order import views_in_model_order
from specan.pairs import Pair, pairs_for, per_head_vo, resolve
from specan.views import WHOLE_RULES

log = logging.getLogger(__name__)

DIAG_TOP = 100  # the diagonals plotted (Eqn 3 and 5): top 100 indices


@dataclass
class RankResult:
    """Normalised effective rank ``values[v, t]`` of view ``keys[v]`` at ``steps[t]``."""

    steps: np.ndarray
    keys: list[str]
    params: list[str]
    rules: list[str]
    values: np.ndarray  # [V, T]; per-head views: mean over heads
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T], NaN if missing
    bound: list[bool] = field(default_factory=list)  # [V] an upper bound (top-k σ), not exact

    @property
    def whole(self) -> np.ndarray:
        """[V] bool: the view is its parameter's whole matrix (one per weight matrix)."""
        return np.array([r in WHOLE_RULES for r in self.rules], dtype=bool)

    @property
    def mean(self) -> np.ndarray:
        """[T] the model's mean normalised effective rank (SPEC §3): the mean over its weight
        matrices, one per parameter; per-head and split views are extra views, not extra weight.
        """
        rows = self.values[self.whole]
        if not rows.size:
            return np.full(len(self.steps), np.nan)
        return rows.mean(axis=0)

    @property
    def matrices(self) -> int:
        """How many weight matrices `mean` averages."""
        return int(self.whole.sum())


@dataclass
class AlignResult:
    pair: Pair
    diag: np.ndarray  # [T, n]: A_ii for i < n <= 100 (per-head pairs: mean over heads)
    score: np.ndarray  # [T]: Eqn 4


@dataclass
class SVAResult:
    key: str
    param: str
    diag: np.ndarray  # [T, n]: S_ii
    score: np.ndarray  # [T]: mean of the first 10


@dataclass
class Alignment:
    steps: np.ndarray
    results: list[AlignResult]
    skipped: list[tuple[Pair, str]]
    rule: str


@dataclass
class Agreement:
    steps: np.ndarray
    results: list[SVAResult]
    reference: str  # what each checkpoint was compared with, in words
    dropped: list[str] = field(default_factory=list)  # what was left out of the comparison


def _open(run: Path | str, dedupe: bool = False) -> store.Store:
    return store.open_store(store.store_path(run), dedupe=dedupe)


def _views(st: store.Store) -> dict[str, Any]:
    """The store's views in model order (older stores list them in file order)."""
    return views_in_model_order(st.views)


def _steps(st: store.Store) -> np.ndarray:
    return _step_array(st.done_rows()[1])


def _step_array(entries: list[dict[str, Any]]) -> np.ndarray:
    """Steps of done checkpoint entries; -1 for a checkpoint without a step."""
    return np.array([-1 if e["step"] is None else e["step"] for e in entries], dtype=np.int64)


def _inputs(st: store.Store) -> list[Any]:
    """What every analysis of a store depends on: its done checkpoints and its views."""
    done = [
        [c["name"], c["size"], c["mtime_ns"], c["row"]] for c in st.checkpoints if c.get("done")
    ]
    return [done, st.views] + (["dedupe"] if st.dedupe else [])


def _cached(
    st: store.Store, name: str, key: str, compute: Any, *, cache: bool
) -> tuple[dict, dict]:
    """(arrays, info) from ``derived/<name>`` when ``key`` matches, else computed and cached.

    ``cache=False`` neither reads nor writes the cache. Each array's dimension names come from
    ``DIMS``, and ``step`` (the done checkpoints' steps) goes in beside them, so that
    ``xarray.open_zarr(<store>/derived/<name>)`` reads a cached result without specan.
    """
    if cache:
        hit = store.read_derived(st.path, name, key)
        if hit is not None:
            return hit
    arrays, info = compute()
    if cache:
        arrays = {**arrays, "step": _steps(st)} if "step" not in arrays else arrays
        store.write_derived(st.path, name, key, arrays, info, dims=DIMS)
    return arrays, info


# Dimension names of the cached arrays (see `_cached`); view and pair names are in the attrs.
DIMS = {
    "step": ["step"],
    "erank": ["view", "step"],
    "diag": ["item", "step", "index"],  # item: a pair (align) or a view (sva); NaN-padded
    "length": ["item"],  # how many diagonal entries of each item are real
}


def _padded(diags: list[np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """Diagonals ``[T, n_i]`` of different lengths as one NaN-padded ``[I, T, N]`` array."""
    n = max((d.shape[1] for d in diags), default=0)
    out = np.full((len(diags), steps, n), np.nan, dtype=np.float64)
    for i, d in enumerate(diags):
        out[i, :, : d.shape[1]] = d
    return {"diag": out, "length": np.array([d.shape[1] for d in diags], dtype=np.int64)}


def _unpadded(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [arrays["diag"][i, :, :n] for i, n in enumerate(arrays["length"].tolist())]


def rank(run: Path | str, *, cache: bool = True, dedupe: bool = False) -> RankResult:
    """Normalised effective rank (Eqn 1-2) of every view at every checkpoint (cached unless
    ``cache`` is False). ``dedupe`` shows identical checkpoints once (`store.dedupe`)."""
    st = _open(run, dedupe)
    steps = _steps(st)
    views = _views(st)

    def compute() -> tuple[dict, dict]:
        rows = []
        for key, v in views.items():
            if v.get("sigma_top"):  # only the top k σ: the bound their tail energy allows
                erank = metrics.normalized_effective_rank_bound(
                    st.read_sigma(key), st.read_tail(key), min(v["shape"])
                )
            else:
                erank = metrics.normalized_effective_rank(st.read_sigma(key))
            rows.append(erank.mean(axis=1) if erank.ndim == 2 else erank)  # heads: mean
        values = np.array(rows) if rows else np.zeros((0, len(steps)))
        return {"erank": values}, {"views": list(views)}

    key = store.fingerprint("rank", 2, list(views), *_inputs(st))  # rows follow `views`' order
    arrays, _ = _cached(st, "rank", key, compute, cache=cache)
    keys = list(views)
    return RankResult(
        steps,
        keys,
        [views[k]["param"] for k in keys],
        [views[k]["rule"] for k in keys],
        arrays["erank"],
        {
            n: np.array(v)
            for n, v in runfile.metrics_at(store.run_folder(run), steps.tolist()).items()
        },
        [bool(views[k].get("sigma_top")) for k in keys],
    )


def sigma(run: Path | str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and all singular values ``[T, (H,) R]`` of one view."""
    st = _open(run)
    if key not in st.views:
        raise StoreError(f"{st.path}: no view {key!r} (see `specan info`)")
    return _steps(st), st.read_sigma(key)


def _loader(st: store.Store) -> Any:
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def load(which: str, key: str) -> np.ndarray:
        if key not in cache:
            cache[key] = st.read_vectors(key)
        return cache[key][0 if which == "U" else 1]

    return load


def align(
    run: Path | str, *, vo_per_head: bool = False, cache: bool = True, dedupe: bool = False
) -> Alignment:
    """Alignment of consecutive layers (Eqn 3) and its score (Eqn 4) at every checkpoint
    (cached unless ``cache`` is False). ``vo_per_head`` takes W_V -> W_O per attention head
    instead of whole."""
    st = _open(run, dedupe)
    _need_vectors(st, "alignment")
    views = _views(st)
    pairs, rule = pairs_for(runfile.read_config(store.run_folder(run)), views)
    if vo_per_head:
        pairs = per_head_vo(pairs)
        rule += "; V -> O per head"

    def compute() -> tuple[dict, dict]:
        load = _loader(st)
        diags, kept, skipped = [], [], []
        for pair in pairs:
            try:
                prev, nxt = resolve(pair, views, load)
            except (KeyError, ValueError) as e:
                skipped.append([asdict(pair), str(e).strip("'\"")])
                continue
            a = metrics.alignment(prev, nxt)  # [T, (H,) k2, k1]
            n = min(DIAG_TOP, a.shape[-1], a.shape[-2])
            diag = np.diagonal(a, axis1=-2, axis2=-1)[..., :n]
            if diag.ndim == 3:  # per head -> mean over heads, as the paper plots it
                diag = diag.mean(axis=1)
            diags.append(diag)
            kept.append(asdict(pair))
        return _padded(diags, len(_steps(st))), {"pairs": kept, "skipped": skipped}

    key = store.fingerprint("align", 2, *_inputs(st), [asdict(p) for p in pairs])
    arrays, info = _cached(st, "align", key, compute, cache=cache)
    results = []
    for p, diag in zip(info["pairs"], _unpadded(arrays), strict=True):
        results.append(AlignResult(Pair(**p), diag, diag[:, : metrics.SCORE_TOP].mean(axis=1)))
    skipped = [(Pair(**p), reason) for p, reason in info["skipped"]]
    return Alignment(_steps(st), results, skipped, rule)


def sva(
    run: Path | str,
    against: Path | str | None = None,
    *,
    by: str = "step",
    cache: bool = True,
    dedupe: bool = False,
) -> Agreement:
    """Singular vector agreement (Eqn 5) of every whole-matrix view (cached unless ``cache`` is
    False; ``dedupe`` shows identical checkpoints once).

    Without ``against``, each checkpoint is compared with the run's final one: the checkpoint
    with the largest step (checkpoints without a step are compared, never taken as final).
    With ``against``, each checkpoint is compared with the other run's checkpoint at the same
    step (``by="epoch"``: the same epoch); only shared steps are compared, and
    ``Agreement.dropped`` says what was left out.
    """
    if by not in ("step", "epoch"):
        raise ValueError(f"by must be 'step' or 'epoch', not {by!r}")
    st = _open(run, dedupe)
    _, entries = st.done_rows()
    views = _sva_views(st)
    dropped: list[str] = []
    if against is None:
        other = None
        ref, reference, note = _final(entries)
        dropped += [note] if note else []
        rows, ref_rows = list(range(len(entries))), [ref]
    else:
        other = _open(against, dedupe)
        _, other_entries = other.done_rows()
        rows, ref_rows, why = _matched(entries, other_entries, by, st.path, other.path)
        dropped += why
        views, why = _shared_views(views, other, st.path)
        dropped += why
        reference = f"{against} at the same {by}"
    steps = _step_array(entries)[rows]

    def compute() -> tuple[dict, dict]:
        diags = []
        for key in views:
            u, v = st.read_vectors(key)
            if other is None:
                u_ref, v_ref = u[ref_rows], v[ref_rows]
            else:
                u_ref, v_ref = (x[ref_rows] for x in other.read_vectors(key))
            s = metrics.sva(u[rows], v[rows], u_ref, v_ref)
            diag = np.diagonal(s, axis1=-2, axis2=-1)[..., : min(DIAG_TOP, s.shape[-1])]
            diags.append(diag.mean(axis=1) if diag.ndim == 3 else diag)
        out = _padded(diags, len(rows))
        return {**out, "step": steps}, {"views": list(views), "reference": reference}

    inputs = [*_inputs(st), _inputs(other) if other is not None else None, rows, ref_rows]
    name = "sva" if other is None else f"sva_vs_{store.fingerprint(str(other.path))}"
    key = store.fingerprint("sva", 2, list(views), *inputs)
    arrays, _ = _cached(st, name, key, compute, cache=cache)
    results = []
    for key, diag in zip(views, _unpadded(arrays), strict=True):
        results.append(
            SVAResult(key, views[key]["param"], diag, diag[:, : metrics.SCORE_TOP].mean(axis=1))
        )
    return Agreement(steps, results, reference, dropped)


def _final(entries: list[dict[str, Any]]) -> tuple[int, str, str | None]:
    """The reference row of a single-run SVA: (index, words for it, a note or None)."""
    known = [i for i, e in enumerate(entries) if e["step"] is not None]
    stepless = [e["name"] for e in entries if e["step"] is None]
    if not entries:
        return 0, "the final checkpoint", None
    if not known:
        i = len(entries) - 1
        return (
            i,
            f"the last checkpoint by name, {entries[i]['name']} (no checkpoint has a step)",
            ("no checkpoint has a step: the last by name was taken as final"),
        )
    i = known[-1]  # entries come in step order
    note = None
    if stepless:
        note = (
            f"{len(stepless)} checkpoint(s) without a step ({', '.join(stepless[:3])}"
            f"{', ...' if len(stepless) > 3 else ''}) compared, but not taken as final"
        )
    return i, f"the final checkpoint, step {entries[i]['step']} ({entries[i]['name']})", note


def _matched(
    entries: list[dict[str, Any]], other: list[dict[str, Any]], by: str, here: Path, there: Path
) -> tuple[list[int], list[int], list[str]]:
    """Rows of both runs that share a step (or epoch), in order, and what was left out."""

    def key(e: dict[str, Any]) -> float | None:
        x = e.get(by)
        return None if x is None else round(float(x), 6)

    mine = {key(e): i for i, e in enumerate(entries) if key(e) is not None}
    theirs = {key(e): i for i, e in enumerate(other) if key(e) is not None}
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        raise StoreError(
            f"{here.parent} and {there.parent} share no {by}: {span(mine)} against "
            f"{span(theirs)}" + (" (use by='epoch' for runs saved at different steps)"
                                  if by == "step" else "")
        )  # fmt: skip
    dropped = []
    for where, have, n_none in ((here, mine, len(entries) - len(mine)),
                                (there, theirs, len(other) - len(theirs))):  # fmt: skip
        alone = sorted(set(have) - set(shared))
        if alone:
            dropped.append(f"{where.parent}: {by}s {span(alone)} have no match in the other run")
        if n_none:
            dropped.append(f"{where.parent}: {n_none} checkpoint(s) without a {by} left out")
    return [mine[k] for k in shared], [theirs[k] for k in shared], dropped


def span(values: Any) -> str:
    vals = sorted(values)
    fmt = [f"{v:g}" for v in vals]
    return ", ".join(fmt) if len(fmt) <= 6 else f"{', '.join(fmt[:3])}, ..., {fmt[-1]}"


def _shared_views(
    views: dict[str, Mapping[str, Any]], other: store.Store, here: Path
) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """The views both runs have, with equal shapes; a shape that differs is an error."""
    theirs = _sva_views(other)
    for key in views.keys() & theirs.keys():
        a, b = views[key], theirs[key]
        if (list(a["shape"]), a.get("heads")) != (list(b["shape"]), b.get("heads")):
            raise StoreError(
                f"{other.path}: view {key!r} is {_shape(b)} there but {_shape(a)} in {here}: "
                "these runs are not the same model"
            )
    keep = {k: v for k, v in views.items() if k in theirs}
    if not keep:
        raise StoreError(f"{here} and {other.path} share no view with singular vectors")
    dropped = []
    for where, only in (
        (here, views.keys() - theirs.keys()),
        (other.path, theirs.keys() - views.keys()),
    ):
        if only:
            dropped.append(f"views only in {where}: {', '.join(sorted(only))}")
    return keep, dropped


def _shape(view: Mapping[str, Any]) -> str:
    text = "x".join(str(d) for d in view["shape"])
    return text + (f" x {view['heads']} heads" if view.get("heads") else "")


def _sva_views(st: store.Store) -> dict[str, Mapping[str, Any]]:
    """Whole-matrix views with stored vectors (per-head and split views would repeat the whole
    matrix's story); a store without vectors is an error, not an empty result."""
    _need_vectors(st, "SVA")
    return {k: v for k, v in _views(st).items() if v["rule"] in WHOLE_RULES and v.get("k")}


def _need_vectors(st: store.Store, what: str) -> None:
    if not st.attrs.get("kernel", {}).get("vectors", True):
        raise StoreError(
            f"{st.path}: holds singular values only (ingested without vectors); {what} needs "
            "singular vectors: ingest again with --overwrite and without --no-vectors"
        )


def select_steps(steps: np.ndarray, spec: str | None) -> np.ndarray:
    """Indices of ``steps`` kept by a step selection: ``A:B`` (inclusive range, either end
    open), a comma-separated list of steps, or None/"all" for every step.

    Raises ValueError when the selection is malformed, names a step the run does not have, or
    keeps nothing: a silent empty or partial answer would look like a result.
    """
    if spec is None or spec.strip().lower() == "all":
        return np.arange(len(steps))
    have = f"the run has {len(steps)} checkpoint(s), steps {span(steps.tolist())}"
    try:
        if ":" in spec:
            lo, hi = (s.strip() for s in spec.split(":", 1))
            keep = np.ones(len(steps), dtype=bool)
            if lo:
                keep &= steps >= int(lo)
            if hi:
                keep &= steps <= int(hi)
            if not keep.any():
                raise LookupError(f"steps {spec!r} select no checkpoint; {have}")
            return np.flatnonzero(keep)
        wanted = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"steps take A:B or a comma-separated list, got {spec!r}") from None
    except LookupError as e:
        raise ValueError(str(e)) from None
    missing = [w for w in wanted if w not in set(steps.tolist())]
    if missing or not wanted:
        which = ", ".join(map(str, missing)) if missing else repr(spec)
        raise ValueError(f"no checkpoint at step {which}; {have}")
    index = {int(s): i for i, s in enumerate(steps)}
    return np.array(sorted({index[w] for w in wanted}), dtype=np.int64)
