"""Runs compared: matched by step (or epoch), results stacked on a ``run`` dimension.

Only the steps every run has are kept; `Comparison.dropped` says, per run, which were left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.analysis import span as _span
from specan.api import Run
from specan.errors import OptionError, RunsMismatchError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Comparison", "compare"]

MODEL_MEAN = "model_mean"  # the name of the model's mean among the views of a long table


class Comparison:
    """Several runs on shared steps; see :func:`compare`.

    Attributes
    ----------
    runs : list of Run
    names : list of str
        One label per run (the folder name; the path where two names clash).
    by : str
        ``"step"`` or ``"epoch"``: the dimension results share.
    shared : numpy.ndarray
        The steps (or epochs) every run has, in order.
    dropped : list of str
        What was left out, in words: each run's unmatched steps, views some runs lack.
    """

    def __init__(self, runs: Sequence[Run], *, by: str) -> None:
        import numpy as np

        self.runs, self.by = list(runs), by
        names = [r.name for r in self.runs]
        self.names = [
            str(r.path) if names.count(n) > 1 else n for r, n in zip(self.runs, names, strict=True)
        ]
        self.dropped: list[str] = []
        keys = [self._keys(r) for r in self.runs]
        shared = sorted(set.intersection(*(set(k) for k in keys)))
        if not shared:
            spans = "; ".join(f"{n}: {_span(k)}" for n, k in zip(self.names, keys, strict=True))
            hint = " (by='epoch' matches runs saved at different steps)" if by == "step" else ""
            raise RunsMismatchError(f"the runs share no {by}: {spans}{hint}")
        self.shared = np.array(shared)
        self._index = [[k[s] for s in shared] for k in keys]
        for name, run, k in zip(self.names, self.runs, keys, strict=True):
            alone = sorted(set(k) - set(shared))
            if alone:
                self.dropped.append(f"{name}: {by}s {_span(alone)} are not in every run")
            missing = len(run.steps) - len(k)
            if missing:
                self.dropped.append(f"{name}: {missing} checkpoint(s) without a {by} left out")

    def __repr__(self) -> str:
        return f"<specan.Comparison {', '.join(self.names)} on {len(self.shared)} {self.by}s>"

    def _keys(self, run: Run) -> dict[Any, int]:
        """Step (or epoch) -> the run's checkpoint index; the last checkpoint wins a tie."""
        import numpy as np

        values = run.steps if self.by == "step" else run.epochs
        ok = values >= 0 if self.by == "step" else np.isfinite(values)
        return {
            (int(v) if self.by == "step" else float(v)): i
            for i, (v, good) in enumerate(zip(values, ok, strict=True))
            if good
        }

    def _stack(self, per_run: list[xr.Dataset], item: str | None) -> xr.Dataset:
        """Each run's result on the shared steps, concatenated on ``run``; items (views, pairs)
        some runs lack are NaN there, and said in `dropped`."""
        import xarray as xr

        parts = []
        for ds, index in zip(per_run, self._index, strict=True):
            ds = ds.isel(step=index)
            if self.by == "epoch":
                ds = ds.swap_dims(step="epoch")
            parts.append(ds.assign_coords({self.by: self.shared}))
        if item is not None:
            every = set.intersection(*(set(p[item].values.tolist()) for p in parts))
            for name, p in zip(self.names, parts, strict=True):
                only = [x for x in p[item].values.tolist() if x not in every]
                if only:
                    self.dropped.append(f"{name}: {item}s not in every run: {', '.join(only)}")
        out = xr.concat(parts, dim="run", join="outer", coords="different", compat="equals")
        return out.assign_coords(run=self.names)

    def rank(self, *, cache: bool = True) -> xr.Dataset:
        """Normalized effective rank of every run on the shared steps.

        Returns
        -------
        xarray.Dataset
            ``erank`` ``(run, view, step)`` and ``model_mean`` ``(run, step)`` (the mean over
            each model's weight matrices, SPEC §3); ``step`` is ``epoch`` when matched by epoch.

        Examples
        --------
        >>> specan.compare(["runs/grok-wd0", "runs/grok-wd1"]).rank().model_mean  # doctest: +SKIP
        """
        return self._stack(
            [r.rank(cache=cache).reset_coords("model_mean") for r in self.runs], "view"
        )

    def align(self, *, cache: bool = True) -> xr.Dataset:
        """Alignment score (Eqn 4) ``score`` ``(run, pair, step)`` and diagonals ``diag``."""
        return self._stack([r.align(cache=cache) for r in self.runs], "pair")

    def sva(self, *, cache: bool = True) -> xr.Dataset:
        """SVA (Eqn 5) of each run against its own final checkpoint, ``score`` ``(run, view,
        step)``."""
        return self._stack([r.sva(cache=cache) for r in self.runs], "view")

    def metrics(self) -> xr.Dataset:
        """metrics.jsonl of every run at the shared checkpoints (NaN where not evaluated)."""
        import numpy as np

        per_run = []
        for r in self.runs:
            m = r.metrics.drop_vars("epoch", errors="ignore")
            m = m.reindex(step=r.steps, fill_value=np.nan).assign_coords(epoch=("step", r.epochs))
            per_run.append(m)
        return self._stack(per_run, None)

    def settings(self) -> dict[str, list[Any]]:
        """The trainer settings (run.json ``config``) whose values differ between the runs,
        name -> one value per run: what a comparison is usually about (weight decay...)."""
        configs = [r.config.get("config", {}) for r in self.runs]
        keys = sorted({k for c in configs for k in c} - {"out", "data", "device", "resume"})
        values = {k: [c.get(k) for c in configs] for k in keys}
        return {k: v for k, v in values.items() if any(x != v[0] for x in v)}

    def result(self, metric: str, *, cache: bool = True) -> xr.DataArray:
        """One quantity of every run on the shared steps, ``(run, [view or pair,] step)``.

        ``metric`` is a registered analysis (`specan.registry`: ``rank``, ``align``, ``sva``,
        ...; its ``value``, with the model mean first as the view
        ``model_mean`` where the analysis has one), or a name from metrics.jsonl.
        """
        import xarray as xr

        from specan import registry

        if metric in registry.ANALYSES:
            item = registry.get(metric).item
            ds = self._stack([r.analyse(metric, cache=cache) for r in self.runs], item)
            value = ds["value"].reset_coords(drop=True)
            if "model_mean" in ds:
                mean = ds["model_mean"].reset_coords(drop=True).expand_dims({item: [MODEL_MEAN]})
                value = xr.concat([mean, value], dim=item)
            return value.transpose("run", item, ...).rename(metric)
        m = self.metrics()
        if metric not in m:
            known = ", ".join([*registry.names(), *m.data_vars])
            raise ValueError(f"metric must be one of {known}; not {metric!r}")
        return m[metric]


