"""The paper's figures, drawn from the Datasets analyses return; the only module that uses
matplotlib.

matplotlib is imported inside the functions, and figures are built as `matplotlib.figure.Figure`
objects rendered by Agg, without pyplot: drawing here never changes the caller's backend or
pyplot's list of open figures. Each drawing function draws only what it is given (results
`specan.report.analyse` got through `Run.analyse`) and writes nothing.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from specan.registry import Analysis
    from specan.report import Analyses
    from specan.views import StoredView

log = logging.getLogger(__name__)

MAX_LINES = 100  # singular values drawn per view (the paper's top 100)
MAX_FIGURES = 6  # per-pair and per-view figures drawn by `figures`, each kind
MAX_TICKS = 10
DPI = 110


def as_label(name: str, width: int = 60) -> str:
    """A name as a figure shows it: control characters escaped (fonts have no glyph for a NUL)
    and, past ``width`` characters, cut in the middle, where names of one model differ least
    (a 10,000-character parameter name collapsed the axes it labelled)."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="0.85")


def _step_axis(ax: Axes, steps: np.ndarray) -> np.ndarray:
    """x values for ``steps`` on a line plot, with a log (or symlog, when step 0 is there) scale
    when they span more than two decades. Unknown steps (-1) fall back to checkpoint indices."""
    steps = np.asarray(steps)
    if steps.size == 0 or (steps < 0).any():
        ax.set_xlabel("checkpoint")
        return np.arange(steps.size, dtype=float)
    ax.set_xlabel("step")
    pos = steps[steps > 0]
    if pos.size > 1 and pos.max() / pos.min() > 100:
        if steps[0] > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=float(pos.min()), linscale=0.5)
    return steps.astype(float)


