"""The `specan` command line: thin commands over the library, one error table.

Only typer, rich and the standard library are imported here at module level: `specan --help` and a
no-op re-ingest must not pay for torch, dask or zarr. Each command imports what it needs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from specan.errors import SpecanError

app = typer.Typer(
    name="specan",
    help=(
        "Spectral dynamics of neural-network weights. `specan ingest RUN` decomposes every weight "
        "matrix of every checkpoint into RUN/specan.zarr; the other commands read that store."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# In a pipe rich would wrap at 80 columns: messages never wrap there (one line each, greppable)
# and tables get room, so a redirected table reads as it does on a terminal.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, warnings, errors


class Family(str, Enum):
    auto = "auto"
    mlp = "mlp"
    vgg = "vgg"
    lstm = "lstm"
    transformer = "transformer"
    neox = "neox"
    llama = "llama"
    gpt2 = "gpt2"


class SigmaMode(str, Enum):
    all = "all"
    top_k = "top-k"


class Format(str, Enum):
    table = "table"
    json = "json"


# -- shared options ---------------------------------------------------------------------------
RunArg = Annotated[
    Path,
    typer.Argument(
        help="A run folder: specan's own (run.json + checkpoints/), a flat folder of "
        "*.safetensors, Hugging Face checkpoint-N/ folders, or Pythia-style stepN/ folders.",
        show_default=False,
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Which parameters: `all`, or comma-separated shell globs on parameter names "
        "(`'blocks.*.attn.*'`), or `re:<regex>`. Default: all (or what the store was made with).",
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="table for people, json for scripts.")]


# -- ingest -----------------------------------------------------------------------------------
INGEST_EXAMPLES = """
Examples:

- `specan ingest runs/vgg` : every checkpoint, every view, σ + top-128 vectors

- `specan ingest runs/pythia-160m --layers 're:layers\\.(0|11)\\.' --top-k 32`

- `specan ingest runs/lstm --no-vectors` : singular values only (smallest store)

