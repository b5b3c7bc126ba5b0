"""`specan demo` and `specan train`: the trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from specan.cli._app import (
    app,
    err,
    for_cli,
    out,
)


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
    result = run_grokking_demo(
        out_dir, lambda name: for_console(err, f"ingest {name}", translate=for_cli)
    )
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

- `python -m specan_trainers.grokking --help` : the same trainer without the CLI
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
    from specan_trainers import trainer_module

    try:
        module = trainer_module(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None
    from specan.errors import OptionError
    from specan_trainers.checkpoint import OptionValueError, finish_runs
    from specan_trainers.data import DataError

    try:
        finish_runs(module.main, [*ctx.args])
    except (DataError, FileExistsError, OptionValueError) as e:
        # a bad --data path, an unavailable --device, or --out holding another run
        raise OptionError(str(e)) from None
