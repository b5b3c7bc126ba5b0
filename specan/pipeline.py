"""`ingest`: checkpoints -> matrix views -> batched SVD -> the store, as a Dask graph.

The graph has one task per (checkpoint, group of same-shaped views): each task reads its tensors
one by one from the memory-mapped checkpoint into one stack and calls the kernel, so reading one
group overlaps the SVDs of another and no task holds more than one batch. Each SVD task's results
are written by a write task that follows it and the previous write, so exactly one task writes the
store at a time, in order, while later groups are still being decomposed, and results are dropped
once written. A task starts only when the stacks of the tasks started and not yet written fit in
`IN_FLIGHT_BYTES`: peak memory is a constant plus a multiple of that budget (see `_chain`),
whatever the number of layers. A row is marked done only after all its arrays are written; an
interrupted ingest loses at most the rows in flight; the next redoes them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from specan import runs, store
from specan.errors import (
    BadCheckpointError,
    EmptyRunError,
    OptionError,
    SchedulerError,
    ShapeMismatchError,
    StoreError,
)

if TYPE_CHECKING:
    from distributed import Client

    from specan.runs import Checkpoint, Run, TensorInfo
    from specan.views import StoredView, ViewSpec

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 128
BATCH_BYTES = 256 * 2**20  # bound on one task's stacked float32 input
# Bound on the stacks of the tasks started and not yet written (at least one task per worker):
# with the threaded scheduler free to run every ready task, results waited for the write chain
# and peak memory grew with the number of layers.
IN_FLIGHT_BYTES = 2 * BATCH_BYTES
# A matrix this large, or with a side this long, is decomposed with every core, one at a time:
# with one thread per task a lone 50304 x 768 embedding left the other core idle, and two
# multi-threaded tasks at once ran 2-4x slower than one (oversubscription).
BIG_ELEMENTS = 2**24
BIG_SIDE = 2048
SIGMA_MODES = ("all", "top-k")


@dataclass(frozen=True)
class IngestOptions:
    """How to ingest. ``None`` means "as the existing store was made, else the default"."""

    top_k: int | None = None  # vectors kept per view; 0 = all
    vectors: bool | None = None
    sigma: str | None = None  # "all" singular values, or "top-k": only the top k where that is
    # cheaper (randomized), with effective rank then reported as a bound
    family: str | None = None
    layers: str | None = None
    heads: int | None = None
    rules: Mapping[str, str] | None = None  # param name -> view rule, overriding detection
    strict: bool = False  # fail on the first bad file instead of skipping it
    backend: str = "auto"
    vector_dtype: str | None = None
    overwrite: bool = False
    workers: int | None = None  # Dask threads; default: one per core
    window: int = 8  # checkpoints per Dask graph; an interrupt loses at most these
    store: Path | None = None  # where the store goes; default <run>/specan.zarr
    scheduler: str | None = None  # a dask.distributed address ("tcp://host:8786") or "local:N"


@dataclass
class IngestReport:
    """What an ingest did; the CLI prints it."""

    store: Path
    computed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    views: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (name, same content as)
    # (name, the checkpoints whose rows it shares files with, views copied from them)
    shared: list[tuple[str, list[str], int]] = field(default_factory=list)


class Progress(Protocol):
    """Where `ingest` reports progress; `specan.progress` draws it."""

    def start(self, checkpoints: int, views: int, nbytes: int) -> None: ...
    def advance(self, checkpoint: str, views: int, nbytes: int) -> None: ...
    def warn(self, message: str) -> None: ...
    def finish(self) -> None: ...


class _Silent:
    def start(self, checkpoints: int, views: int, nbytes: int) -> None: ...
    def advance(self, checkpoint: str, views: int, nbytes: int) -> None: ...
    def warn(self, message: str) -> None:
        log.warning(message)

    def finish(self) -> None: ...


# -- settings ---------------------------------------------------------------------------------
def _settings(opts: IngestOptions, attrs: Mapping[str, Any] | None, path: Path) -> dict[str, Any]:
    """Resolve options against an existing store: unset inherits, a different value is an error."""
    defaults = {
        "top_k": DEFAULT_TOP_K,
        "vectors": True,
        "sigma": "all",
        "vector_dtype": "float32",
        "family": "auto",
        "layers": None,
        "heads": None,
        "rules": None,
    }
    given = {
        "top_k": opts.top_k,
        "vectors": opts.vectors,
        "sigma": opts.sigma,
        "vector_dtype": opts.vector_dtype,
        "family": opts.family,
        "layers": opts.layers,
        "heads": opts.heads,
        "rules": dict(opts.rules) if opts.rules else None,
    }
    if attrs is None or opts.overwrite:
        return {k: defaults[k] if v is None else v for k, v in given.items()}
    stored = {**attrs.get("settings", {}), **_kernel_settings(attrs.get("kernel", {}))}
    out = {}
    for k, v in given.items():
        if v is not None and v != stored.get(k, defaults[k]):
            raise StoreError(
                f"{path}: made with {k}={stored.get(k, defaults[k])!r}, asked for {v!r};"
                " pass overwrite=True to recompute everything with the new setting"
            )
        out[k] = stored.get(k, defaults[k])
    return out


def _kernel_settings(kernel: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("top_k", "vectors", "vector_dtype", "sigma")
    return {k: kernel[k] for k in keys if k in kernel}


# -- planning ---------------------------------------------------------------------------------
_HEAD_KEYS = ("n_heads", "num_heads", "nhead", "num_attention_heads", "n_head")  # n_head: GPT-2
_KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")


def _heads_from_config(run: Run, keys: Sequence[str] = _HEAD_KEYS) -> int | None:
    cfg = run.config or {}
    for source in (cfg.get("model", {}), cfg, cfg.get("hf_config", {})):
        if isinstance(source, dict):
            for name in keys:
                if isinstance(source.get(name), int) and not isinstance(source[name], bool):
                    return source[name]
    return None


def _rules_from_config(run: Run) -> dict[str, str]:
    rules = (run.config or {}).get("view_rules", {})
    return dict(rules) if isinstance(rules, dict) else {}


def _plan(
    header: Mapping[str, TensorInfo], settings: Mapping[str, Any], run: Run
) -> list[ViewSpec]:
    from specan.views import plan_views

    rules = {**_rules_from_config(run), **(settings["rules"] or {})}
    given = settings["heads"]  # --heads: the K/V head count then follows from the shapes
    return plan_views(
        header,  # TensorInfo values: the planner also skips integer buffers by their dtype
        family=settings["family"],
        heads=given or _heads_from_config(run),
        kv_heads=None if given else _heads_from_config(run, _KV_HEAD_KEYS),
        layers=settings["layers"],
        rules=rules or None,
    )


def _check_against_plan(ckpt: Checkpoint, header: Mapping[str, TensorInfo], views: Mapping) -> None:
    """A checkpoint must hold every planned parameter with the planned shape."""
    shapes: dict[str, list[int]] = {}
    for v in views.values():
        shapes.setdefault(v.param, v.param_shape)
    for param, shape in shapes.items():
        if param not in header:
            raise ShapeMismatchError(
                ckpt.files[0], f"has no parameter {param!r}, unlike the others"
            )
        if shape is not None and list(header[param].shape) != list(shape):
            raise ShapeMismatchError(
                ckpt.files[0],
                f"{param} has shape {tuple(header[param].shape)}, the run's others {tuple(shape)}",
            )


def _groups(views: Mapping[str, StoredView]) -> list[list[str]]:
    """View keys grouped by matrix shape, each group small enough for one task."""
    by_shape: dict[tuple, list[str]] = {}
    for key, v in views.items():
        by_shape.setdefault((v.shape,), []).append(key)
    out = []
    for (shape,), keys in by_shape.items():
        per = 4 * shape[0] * shape[1] * max(1, max(views[k].heads or 1 for k in keys))
        cap = max(1, BATCH_BYTES // per)
        out.extend(keys[i : i + cap] for i in range(0, len(keys), cap))
    return out


# -- the task ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Failed:
    """A task's verdict that its checkpoint is unusable; the writer reports it and moves on."""

    error: BadCheckpointError


