"""Figures of an LMC result (`specan.lmc.barriers`), as the paper's §7 draws them: the barrier
and the endpoint SVA against the split point (or the perturbation size η), mean over branch pairs
with their spread, and the SVA score of every weight matrix against the split (a heatmap).
matplotlib is imported inside the functions, through `specan.plots`' figure factory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xarray as xr

    from specan.plots import Plot
    from specan.registry import Analysis
    from specan.report import Analyses

__all__ = ["figures", "registered_figures", "save_figures"]


def _axis(ds: xr.Dataset) -> tuple[str, Any, list[str], str]:
    """The group dimension, x positions, tick labels and axis label of an LMC result."""
    import numpy as np

    if "eta" in ds.dims:
        etas = ds["eta"].values
        # evenly spaced positions, labelled by η: the paper's sizes are far from even
        return "eta", np.arange(len(etas)), [f"{e:g}" for e in etas], "perturbation size η"
    epochs = np.asarray(ds["epoch"].values, dtype=float)
    return "split", epochs, [f"{e:g}" for e in epochs], "split epoch"


def _mean_band(ds: xr.Dataset, name: str, *, ylabel: str, title: str) -> Any:
    import numpy as np

    from specan.plots import _figure

    dim, x, labels, xlabel = _axis(ds)
    values = np.asarray(ds[name].transpose(dim, "pair").values, dtype=float)
    mean, std = values.mean(axis=1), values.std(axis=1)
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot()
    for j in range(values.shape[1]):
        ax.plot(x, values[:, j], ".", color="0.6", ms=4)
    ax.plot(x, mean, marker="o", color="C0", label=f"mean of {values.shape[1]} pairs")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2, label="± std")
    if dim == "eta":
        ax.set_xticks(x, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return fig


def _layer_heatmap(ds: xr.Dataset, *, title: str) -> Any:
    import numpy as np

    from specan.plots import _cmap, _figure

    dim, _, labels, xlabel = _axis(ds)
    scores = np.asarray(ds["sva_view"].mean("pair").transpose("view", dim).values, dtype=float)
    views = [str(v) for v in ds["view"].values]
    fig = _figure(max(5.0, 0.5 * len(labels) + 3.0), max(3.5, 0.28 * len(views) + 1.5))
    ax = fig.add_subplot()
    img = ax.imshow(scores, aspect="auto", cmap=_cmap("magma"), vmin=0.0, vmax=1.0,
                    interpolation="nearest")  # fmt: skip
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_yticks(np.arange(len(views)), views)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weight matrix (model order)")
    ax.set_title(title)
    fig.colorbar(img, ax=ax, label="endpoint SVA score (top 10)")
    return fig


def figures(ds: xr.Dataset, *, name: str = "lmc") -> list[Plot]:
    """The three figures of an LMC result: barrier, mean endpoint SVA, and the SVA score per
    weight matrix, each against the split (or η); `name` prefixes the file stems."""
    from specan.plots import Plot

    dim = _axis(ds)[0]
    against = "perturbation size" if dim == "eta" else "split epoch"
    kind = "different trunks" if ds.attrs.get("cross_trunk") else "branch pairs"
    return [
        Plot(
            f"{name}-barrier",
            f"LMC barrier of the training loss (Eqn 6) against the {against}, {kind}",
            _mean_band(
                ds, "barrier", ylabel="barrier (train loss)", title=f"LMC barrier vs {against}"
            ),
        ),  # fmt: skip
        Plot(
            f"{name}-sva",
            f"Endpoint SVA (Eqn 5, mean over weight matrices) against the {against}, {kind}",
            _mean_band(ds, "sva", ylabel="endpoint SVA score", title=f"endpoint SVA vs {against}"),
        ),
        Plot(
            f"{name}-sva-layers",
            f"Endpoint SVA score of every weight matrix against the {against} (mean of pairs)",
            _layer_heatmap(ds, title=f"endpoint SVA per layer vs {against}"),
        ),
    ]


def save_figures(
    ds: xr.Dataset, out_dir: Path | str, *, svg: bool = False, name: str = "lmc"
) -> list[Path]:
    """Write `figures` as ``<out_dir>/<stem>.png`` (and ``.svg``); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot in figures(ds, name=name):
        for ext in ("png", "svg") if svg else ("png",):
            path = out / f"{plot.name}.{ext}"
            plot.figure.savefig(path, format=ext)
            paths.append(path)
    return paths


def _grouped(ds: xr.Dataset) -> xr.Dataset:
    """A trunk's registered result (`specan.lmc.trunk_result`) back in `barriers`' layout: on
    ``split``, or for a perturbation folder on ``eta`` with its one split as coordinates."""
    import numpy as np
    import xarray as xr

    if "eta" not in ds.coords:
        return ds.rename(step="split")
    etas = list(dict.fromkeys(float(e) for e in ds["eta"].values))
    pairs = list(dict.fromkeys(str(p) for p in ds["branches"].values))
    data = {}
    for name, var in ds.data_vars.items():
        rest = [d for d in var.dims if d not in ("pair", "step")]
        values = var.isel(step=0).transpose("pair", *rest).values
        data[name] = (
            ("eta", "pair", *rest),
            values.reshape(len(etas), len(pairs), *values.shape[1:]),
        )
    coords = {"eta": np.array(etas), "pair": pairs, "split": int(ds["step"].values[0]),
              "epoch": float(ds["epoch"].values[0])}  # fmt: skip
    coords |= {d: ds[d].values for d in ("alpha", "view") if d in ds.coords}
    return xr.Dataset(data, coords=coords, attrs=dict(ds.attrs))


def registered_figures(
    an: Analyses, a: Analysis, ds: xr.Dataset, limit: int | None
) -> Iterator[Plot]:
    """How `specan plot` and the report draw the registered ``lmc`` result of a trunk
    (`specan.plots.FIGURES`): the three `figures`, named after the analysis."""
    del an, limit  # three figures whatever the run: nothing to cap
    yield from figures(_grouped(ds), name=a.name)