def _step_ticks(ax: Axes, steps: np.ndarray) -> None:
    """Label a heatmap's checkpoint columns with their steps, at most MAX_TICKS of them."""
    steps = np.asarray(steps)
    if steps.size == 0:
        return
    cols = np.arange(0, steps.size, -(-steps.size // MAX_TICKS))  # an even stride
    labels = [str(int(steps[c])) if steps[c] >= 0 else f"#{c}" for c in cols]
    rotate = max(len(s) for s in labels) > 5
    ax.set_xticks(cols, labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlabel("step (one column per checkpoint)")


def _heatmap(
    values: np.ndarray,
    steps: np.ndarray,
    labels: Sequence[str] | None,
    *,
    title: str,
    ylabel: str,
    cbar: str,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Figure:
    """Rows x checkpoints on a fixed colour scale (``bounds``, 0-1 unless given; None: the
    data's range); ``labels`` name the rows (else indices)."""
    values = np.asarray(values, dtype=float)
    labels = None if labels is None else [as_label(s) for s in labels]
    title = as_label(title, 120)
    rows = values.shape[0] if values.ndim == 2 else 0
    size = 9 if rows <= 30 else 7 if rows <= 60 else 5
    height = min(2.2 + 0.24 * rows, 30.0) if labels is not None else 4.5
    # widen by the row labels' length so the heatmap itself keeps about 5.5 inches
    label_in = 0.075 * size / 9 * max((len(s) for s in labels or ()), default=0)
    fig = _figure(min(7.0 + label_in, 18.0), max(height, 3.0))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=12 if len(title) < 60 else 9)
    ax.set_ylabel(ylabel)
    if values.ndim != 2 or values.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return fig
    vmin, vmax = bounds if bounds is not None else (None, None)
    im = ax.imshow(
        values, aspect="auto", vmin=vmin, vmax=vmax, cmap=_cmap("viridis"), interpolation="nearest"
    )
    _step_ticks(ax, steps)
    if labels is not None:
        ax.set_yticks(range(rows), list(labels), fontsize=size)
    fig.colorbar(im, ax=ax, label=cbar)
    return fig


def singular_values(steps: np.ndarray, sigma: np.ndarray, *, title: str) -> Figure:
    """σ_i of one view over training, one line per rank index i < 100, coloured by i.

    ``sigma`` is ``[T, R]``, or ``[T, H, R]`` for per-head views (averaged over heads).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    s = np.asarray(sigma, dtype=float)
    heads = s.shape[1] if s.ndim == 3 else 0
    if heads:
        s = s.mean(axis=1)
    n = min(MAX_LINES, s.shape[-1]) if s.ndim == 2 else 0
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.set_title(as_label(title, 120))
    ax.set_ylabel(r"singular value $\sigma_i$" + (f" (mean over {heads} heads)" if heads else ""))
    x = _step_axis(ax, steps)
    if n == 0 or s.shape[0] == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return fig
    cmap, norm = _cmap("viridis"), Normalize(0, max(n - 1, 1))
    marker = "o" if x.size < 3 else None
    for i in reversed(range(n)):  # index 0 (the largest) drawn last, on top
        ax.plot(x, s[:, i], color=cmap(norm(i)), lw=1.0, marker=marker, ms=3)
    top = s[:, :n]
    pos = top[np.isfinite(top) & (top > 0)]
    if pos.size and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="rank index i")
    return fig


def _view_labels(rank: Any) -> list[str]:
    # a whole-matrix view is named by its parameter; extra views (per head, W_V) add their rule;
    # a value from top-k σ only is an upper bound, marked "≤"
    return [
        ("≤ " if b else "") + (p if k == p else f"{p} [{r}]")
        for k, p, r, b in zip(
            *(rank[c].values.tolist() for c in ("view", "param", "rule", "bound")), strict=True
        )
    ]


def rank_heatmap(rank: Any, *, title: str) -> Figure:
    """Normalised effective rank (Eqn 1-2): views (rows) x checkpoints, on a fixed 0-1 scale.

    ``rank`` is the ``rank`` analysis's Dataset (`specan.analysis.rank`)."""
    return _heatmap(
        rank["value"].values,
        rank["step"].values,
        _view_labels(rank),
        title=title,
        ylabel="view",
        cbar="normalised effective rank",
    )


def alignment_diagonal(steps: np.ndarray, diag: np.ndarray, *, title: str) -> Figure:
    """A_ii (Eqn 3) over training: index i (rows) x checkpoints, 0-1."""
    d = np.asarray(diag)
    return _heatmap(d.T, steps, None, title=title, ylabel="index i", cbar=r"alignment $A_{ii}$")


def alignment_scores(alignment: Any, *, title: str) -> Figure:
    """Alignment score a(t) (Eqn 4): pairs (rows) x checkpoints, 0-1.

    ``alignment`` is the ``align`` analysis's Dataset (`specan.analysis.align`)."""
    return _heatmap(
        _stack(alignment),
        alignment["step"].values,
        [str(x) for x in alignment["pair"].values],
        title=title,
        ylabel="pair (layer l -> l+1)",
        cbar=r"alignment score (mean $A_{ii}$, $i < 10$)",
    )


def sva_diagonal(steps: np.ndarray, diag: np.ndarray, *, title: str) -> Figure:
    """S_ii (Eqn 5) over training: index i (rows) x checkpoints, 0-1."""
    d = np.asarray(diag)
    return _heatmap(d.T, steps, None, title=title, ylabel="index i", cbar=r"agreement $S_{ii}$")


def sva_scores(agreement: Any, *, title: str) -> Figure:
    """SVA score s(t): views (rows) x checkpoints, 0-1.

    ``agreement`` is the ``sva`` analysis's Dataset (`specan.analysis.sva`)."""
    return _heatmap(
        _stack(agreement),
        agreement["step"].values,
        [str(x) for x in agreement["view"].values],
        title=title,
        ylabel="view",
        cbar=r"SVA score (mean $S_{ii}$, $i < 10$)",
    )


def _stack(ds: Any) -> np.ndarray:
    """A Dataset's ``value`` ``(item, step)`` as floats (``[0, T]`` without items)."""
    return np.asarray(ds["value"].values, dtype=float).reshape(-1, ds.sizes["step"])


def loss_under_rank(rank: Any, metrics: Mapping[str, np.ndarray], *, title: str) -> Figure:
    """Losses (and accuracies, on a twin axis) above the mean normalised effective rank.

    The grokking figure: the validation-loss drop coincides with the fall in effective rank.
    ``rank`` is the ``rank`` analysis's Dataset, ``metrics`` name -> ``[T]`` at its steps (NaN
    where not evaluated).
    """
    fig = _figure(8.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set_title(title)
    x = _step_axis(bottom, rank["step"].values)
    names = sorted(metrics)
    accs = [n for n in names if "acc" in n.lower()]
    others = [n for n in names if n not in accs]
    prefixes = list(dict.fromkeys(n.split("_")[0] for n in names))
    colour = {p: f"C{i % 10}" for i, p in enumerate(prefixes)}
    marker = "o" if x.size < 30 else None
    handles = []
    for ax, group, style in ((top, others, "-"), (None, accs, "--")):
        if not group:
            continue
        if ax is None:
            ax = top.twinx()
            ax.set_ylabel("accuracy")
        else:
            ax.set_ylabel("loss" if any("loss" in n for n in group) else "metric")
        vals = []
        for n in group:
            v = np.asarray(metrics[n], dtype=float)
            ok = np.isfinite(v)
            vals.append(v[ok])
            (h,) = ax.plot(
                x[ok],
                v[ok],
                style,
                color=colour[n.split("_")[0]],
                label=n,
                marker=marker,
                ms=3,
                lw=1.4,
            )
            handles.append(h)
        allv = np.concatenate(vals) if vals else np.zeros(0)
        if style == "-" and allv.size and allv.min() > 0 and allv.max() / allv.min() > 100:
            ax.set_yscale("log")
        if style == "--" and allv.size and allv.min() >= 0 and allv.max() <= 1:
            ax.set_ylim(-0.02, 1.02)
    if handles:
        top.legend(handles=handles, fontsize=8, loc="best")
    else:
        top.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=top.transAxes)
    values = np.asarray(rank["value"].values, dtype=float)[rank["in_mean"].values]
    for row in values:
        bottom.plot(x, row, color="0.6", lw=0.6, alpha=0.6)
    if values.size:
        bottom.plot(
            x,
            rank["model_mean"].values,
            color="C3",
            lw=2.2,
            marker=marker,
            ms=3,
            label=f"mean over {len(values)} weight matrices (grey: each matrix)",
        )
        bottom.legend(fontsize=8, loc="best")
    bottom.set_ylabel("normalised effective rank")
    bottom.set_ylim(0.0, 1.02)
    return fig


def registered_lines(ds: Any, *, title: str, item: str, label: str) -> Figure:
    """A registered analysis's ``value`` ``(item, step)``: one line per item over checkpoints."""
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    steps = np.asarray(ds["step"].values)
    for name, row in zip(ds[item].values, np.asarray(ds["value"].values, dtype=float), strict=True):
        ax.plot(steps, row, marker="o", ms=3, label=as_label(str(name)))
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(as_label(title, 120))
    ax.legend(title=item)
    return fig


def registered_heatmap(ds: Any, *, title: str, item: str, label: str, bounds: Any) -> Figure:
    """A registered analysis's ``value`` ``(item, step)``: items (rows) x checkpoints."""
    return _heatmap(
        np.asarray(ds["value"].values, dtype=float),
        np.asarray(ds["step"].values),
        [str(x) for x in ds[item].values],
        title=title,
        ylabel=item,
        cbar=label,
        bounds=bounds,
    )


@dataclass
class Plot:
    """One figure of a run: its file stem, a caption, and the figure."""

    name: str
    caption: str
    figure: Figure


def safe_name(key: str) -> str:
    """A view key as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def _largest(keys: Sequence[str], views: Mapping[str, StoredView], limit: int | None) -> list[str]:
    """The ``limit`` largest views (all for None), listed in the order given."""
    chosen = set(sorted(keys, key=lambda k: (-views[k].size, k))[:limit])
    return [k for k in keys if k in chosen]


def _note_cut(an: Analyses, total: int, limit: int | None, what: str) -> None:
    if limit is not None and total > limit:
        an.notes.append(f"drew {limit} of {total} {what} (limit=0 draws all)")


def _rank_figures(an: Analyses, a: Analysis, ds: Any, limit: int | None) -> Iterator[Plot]:
    yield Plot(
        "rank",
        "Normalised effective rank (Eqn 1-2) of every view over training, "
        "on a fixed 0-1 colour scale.",
        rank_heatmap(ds, title=f"{an.name}: effective rank"),
    )
    if any(np.isfinite(v).any() for v in an.metrics.values()):
        yield Plot(
            "loss_rank",
            "Losses and accuracies (top) above the normalised effective rank "
            "(bottom; red: the mean over the model's weight matrices, one per parameter).",
            loss_under_rank(ds, an.metrics, title=f"{an.name}: loss and effective rank"),
        )


def _align_figures(an: Analyses, a: Analysis, ds: Any, limit: int | None) -> Iterator[Plot]:
    rule, steps = ds.attrs["rule"], ds["step"].values
    yield Plot(
        "align_scores",
        f"Alignment score (Eqn 4) of consecutive layers; {rule}.",
        alignment_scores(ds, title=f"{an.name}: alignment scores"),
    )
    labels = [str(x) for x in ds["pair"].values]
    _note_cut(an, len(labels), limit, "alignment diagonals (the first pairs)")
    for i, label in enumerate(labels[:limit]):
        diag = ds["diag"].values[i, :, : int(ds["length"].values[i])]
        yield Plot(
            f"align_{i}",
            f"Alignment diagonal A_ii (Eqn 3), {label}.",
            alignment_diagonal(steps, diag, title=f"{an.name}: A_ii, {label}"),
        )


def _sva_figures(an: Analyses, a: Analysis, ds: Any, limit: int | None) -> Iterator[Plot]:
    reference, steps = ds.attrs["reference"], ds["step"].values
    yield Plot(
        "sva_scores",
        f"Singular vector agreement score (Eqn 5) with {reference}.",
        sva_scores(ds, title=f"{an.name}: SVA scores"),
    )
    index = {str(k): i for i, k in enumerate(ds["view"].values)}
    _note_cut(an, len(index), limit, "SVA diagonals (the largest views)")
    for key in _largest(list(index), an.views, limit):
        i = index[key]
        diag = ds["diag"].values[i, :, : int(ds["length"].values[i])]
        yield Plot(
            f"sva_{safe_name(key)}",
            f"SVA diagonal S_ii of {key} with {reference}.",
            sva_diagonal(steps, diag, title=f"{an.name}: S_ii, {key}"),
        )


def _registered_figure(an: Analyses, a: Analysis, ds: Any, limit: int | None) -> Iterator[Plot]:
    title = f"{an.name}: {a.title}"
    if a.figure == "lines":
        fig = registered_lines(ds, title=title, item=a.item, label=a.title)
    else:
        fig = registered_heatmap(ds, title=title, item=a.item, label=a.title, bounds=a.bounds)
    yield Plot(a.name, f"{a.title[:1].upper()}{a.title[1:]} of every {a.item} over training.", fig)


def _lmc_figures(an: Analyses, a: Analysis, ds: Any, limit: int | None) -> Iterator[Plot]:
    from specan.lmc_plots import registered_figures

    return registered_figures(an, a, ds, limit)


# How each analysis is drawn (`Analysis.figure`): from its Dataset alone, never computing.
FIGURES: dict[str, Callable[[Analyses, Analysis, Any, int | None], Iterator[Plot]]] = {
    "heatmap": _registered_figure,
    "lines": _registered_figure,
    "rank": _rank_figures,
    "align": _align_figures,
    "sva": _sva_figures,
    "lmc": _lmc_figures,
}


def figures(
    an: Analyses, *, views: Sequence[str] | None = None, limit: int | None = None
) -> Iterator[Plot]:
    """The run's figures, one at a time; figures without data are left out (see ``an.notes``).

    Each analysis in ``an.results`` is drawn as its ``figure`` says (`FIGURES`). ``views``
    picks the σ figures; otherwise, and for the per-pair and per-view diagonals, ``limit`` caps
    each kind (None: `MAX_FIGURES`, 0: all), and a note in ``an.notes`` says what was left out.
    """
    from specan import registry

    limit = MAX_FIGURES if limit is None else (limit or None)
    for name, ds in an.results.items():
        a = registry.get(name)
        if ds.sizes[a.item]:
            yield from FIGURES[a.figure](an, a, ds, limit)
    if views is None:
        _note_cut(an, len(an.views), limit, "singular-value figures (the largest views)")
    for key in list(views) if views is not None else _largest(list(an.views), an.views, limit):
        sigma = an.run.sigma(key)
        yield Plot(
            f"sigma_{safe_name(key)}",
            f"Singular values of {key} over training.",
            singular_values(
                sigma["step"].values, sigma.values, title=f"{an.name}: singular values, {key}"
            ),
        )


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- several runs on shared axes ----------------------------------------------------------------
def _run_colours(runs: Sequence[str]) -> dict[str, str]:
    return {r: f"C{i % 10}" for i, r in enumerate(runs)}


def compare_lines(
    result: Any, *, title: str, ylabel: str, limit: int | None = MAX_FIGURES * 2
) -> Figure:
    """One panel per view (or pair), one line per run, every panel on the same axes.

    ``result`` is an xarray DataArray ``(run, [item,] step)`` (``step`` may be ``epoch``), as
    `specan.comparison.Comparison.result` returns; ``limit`` caps the panels (the first items).
    """
    by = result.dims[-1]
    items = [d for d in result.dims if d not in ("run", by)]
    names = [str(x) for x in result[items[0]].values] if items else [ylabel]
    shown = names[:limit] if limit else names
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig = _figure(4.2 * cols, 1.2 + 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    fig.suptitle(as_label(title, 120))
    colour = _run_colours([str(r) for r in result.run.values])
    x = np.asarray(result[by].values, dtype=float)
    marker = "o" if x.size < 30 else None
    for ax, name in zip(axes, shown, strict=False):
        panel = result.sel({items[0]: name}) if items else result
        for run in result.run.values:
            y = np.asarray(panel.sel(run=run).values, dtype=float)
            run_label = as_label(str(run))
            ax.plot(x, y, color=colour[str(run)], label=run_label, marker=marker, ms=3, lw=1.4)
        ax.set_title(as_label(name), fontsize=8 if len(name) > 30 else 10)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols :]:
        ax.set_xlabel(by)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel)
    if 0 <= np.nanmin(result.values, initial=0) and np.nanmax(result.values, initial=0) <= 1:
        axes[0].set_ylim(0.0, 1.02)
    axes[0].legend(fontsize=8, loc="best")
    return fig


def compare_overview(metrics: Any, rank: Any, *, title: str) -> Figure:
    """The grokking figure for several runs on shared axes: each run's losses and accuracies
    (top; colour = run, line style = metric) above its mean normalised effective rank (bottom).

    ``metrics`` maps run name -> its metrics Dataset on ``step`` (every evaluation); ``rank`` is
    `Comparison.rank()` (its ``model_mean``).
    """
    fig = _figure(10.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set_title(title)
    colour = _run_colours([str(r) for r in rank.run.values])
    names = sorted({str(n) for m in metrics.values() for n in m.data_vars})
    accs = [n for n in names if "acc" in n.lower()]
    styles = {n: ("-", "--", ":", "-.")[i % 4] for i, n in enumerate(names)}
    twin = top.twinx() if accs else None
    for run, m in metrics.items():
        x = np.asarray(m.step.values, dtype=float)
        for n in m.data_vars:
            ax = twin if n in accs else top
            y = np.asarray(m[n].values, dtype=float)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], styles[n], color=colour[run], lw=1.3, label=f"{run} {n}")
    handles = [*top.get_lines(), *(twin.get_lines() if twin else [])]
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside right upper")
        top.set_ylabel("loss" if any("loss" in n for n in names) else "metric")
        losses = np.concatenate([h.get_ydata() for h in top.get_lines()] or [np.zeros(0)])
        if losses.size and losses.min() > 0 and losses.max() / losses.min() > 100:
            top.set_yscale("log")
        if twin is not None:
            twin.set_ylabel("accuracy")
            twin.set_ylim(-0.02, 1.02)
    else:
        top.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=top.transAxes)
    by = rank.model_mean.dims[-1]
    x = np.asarray(rank[by].values, dtype=float)
    for run in rank.run.values:
        y = np.asarray(rank.model_mean.sel(run=run).values, dtype=float)
        bottom.plot(x, y, color=colour[str(run)], lw=2.0, label=f"{run}: mean over weight matrices")
    bottom.legend(fontsize=8, loc="best")
    bottom.set_xlabel(by)
    bottom.set_ylabel("normalised effective rank")
    bottom.set_ylim(0.0, 1.02)
    return fig


def final_vs_setting(result: Any, setting: str, values: Sequence[float], *, title: str) -> Figure:
    """The paper's summary figure: each view's final value (one line per view, the model mean
    thick) against the one setting in which the runs differ (e.g. weight decay).

    ``result`` is `Comparison.result("rank")` ``(run, view, step)``; ``values`` the setting per run.
    """
    by = result.dims[-1]
    last = result.isel({by: -1})
    order = np.argsort(np.asarray(values, dtype=float))
    x = np.asarray(values, dtype=float)[order]
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.set_title(title)
    for view in last.view.values:
        y = np.asarray(last.sel(view=view).values, dtype=float)[order]
        mean = str(view) == "model_mean"
        style = {"color": "C3", "lw": 2.4, "zorder": 3, "label": "mean over weight matrices"}
        ax.plot(x, y, marker="o", ms=3, **(style if mean else {"color": "0.6", "lw": 0.8}))
    if (x > 0).all() and x.max() / x.min() > 10:
        ax.set_xscale("log")
    elif (x >= 0).all() and (x > 0).sum() > 1 and x[x > 0].max() / x[x > 0].min() > 10:
        ax.set_xscale("symlog", linthresh=float(x[x > 0].min()))
    ax.set_xlabel(setting)
    ax.set_ylabel(f"final value ({by} {last[by].item():g}); grey: each view")
    ax.legend(fontsize=8, loc="best")
    return fig