def _is_big(view: StoredView) -> bool:
    m, n = view.shape
    return m * n >= BIG_ELEMENTS or min(m, n) >= BIG_SIDE


def _svd_group(
    ckpt: Checkpoint,
    keys: Sequence[str],
    views: Mapping[str, StoredView],
    backend: str,
    threads: int,
    *_after: object,
) -> dict[str, store.ViewResult] | _Failed:
    """Read the views in ``keys`` from one checkpoint and decompose them as one batch with
    ``threads`` torch threads. ``_after`` only orders the task after others (Dask passes the
    results of the tasks it depends on)."""
    import torch

    from specan.views import extract
    from specan_kernels import svd

    # Tensor by tensor into one preallocated stack, each view converted straight from the
    # memory-mapped file into its place (stacking a list of float32 copies with torch.cat held
    # the batch twice; a float32 copy of each parameter first cost a pass and fresh pages).
    sizes = [views[key].heads or 1 for key in keys]
    batch = torch.empty((sum(sizes), *views[keys[0]].shape), dtype=torch.float32)
    try:
        with runs.CheckpointReader(ckpt) as reader:
            start = 0
            for key, n in zip(keys, sizes, strict=True):
                spec = views[key]
                with reader.mapped(spec.param) as raw:
                    m = extract(spec, raw, out=batch[start : start + n])
                if not bool(torch.isfinite(m.sum())):  # NaN and Inf survive a sum
                    raise BadCheckpointError(ckpt.files[0], f"{spec.param} has NaN or Inf values")
                start += n
    except BadCheckpointError as e:
        return _Failed(e)
    k = max(views[key].k for key in keys)
    top = max(views[key].sigma_top or 0 for key in keys)  # a group shares one shape
    try:
        res = svd(
            batch, k=(top or k) or None, vectors=k > 0, backend=backend,
            sigma="top-k" if top else "all", threads=threads,
        )  # fmt: skip
    except RuntimeError as e:  # LAPACK's "failed to converge": name the file, not a traceback
        params = ", ".join(views[key].param for key in keys)
        return _Failed(BadCheckpointError(ckpt.files[0], f"SVD failed on {params}: {e}"))
    # The kernel's tail is beyond its k; a view keeping fewer vectors (or no vectors, k = R)
    # adds the σ² between the two, which the kernel returned.
    sq = res.sigma.double().square()
    out: dict[str, store.ViewResult] = {}
    start = 0
    for key, n in zip(keys, sizes, strict=True):
        sl = slice(start, start + n)
        start += n
        v = views[key]
        kk = v.k
        top = v.sigma_top
        tail = (res.tail[sl] + sq[sl, (top or kk) : res.k].sum(dim=-1)).float().numpy()
        heads = v.heads
        one = (lambda a: a[0]) if not heads else (lambda a: a)
        out[key] = store.ViewResult(
            sigma=one(res.sigma[sl, : top or None].numpy()),
            U=one(res.U[sl, :, :kk].numpy()) if kk and res.U is not None else None,
            V=one(res.V[sl, :, :kk].numpy()) if kk and res.V is not None else None,
            tail=one(tail),
            route="+".join(dict.fromkeys(res.routes[sl])),
        )
    return out


