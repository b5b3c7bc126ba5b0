"""specan as a library: a run's store opened as one object, its results as xarray objects.

`open` reads only the store's ``zarr.json`` (no array data). `Run.sigma` is lazy (dask over the
Zarr chunks: selecting one step reads that step's chunk only); `Run.rank`, `Run.align` and
`Run.sva` compute eagerly (and cache in the store's ``derived/`` unless ``cache=False``) and
return small in-memory xarray objects. The CLI calls these same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan import runfile, store
from specan.errors import StoreError, ViewNotFoundError

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

    from specan.pipeline import IngestReport, Progress
    from specan.views import StoredView

__all__ = ["Run", "ingest", "open"]

log = logging.getLogger(__name__)


def _locate(path: Path | str) -> tuple[Path, Path]:
    """(run folder, store path) from a run folder or from the store itself, wherever it was
    written (``ingest --store``)."""
    where = store.store_path(path)
    return store.run_folder(where), where


class Run:
    """One run's store, opened; see :func:`open`.

    Attributes
    ----------
    path : Path
        The run folder (beside the store: run.json, metrics.jsonl).
    name : str
        The run folder's name, the label in comparisons.
    """

    def __init__(self, path: Path | str, *, dedupe: bool = False) -> None:
        self.path, self.store_path = _locate(path)
        self.label = str(path)  # the path as given: how messages name the run
        self.dedupe = dedupe
        self._store = store.open_store(self.store_path, dedupe=dedupe)
        self.name = self.path.resolve().name

    def __repr__(self) -> str:
        return f"<specan.Run {self.path}: {len(self.steps)} checkpoints, {len(self.views)} views>"

    # -- what is there (attributes only) --------------------------------------------------------
    @cached_property
    def _done(self) -> tuple[list[int], list[dict[str, Any]]]:
        return self._store.done_rows()

    @property
    def steps(self) -> np.ndarray:
        """int64 [T]: the steps of the done checkpoints, in step order (-1: no step known)."""
        import numpy as np

        entries = self._done[1]
        return np.array([-1 if e["step"] is None else e["step"] for e in entries], dtype=np.int64)

    @property
    def epochs(self) -> np.ndarray:
        """float64 [T]: each checkpoint's epoch, NaN where unknown."""
        import numpy as np

        entries = self._done[1]
        return np.array([np.nan if e.get("epoch") is None else e["epoch"] for e in entries], float)

    @property
    def views(self) -> list[str]:
        """The store's view keys, in model order (SPEC §3)."""
        from specan.order import views_in_model_order

        return list(views_in_model_order(self._store.views))

    @property
    def config(self) -> dict[str, Any]:
        """run.json (``{}`` when the run has none)."""
        return runfile.read_config(self.path)

    @property
    def metrics(self) -> xr.Dataset:
        """metrics.jsonl as a Dataset on ``step`` (every evaluation, not only checkpoints).

        A step logged twice (a resumed training) keeps its last record; ``epoch`` is a
        coordinate when the records carry it.
        """
        import numpy as np
        import xarray as xr

        by_step = {int(r["step"]): r for r in runfile.read_metrics(self.path) if "step" in r}
        steps = sorted(by_step)
        values = runfile.metrics_at(self.path, steps)
        coords: dict[str, Any] = {"step": np.array(steps, dtype=np.int64)}
        if any("epoch" in by_step[s] for s in steps):
            epochs = [by_step[s].get("epoch") for s in steps]
            coords["epoch"] = ("step", np.array([np.nan if e is None else e for e in epochs]))
        return xr.Dataset({n: ("step", np.array(v)) for n, v in values.items()}, coords=coords)

    def _coords(self, index: Sequence[int] | None = None) -> dict[str, Any]:
        steps, epochs = self.steps, self.epochs
        if index is not None:
            steps, epochs = steps[list(index)], epochs[list(index)]
        return {"step": steps, "epoch": ("step", epochs)}

    def _view(self, view: str) -> StoredView:
        views = self._store.views
        if view not in views:
            known = ", ".join(self.views[:8]) + (", ..." if len(views) > 8 else "")
            raise ViewNotFoundError(f"{self.store_path}: no view {view!r} (run.views: {known})")
        return views[view]

    # -- results --------------------------------------------------------------------------------
    def sigma(self, view: str) -> xr.DataArray:
        """All stored singular values of one view, lazily.

        Parameters
        ----------
        view : str
            A key of :attr:`views`.

        Returns
        -------
        xarray.DataArray
            ``(step, index)``, or ``(step, head, index)`` for per-head views; dask-backed: no
            data is read until ``.values`` or ``.compute()``, and then only the chunks selected.

        Examples
        --------
        >>> run = specan.open("runs/demo/grok-wd1")  # doctest: +SKIP
        >>> run.sigma("blocks.0.linear1.weight").isel(step=-1).values[:3]  # doctest: +SKIP
        """
        return self._lazy(view, "sigma", "index")

    def tail(self, view: str) -> xr.DataArray:
        """Σσ² beyond the stored top k of one view, lazily: ``(step,)`` or ``(step, head)``;
        0 where every σ is stored."""
        return self._lazy(view, "tail", None)

    def _lazy(self, view: str, array: str, last: str | None) -> xr.DataArray:
        """A per-view store array as a dask-backed DataArray on the done checkpoints."""
        import dask.array as da
        import numpy as np
        import xarray as xr

        info = self._view(view)
        arr = self._store._array(f"views/{view}/{array}")
        rows = self._done[0]
        data = da.from_array(arr, chunks=arr.chunks, inline_array=True, name=False)
        if not rows:
            data = data[:0]
        elif rows == list(range(rows[0], rows[0] + len(rows))):  # in step order already
            data = data[rows[0] : rows[0] + len(rows)]
        else:
            data = data[np.asarray(rows)]
        dims = ("step", *(["head"] if info.heads else []), *([last] if last else []))
        return xr.DataArray(
            data,
            dims=dims,
            coords=self._coords(),
            name=view,
            attrs={"param": info.param, "rule": info.rule, "shape": list(info.shape),
                   "top_k_only": bool(info.sigma_top)},
        )  # fmt: skip

    def analyse(
        self, name: str, *, cache: bool = True, compute: bool = True, **options: Any
    ) -> xr.Dataset | None:
        """Any registered analysis by name (`specan.registry`), as a Dataset whose ``value`` is
        ``(view or pair, step)``.

        Parameters
        ----------
        name : str
            ``rank``, ``align``, ``sva``, or another registered name.
        cache : bool
            Read and write the store's ``derived/`` (a read-only store is read, never written).
        compute : bool
            False: return the cached result, or None when there is none.
        **options
            Keywords for the analysis's compute: those it names in ``params`` (``align``:
            ``vo_per_head``; ``sva``: ``against``, ``by``) select a result, cached apart from
            the default one; others (``prune``: ``progress``, ``device``) leave it alone.

        Examples
        --------
        >>> specan.open("runs/demo/grok-wd1").analyse("rank").value  # doctest: +SKIP
        """
        import inspect

        from specan import registry

        a = registry.get(name)
        if {"U", "V"} & set(a.reads):
            self._need_vectors(name)
        defaults = {k: p.default for k, p in inspect.signature(a.compute).parameters.items()}
        # a parameter left at its default selects the default result, whichever way it is given
        params = {k: v for k, v in options.items() if k in a.params and v != defaults.get(k)}
        group = name + (f"-{store.fingerprint(_keyed(params))}" if params else "")
        outside = [a.depends(self)] if a.depends is not None else []
        key = store.fingerprint(name, a.version, *_inputs(self), _keyed(params), *outside)
        hit = store.read_derived(self.store_path, group, key) if cache or not compute else None
        if hit is not None:
            return _from_cache(*hit)
        if not compute:
            return None
        ds = a.compute(self, **options)
        if cache:
            arrays, info, dims = _to_cache(ds)
            store.write_derived(self.store_path, group, key, arrays, info, dims=dims)
        return ds

    def rank(self, *, cache: bool = True) -> xr.DataArray:
        """Normalized effective rank (Eqn 1-2) of every view at every checkpoint.

        Parameters
        ----------
        cache : bool
            Read and write the store's ``derived/rank`` (a read-only store is left alone).

        Returns
        -------
        xarray.DataArray
            ``erank`` on ``(view, step)`` in model order; per-head views averaged over heads.
            Coordinates: ``param``, ``rule``, ``in_mean`` (the view counts in the model mean:
            one per weight matrix, SPEC §3), ``bound`` (top-k σ only: an upper bound), ``epoch``
            and ``model_mean`` on ``step``.

        Examples
        --------
        >>> r = specan.open("runs/demo/grok-wd1").rank()  # doctest: +SKIP
        >>> r.model_mean.values  # doctest: +SKIP
        """
        ds = self._result("rank", cache=cache)
        e = ds.set_coords("model_mean")["value"].rename("erank")
        e.attrs = {"long_name": "normalized effective rank", **ds.attrs}
        return e

    def align(self, *, vo_per_head: bool = False, cache: bool = True) -> xr.Dataset:
        """Alignment of consecutive layers (Eqn 3) and its score (Eqn 4).

        Parameters
        ----------
        vo_per_head : bool
            Align W_V -> W_O per attention head instead of whole matrices.
        cache : bool
            Read and write the store's ``derived/``.

        Returns
        -------
        xarray.Dataset
            ``diag`` ``(pair, step, index)`` (A_ii for i < 100, NaN beyond a pair's size; per
            head pairs averaged over heads) and ``score`` ``(pair, step)``; coordinates ``prev``,
            ``next``, ``kind``, ``length`` (the real diagonal entries) on ``pair``; attrs
            ``rule`` (where the pairs came from) and ``skipped`` (each pair left out, with the
            reason).

        Examples
        --------
        >>> specan.open("runs/demo/grok-wd1").align().score.isel(step=-1)  # doctest: +SKIP
        """
        ds = self._result("align", cache=cache, vo_per_head=vo_per_head)
        return ds.rename(value="score")

    def sva(
        self, against: Run | Path | str | None = None, *, by: str = "step", cache: bool = True
    ) -> xr.Dataset:
        """Singular vector agreement (Eqn 5) of every whole-matrix view.

        Parameters
        ----------
        against : Run, path or None
            None: each checkpoint against this run's final one. A run: each checkpoint against
            that run's checkpoint at the same ``by``; only shared ones are kept.
        by : {"step", "epoch"}
            With ``against``: how checkpoints are matched.
        cache : bool
            Read and write the store's ``derived/``.

        Returns
        -------
        xarray.Dataset
            ``diag`` ``(view, step, index)`` (S_ii, i < 100) and ``score`` ``(view, step)``;
            attrs ``reference`` (in words) and ``dropped`` (what was left out, and why).

        Examples
        --------
        >>> a, b = specan.open("runs/a"), specan.open("runs/b")  # doctest: +SKIP
        >>> a.sva(against=b).score  # doctest: +SKIP
        """
        if by not in ("step", "epoch"):
            raise ValueError(f"by must be 'step' or 'epoch', not {by!r}")
        if against is None and by != "step":
            raise ValueError("by='epoch' needs against=")
        if against is not None and not isinstance(against, Run):
            against = Run(against, dedupe=self.dedupe)
        ds = self._result("sva", cache=cache, against=against, by=by)
        return ds.rename(value="score")

    def _need_vectors(self, what: str) -> None:
        if not self._store.attrs.get("kernel", {}).get("vectors", True):
            raise StoreError(
                f"{self.store_path}: holds singular values only (ingested without vectors); "
                f"{what} needs singular vectors: ingest it again with overwrite=True, keeping "
                "vectors"
            )

    def _result(self, name: str, *, cache: bool, **params: Any) -> xr.Dataset:
        ds = self.analyse(name, cache=cache, **params)
        assert ds is not None  # computed when missing
        return ds