- `specan ingest ckpts/ --heads 12 --rule blocks.0.up.weight=conv_transpose`
"""


@app.command(epilog=INGEST_EXAMPLES)
def ingest(
    run: RunArg,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="Singular vectors kept per view (left and right); 0 keeps all. Default 128.",
        ),
    ] = None,
    no_vectors: Annotated[
        bool, typer.Option("--no-vectors", help="Keep singular values only (no U, V).")
    ] = False,
    sigma: Annotated[
        SigmaMode | None,
        typer.Option(
            "--sigma",
            help="`all` singular values (default), or `top-k`: for matrices large enough that a "
            "randomized top-k decomposition is cheaper, keep only the top k σ (and vectors); "
            "their effective rank is then reported as an upper bound, and said to be one.",
        ),
    ] = None,
    family: Annotated[
        Family | None,
        typer.Option(
            "--family",
            help="Model family for the view rules; auto detects from parameter names.",
        ),
    ] = None,
    layers: LayersOpt = None,
    heads: Annotated[
        int | None,
        typer.Option(
            "--heads",
            min=1,
            help="Attention (query) heads, for the per-head Q/K views; grouped K/V heads follow "
            "from the shapes. Default: from run.json or config.json.",
        ),
    ] = None,
    rule: Annotated[
        list[str] | None,
        typer.Option(
            "--rule",
            help="PARAM=RULE, forcing a view rule for one parameter, e.g. "
            "`up.weight=conv_transpose`. Repeatable.",
        ),
    ] = None,
    vector_dtype: Annotated[
        str | None,
        typer.Option("--vector-dtype", help="float32 (default) or float16 for stored vectors."),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="SVD kernel: auto, torch-cpu, torch-cuda.")
    ] = "auto",
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Dask threads (default: one per core).")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Stop at the first bad checkpoint instead of skipping it."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Delete the existing store and compute it anew.")
    ] = False,
) -> None:
    """Decompose every weight matrix of every checkpoint of RUN into RUN/specan.zarr.

    Incremental: checkpoints already in the store are skipped, new ones appended, changed files
    recomputed, and an interrupted ingest is completed by running it again. Bad files are skipped
    and listed (or stop the run with --strict); nothing already stored is touched.
    """
    import specan
    from specan.progress import for_console

    if no_vectors and top_k:
        raise typer.BadParameter("'--no-vectors' cannot be used with '--top-k'.")
    if no_vectors and sigma is SigmaMode.top_k:
        raise typer.BadParameter(
            "'--sigma top-k' keeps the top-k vectors: not with '--no-vectors'."
        )
    if vector_dtype not in (None, "float32", "float16"):
        raise typer.BadParameter(f"'--vector-dtype' must be float32 or float16, not {vector_dtype}")
    rules = {}
    for r in rule or []:
        param, sep, name = r.partition("=")
        if not sep or not param or not name:
            raise typer.BadParameter(f"'--rule' takes PARAM=RULE, got {r!r}")
        rules[param] = name
    report = specan.ingest(
        run, top_k=top_k, vectors=False if no_vectors else None,
        sigma=sigma.value if sigma else None, family=family.value if family else None,
        layers=layers, heads=heads, rules=rules or None, strict=strict, backend=backend,
        vector_dtype=vector_dtype, overwrite=overwrite, workers=workers,
        progress=for_console(err),
    )  # fmt: skip
    for path, reason in report.bad:
        err.print(f"[yellow]skipped[/] {_e(path)}: {_e(reason)}")
    if report.computed:
        out.print(
            f"{_e(run)}: {len(report.computed)} checkpoint(s) ingested "
            f"({len(report.changed)} changed), {report.unchanged} unchanged, "
            f"{report.views} views, {report.bytes_read / 2**20:.1f} MB in {report.seconds:.1f} s "
            f"-> {_e(report.store)}"
        )
    else:
        out.print(
            f"{_e(run)}: up to date ({report.unchanged} checkpoints, {report.views} views) "
            f"-> {_e(report.store)}"
        )


# -- info -------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n- `specan info runs/vgg`\n\n- `specan info runs/vgg --format json`"
)
def info(run: RunArg, format: FormatOpt = Format.table) -> None:
    """What the store of RUN holds: checkpoints, views and their shapes, the kernel, sizes."""
    from specan.store import store_path, summary

    s = summary(store_path(run))
    if format is Format.json:
        out.print_json(json.dumps(s))
        return
    ck = s["checkpoints"]
    out.print(
        f"[bold]{_e(s['path'])}[/]  schema {s['schema_version']}, specan {s['specan_version']}"
    )
    k = s["kernel"]
    out.print(
        f"checkpoints: {ck['done']} done"
        + (f", {ck['pending']} unfinished" if ck["pending"] else "")
        + (f", {ck['bad']} bad (skipped until their files change)" if ck.get("bad") else "")
        + (f", steps {ck['first_step']} … {ck['last_step']}" if ck["done"] else "")
        + f"   kernel: {k.get('backend')}, top-k {k.get('top_k') or 'all'}, "
        f"vectors {'yes' if k.get('vectors') else 'no'} ({k.get('vector_dtype')})"
        + f"   size: {s['bytes'] / 2**20:.1f} MB"
    )
    table = Table(title=f"{len(s['views'])} views", title_justify="left")
    for col in ("view", "rule", "matrix", "heads", "k", "MB"):
        table.add_column(col, justify="right" if col in ("heads", "k", "MB") else "left")
    for v in s["views"]:
        name = _e(v["param"])
        if v["key"] != v["param"]:
            name += f" [dim]({_e(v['key'])})[/]"
        table.add_row(
            name,
            v["rule"],
            "×".join(map(str, v["shape"])),
            str(v["heads"] or ""),
            str(v["k"]),
            f"{v['bytes'] / 2**20:.2f}",
        )
    out.print(table)
    for b in s["bad_files"]:
        out.print(f"[yellow]bad file[/] {_e(b['path'])}: {_e(b['reason'])}")


# -- analyses ---------------------------------------------------------------------------------
class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


OutFormatOpt = Annotated[
    OutFormat,
    typer.Option("--format", help="table for people; csv or json (long form) for scripts."),
]
StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--steps", help="Which checkpoints: `A:B` (inclusive, either end open) or a list."
    ),
]


def _filters(params: list[str], steps, layers: str | None, steps_spec: str | None):
    """Row and column indices kept by --layers and --steps (errors become one line)."""
    from specan.analysis import select_steps
    from specan.errors import OptionError
    from specan.views import select

    keep = set(select(sorted(set(params)), layers))
    try:
        cols = select_steps(steps, steps_spec)
    except ValueError as e:
        raise OptionError(f"--steps: {e}") from None
    return [i for i, p in enumerate(params) if p in keep], cols


def _emit_long(rows: list[dict], format: OutFormat, fields: list[str]) -> None:
    if format is OutFormat.json:
        out.print_json(json.dumps(rows))
    else:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for row in rows:  # a list (a diagonal) is one cell: values separated by ';'
            writer.writerow(
                {k: ";".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v
                 for k, v in row.items()}
            )  # fmt: skip
        sys.stdout.write(buf.getvalue())


def _e(x: object) -> str:
    """Text from a run (names, paths, reasons) as literal text: `qkv[v]` is no markup tag."""
    from rich.markup import escape

    return escape(str(x))


def _f(x: float) -> str:
    return "" if x != x else f"{x:.3f}"  # NaN -> empty


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
) -> None:
    """Normalized effective rank (Eqn 1-2) of every view at every checkpoint, with the run's
    losses and accuracies beside it.

    The model's mean is over its weight matrices, one per parameter (per-head and split views
    are listed but not counted twice); csv/json mark the views it counts (`in_mean`).
    """
    import numpy as np

    import specan

    opened = specan.open(run)
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
) -> None:
    """Alignment of consecutive layers: the diagonal |V_next' U_prev|_ii (Eqn 3) and its
    score, the mean of the first 10 (Eqn 4), per pair of layers and checkpoint.

    Says which rule gave the pairs (run.json, or the family inferred from names) and every
    pair it skipped, with the reason. csv/json carry the diagonal (top 100) per row.
    """
    import specan
    from specan.views import select

    a = specan.open(run).align(vo_per_head=vo_per_head)
    params = sorted(set(a.prev.values.tolist()) | set(a.next.values.tolist()))
    keep = set(select(params, layers)) if params else set()
    results = [i for i, (p, n) in enumerate(zip(a.prev.values, a.next.values, strict=True))
               if {p, n} & keep]  # fmt: skip
    _, cols = _filters([], a.step.values, None, steps)
    err.print(f"pairs: {_e(a.attrs['rule'])}")
    for why in a.attrs["skipped"]:
        err.print(f"[yellow]skipped pair[/] {_e(why)}")
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


class By(str, Enum):
    step = "step"
    epoch = "epoch"


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
    g = specan.open(run).sva(against, by=by.value)
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


PLOT_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan plot runs/grok-wd1 --out figs/`",
        "- `specan plot runs/vgg --out figs/ --svg`",
    ]
)


@app.command(epilog=PLOT_EXAMPLES)
def plot(
    run: RunArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the figures.")] = Path("figs"),
    svg: Annotated[bool, typer.Option("--svg", help="Also write SVG.")] = False,
    max_figures: Annotated[
        int,
        typer.Option(
            "--max-figures",
            min=0,
            help="Per-pair and per-view figures of each kind (the first pairs, the largest "
            "views); 0 draws all. What is left out is said.",
        ),
    ] = 6,
) -> None:
    """The paper's figures as PNG: singular values over time, effective-rank heatmap, loss under
    rank, alignment and SVA diagonals and scores."""
    from specan.plots import save_all

    for path in save_all(run, out_dir, svg=svg, limit=max_figures):
        out.print(str(path))


REPORT_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan report runs/grok-wd1`",
        "- `specan report runs/vgg --out vgg.html`",
        "- `specan report runs/grok-wd0 runs/grok-wd1 --out grok.html` : the runs compared",
    ]
)


@app.command(epilog=REPORT_EXAMPLES)
def report(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="One run folder, or several to compare on shared axes.", show_default=False
        ),
    ],
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out", help="The HTML file (default RUN/report.html; for several runs report.html)."
        ),
    ] = None,
) -> None:
    """One self-contained HTML page: the figures, a summary table and the run's config; for
    several runs, the runs compared on shared steps (see `specan compare`)."""
    from specan.report import write_comparison, write_report

    if len(runs) == 1:
        out.print(str(write_report(runs[0], out_file)))
    else:
        out.print(str(write_comparison(runs, out_file or Path("report.html"))))


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
            "scores), or a metric of metrics.jsonl such as `val_acc`.",
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
    summary = result.sel(view=MODEL_MEAN) if metric == "rank" else result
    if item and metric != "rank":
        summary = summary.mean(dim=item)
    differ = c.settings()
    what = {"rank": "mean erank", "align": "mean alignment score", "sva": "mean SVA score"}
    label = what.get(metric, metric)
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


# -- demo -------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n- `specan demo`\n\n- `specan demo --out /tmp/demo`")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo runs are written.")] = Path(
        "runs/demo"
    ),
) -> None:
    """The built-in default: grokking on (a + b) mod 97 trained on the CPU with weight decay 1.0
    and 0, both ingested, and one HTML report comparing them.

    With weight decay the validation accuracy jumps from chance to ~100 % long after the training
    set is memorised, and the weights' effective rank falls with it; without, neither happens.
    Takes several minutes on a laptop CPU; an interrupted demo resumes where it stopped.
    """
    from specan.demo import run_grokking_demo
    from specan.progress import for_console

    err.print(f"training grokking twice (wd 1.0, wd 0) into {out_dir}; progress every 100 steps")
    result = run_grokking_demo(out_dir, lambda name: for_console(err, f"ingest {name}"))
    table = Table(title="grokking demo", title_justify="left")
    for col in ("run", "final val acc", "mean erank first", "mean erank last"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, n in result["numbers"].items():
        table.add_row(
            name, f"{n['val_acc']:.3f}", f"{n['erank_first']:.3f}", f"{n['erank_last']:.3f}"
        )
    out.print(table)
    out.print(f"report: {result['report']}")


# -- train ------------------------------------------------------------------------------------
TRAIN_EXAMPLES = """
Examples:

- `specan train grokking --wd 1.0 --train-frac 0.3 --steps 20000 --out runs/grok-wd1`

- `specan train grokking --help` : every option with the paper's default

- `python -m trainers.grokking --help` : the same trainer without the CLI
"""


@app.command(
    epilog=TRAIN_EXAMPLES,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(
    ctx: typer.Context,
    name: Annotated[
        str,
        typer.Argument(
            help="Trainer: grokking, deep-mlp, random-labels, vgg, unet, lstm, lm.",
            show_default=False,
        ),
    ] = "",
) -> None:
    """Train one of the paper's experiments, writing a run directory that `ingest` reads.

    Every option after the trainer's name goes to the trainer (`specan train grokking --help`
    lists them with the paper's defaults). A killed training resumes from its last checkpoint
    when run again with the same options.
    """
    if not name or name in ("-h", "--help"):
        out.print(ctx.get_help())
        return
    from trainers import trainer_module

    try:
        module = trainer_module(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None
    from specan.errors import OptionError
    from trainers.checkpoint import OptionValueError
    from trainers.data import DataError

    try:
        module.main([*ctx.args])
    except (DataError, FileExistsError, OptionValueError) as e:
        # a bad --data path, an unavailable --device, or --out holding another run
        raise OptionError(str(e)) from None


# -- bench ------------------------------------------------------------------------------------
BENCH_EXAMPLES = """
Examples:

- `specan bench` : every Pythia-160m…1.4b shape, every route, and the randomized comparison

- `specan bench --quick --format json > bench.json` : small shapes, one repeat, for scripts

- `specan bench --shapes 3072x768,50304x768 --no-randomized`

- `specan bench --device cuda --spectrum decaying`
"""


@app.command(epilog=BENCH_EXAMPLES)
def bench(
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    shapes: Annotated[
        str | None,
        typer.Option(
            "--shapes",
            help="Comma-separated shape names (e.g. 50304x768, conv64x576, heads12x64x768) or "
            "BxMxN stacks. Default: all (the quick set with --quick).",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small shapes, one repeat: checks that all runs.")
    ] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Vectors kept per matrix.")] = 128,
    spectrum: Annotated[
        str, typer.Option("--spectrum", help="random (init) or decaying (trained-like) matrices.")
    ] = "random",
    randomized: Annotated[
        bool,
        typer.Option(
            "--randomized/--no-randomized",
            help="Also compare randomized top-k with scikit-learn and torch.svd_lowrank.",
        ),
    ] = True,
    format: FormatOpt = Format.table,
) -> None:
    """SVD throughput of this machine: matrices/s, GFLOP/s and fraction of the measured float32
    matmul peak per shape and route, beside the per-matrix `torch.linalg.svd` / `svdvals` loops,
    with σ's error against float64 NumPy.
    """
    from specan.bench import BenchOptions, run, table_lines

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("cpu or cuda", param_hint="--device")
    if spectrum not in ("random", "decaying"):
        raise typer.BadParameter("random or decaying", param_hint="--spectrum")
    names = [x.strip() for x in shapes.split(",") if x.strip()] if shapes else None
    opts = BenchOptions(
        device=device, shapes=names, quick=quick, k=top_k, randomized=randomized,
        spectrum=spectrum,
    )  # fmt: skip
    try:
        result = run(opts, progress=lambda msg: err.print(f"bench {msg}"))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if format is Format.json:
        out.print_json(json.dumps(result))
    else:
        for line in table_lines(result):
            out.print(line, markup=False)


# -- entry point ------------------------------------------------------------------------------
def main() -> None:
    """Console-script entry: known errors become one line on stderr and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SpecanError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        err.print(f"[red]error:[/] {_e(e)}", soft_wrap=True)
        err.print("[dim](set SPECAN_DEBUG=1 for the traceback)[/]")
        sys.exit(e.exit_code)
    except OSError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        err.print(f"[red]error:[/] {_e(where)}{_e(e.strerror or e)}", soft_wrap=True)
        sys.exit(5)


if __name__ == "__main__":
    main()