# -- ingest -----------------------------------------------------------------------------------
def ingest(
    root: Path | str, options: IngestOptions | None = None, progress: Progress | None = None
) -> IngestReport:
    """Bring the run's store up to date with its checkpoints; return what was done.

    Unchanged checkpoints are skipped without importing torch or dask; new ones are appended,
    changed ones (size or mtime differ) recomputed with a warning, unfinished ones completed.
    Bad files are skipped and listed in the store (``strict`` raises on the first instead).
    """
    t0 = time.perf_counter()
    opts = options or IngestOptions()
    prog = progress or _Silent()
    root = Path(root)
    spath = store.store_path(root)
    if spath == root:  # given a store: ingest the run it was made from
        root = store.run_folder(root)
    if opts.store is not None:
        spath = Path(opts.store)
    attrs = None if opts.overwrite else store.read_attrs(spath)
    made_from = Path((attrs or {}).get("run") or root)
    if made_from.is_dir() and not made_from.samefile(root):
        raise StoreError(
            f"{spath}: holds the run {made_from}, not {root}; give another store=PATH, or "
            "overwrite=True to replace it"
        )
    settings = _settings(opts, attrs, spath)
    stored = {c["name"]: c for c in (attrs or {}).get("checkpoints", [])}
    known = {n: (c["size"], c["mtime_ns"], c["step"], c["epoch"]) for n, c in stored.items()}
    run = runs.discover(root, known=known)
    report = IngestReport(store=spath, views=len((attrs or {}).get("views", {})))
    report.bad = [(str(p), r) for p, r in run.bad]
    for note in run.notes:
        report.warnings.append(note)
        prog.warn(note)
    stepless = [c.name for c in run.checkpoints if c.step is None]
    if stepless:
        msg = (
            f"{len(stepless)} checkpoint(s) have no step (no 'step' metadata, no number in the "
            f"name): {', '.join(stepless[:5])}{', ...' if len(stepless) > 5 else ''}; they are "
            "listed after the others and never taken as the final checkpoint"
        )
        report.warnings.append(msg)
        prog.warn(msg)
    todo = _triage(run, stored, report, prog)
    if report.bad and opts.strict:
        raise BadCheckpointError(*report.bad[0])
    old_bad = [(b["path"], b["reason"]) for b in (attrs or {}).get("bad_files", [])]
    if todo or report.bad != old_bad:
        where = spath.parent  # the folder the store goes in, or the first of it that exists
        while not where.exists() and where != where.parent:
            where = where.parent
        if not os.access(where, os.W_OK):
            raise StoreError(
                f"{where}: read-only, no store can be written here; pass store=PATH to "
                "keep the store elsewhere (a Hugging Face cache is best left untouched)"
            )
        with store.lock(spath):
            _ingest_locked(run, todo, settings, opts, attrs is None, prog, report, spath)
    report.seconds = time.perf_counter() - t0
    return report