def _keyed(params: Mapping[str, Any]) -> list[Any]:
    """An analysis's parameters as fingerprint parts: a run stands for its store's inputs (and
    the path it was given by, which its words quote)."""
    return [[k, [v.label, str(v.store_path), *_inputs(v)] if isinstance(v, Run) else v]
            for k, v in sorted(params.items())]  # fmt: skip


def _inputs(run: Run) -> list[Any]:
    """What every analysis of a run depends on: its done checkpoints, its views, run.json."""
    st = run._store
    done = [
        [c["name"], c["size"], c["mtime_ns"], c["row"]] for c in st.checkpoints if c.get("done")
    ]
    return [done, st.attrs.get("views"), run.config] + (["dedupe"] if st.dedupe else [])


def open(path: Path | str, *, dedupe: bool = False) -> Run:  # noqa: A001 - as zarr.open
    """Open the store of a run; reads no array data.

    Parameters
    ----------
    path : path
        The run folder (the one holding ``specan.zarr``), or the store itself (wherever
        ``ingest --store`` put it).
    dedupe : bool
        Show checkpoints of identical content once, at the largest step that holds them.

    Returns
    -------
    Run
        ``steps``, ``views``, ``metrics``, ``config``; ``sigma(view)`` (lazy), ``rank()``,
        ``align()``, ``sva()`` (xarray results).

    Raises
    ------
    RunNotFoundError
        ``path`` does not exist or is not a folder.
    StoreError
        There is no store (ingest the run first), or a newer specan wrote it.

    Examples
    --------
    >>> run = specan.open("runs/demo/grok-wd1")  # doctest: +SKIP
    >>> run.steps[:3], run.views[:2]  # doctest: +SKIP
    """
    return Run(path, dedupe=dedupe)


