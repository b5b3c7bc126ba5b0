"""`specan prune` and `specan lmc`: losses of models rebuilt through the run's own trainer."""

from __future__ import annotations

from pathlib import Path
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


LMC_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan lmc runs/vgg-lmc`",
        "- `specan lmc runs/vgg-lmc --split-epochs 0..4`",
        "- `specan lmc runs/vgg-lmc --split-epochs 0..4 --cross-trunk --format csv`",
    ]
)


@app.command(epilog=LMC_EXAMPLES)
def lmc(
    root: Annotated[
        Path,
        typer.Argument(
            help="An LMC folder written by `specan train vgg --lmc` (lmc.json, trunk-<t>/).",
            show_default=False,
        ),
    ],
    split_epochs: Annotated[
        str | None,
        typer.Option(
            "--split-epochs",
            help="Which split points, by epoch: `A..B` (inclusive, either end open) or a list "
            "(`0,0.2,1`). Default: all.",
        ),
    ] = None,
    cross_trunk: Annotated[
        bool,
        typer.Option(
            "--cross-trunk",
            help="The control: pair branches of one split and seed grown from different trunks.",
        ),
    ] = False,
    alphas: Annotated[
        int, typer.Option("--alphas", help="Evenly spaced α on each path, ends included.")
    ] = 11,
    device: DeviceOpt = "cpu",
    format: OutFormatOpt = OutFormat.table,
) -> None:
    """Linear-mode-connectivity barrier (Eqn 6) of branch endpoints at every split point.

    The training loss along the straight path between the last checkpoints of two branches,
    batch norm re-estimated on the training data at every α; the barrier is the largest excess
    over the chord at interior α (slightly negative when there is none), averaged over pairs.
    Beside it, the endpoint SVA (Eqn 5, mean of the top 10 S_ii, averaged over the model's
    weight matrices), from SVDs of the endpoints themselves.
    """
    from specan.lmc import barriers
    from specan.progress import for_console

    if alphas < 3:
        raise typer.BadParameter(f"'--alphas' needs at least 3 points (one interior), not {alphas}")
    ds = barriers(
        root, split_epochs=split_epochs, cross_trunk=cross_trunk, n=alphas,
        device=_device(device), progress=for_console(err, "lmc"),
    )  # fmt: skip
    b = ds["barrier"].values
    if format is not OutFormat.table:
        rows = [
            {"split_step": int(s), "split_epoch": float(ds["epoch"].values[i]), "pair": str(p),
             "barrier": float(b[i, j]), "sva": float(ds["sva"].values[i, j]),
             "train_loss": [float(x) for x in ds["train_loss"].values[i, j]]}
            for i, s in enumerate(ds["split"].values) for j, p in enumerate(ds["pair"].values)
        ]  # fmt: skip
        _emit_long(
            rows, format, ["split_step", "split_epoch", "pair", "barrier", "sva", "train_loss"]
        )
        return
    kind = "different trunks" if cross_trunk else "one trunk, different branch seeds"
    table = Table(title=f"LMC barrier (train loss), {_e(root)}: {kind}", title_justify="left")
    for col in ("split step", "epoch", "barrier mean", "std", "min", "max", "SVA mean", "pairs"):
        table.add_column(col, justify="right")
    for i, s in enumerate(ds["split"].values):
        row = b[i]
        table.add_row(
            str(int(s)), f"{float(ds['epoch'].values[i]):g}", f"{row.mean():.4g}",
            f"{row.std():.2g}", f"{row.min():.4g}", f"{row.max():.4g}",
            f"{ds['sva'].values[i].mean():.3f}", str(len(row)),
        )  # fmt: skip
    out.print(table)