def _triage(
    run: Run, stored: Mapping[str, Mapping[str, Any]], report: IngestReport, prog: Progress
) -> list[Checkpoint]:
    """The checkpoints to compute: new, unfinished, or changed on disk since their ingest."""
    todo = []
    for ckpt in run.checkpoints:
        c = stored.get(ckpt.name)
        same = c is not None and (c["size"], c["mtime_ns"]) == (ckpt.size, ckpt.mtime_ns)
        if c is not None and c.get("bad") and same:
            report.bad.append((str(ckpt.files[0]), c["bad"]))  # known bad, file unchanged
        elif c is None or not c.get("done"):
            todo.append(ckpt)
        elif (c["size"], c["mtime_ns"]) != (ckpt.size, ckpt.mtime_ns):
            msg = f"{ckpt.files[0]}: changed since it was ingested (size or mtime); recomputing"
            report.warnings.append(msg)
            prog.warn(msg)
            report.changed.append(ckpt.name)
            todo.append(ckpt)
        else:
            report.unchanged += 1
    return todo


def _ingest_locked(
    run: Run,
    todo: list[Checkpoint],
    settings: Mapping[str, Any],
    opts: IngestOptions,
    new_store: bool,
    prog: Progress,
    report: IngestReport,
    spath: Path,
) -> None:
    from specan_kernels import resolve_backend

    try:
        backend = resolve_backend(opts.backend)
    except ValueError as e:
        raise OptionError(f"the backend argument: {e}") from None

    def reject(err: BadCheckpointError) -> None:
        if opts.strict:
            raise err
        report.bad.append((str(err.path), err.reason))
        prog.warn(f"skipped {err}")

    headers: dict[str, Mapping[str, TensorInfo]] = {}
    for ckpt in todo:
        try:
            headers[ckpt.name] = runs.read_header(ckpt)
        except BadCheckpointError as e:
            reject(e)
    good = [c for c in todo if c.name in headers]
    if new_store:
        if not good:
            path, reason = report.bad[0] if report.bad else ("", "")
            raise EmptyRunError(run.root, f"every checkpoint is unreadable, e.g. {path}: {reason}")
        st = _create_store(run, headers[good[0].name], settings, opts, backend, prog, report, spath)
    else:
        st = store.open_store(spath, mode="r+")
    views = st.views
    ready = []
    for ckpt in good:
        try:
            _check_against_plan(ckpt, headers[ckpt.name], views)
            ready.append(ckpt)
        except ShapeMismatchError as e:
            reject(e)
    report.views = len(views)
    with _scheduler(opts) if ready else nullcontext() as client:  # no cluster for nothing
        compute, ids, dups = (
            _deduplicate(st, run, ready, client, opts, reject) if ready else ([], {}, [])
        )
        st.set_bad_files([{"path": p, "reason": r} for p, r in report.bad])
        if compute:
            # on a cluster checkpoints finish in any order, so a copy could run before its
            # original is written: there every checkpoint is decomposed whole
            reused = _shared_files(run, st, compute, views) if client is None else {}
            for c in compute:
                if c.name in reused:
                    owners = sorted(set(reused[c.name].values()), key=runs.natural_key)
                    report.shared.append((c.name, owners, len(reused[c.name])))
            _compute(st, compute, views, opts, prog, report, reject, client, ids, reused)
        _point_duplicates(st, dups, ids, report, reject)


def _create_store(
    run: Run,
    header: Mapping[str, TensorInfo],
    settings: Mapping[str, Any],
    opts: IngestOptions,
    backend: str,
    prog: Progress,
    report: IngestReport,
    spath: Path,
) -> store.Store:
    """Plan the views from one checkpoint's header and create the store for them."""
    from specan.views import StoredView

    specs = _plan(header, settings, run)
    unknown = [s for s in specs if s.facts.heads_unknown]
    if unknown:
        interleaved = any(s.facts.layout == "interleaved" for s in unknown)
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        msg = (
            f"{unknown[0].param}{more}: number of attention heads unknown (no run.json or "
            "config.json); whole-matrix spectra only, per-head Q/K views"
            + (" and GPT-NeoX's W_V view" if interleaved else "")
            + " skipped: pass heads=N to get them"
        )
        report.warnings.append(msg)
        prog.warn(msg)
    views = [
        StoredView(
            s.key,
            s.param,
            s.rule,
            s.shape,
            s.heads,
            s.facts,
            sigma_top=_sigma_top(s, settings, backend),
            # the stored parameter's shape, to check later checkpoints against
            param_shape=tuple(header[s.param].shape),
        )  # fmt: skip
        for s in specs
    ]
    kernel = {
        "backend": backend,
        "top_k": settings["top_k"],
        "vectors": settings["vectors"],
        "vector_dtype": settings["vector_dtype"],
        "sigma": settings["sigma"],
    }
    return store.create(
        spath,
        views=views,
        kernel=kernel,
        settings={k: settings[k] for k in ("family", "layers", "heads", "rules")},
        overwrite=opts.overwrite,
        run=run.root,
    )