def ingest(
    path: Path | str,
    *,
    top_k: int | None = None,
    vectors: bool | None = None,
    sigma: str | None = None,
    family: str | None = None,
    layers: str | None = None,
    heads: int | None = None,
    rules: Mapping[str, str] | None = None,
    vector_dtype: str | None = None,
    backend: str = "auto",
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    store: Path | str | None = None,
    scheduler: str | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> IngestReport:
    """Decompose every weight matrix of every checkpoint of a run into ``<path>/specan.zarr``.

    Incremental, as ``specan ingest``: checkpoints already stored are skipped, new ones
    appended, changed ones recomputed. ``None`` means "as the existing store was made, else the
    default". An existing store is replaced only with ``overwrite=True``.

    Parameters
    ----------
    path : path
        The run folder (any layout ``specan ingest`` reads).
    top_k : int, optional
        Singular vectors kept per view (0: all; default 128).
    vectors : bool, optional
        False keeps singular values only.
    sigma : {"all", "top-k"}, optional
        ``"top-k"``: keep only the top-k σ where a randomized decomposition is cheaper.
    family, layers, heads, rules, vector_dtype, backend, workers, strict
        As the CLI options of the same names (``rules``: parameter name -> view rule).
    overwrite : bool
        Replace an existing store.
    store : path, optional
        Where the store goes (default ``<path>/specan.zarr``), e.g. away from a read-only
        checkpoint folder or the Hugging Face cache.
    scheduler : str, optional
        ``"tcp://host:8786"`` or ``"local:N"``: decompose on a Dask cluster (workers only
        compute; this process writes the store). Not with ``workers``.
    progress : Progress, optional
        Receives progress (see `specan.pipeline.Progress`); silent by default.
    **options
        Any further field of `specan.pipeline.IngestOptions`.

    Returns
    -------
    IngestReport
        What was computed, skipped, and how long it took.

    Examples
    --------
    >>> specan.ingest("runs/vgg", top_k=32)  # doctest: +SKIP
    """
    from specan.errors import OptionError
    from specan.pipeline import IngestOptions
    from specan.pipeline import ingest as run_ingest

    if vectors is False and top_k:
        raise OptionError("top_k cannot be used with vectors=False")
    if vectors is False and sigma == "top-k":
        raise OptionError("sigma='top-k' keeps the top-k vectors: not with vectors=False")
    if sigma not in (None, "all", "top-k"):
        raise OptionError(f"sigma must be 'all' or 'top-k', not {sigma!r}")
    if vector_dtype not in (None, "float32", "float16"):
        raise OptionError(f"vector_dtype must be 'float32' or 'float16', not {vector_dtype!r}")
    if workers and scheduler:
        raise OptionError("workers sets this process's threads: not with scheduler (size the "
                          "cluster where it runs)")  # fmt: skip
    opts = IngestOptions(
        top_k=0 if vectors is False else top_k, vectors=vectors, sigma=sigma, family=family,
        layers=layers, heads=heads, rules=dict(rules) if rules else None, strict=strict,
        backend=backend, vector_dtype=vector_dtype, overwrite=overwrite, workers=workers,
        store=Path(store) if store is not None else None, scheduler=scheduler, **options,
    )  # fmt: skip
    return run_ingest(path, opts, progress)


def _to_cache(ds: xr.Dataset) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[str]]]:
    """A result Dataset as ``derived/`` arrays (variables and numeric coordinates, with their
    dimension names) and attrs (text coordinates, which Zarr v3 has no stable type for)."""
    arrays, dims, labels = {}, {}, {}
    for name, var in ds.variables.items():
        if var.dtype.kind in "biuf":
            arrays[str(name)], dims[str(name)] = var.values, [str(d) for d in var.dims]
        else:
            labels[str(name)] = [[str(d) for d in var.dims], [str(x) for x in var.values]]
    coords = [str(c) for c in ds.coords if str(c) in arrays]
    info = {"dims": dims, "labels": labels, "coords": coords, "attrs": dict(ds.attrs)}
    return arrays, info, dims


def _from_cache(arrays: Mapping[str, Any], info: Mapping[str, Any]) -> xr.Dataset:
    """The Dataset `_to_cache` stored."""
    import xarray as xr

    dims, coords = info["dims"], set(info["coords"])
    variables = {n: (tuple(dims[n]), a) for n, a in arrays.items() if n not in coords}
    coordinates = {n: (tuple(dims[n]), a) for n, a in arrays.items() if n in coords}
    coordinates |= {n: (tuple(d), v) for n, (d, v) in info["labels"].items()}
    return xr.Dataset(variables, coords=coordinates, attrs=dict(info["attrs"]))
