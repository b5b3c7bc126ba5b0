"""The analyses of a run's store: rank, alignment and SVA over checkpoints, as plain arrays.

Each function opens the store, reads what it needs, and returns a small dataclass that
`specan.cli` prints and `specan.plots` draws. Steps are in step order (done checkpoints only).
Results are cached in the store's ``derived/`` under a fingerprint of their inputs (the done
checkpoints, the views, the pairs), so they are recomputed only after the store changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specan import metrics, store
from specan.errors import StoreError
from specan.pairs import Pair, pairs_for, per_head_vo, resolve

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
    reference: str  # what each checkpoint was compared with


def _open(run: Path | str) -> store.Store:
    return store.open_store(store.store_path(run))


def _steps(st: store.Store) -> np.ndarray:
    _, entries = st.done_rows()
    return np.array([-1 if e["step"] is None else e["step"] for e in entries], dtype=np.int64)


def run_metrics(run: Path | str, steps: np.ndarray) -> dict[str, np.ndarray]:
    """Numbers from metrics.jsonl aligned to ``steps`` (NaN where a step was not evaluated)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return {}
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping a line that is not JSON", path)
                continue
            by_step[int(rec.get("step", -1))] = rec
    names = sorted(
        {k for r in by_step.values() for k, v in r.items() if isinstance(v, int | float)}
        - {"step", "epoch"}
    )
    return {
        n: np.array([float(by_step.get(int(s), {}).get(n, np.nan)) for s in steps]) for n in names
    }


def _inputs(st: store.Store) -> list[Any]:
    """What every analysis of a store depends on: its done checkpoints and its views."""
    done = [
        [c["name"], c["size"], c["mtime_ns"], c["row"]] for c in st.checkpoints if c.get("done")
    ]
    return [done, st.views]


def _cached(st: store.Store, name: str, key: str, compute: Any) -> tuple[dict, dict]:
    """(arrays, info) from ``derived/<name>`` when ``key`` matches, else computed and cached."""
    hit = store.read_derived(st.path, name, key)
    if hit is not None:
        return hit
    arrays, info = compute()
    store.write_derived(st.path, name, key, arrays, info)
    return arrays, info


def rank(run: Path | str) -> RankResult:
    """Normalised effective rank (Eqn 1-2) of every view at every checkpoint (cached)."""
    st = _open(run)
    steps = _steps(st)
    views = st.views

    def compute() -> tuple[dict, dict]:
        rows = []
        for key in views:
            erank = metrics.normalized_effective_rank(st.read_sigma(key))
            rows.append(erank.mean(axis=1) if erank.ndim == 2 else erank)  # heads: mean
        return {"values": np.array(rows) if rows else np.zeros((0, len(steps)))}, {}

    arrays, _ = _cached(st, "rank", store.fingerprint("rank", *_inputs(st)), compute)
    keys = list(views)
    return RankResult(
        steps,
        keys,
        [views[k]["param"] for k in keys],
        [views[k]["rule"] for k in keys],
        arrays["values"],
        run_metrics(run, steps),
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


def align(run: Path | str, *, vo_per_head: bool = False) -> Alignment:
    """Alignment of consecutive layers (Eqn 3) and its score (Eqn 4) at every checkpoint
    (cached). ``vo_per_head`` takes W_V -> W_O per attention head instead of whole."""
    st = _open(run)
    views = st.views
    pairs, rule = pairs_for(_config(run), views)
    if vo_per_head:
        pairs = per_head_vo(pairs)
        rule += "; V -> O per head"

    def compute() -> tuple[dict, dict]:
        load = _loader(st)
        arrays, kept, skipped = {}, [], []
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
            arrays[f"diag_{len(kept)}"] = diag
            kept.append(asdict(pair))
        return arrays, {"pairs": kept, "skipped": skipped}

    key = store.fingerprint("align", *_inputs(st), [asdict(p) for p in pairs])
    arrays, info = _cached(st, "align", key, compute)
    results = []
    for i, p in enumerate(info["pairs"]):
        diag = arrays[f"diag_{i}"]
        results.append(AlignResult(Pair(**p), diag, diag[:, : metrics.SCORE_TOP].mean(axis=1)))
    skipped = [(Pair(**p), reason) for p, reason in info["skipped"]]
    return Alignment(_steps(st), results, skipped, rule)


def _config(run: Path | str) -> dict[str, Any]:
    path = Path(run) / "run.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e


def sva(run: Path | str, against: Path | str | None = None) -> Agreement:
    """Singular vector agreement (Eqn 5): each checkpoint against the run's final one, or with
    ``against``, against the other run's checkpoint at the same index (cached).
    """
    st = _open(run)
    steps = _steps(st)
    other = _open(against) if against is not None else None
    views = _sva_views(st.views)
    if other is not None:
        missing = [k for k in views if k not in other.views]
        if missing:
            raise StoreError(f"{other.path}: lacks views of {st.path}, e.g. {missing[0]!r}")
        other_steps = len(_steps(other))
        t = min(len(steps), other_steps)
        if t < max(len(steps), other_steps):
            log.warning("runs differ in length; comparing the first %d checkpoints", t)
        steps = steps[:t]

    def compute() -> tuple[dict, dict]:
        arrays = {}
        for i, key in enumerate(views):
            u, v = st.read_vectors(key)
            if other is None:
                u_ref, v_ref = u[-1:], v[-1:]
            else:
                u_ref, v_ref = other.read_vectors(key)
                t = len(steps)
                u, v, u_ref, v_ref = u[:t], v[:t], u_ref[:t], v_ref[:t]
            s = metrics.sva(u, v, u_ref, v_ref)
            diag = np.diagonal(s, axis1=-2, axis2=-1)[..., : min(DIAG_TOP, s.shape[-1])]
            arrays[f"diag_{i}"] = diag.mean(axis=1) if diag.ndim == 3 else diag
        return arrays, {}

    inputs = [*_inputs(st), _inputs(other) if other is not None else None]
    name = "sva" if other is None else f"sva_vs_{store.fingerprint(str(other.path))}"
    arrays, _ = _cached(st, name, store.fingerprint("sva", *inputs), compute)
    results = []
    for i, key in enumerate(views):
        diag = arrays[f"diag_{i}"]
        results.append(
            SVAResult(key, views[key]["param"], diag, diag[:, : metrics.SCORE_TOP].mean(axis=1))
        )
    reference = f"checkpoint-by-checkpoint against {against}" if against else "the final checkpoint"
    return Agreement(steps, results, reference)


def _sva_views(views: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    # whole matrices: the per-head and V splits would repeat the in_proj's story
    return {k: v for k, v in views.items() if v["rule"] in ("linear", "embedding", "conv",
            "conv_transpose", "lstm", "in_proj") and v.get("k")}  # fmt: skip


def select_steps(steps: np.ndarray, spec: str | None) -> np.ndarray:
    """Indices of ``steps`` kept by ``--steps``: ``A:B`` (inclusive range, either end open),
    a comma-separated list, or None/"all" for every step."""
    if spec is None or spec.strip().lower() == "all":
        return np.arange(len(steps))
    try:
        if ":" in spec:
            lo, hi = (s.strip() for s in spec.split(":", 1))
            keep = np.ones(len(steps), dtype=bool)
            if lo:
                keep &= steps >= int(lo)
            if hi:
                keep &= steps <= int(hi)
            return np.flatnonzero(keep)
        wanted = {int(s) for s in spec.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"--steps takes A:B or a comma-separated list, got {spec!r}") from None
    return np.flatnonzero(np.isin(steps, list(wanted)))
