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
        "*.safetensors or torch files, Hugging Face checkpoint-N/ folders, Pythia-style stepN/ "
        "folders, or a Hugging Face cache folder (models--org--name); or a store made with "
        "`ingest --store`.",
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
DedupeOpt = Annotated[
    bool,
    typer.Option(
        "--dedupe",
        help="Show checkpoints of identical content once, at the largest step that holds it "
        "(`specan info` lists them).",
    ),
]


# -- ingest -----------------------------------------------------------------------------------
INGEST_EXAMPLES = """
Examples:

- `specan ingest runs/vgg` : every checkpoint, every view, σ + top-128 vectors

- `specan ingest runs/pythia-160m --layers 're:layers\\.(0|11)\\.' --top-k 32`

- `specan ingest runs/lstm --no-vectors` : singular values only (smallest store)

- `specan ingest ckpts/ --heads 12 --rule blocks.0.up.weight=conv_transpose`

- `specan ingest ~/.cache/huggingface/hub/models--EleutherAI--pythia-160m --store pythia-160m.zarr
  --scheduler local:4` : the HF cache left untouched, four worker processes
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
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="Where the store goes (default RUN/specan.zarr), e.g. away from a read-only "
            "checkpoint folder or the Hugging Face cache. Other commands take this path as RUN.",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="Run the SVDs on a Dask cluster: `tcp://host:8786` (its workers must see RUN at "
            "the same path) or `local:N` (N worker processes here). This process still writes "
            "the store, as results come back. Default: threads in this process.",
        ),
    ] = None,
) -> None:
    """Decompose every weight matrix of every checkpoint of RUN into RUN/specan.zarr.

    Incremental: checkpoints already in the store are skipped, new ones appended, changed files
    recomputed, and an interrupted ingest is completed by running it again. Bad files are skipped
    and listed (or stop the run with --strict); nothing already stored is touched.
    """
    from specan.pipeline import IngestOptions
    from specan.pipeline import ingest as run_ingest
    from specan.progress import for_console

    if no_vectors and top_k:
        raise typer.BadParameter("'--no-vectors' cannot be used with '--top-k'.")
    if no_vectors and sigma is SigmaMode.top_k:
        raise typer.BadParameter(
            "'--sigma top-k' keeps the top-k vectors: not with '--no-vectors'."
        )
    if workers and scheduler:
        raise typer.BadParameter(
            "'--workers' sets this process's threads: not with '--scheduler' (size the cluster)."
        )
    if vector_dtype not in (None, "float32", "float16"):
        raise typer.BadParameter(f"'--vector-dtype' must be float32 or float16, not {vector_dtype}")
    rules = {}
    for r in rule or []:
        param, sep, name = r.partition("=")
        if not sep or not param or not name:
            raise typer.BadParameter(f"'--rule' takes PARAM=RULE, got {r!r}")
        rules[param] = name
    opts = IngestOptions(
        top_k=0 if no_vectors else top_k,
        vectors=False if no_vectors else None,
        sigma=sigma.value if sigma else None,
        family=family.value if family else None,
        layers=layers,
        heads=heads,
        rules=rules or None,
        strict=strict,
        backend=backend,
        vector_dtype=vector_dtype,
        overwrite=overwrite,
        workers=workers,
        store=store,
        scheduler=scheduler,
    )
    report = run_ingest(run, opts, for_console(err))
    for path, reason in report.bad:
        err.print(f"[yellow]skipped[/] {_e(path)}: {_e(reason)}")
    for name, original in report.duplicates:
        out.print(f"duplicate: {_e(name)} has the content of {_e(original)} (decomposed once)")
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
    for group in s["duplicates"]:
        out.print(f"identical checkpoints (one decomposition, `--dedupe` keeps the last): "
                  f"{_e(', '.join(group))}")  # fmt: skip
    if s["run"] and Path(s["run"]) != Path(s["path"]).parent:
        out.print(f"checkpoints read from {_e(s['run'])}")


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
    dedupe: DedupeOpt = False,
) -> None:
    """Normalized effective rank (Eqn 1-2) of every view at every checkpoint, with the run's
    losses and accuracies beside it.

    The model's mean is over its weight matrices, one per parameter (per-head and split views
    are listed but not counted twice); csv/json mark the views it counts (`in_mean`).
    """
    import numpy as np

    from specan.analysis import rank as compute

    r = compute(run, dedupe=dedupe)
    rows, cols = _filters(r.params, r.steps, layers, steps)
    whole = r.whole
    if format is not OutFormat.table:
        fields = ["view", "param", "rule", "in_mean", "step", "erank_norm", "is_bound"]
        _emit_long(
            [dict(zip(fields, (r.keys[i], r.params[i], r.rules[i], bool(whole[i]),
                               int(r.steps[t]), float(r.values[i, t]), r.bound[i]), strict=True))
             for i in rows for t in cols],
            format, fields,
        )  # fmt: skip
        return
    t0, t1 = cols[0], cols[-1]
    table = Table(title=f"normalized effective rank, {run}: step {r.steps[t0]} -> {r.steps[t1]}",
                  title_justify="left")  # fmt: skip
    for col in ("view", "rule", "first", "last", "min", "change"):
        table.add_column(col, justify="left" if col in ("view", "rule") else "right")
    for i in rows:
        v = r.values[i, cols]
        label = _e(r.keys[i]) + (" ≤" if r.bound[i] else "")
        label = label if whole[i] else f"[dim]{label}[/]"
        table.add_row(label, r.rules[i], _f(v[0]), _f(v[-1]), _f(v.min()), f"{v[-1] - v[0]:+.3f}")
    out.print(table)
    counted = [i for i in rows if whole[i]]
    mean_col = f"mean erank ({len(counted)} matrices)"
    names = [n for n in r.metrics if "loss" in n or "acc" in n] or list(r.metrics)
    per = Table(title="per checkpoint: the model's mean normalized effective rank"
                + (" and the run's metrics" if names else ""), title_justify="left")  # fmt: skip
    for col in ("step", mean_col, *names):
        per.add_column(col, justify="right")
    shown = cols if len(cols) <= 25 else cols[np.linspace(0, len(cols) - 1, 25).astype(int)]
    mean = r.values[counted].mean(axis=0) if counted else np.full(len(r.steps), np.nan)
    for t in shown:
        per.add_row(str(r.steps[t]), _f(mean[t]), *(_f(r.metrics[n][t]) for n in names))
    out.print(per)
    if any(r.bound[i] for i in rows):
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
    from specan.analysis import align as compute
    from specan.views import select

    a = compute(run, vo_per_head=vo_per_head, dedupe=dedupe)
    params = sorted({p for r in a.results for p in (r.pair.prev, r.pair.next)})
    keep = set(select(params, layers)) if a.results else set()
    results = [r for r in a.results if {r.pair.prev, r.pair.next} & keep]
    _, cols = _filters([], a.steps, None, steps)
    err.print(f"pairs: {_e(a.rule)}")
    for pair, reason in a.skipped:
        err.print(f"[yellow]skipped pair[/] {_e(pair.label)}: {_e(reason)}")
    if format is not OutFormat.table:
        fields = ["pair", "kind", "step", "score", "diag"]
        _emit_long(
            [dict(zip(fields, (r.pair.label, r.pair.kind, int(a.steps[t]), float(r.score[t]),
                               [float(x) for x in r.diag[t]]), strict=True))
             for r in results for t in cols],
            format, fields,
        )  # fmt: skip
        return
    table = Table(title=f"alignment score (Eqn 4), {run}", title_justify="left")
    for col in ("pair", "kind", "first", "last", "max"):
        table.add_column(col, justify="left" if col in ("pair", "kind") else "right")
    for r in results:
        s = r.score[cols]
        table.add_row(_e(r.pair.label), r.pair.kind, _f(s[0]), _f(s[-1]), _f(s.max()))
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
    dedupe: DedupeOpt = False,
) -> None:
    """Singular vector agreement (Eqn 5) of each checkpoint with the final one (the largest
    step) or with another run's checkpoint at the same step: the diagonal S_ii and the score
    s(t), the mean of the first 10.

    Says which checkpoint is the reference, and which steps or views were left out and why.
    csv/json carry the diagonal (top 100) per row.
    """
    from specan.analysis import sva as compute

    if against is None and by is not By.step:
        raise typer.BadParameter("'--by' needs '--against'.")
    g = compute(run, against, by=by.value, dedupe=dedupe)
    rows, cols = _filters([r.param for r in g.results], g.steps, layers, steps)
    err.print(f"reference: {_e(g.reference)}")
    for why in g.dropped:
        err.print(f"[yellow]left out[/] {_e(why)}")
    if format is not OutFormat.table:
        fields = ["view", "param", "step", "score", "diag"]
        _emit_long(
            [dict(zip(fields, (g.results[i].key, g.results[i].param, int(g.steps[t]),
                               float(g.results[i].score[t]),
                               [float(x) for x in g.results[i].diag[t]]), strict=True))
             for i in rows for t in cols],
            format, fields,
        )  # fmt: skip
        return
    table = Table(title=f"SVA score against {g.reference}, {run}", title_justify="left")
    for col in ("view", "first", "middle", "last"):
        table.add_column(col, justify="left" if col == "view" else "right")
    for i in rows:
        s = g.results[i].score[cols]
        table.add_row(_e(g.results[i].key), _f(s[0]), _f(s[len(s) // 2]), _f(s[-1]))
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
    ]
)


@app.command(epilog=REPORT_EXAMPLES)
def report(
    run: RunArg,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="The HTML file (default RUN/report.html).")
    ] = None,
) -> None:
    """One self-contained HTML page: the figures, a summary table and the run's config."""
    from specan.report import write_report

    out.print(str(write_report(run, out_file)))


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