def _sigma_top(spec: ViewSpec, settings: Mapping[str, Any], backend: str) -> int | None:
    """How many σ a view keeps under ``sigma="top-k"``: k where the kernel would decompose it
    with the randomized top-k route (only the top k exist then), else None (all of them)."""
    from specan_kernels import choose_route
    from specan_kernels.registry import TOPK_ROUTES

    k = settings["top_k"]
    if settings["sigma"] != "top-k" or not k:
        return None
    m, n = spec.shape
    shape = (spec.heads or 1, m, n)
    route = choose_route(backend, shape, k=k, vectors=settings["vectors"], sigma="top-k")
    return min(k, m, n) if route in TOPK_ROUTES else None


def _compute(
    st: store.Store,
    ready: Sequence[Checkpoint],
    views: Mapping[str, StoredView],
    opts: IngestOptions,
    prog: Progress,
    report: IngestReport,
    reject: Callable[[BadCheckpointError], None],
    client: Client | None = None,
    ids: Mapping[str, Mapping[str, str]] | None = None,
    reused: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Run the Dask graph, a window of checkpoints at a time (on a cluster: `_distributed`).

    ``reused`` maps a checkpoint to the views (key -> checkpoint) it takes from another's row
    (see `_shared_files`): they are copied, not decomposed again.

    Per window, groups of small matrices run side by side, one thread each; then the large
    matrices (see `BIG_ELEMENTS`) one at a time with every core, so neither a lone large matrix
    leaves cores idle nor do two multi-threaded decompositions fight over them. Each SVD task's
    results are written by a task that depends on it and on the previous write, and a
    checkpoint's `finish` (done) follows its last write: the chain keeps one writer at a time, in
    order, while the next SVDs run beside it. `_chain` builds the graph and bounds what is in
    flight.
    """
    import dask
    import dask.threaded

    rows = st.reserve(
        [
            {"name": c.name, "size": c.size, "mtime_ns": c.mtime_ns, "step": c.step,
             "epoch": c.epoch, **(ids or {}).get(c.name, {})}
            for c in ready
        ]
    )  # fmt: skip
    groups = _groups(views)

    failed: set[str] = set()

    def write(ckpt: Checkpoint, res: dict[str, store.ViewResult] | _Failed, _prev: None) -> None:
        """Write one task's views into the checkpoint's row as soon as they are in, so that no
        more than the tasks' results in flight are held (a whole checkpoint's row of per-head
        vectors is 1.7 GB for pythia-1.4b)."""
        if ckpt.name in failed:
            return
        if isinstance(res, _Failed):
            # its row stays reserved and not done; marked bad, so later ingests skip it until
            # the file changes instead of reading it again every time
            failed.add(ckpt.name)
            reject(res.error)
            st.mark_bad(ckpt.name, res.error.reason)
            st.set_bad_files([{"path": p, "reason": r} for p, r in report.bad])
            prog.advance(ckpt.name, 0, ckpt.size)
            return
        st.write_row(rows[ckpt.name], res)

    reused = reused or {}

    def copy(ckpt: Checkpoint, _prev: None) -> None:
        """Copy the views this checkpoint shares with earlier ones from their rows (done before
        it in the chain), one view at a time."""
        keys = reused.get(ckpt.name)
        if not keys or ckpt.name in failed:
            return
        done = {e["name"]: e["row"] for e in st.checkpoints if e.get("done")}
        lost = sorted({o for o in keys.values() if o not in done})
        if lost:  # its original failed: left not done, so that the next ingest decomposes it
            failed.add(ckpt.name)
            msg = (f"{ckpt.name}: not ingested, it shares files with {', '.join(lost)}, which "
                   "failed; the next ingest decomposes it whole")  # fmt: skip
            report.warnings.append(msg)
            prog.warn(msg)
            prog.advance(ckpt.name, 0, ckpt.size)
            return
        for key, owner in keys.items():
            st.write_row(rows[ckpt.name], {key: st.read_view(key, done[owner])})

    def finish(ckpt: Checkpoint, _prev: None) -> None:
        """All of the checkpoint's views are written: only now is it done."""
        if ckpt.name in failed:
            return
        st.mark_done(ckpt.name)
        report.computed.append(ckpt.name)
        report.bytes_read += ckpt.size
        prog.advance(ckpt.name, len(views), ckpt.size)

    cores = os.cpu_count() or 1
    workers = opts.workers or cores
    small = [g for g in groups if not _is_big(views[g[0]])]
    big = [g for g in groups if _is_big(views[g[0]])]
    window = max(1, opts.window)
    prog.start(len(ready), len(views), sum(c.size for c in ready))

    def task(c: Checkpoint, g: Sequence[str], threads: int) -> Callable[..., Any]:
        # partial() keeps Dask from walking (and rebuilding) the dataclass arguments
        return dask.delayed(partial(_svd_group, c, g, views, opts.backend, threads))

    try:
        if client is not None:
            _distributed(client, ready, small, big, views, opts, write, finish)
            return
        for i in range(0, len(ready), window):
            batch = ready[i : i + window]
            # small matrices first, side by side; the large ones after them, one at a time
            plan = [(c, g) for groups in (small, big) for c in batch
                    for g in _without(groups, reused.get(c.name))]  # fmt: skip
            last = _chain(batch, plan, task, write, finish, views, cores, workers, copy, reused)
            # the function, not "threads": naming it made dask import distributed (0.2 s) to
            # look for a client
            dask.compute(last, scheduler=dask.threaded.get, num_workers=workers)
    finally:
        prog.finish()


