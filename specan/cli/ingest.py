"""`specan ingest` and `specan info`: making a store, and what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from specan.cli._app import (
    Family,
    Format,
    FormatOpt,
    LayersOpt,
    RunArg,
    SigmaMode,
    _e,
    app,
    err,
    for_cli,
    out,
)

if TYPE_CHECKING:
    from specan.pipeline import IngestReport

# -- ingest -----------------------------------------------------------------------------------
INGEST_EXAMPLES = """
Examples:

- `specan ingest runs/vgg` : every checkpoint, every view, σ + top-128 vectors

- `specan ingest runs/pythia-160m --layers 're:layers\\.(0|11)\\.' --top-k 32`

- `specan ingest runs/lstm --no-vectors` : singular values only (smallest store)

- `specan ingest runs/vgg --watch --report` : beside a running training, each checkpoint as it
  lands, the report rewritten, until the run finishes

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
        str, typer.Option("--backend", help="SVD kernel: auto, torch-cpu, torch-cuda, cupy.")
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
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Follow a training that is still running: ingest each checkpoint as it lands, "
            "until the run writes its end marker (finished.json) or Ctrl-C.",
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option("--interval", min=0.1, help="With --watch: seconds between looks at RUN."),
    ] = 5.0,
    report_html: Annotated[
        bool,
        typer.Option(
            "--report",
            help="With --watch: rewrite RUN/report.html (as `specan report`) after each ingest "
            "that added checkpoints.",
        ),
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
    if workers and scheduler:
        raise typer.BadParameter(
            "'--workers' sets this process's threads: not with '--scheduler' (size the cluster)."
        )
    if vector_dtype not in (None, "float32", "float16"):
        raise typer.BadParameter(f"'--vector-dtype' must be float32 or float16, not {vector_dtype}")
    if report_html and not watch:
        raise typer.BadParameter("'--report' rewrites the report as a run goes: with '--watch'.")
    rules = {}
    for r in rule or []:
        param, sep, name = r.partition("=")
        if not sep or not param or not name:
            raise typer.BadParameter(f"'--rule' takes PARAM=RULE, got {r!r}")
        rules[param] = name
    kwargs = dict(
        top_k=top_k, vectors=False if no_vectors else None,
        sigma=sigma.value if sigma else None, family=family.value if family else None,
        layers=layers, heads=heads, rules=rules or None, strict=strict, backend=backend,
        vector_dtype=vector_dtype, overwrite=overwrite, workers=workers, store=store,
        scheduler=scheduler, progress=for_console(err, translate=for_cli),
    )  # fmt: skip
    _fewer_collections()
    if watch:
        _watch(run, interval, report_html, kwargs)
        return
    _print_ingest(run, specan.ingest(run, **kwargs))


def _fewer_collections() -> None:
    """Let Python's cyclic garbage collector run less often for the rest of this process.

    An ingest allocates many small objects (its task graph, the store's metadata, zarr's async
    calls): on a Pythia-160m-shaped run of four checkpoints the collector ran 1,100 times for
    0.8 s, holding the GIL that the decomposing threads need between LAPACK calls; with the
    objects of the imports frozen and a young generation of 20,000 objects, 60 times for 0.18 s.
    The command line only: a library caller's process is left as it is.
    """
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _print_ingest(run: Path, report: IngestReport) -> None:
    for path, reason in report.bad:
        err.print(f"[yellow]skipped[/] {_e(path)}: {_e(reason)}")
    for name, original in report.duplicates:
        out.print(f"duplicate: {_e(name)} has the content of {_e(original)} (decomposed once)")
    for name, owners, n in report.shared:
        out.print(
            f"shared files: {_e(name)} has shards of {_e(', '.join(owners))}; {n} view(s) "
            "copied from there, not decomposed again"
        )
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


def _watch(run: Path, interval: float, report_html: bool, kwargs: dict[str, Any]) -> None:
    """`--watch`: print each pass that ingested something, and files seen still being written."""
    from specan.watch import watch

    said: set[Path] = set()

    def on_pass(report: IngestReport | None, writing: list[tuple[Path, str]]) -> None:
        if report is not None and report.computed:
            _print_ingest(run, report)
        for path, reason in writing:
            if path not in said:
                err.print(f"[dim]waiting[/] {_e(path)}: {_e(reason)}")
        said.clear()
        said.update(p for p, _ in writing)

    done = watch(run, interval=interval, report=report_html, on_pass=on_pass, **kwargs)
    why = {"finished": "the run finished", "interrupted": "interrupted"}.get(
        done.stopped, "stopped"
    )
    out.print(
        f"{_e(run)}: watch ended ({why}): {len(done.computed)} checkpoint(s) ingested in "
        f"{done.passes} pass(es), {len(done.bad)} bad"
        + (f", {done.reports} report(s) written" if done.reports else "")
        + (f" -> {_e(done.store)}" if done.store else "")
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
