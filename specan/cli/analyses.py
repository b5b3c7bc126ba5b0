"""`specan rank`, `align`, `sva` and `compare`: the analyses, as tables, csv or json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from specan.cli._app import (
    By,
    DedupeOpt,
    LayersOpt,
    OutFormat,
    OutFormatOpt,
    RunArg,
    StepsOpt,
    _e,
    _emit_long,
    _f,
    _filters,
    app,
    err,
    for_cli,
    out,
)

RANK_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan rank runs/grok-wd1`",
        "- `specan rank runs/vgg --layers 'features.*' --steps 0:5000 --format csv`",
    ]
)


@app.command(epilog=RANK_EXAMPLES)
def rank(
    run: RunArg,
    layers: LayersOpt = None,
    steps: StepsOpt = None,
    format: OutFormatOpt = OutFormat.table,
    dedupe: DedupeOpt = False,
) -> None:
    """Normalized effective rank (Eqn 1-2) of every view at every checkpoint, with the run's
    losses and accuracies beside it.

    The model's mean is over its weight matrices, one per parameter (per-head and split views
    are listed but not counted twice); csv/json mark the views it counts (`in_mean`).
    """
    import numpy as np

    import specan

    opened = specan.open(run, dedupe=dedupe)
    e = opened.rank()
    keys, params, rules = (e[c].values.tolist() for c in ("view", "param", "rule"))
    steps_, whole, bound = e.step.values, e.in_mean.values, e.bound.values.tolist()
    rows, cols = _filters(params, steps_, layers, steps)
    if format is not OutFormat.table:
        fields = ["view", "param", "rule", "in_mean", "step", "erank_norm", "is_bound"]
        _emit_long(
            [dict(zip(fields, (keys[i], params[i], rules[i], bool(whole[i]), int(steps_[t]),
                               float(e.values[i, t]), bound[i]), strict=True))
             for i in rows for t in cols],
            format, fields,
        )  # fmt: skip
        return
    t0, t1 = cols[0], cols[-1]
    table = Table(title=f"normalized effective rank, {run}: step {steps_[t0]} -> {steps_[t1]}",
                  title_justify="left")  # fmt: skip
    for col in ("view", "rule", "first", "last", "min", "change"):
        table.add_column(col, justify="left" if col in ("view", "rule") else "right")
    for i in rows:
        v = e.values[i, cols]
        label = _e(keys[i]) + (" ≤" if bound[i] else "")
        label = label if whole[i] else f"[dim]{label}[/]"
        table.add_row(label, rules[i], _f(v[0]), _f(v[-1]), _f(v.min()), f"{v[-1] - v[0]:+.3f}")
    out.print(table)
    counted = [i for i in rows if whole[i]]
    mean_col = f"mean erank ({len(counted)} matrices)"
    m = opened.metrics.drop_vars("epoch", errors="ignore").reindex(step=steps_)
    metrics = {n: m[n].values for n in m.data_vars}
    names = [n for n in metrics if "loss" in n or "acc" in n] or list(metrics)
    per = Table(title="per checkpoint: the model's mean normalized effective rank"
                + (" and the run's metrics" if names else ""), title_justify="left")  # fmt: skip
    for col in ("step", mean_col, *names):
        per.add_column(col, justify="right")
    shown = cols if len(cols) <= 25 else cols[np.linspace(0, len(cols) - 1, 25).astype(int)]
    mean = e.values[counted].mean(axis=0) if counted else np.full(len(steps_), np.nan)
    for t in shown:
        per.add_row(str(steps_[t]), _f(mean[t]), *(_f(metrics[n][t]) for n in names))
    out.print(per)
    if any(bound[i] for i in rows):
        out.print(
            "≤: only the top-k σ are stored for this view (--sigma top-k): its value is an upper "
            "bound from their tail energy (SPEC §2), and so is any mean it enters"
        )
    if len(rows) > len(counted):
        out.print(
            f"[dim]dimmed: {len(rows) - len(counted)} extra views (per head, W_V, halves), "
            "not counted in the mean[/]"
        )


ALIGN_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan align runs/grok-wd1`",
        "- `specan align runs/vgg --layers 'features.*' --steps 0:5000`",
        "- `specan align runs/vgg --format csv > align.csv` : diag cells are ';'-separated",
    ]
)


@app.command(epilog=ALIGN_EXAMPLES)
def align(
    run: RunArg,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Which pairs: those whose previous or next parameter matches (globs or "
            "`re:<regex>`, as for ingest). Default: all.",
        ),
    ] = None,
    steps: StepsOpt = None,
    vo_per_head: Annotated[
        bool,
        typer.Option(
            "--vo-per-head",
            help="Align W_V -> W_O per attention head instead of "
            "whole matrices (the paper's figures use whole).",
        ),
    ] = False,
    format: OutFormatOpt = OutFormat.table,
    dedupe: DedupeOpt = False,
) -> None:
    """Alignment of consecutive layers: the diagonal |V_next' U_prev|_ii (Eqn 3) and its
    score, the mean of the first 10 (Eqn 4), per pair of layers and checkpoint.

    Says which rule gave the pairs (run.json, or the family inferred from names) and every
    pair it skipped, with the reason. csv/json carry the diagonal (top 100) per row.
    """
    import specan
    from specan.views import select

    a = specan.open(run, dedupe=dedupe).align(vo_per_head=vo_per_head)
    params = sorted(set(a.prev.values.tolist()) | set(a.next.values.tolist()))
    keep = set(select(params, layers)) if params else set()
    results = [i for i, (p, n) in enumerate(zip(a.prev.values, a.next.values, strict=True))
               if {p, n} & keep]  # fmt: skip
    _, cols = _filters([], a.step.values, None, steps)
    err.print(f"pairs: {_e(a.attrs['rule'])}")
    for why in a.attrs["skipped"]:
        err.print(f"[yellow]skipped pair[/] {_e(for_cli(why))}")
    label, kind, length = (a[c].values for c in ("pair", "kind", "length"))
    score, diag = a.score.values, a.diag.values
    if format is not OutFormat.table:
        fields = ["pair", "kind", "step", "score", "diag"]
        _emit_long(
            [dict(zip(fields, (str(label[i]), str(kind[i]), int(a.step.values[t]),
                               float(score[i, t]), diag[i, t, : length[i]].tolist()), strict=True))
             for i in results for t in cols],
            format, fields,
        )  # fmt: skip
        return
    table = Table(title=f"alignment score (Eqn 4), {run}", title_justify="left")
    for col in ("pair", "kind", "first", "last", "max"):
        table.add_column(col, justify="left" if col in ("pair", "kind") else "right")
    for i in results:
        s = score[i, cols]
        table.add_row(_e(label[i]), str(kind[i]), _f(s[0]), _f(s[-1]), _f(s.max()))
    out.print(table)


SVA_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan sva runs/vgg`",
        "- `specan sva runs/a --against runs/b` : checkpoint by checkpoint, matched by step",
        "- `specan sva runs/a --against runs/b --by epoch --format json`",
    ]
)


@app.command(epilog=SVA_EXAMPLES)
def sva(
    run: RunArg,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="Compare with this run, checkpoint by checkpoint at the same step (see --by), "
            "instead of with the final checkpoint.",
        ),
    ] = None,
    by: Annotated[
        By, typer.Option("--by", help="With --against: match checkpoints by step or by epoch.")
    ] = By.step,
    layers: LayersOpt = None,
    steps: StepsOpt = None,
    format: OutFormatOpt = OutFormat.table,
    dedupe: DedupeOpt = False,
) -> None:
    """Singular vector agreement (Eqn 5) of each checkpoint with the final one (the largest
    step) or with another run's checkpoint at the same step: the diagonal S_ii and the score
    s(t), the mean of the first 10.

    Says which checkpoint is the reference, and which steps or views were left out and why.
    csv/json carry the diagonal (top 100) per row.
    """
    import specan

    if against is None and by is not By.step:
        raise typer.BadParameter("'--by' needs '--against'.")
    g = specan.open(run, dedupe=dedupe).sva(against, by=by.value)
    keys, params, length = (g[c].values for c in ("view", "param", "length"))
    rows, cols = _filters(params.tolist(), g.step.values, layers, steps)
    err.print(f"reference: {_e(g.attrs['reference'])}")
    for why in g.attrs["dropped"]:
        err.print(f"[yellow]left out[/] {_e(why)}")
    score, diag = g.score.values, g.diag.values
    if format is not OutFormat.table:
        fields = ["view", "param", "step", "score", "diag"]
        _emit_long(
            [dict(zip(fields, (str(keys[i]), str(params[i]), int(g.step.values[t]),
                               float(score[i, t]), diag[i, t, : length[i]].tolist()), strict=True))
             for i in rows for t in cols],
            format, fields,
        )  # fmt: skip
        return
    table = Table(title=f"SVA score against {g.attrs['reference']}, {run}", title_justify="left")
    for col in ("view", "first", "middle", "last"):
        table.add_column(col, justify="left" if col == "view" else "right")
    for i in rows:
        s = score[i, cols]
        table.add_row(_e(keys[i]), _f(s[0]), _f(s[len(s) // 2]), _f(s[-1]))
    out.print(table)


COMPARE_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan compare runs/grok-wd0 runs/grok-wd1` : mean effective rank, table and figure",
        "- `specan compare runs/grok-wd* --metric rank --format csv > rank.csv`",
        "- `specan compare runs/a runs/b --metric val_acc --by epoch`",
    ]
)


@app.command(epilog=COMPARE_EXAMPLES)
def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="Two or more run folders.", show_default=False)
    ],
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="`rank` (effective rank per view, and the model mean), `align` or `sva` (their "
            "scores), any other registered analysis, or a metric of "
            "metrics.jsonl such as `val_acc`.",
        ),
    ] = "rank",
    by: Annotated[
        By, typer.Option("--by", help="Match checkpoints by step or by epoch.")
    ] = By.step,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the figure (table format only).")
    ] = Path("figs"),
    format: OutFormatOpt = OutFormat.table,
) -> None:
    """Runs side by side: the metric on the steps every run has, one line per run.

    Says which steps (and views) were left out because not every run has them. The table has
    one row per run (the settings in which run.json differs, first and last value of the model
    mean or the mean score); the figure one panel per view, one line per run, shared axes.
    csv/json: one row per run, view (`model_mean` for the mean) and step.
    """
    import numpy as np

    import specan
    from specan.comparison import MODEL_MEAN

    if len(runs) < 2:
        raise typer.BadParameter("give two or more runs.", param_hint="RUNS")
    c = specan.compare(runs, by=by.value)
    try:
        result = c.result(metric)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--metric") from None
    for why in c.dropped:
        err.print(f"[yellow]left out[/] {_e(why)}")
    item = next((d for d in result.dims if d not in ("run", by.value)), None)
    if format is not OutFormat.table:
        fields = ["run", *([item] if item else []), by.value, metric]
        rows = []
        for r in result.run.values:
            for x in result[item].values if item else [None]:
                cell = result.sel(run=r, **({item: x} if item else {}))
                for t, v in zip(cell[by.value].values, cell.values, strict=True):
                    key = int(t) if by is By.step else float(t)
                    rows.append(
                        dict(
                            zip(
                                fields,
                                [
                                    str(r),
                                    *([str(x)] if item else []),
                                    key,
                                    None if v != v else float(v),
                                ],
                                strict=True,
                            )
                        )
                    )
        _emit_long(rows, format, fields)  # fmt: skip
        return
    from specan import registry

    summary = result
    if item and MODEL_MEAN in result[item].values:
        summary = result.sel({item: MODEL_MEAN})
    elif item:
        summary = result.mean(dim=item)
    differ = c.settings()
    label = registry.get(metric).summary if metric in registry.ANALYSES else metric
    table = Table(title=f"{label}, {len(c.shared)} shared {by.value}s "
                  f"({c.shared[0]:g} … {c.shared[-1]:g})", title_justify="left")  # fmt: skip
    for col in ("run", *differ, "first", "last", "change"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for i, name in enumerate(c.names):
        v = np.asarray(summary.isel(run=i).values, dtype=float)
        table.add_row(_e(name), *(_e(vals[i]) for vals in differ.values()), _f(v[0]), _f(v[-1]),
                      f"{v[-1] - v[0]:+.3f}")  # fmt: skip
    out.print(table)
    from specan.plots import compare_lines

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compare_{metric}.png"
    fig = compare_lines(result, title=f"{metric}, one line per run", ylabel=metric)
    fig.savefig(path)
    out.print(str(path))