def _without(groups: Sequence[Sequence[str]], keys: Mapping[str, Any] | None) -> list[list[str]]:
    """``groups`` less the view keys in ``keys``, dropping groups left empty."""
    out = [[k for k in g if k not in (keys or {})] for g in groups]
    return [g for g in out if g]


def _shared_files(
    run: Run,
    st: store.Store,
    compute: Sequence[Checkpoint],
    views: Mapping[str, StoredView],
) -> dict[str, dict[str, str]]:
    """The views each sharded checkpoint in ``compute`` can copy from another checkpoint's row.

    In the Hugging Face cache a file's blob name is its content hash: a shard two revisions have
    in common (pythia-12b's step50000 and step58000 serve the final first shard) holds the same
    tensors, so the views of its parameters are decomposed once, by the first checkpoint (done in
    the store, else earliest in ``compute``) that has it. Returns name -> {view key: checkpoint}.
    Files outside the cache are not compared (that would mean hashing every shard of every done
    checkpoint again); whole identical checkpoints are found by `_deduplicate` either way.
    """
    todo = {c.name for c in compute}
    entries = {e["name"]: e for e in st.checkpoints}
    owners: dict[str, str] = {}  # blob -> the checkpoint whose row holds its views
    for c in run.checkpoints:
        e = entries.get(c.name)
        if c.name not in todo and e and e.get("done") and not e.get("duplicate_of"):
            for b in runs.file_blobs(c):
                if b:
                    owners.setdefault(b, c.name)
    out: dict[str, dict[str, str]] = {}
    for c in compute:
        blobs = runs.file_blobs(c)
        shared = {f: owners[b] for f, b in zip(c.files, blobs, strict=True) if b in owners}
        if shared and len(c.files) > 1:  # one shared file alone: a duplicate, handled before
            with runs.CheckpointReader(c) as reader:
                where = reader.files()
            keys = {k: shared[where[v.param]] for k, v in views.items()
                    if where.get(v.param) in shared}  # fmt: skip
            if keys:
                out[c.name] = keys
        for b in blobs:
            if b:
                owners.setdefault(b, c.name)
    return out


def _batch_bytes(keys: Sequence[str], views: Mapping[str, StoredView]) -> int:
    """Bytes of the float32 stack one task decomposes."""
    m, n = views[keys[0]].shape
    return sum(4 * m * n * (views[k].heads or 1) for k in keys)


def _nothing(*_: object) -> None:
    """A marker that a task has run; it carries no result, so depending on it holds nothing."""