def compare(runs: Sequence[Run | Path | str], *, by: str = "step") -> Comparison:
    """Open several runs and match their checkpoints by step (or epoch).

    Parameters
    ----------
    runs : sequence of Run or path
        Two or more runs (folders holding an ingested ``specan.zarr``).
    by : {"step", "epoch"}
        How checkpoints are matched; only values every run has are kept.

    Returns
    -------
    Comparison
        ``rank()``, ``align()``, ``sva()``, ``metrics()``: Datasets with a ``run`` dimension;
        ``dropped`` says what was left out; ``settings()`` what differs in run.json.

    Raises
    ------
    RunsMismatchError
        The runs share no step (or epoch).
    OptionError
        One store is given twice (a run folder and its ``specan.zarr``, say).

    Examples
    --------
    >>> c = specan.compare(["runs/grok-wd0", "runs/grok-wd1"])  # doctest: +SKIP
    >>> c.rank().model_mean.sel(step=c.shared[-1])  # doctest: +SKIP
    """
    if by not in ("step", "epoch"):
        raise ValueError(f"by must be 'step' or 'epoch', not {by!r}")
    opened = [r if isinstance(r, Run) else Run(r) for r in runs]
    if len(opened) < 2:
        raise ValueError(f"compare needs two or more runs, got {len(opened)}")
    seen: dict[Path, Run] = {}
    for r in opened:  # one store twice (a run and its specan.zarr) would be two equal labels
        first = seen.setdefault(r.store_path.resolve(), r)
        if first is not r:
            raise OptionError(
                f"runs: {first.label!r} and {r.label!r} are one store ({r.store_path}); "
                "give each run once"
            )
    return Comparison(opened, by=by)
