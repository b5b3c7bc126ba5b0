"""What every `specan` command shares: the Typer app, the two consoles, options and output helpers.

Only typer, rich and the standard library are imported here at module level: `specan --help` and a
no-op re-ingest must not pay for torch, dask or zarr. Each command imports what it needs.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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


class By(str, Enum):
    step = "step"
    epoch = "epoch"


# The library speaks of its arguments; a user of the command line reads the flags that set them.
ARGUMENT_FLAGS = (
    ("overwrite=True, keeping vectors", "--overwrite and without --no-vectors"),
    ("overwrite=True", "--overwrite"),
    ("heads=N", "--heads N"),
    ("the layers selection", "--layers"),
    ("limit=0", "--max-figures 0"),
    ("store=PATH", "--store PATH"),
    ("the backend argument", "--backend"),
    ("the scheduler argument", "--scheduler"),
    ("the split_epochs argument", "--split-epochs"),
    ("the cross_trunk argument", "--cross-trunk"),
    ("device='cuda'", "--device cuda"),
)


def for_cli(message: object) -> str:
    """A library message with its argument names replaced by the CLI flags that set them."""
    text = str(message)
    for argument, flag in ARGUMENT_FLAGS:
        text = text.replace(argument, flag)
    return text


class FlagsFilter(logging.Filter):
    """Logged library warnings (figures left out, ...) as a CLI user reads them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = for_cli(record.getMessage()), None
        return True