def _chain(
    ckpts: Sequence[Checkpoint],
    plan: Sequence[tuple[Checkpoint, Sequence[str]]],
    task: Callable[[Checkpoint, Sequence[str], int], Callable[..., Any]],
    write: Callable[..., None],
    finish: Callable[..., None],
    views: Mapping[str, StoredView],
    cores: int,
    workers: int,
    copy: Callable[..., None],
    copied: Collection[str],
) -> Any:
    """The Dask graph of ``plan`` ((checkpoint, group) tasks of ``ckpts``, in write order);
    returns its last task.

    The writes form one chain in plan order, and ``finish`` follows a checkpoint's last write.
    The checkpoints named in ``copied`` take views from other rows (``copy``): they are finished
    at the end of the chain, in order, each after its copy, so that every original decomposed
    beside them (whose large matrices may come late in the plan) is written by then.

    Task j may start only once the write of the last task that keeps it over `IN_FLIGHT_BYTES`
    is done, so the stacks of the tasks started and not yet written stay within that budget (or
    `workers` tasks, if more) however many layers and checkpoints the plan holds. A large matrix
    (`_is_big`) waits until every task before it has computed and the tasks after it wait for
    it, so it runs alone with every core, unless the plan has one for every worker and the
    budget holds one per worker: then large ones run like small ones. Tasks depend on markers
    (`_nothing`), never on other tasks' results, which would keep those results alive until the
    dependent ran.
    """
    import dask

    def then(fn: Callable[..., None], c: Checkpoint, *args: Any) -> Any:
        return dask.delayed(partial(fn, c))(*args)

    last_of = {c.name: j for j, (c, _) in enumerate(plan)}
    last = None
    for c in ckpts:  # nothing to decompose and nothing to copy: done at once
        if c.name not in last_of and c.name not in copied:
            last = then(finish, c, last)
    nbytes = [_batch_bytes(g, views) for _, g in plan]
    big = [_is_big(views[g[0]]) for _, g in plan]
    largest = max((b for b, is_big in zip(nbytes, big, strict=True) if is_big), default=0)
    if sum(big) >= workers and workers * largest <= IN_FLIGHT_BYTES:
        # enough large matrices to keep every worker busy, and room in the budget for one on
        # each: side by side, one thread each, like the small ones. Alone with every core, each
        # left cores idle in its one-threaded parts (reading, the eigensolver): 8 embeddings of
        # 50304 x 768 took 4.2 s that way, 3.5 s two at a time (Pythia-160m-shaped, 2 cores).
        # Pythia-1.4b's 50304 x 2048 embeddings (393 MiB each) still go one at a time.
        big = [False] * len(plan)
    computed: list[Any] = []
    writes: list[Any] = []
    first = 0  # the oldest task that may still be unwritten when task j starts
    flight = 0  # bytes of tasks first .. j-1
    for j, (c, g) in enumerate(plan):
        while first < j and flight + nbytes[j] > IN_FLIGHT_BYTES and j - first >= workers:
            flight -= nbytes[first]
            first += 1
        after = [writes[first - 1]] if first else []
        if big[j]:
            after += computed[first:j]
        else:
            after += [computed[i] for i in range(first, j) if big[i]]
        svd = task(c, g, cores if big[j] else max(1, cores // workers))(*after)
        computed.append(dask.delayed(_nothing)(svd))
        last = then(write, c, svd, last)
        writes.append(last)
        flight += nbytes[j]
        if last_of[c.name] == j and c.name not in copied:  # all its views written: done
            last = then(finish, c, last)
    for c in ckpts:
        if c.name in copied:
            last = then(finish, c, then(copy, c, last))
    return last


# -- a dask.distributed cluster ---------------------------------------------------------------
@contextmanager
def _scheduler(opts: IngestOptions) -> Iterator[Client | None]:
    """A client of the cluster named by ``opts.scheduler`` (None: the threaded scheduler).

    ``local:N`` starts a LocalCluster of N worker processes on this machine for the duration;
    an address (``tcp://host:8786``) connects to a running scheduler, whose workers must see
    the checkpoints at the same paths as this process.
    """
    if not opts.scheduler:
        yield None
        return
    from distributed import Client, LocalCluster

    spec = opts.scheduler
    if spec.startswith("local:"):
        n = spec.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise OptionError(
                f"the scheduler argument: local:N takes a number of worker processes, not {n!r}"
            )
        cores = os.cpu_count() or 1
        with (
            LocalCluster(
                n_workers=int(n), threads_per_worker=max(1, cores // int(n)), processes=True,
                dashboard_address=None, silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            yield client
        return
    try:
        client = Client(spec, timeout="20s")
    except (OSError, TimeoutError, ValueError) as e:
        raise OptionError(
            f"the scheduler argument: cannot reach a Dask scheduler at {spec} ({e})"
        ) from None
    with client:
        yield client


def _map(client: Client | None, fn: Callable[[Any], Any], items: Sequence[Any], workers: int):
    """``[fn(x) for x in items]`` on the cluster, or on the threaded scheduler."""
    if client is not None:
        return client.gather(client.map(fn, items, pure=False))
    import dask
    import dask.threaded

    tasks = [dask.delayed(partial(fn, x))() for x in items]
    return list(dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=workers))


def _distributed(
    client: Client,
    ready: Sequence[Checkpoint],
    small: Sequence[Sequence[str]],
    big: Sequence[Sequence[str]],
    views: Mapping[str, StoredView],
    opts: IngestOptions,
    write: Callable[[Checkpoint, Any, None], None],
    finish: Callable[[Checkpoint, None], None],
) -> None:
    """The same tasks on a cluster: workers compute and return results, this process writes.

    Results come back as tasks complete (``as_completed``) and are written at once; a checkpoint
    is done when all its groups are in. The client is the one writer and no worker touches the
    store. At most ``opts.window`` checkpoints are in flight. A worker lost
    mid-task costs only a recomputation (the scheduler reruns what it held); if the cluster
    gives up, the rows written so far stay done and the next ingest completes the rest.
    """
    from distributed import as_completed

    threads = max(client.nthreads().values() or [1])  # a big matrix: the worker's threads
    shared = client.scatter(dict(views), broadcast=True)  # sent once, not with every task
    queue = iter(ready)
    owner: dict[str, Checkpoint] = {}
    todo: dict[str, int] = {}  # tasks of each checkpoint not back yet
    done = as_completed()

    def submit(c: Checkpoint) -> None:
        tasks = [(g, 1) for g in small] + [(g, threads) for g in big]
        todo[c.name] = len(tasks)
        for g, t in tasks:
            fut = client.submit(_svd_group, c, g, shared, opts.backend, t, pure=False)
            owner[fut.key] = c
            done.add(fut)

    for _ in range(min(len(ready), max(1, opts.window))):
        submit(next(queue))
    for fut in done:
        c = owner.pop(fut.key)
        try:
            result = fut.result()
        except Exception as e:  # a worker error or the cluster giving up: one line, no traceback
            done.clear()
            raise SchedulerError(
                f"{opts.scheduler}: {type(e).__name__}: {e} (at {c.name}); the rows written so "
                "far are kept, run ingest again to complete the store"
            ) from e
        write(c, result, None)
        del fut, result  # the worker may drop it now
        todo[c.name] -= 1
        if not todo[c.name]:
            finish(c, None)
            nxt = next(queue, None)
            if nxt is not None:
                submit(nxt)


# -- duplicates -------------------------------------------------------------------------------
def _fingerprint_or_failed(ckpt: Checkpoint, full: bool) -> str | _Failed:
    try:
        return runs.content_id(ckpt) if full else runs.content_probe(ckpt)
    except BadCheckpointError as e:
        return _Failed(e)


def _deduplicate(
    st: store.Store,
    run: Run,
    ready: Sequence[Checkpoint],
    client: Client | None,
    opts: IngestOptions,
    reject: Callable[[BadCheckpointError], None],
) -> tuple[list[Checkpoint], dict[str, dict[str, str]], list[tuple[Checkpoint, str]]]:
    """Split the checkpoints to compute by content: (to decompose, their fingerprints for the
    store: name -> {"probe", and "content" where computed}, duplicates).

    A checkpoint whose content equals a done one's, or an earlier one's in ``ready``, is a
    duplicate of it (name, original) and is not decomposed. Every checkpoint gets a cheap
    `runs.content_probe`; only those whose probe equals another's get the full
    `runs.content_id` (all of them beside a store written before probes were kept), which
    decides. Both come from the store when its entry has the same file signature.
    """
    workers = opts.workers or os.cpu_count() or 1
    entries = {c["name"]: c for c in st.checkpoints}
    names = {c.name for c in ready}
    done = [e for e in entries.values()
            if e.get("done") and not e.get("duplicate_of") and e["name"] not in names]  # fmt: skip
    ids: dict[str, dict[str, str]] = {}

    def fill(todo: Sequence[Checkpoint], kind: str) -> None:
        """``ids[name][kind]`` for ``todo``, from the store where the file is unchanged."""
        need = []
        for c in todo:
            e = entries.get(c.name)
            if e and e.get(kind) and (e["size"], e["mtime_ns"]) == (c.size, c.mtime_ns):
                ids.setdefault(c.name, {})[kind] = e[kind]
            else:
                need.append(c)
        read = partial(_fingerprint_or_failed, full=kind == "content")
        for c, got in zip(need, _map(client, read, need, workers), strict=True):
            if isinstance(got, _Failed):
                reject(got.error)
                ids.pop(c.name, None)
            else:
                ids.setdefault(c.name, {})[kind] = got

    fill(ready, "probe")
    ready = [c for c in ready if c.name in ids]
    older = any(e.get("content") and not e.get("probe") for e in done)
    seen = Counter([ids[c.name]["probe"] for c in ready] + [e.get("probe") for e in done])
    fill([c for c in ready if older or seen[ids[c.name]["probe"]] > 1], "content")
    ready = [c for c in ready if c.name in ids]
    # a done checkpoint whose probe matches and whose full id was never needed: from its files,
    # if they are still the ones decomposed (else it cannot be confirmed, so it is no original)
    alike = {ids[c.name]["probe"] for c in ready if "content" in ids[c.name]}
    files = {c.name: c for c in run.checkpoints}
    for e in done:
        c = files.get(e["name"])
        if not e.get("content") and e.get("probe") in alike and c is not None:
            if (c.size, c.mtime_ns) == (e["size"], e["mtime_ns"]):
                got = _fingerprint_or_failed(c, full=True)
                if not isinstance(got, _Failed):
                    e["content"] = got
    owners = {e["content"]: e["name"] for e in done if e.get("content")}
    compute, dups = [], []
    for c in ready:
        content = ids[c.name].get("content")
        if content in owners:
            dups.append((c, owners[content]))
        else:
            if content:
                owners[content] = c.name
            compute.append(c)
    return compute, ids, dups


def _point_duplicates(
    st: store.Store,
    dups: Sequence[tuple[Checkpoint, str]],
    ids: Mapping[str, Mapping[str, str]],
    report: IngestReport,
    reject: Callable[[BadCheckpointError], None],
) -> None:
    """Record each duplicate as sharing its (now done) original's row; none is decomposed."""
    done = {c["name"] for c in st.checkpoints if c.get("done")}
    add = []
    for c, of in dups:
        if of not in done:  # the original could not be decomposed: neither can its copy
            reject(BadCheckpointError(c.files[0], f"same content as {of}, which failed"))
            continue
        add.append({"name": c.name, "size": c.size, "mtime_ns": c.mtime_ns, "step": c.step,
                    "epoch": c.epoch, **ids[c.name], "duplicate_of": of})  # fmt: skip
        report.duplicates.append((c.name, of))
    if add:
        st.add_duplicates(add)
