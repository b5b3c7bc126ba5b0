"""The built-in analyses of a run's store: rank, alignment and SVA over checkpoints.

Each is an ordinary registration (`specan.registry`): ``compute(run, ...)`` reads what it needs
from an open `specan.api.Run` and returns a small in-memory Dataset whose ``value`` is
``(view or pair, step)``. `Run.analyse` caches it in the store's ``derived/`` like any other
analysis, and `specan.plots` draws it from that Dataset. Steps are in step order (done
checkpoints only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specan import metrics
from specan.errors import StoreError
from specan.pairs import pairs_for, per_head_vo, resolve
from specan.registry import Analysis
from specan.views import WHOLE_RULES, StoredView

if TYPE_CHECKING:
    import xarray as xr

    from specan.api import Run

log = logging.getLogger(__name__)

DIAG_TOP = 100  # the diagonals plotted (Eqn 3 and 5): top 100 indices


def rank(run: Run) -> xr.Dataset:
    """Normalised effective rank (Eqn 1-2) of every view at every checkpoint.

    ``value`` ``(view, step)`` (per-head views: the mean over heads) and ``model_mean``
    ``(step)``, the mean over the model's weight matrices, one per parameter (SPEC §3: per-head
    and split views are extra views, not extra weight); on ``view``: ``param``, ``rule``,
    ``in_mean`` (counted in that mean) and ``bound`` (only the top-k σ are stored: the value is
    the upper bound their tail energy allows).
    """
    import xarray as xr

    views = _views(run)
    rows = []
    for key, v in views.items():
        sigma = run.sigma(key).values
        if v.sigma_top:  # only the top k σ: the bound their tail energy allows
            erank = metrics.normalized_effective_rank_bound(
                sigma, run.tail(key).values, min(v.shape)
            )
        else:
            erank = metrics.normalized_effective_rank(sigma)
        rows.append(erank.mean(axis=1) if erank.ndim == 2 else erank)  # heads: mean
    values = np.array(rows) if rows else np.zeros((0, len(run.steps)))
    whole = np.array([v.rule in WHOLE_RULES for v in views.values()], dtype=bool)
    mean = values[whole].mean(axis=0) if whole.any() else np.full(len(run.steps), np.nan)
    return xr.Dataset(
        {"value": (("view", "step"), values), "model_mean": ("step", mean)},
        coords={**run._coords(), "view": list(views),
                "param": ("view", [v.param for v in views.values()]),
                "rule": ("view", [v.rule for v in views.values()]),
                "in_mean": ("view", whole),
                "bound": ("view", np.array([bool(v.sigma_top) for v in views.values()]))},
        attrs={"matrices": int(whole.sum())},
    )  # fmt: skip


def _diagonals(
    run: Run,
    item: str,
    labels: list[str],
    diags: list[np.ndarray],
    item_coords: Mapping[str, list[Any]],
    attrs: dict[str, Any],
    index: Sequence[int] | None = None,
) -> xr.Dataset:
    """Per-item diagonals ``[T, n_i]``, NaN-padded to one ``index`` length, and their scores
    (the mean of the first `metrics.SCORE_TOP`) as ``value``; ``length`` says how many entries
    of each item's diagonal are real."""
    import xarray as xr

    coords = run._coords(index)
    t = len(coords["step"])
    n = max((d.shape[1] for d in diags), default=0)
    diag = np.full((len(diags), t, n), np.nan)
    for i, d in enumerate(diags):
        diag[i, :, : d.shape[1]] = d
    score = np.array([d[:, : metrics.SCORE_TOP].mean(axis=1) for d in diags], dtype=float)
    return xr.Dataset(
        {"diag": ((item, "step", "index"), diag),
         "value": ((item, "step"), score.reshape(len(diags), t))},
        coords={**coords, item: labels, "index": np.arange(n),
                "length": (item, np.array([d.shape[1] for d in diags], dtype=np.int64)),
                **{k: (item, v) for k, v in item_coords.items()}},
        attrs=attrs,
    )  # fmt: skip


def align(run: Run, *, vo_per_head: bool = False) -> xr.Dataset:
    """Alignment of consecutive layers (Eqn 3) and its score (Eqn 4) at every checkpoint.

    ``diag`` ``(pair, step, index)`` (A_ii for i < 100; per-head pairs: the mean over heads)
    and ``value`` ``(pair, step)``, the score; ``prev``, ``next``, ``kind`` on ``pair``; attrs
    ``rule`` (where the pairs came from) and ``skipped`` (each pair left out, with the reason).
    ``vo_per_head`` takes W_V -> W_O per attention head instead of whole.
    """
    views = _views(run)
    pairs, rule = pairs_for(run.config, views)
    if vo_per_head:
        pairs = per_head_vo(pairs)
        rule += "; V -> O per head"
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def load(which: str, key: str) -> np.ndarray:
        if key not in vectors:
            vectors[key] = run._store.read_vectors(key)
        return vectors[key][0 if which == "U" else 1]

    diags, kept, skipped = [], [], []
    for pair in pairs:
        try:
            prev, nxt = resolve(pair, views, load)
        except (KeyError, ValueError) as e:
            skipped.append(f"{pair.label}: {str(e).strip(chr(39) + chr(34))}")
            continue
        a = metrics.alignment(prev, nxt)  # [T, (H,) k2, k1]
        n = min(DIAG_TOP, a.shape[-1], a.shape[-2])
        diag = np.diagonal(a, axis1=-2, axis2=-1)[..., :n]
        diags.append(diag.mean(axis=1) if diag.ndim == 3 else diag)  # heads: mean, as plotted
        kept.append(pair)
    return _diagonals(
        run, "pair", [p.label for p in kept], diags,
        {"prev": [p.prev for p in kept], "next": [p.next for p in kept],
         "kind": [p.kind for p in kept]},
        {"rule": rule, "skipped": skipped},
    )  # fmt: skip


