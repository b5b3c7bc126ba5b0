"""`specan prune`: losses of models rebuilt from a run (its trainer's model and data)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from specan.cli._app import OutFormat, OutFormatOpt, RunArg, StepsOpt, _e, _emit_long, app, err, out

KEEPS = ("full", "top-half", "bottom-half")
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where the models are evaluated: cpu, cuda, cuda:1, ...")
]

PRUNE_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan prune runs/vgg`",
        "- `specan prune runs/vgg --sv top-half --steps 0:5000 --format csv`",
        "- `specan prune runs/vgg --device cuda`",
    ]
)


def _device(name: str) -> str:
    from specan.errors import OptionError
    from specan_trainers.checkpoint import OptionValueError, resolve_device

    try:
        return str(resolve_device(name))
    except OptionValueError as e:
        raise OptionError(str(e)) from None


@app.command(epilog=PRUNE_EXAMPLES)
def prune(
    run: RunArg,
    sv: Annotated[
        str,
        typer.Option(
            "--sv",
            help="Which models, comma-separated: full (the checkpoint), top-half (each weight "
            "but the output layer rebuilt from its top ⌈R/2⌉ singular triplets), bottom-half "
            "(from the rest).",
        ),
    ] = ",".join(KEEPS),
    steps: StepsOpt = None,
    device: DeviceOpt = "cpu",
    format: OutFormatOpt = OutFormat.table,
) -> None:
    """Training and validation loss of singular-value-pruned models at every checkpoint
    (SPEC §2, Fig. 4).

    RUN must be written by `specan train`: its trainer rebuilds the model and its data. The
    SVD is recomputed from each checkpoint in float64 (the bottom half needs every singular
    vector, which a store of the top k does not hold); batch norm is re-estimated on the
    training data after pruning. With a store (`specan ingest`), all three models are
    evaluated at the store's checkpoints and cached there for `plot` and `report`.
    """
    import numpy as np

    import specan
    from specan import store
    from specan.analysis import select_steps
    from specan.errors import OptionError
    from specan.progress import for_console
    from specan.prune import prune_losses

    keeps = [k.strip() for k in sv.split(",") if k.strip()]
    bad = [k for k in keeps if k not in KEEPS]
    if bad or not keeps:
        raise typer.BadParameter(f"'--sv' takes {', '.join(KEEPS)}, not {sv!r}")
    dev = _device(device)
    progress = for_console(err, "prune")
    if store.store_path(run).exists():
        ds = specan.open(run).analyse("prune", progress=progress, device=dev).sel(keep=keeps)
    else:
        ds = prune_losses(run, keeps=keeps, device=dev, progress=progress)
    try:
        cols = select_steps(ds["step"].values, steps)
    except ValueError as e:
        raise OptionError(f"--steps: {e}") from None
    ds = ds.isel(step=cols)
    names = [n for n in ds.data_vars if n != "value"]
    if format is not OutFormat.table:
        fields = ["keep", "step", "epoch", *names]
        rows = [
            {"keep": k, "step": int(s), "epoch": float(ds["epoch"].values[t]),
             **{n: float(ds[n].sel(keep=k).values[t]) for n in names}}
            for k in keeps for t, s in enumerate(ds["step"].values)
        ]  # fmt: skip
        _emit_long(rows, format, fields)
        return
    table = Table(title=f"loss of SV-pruned models, {_e(run)}", title_justify="left")
    table.add_column("step", justify="right")
    shown = [n for n in names if "loss" in n]
    for n in shown:
        for k in keeps:
            table.add_column(f"{n} {k}", justify="right")
    picks = np.arange(len(cols))
    if len(picks) > 25:
        picks = picks[np.linspace(0, len(picks) - 1, 25).astype(int)]
    for t in picks:
        cells = [f"{float(ds[n].sel(keep=k).values[t]):.4g}" for n in shown for k in keeps]
        table.add_row(str(int(ds["step"].values[t])), *cells)
    out.print(table)
