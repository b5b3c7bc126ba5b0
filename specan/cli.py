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

out = Console(highlight=False)  # results
err = Console(stderr=True, highlight=False)  # progress, warnings, errors


class Family(str, Enum):
    auto = "auto"
    mlp = "mlp"
    vgg = "vgg"
    lstm = "lstm"
    transformer = "transformer"
    neox = "neox"


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
            help="Attention heads, for the per-head Q/K views. Default: from run.json or "
            "config.json.",
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
    from specan.pipeline import IngestOptions
    from specan.pipeline import ingest as run_ingest
    from specan.progress import for_console

    if no_vectors and top_k:
        raise typer.BadParameter("'--no-vectors' cannot be used with '--top-k'.")
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
        family=family.value if family else None,
        layers=layers,
        heads=heads,
        rules=rules or None,
        strict=strict,
        backend=backend,
        vector_dtype=vector_dtype,
        overwrite=overwrite,
        workers=workers,
    )
    report = run_ingest(run, opts, for_console(err))
    for path, reason in report.bad:
        err.print(f"[yellow]skipped[/] {path}: {reason}")
    if report.computed:
        out.print(
            f"{run}: {len(report.computed)} checkpoint(s) ingested "
            f"({len(report.changed)} changed), {report.unchanged} unchanged, "
            f"{report.views} views, {report.bytes_read / 2**20:.1f} MB in {report.seconds:.1f} s "
            f"-> {report.store}"
        )
    else:
        out.print(
            f"{run}: up to date ({report.unchanged} checkpoints, {report.views} views) "
            f"-> {report.store}"
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
    out.print(f"[bold]{s['path']}[/]  schema {s['schema_version']}, specan {s['specan_version']}")
    k = s["kernel"]
    out.print(
        f"checkpoints: {ck['done']} done"
        + (f", {ck['pending']} unfinished" if ck["pending"] else "")
        + (f", steps {ck['first_step']} … {ck['last_step']}" if ck["done"] else "")
        + f"   kernel: {k.get('backend')}, top-k {k.get('top_k') or 'all'}, "
        f"vectors {'yes' if k.get('vectors') else 'no'} ({k.get('vector_dtype')})"
        + f"   size: {s['bytes'] / 2**20:.1f} MB"
    )
    table = Table(title=f"{len(s['views'])} views", title_justify="left")
    for col in ("view", "rule", "matrix", "heads", "k", "MB"):
        table.add_column(col, justify="right" if col in ("heads", "k", "MB") else "left")
    for v in s["views"]:
        name = v["param"] if v["key"] == v["param"] else f"{v['param']} [dim]({v['key']})[/]"
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
        out.print(f"[yellow]bad file[/] {b['path']}: {b['reason']}")


# -- demo -------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n- `specan demo`\n\n- `specan demo --out /tmp/demo`")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo run is written.")] = Path(
        "runs/demo"
    ),
    checkpoints: Annotated[
        int, typer.Option("--checkpoints", min=2, help="How many checkpoints to write.")
    ] = 20,
) -> None:
    """The built-in default: write a small run (linear, conv, LSTM, attention), ingest, report."""
    from specan.demo import write_synthetic_run
    from specan.pipeline import IngestOptions
    from specan.pipeline import ingest as run_ingest
    from specan.progress import for_console

    err.print(f"writing {checkpoints} checkpoints of the synthetic demo model to {out_dir}")
    write_synthetic_run(out_dir, checkpoints=checkpoints)
    report = run_ingest(out_dir, IngestOptions(), for_console(err))
    out.print(
        f"ingested {len(report.computed)} checkpoint(s) ({report.unchanged} already there) "
        f"in {report.seconds:.1f} s"
    )
    info(out_dir, Format.table)


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
    name: Annotated[str, typer.Argument(help="Trainer: grokking.", show_default=False)] = "",
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
    module.main([*ctx.args])


# -- entry point ------------------------------------------------------------------------------
def main() -> None:
    """Console-script entry: known errors become one line on stderr and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SpecanError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        err.print(f"[red]error:[/] {e}", soft_wrap=True)
        err.print("[dim](set SPECAN_DEBUG=1 for the traceback)[/]")
        sys.exit(e.exit_code)
    except OSError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        err.print(f"[red]error:[/] {where}{e.strerror or e}", soft_wrap=True)
        sys.exit(5)


if __name__ == "__main__":
    main()