def sva(run: Run, *, against: Run | None = None, by: str = "step") -> xr.Dataset:
    """Singular vector agreement (Eqn 5) of every whole-matrix view.

    Without ``against``, each checkpoint is compared with the run's final one: the checkpoint
    with the largest step (checkpoints without a step are compared, never taken as final).
    With ``against``, each checkpoint is compared with the other run's checkpoint at the same
    step (``by="epoch"``: the same epoch); only shared steps are kept.

    ``diag`` ``(view, step, index)`` (S_ii, i < 100), ``value`` ``(view, step)``, the score;
    ``param`` on ``view``; attrs ``reference`` (in words) and ``dropped`` (what was left out).
    """
    if by not in ("step", "epoch"):
        raise ValueError(f"by must be 'step' or 'epoch', not {by!r}")
    if against is None and by != "step":
        raise ValueError("by='epoch' needs against=")
    entries = run._done[1]
    views = _sva_views(run)
    dropped: list[str] = []
    if against is None:
        ref, reference, note = _final(entries)
        dropped += [note] if note else []
        rows, ref_rows = list(range(len(entries))), [ref]
    else:
        rows, ref_rows, why = _matched(
            entries, against._done[1], by, run.store_path, against.store_path
        )
        dropped += why
        views, why = _shared_views(views, against, run.store_path)
        dropped += why
        reference = f"{against.label} at the same {by}"
    diags = []
    for key in views:
        u, v = run._store.read_vectors(key)
        other = run if against is None else against
        u_ref, v_ref = (x[ref_rows] for x in other._store.read_vectors(key))
        s = metrics.sva(u[rows], v[rows], u_ref, v_ref)
        diag = np.diagonal(s, axis1=-2, axis2=-1)[..., : min(DIAG_TOP, s.shape[-1])]
        diags.append(diag.mean(axis=1) if diag.ndim == 3 else diag)
    return _diagonals(
        run, "view", list(views), diags, {"param": [v.param for v in views.values()]},
        {"reference": reference, "dropped": dropped}, index=rows,
    )  # fmt: skip


def _views(run: Run) -> dict[str, StoredView]:
    """The store's views in model order (older stores list them in file order)."""
    return {key: run._view(key) for key in run.views}


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
    views: dict[str, StoredView], other: Run, here: Path
) -> tuple[dict[str, StoredView], list[str]]:
    """The views both runs have, with equal shapes; a shape that differs is an error."""
    theirs = _sva_views(other)
    for key in views.keys() & theirs.keys():
        a, b = views[key], theirs[key]
        if (a.shape, a.heads) != (b.shape, b.heads):
            raise StoreError(
                f"{other.store_path}: view {key!r} is {_shape(b)} there but {_shape(a)} in "
                f"{here}: these runs are not the same model"
            )
    keep = {k: v for k, v in views.items() if k in theirs}
    if not keep:
        raise StoreError(f"{here} and {other.store_path} share no view with singular vectors")
    dropped = []
    for where, only in (
        (here, views.keys() - theirs.keys()),
        (other.store_path, theirs.keys() - views.keys()),
    ):
        if only:
            dropped.append(f"views only in {where}: {', '.join(sorted(only))}")
    return keep, dropped


def _shape(view: StoredView) -> str:
    text = "x".join(str(d) for d in view.shape)
    return text + (f" x {view.heads} heads" if view.heads else "")


def _sva_views(run: Run) -> dict[str, StoredView]:
    """Whole-matrix views with stored vectors (per-head and split views would repeat the whole
    matrix's story); a store without vectors is an error, not an empty result."""
    run._need_vectors("sva")
    return {k: v for k, v in _views(run).items() if v.rule in WHOLE_RULES and v.k}


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


RANK = Analysis(
    name="rank",
    title="normalized effective rank",
    reads=("sigma", "tail"),
    compute=rank,
    summary="mean erank",
    bounds=(0.0, 1.0),
    figure="rank",
    version=3,
)
ALIGN = Analysis(
    name="align",
    title="alignment score",
    reads=("U", "V"),
    compute=align,
    item="pair",
    summary="mean alignment score",
    bounds=(0.0, 1.0),
    figure="align",
    version=3,
    params=("vo_per_head",),
)
SVA = Analysis(
    name="sva",
    title="SVA score",
    reads=("U", "V"),
    compute=sva,
    summary="mean SVA score",
    bounds=(0.0, 1.0),
    figure="sva",
    version=3,
    params=("against", "by"),
)
