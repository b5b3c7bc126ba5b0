"""`specan prune` and `specan lmc`: losses of models rebuilt through the run's own trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from specan.cli._app import (
    OutFormat,
    OutFormatOpt,
    RunArg,
    StepsOpt,
    _e,
    _emit_long,
    app,
    err,
    for_cli,
    out,
)

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
    progress = for_console(err, "prune", translate=for_cli)
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
        "- `specan lmc runs/vgg-perturb --plot figs/` : barrier vs perturbation size, figures",
    ]
)


@app.command(epilog=LMC_EXAMPLES)
def lmc(
    root: Annotated[
        Path,
        typer.Argument(
            help="An LMC folder written by `specan train vgg --lmc` (lmc.json, trunk-<t>/), "
            "with or without --perturb.",
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
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write the figures here: barrier, endpoint SVA and SVA per layer against "
            "the split (or η), as PNG.",
        ),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache", help="Keep the result in ROOT/specan.zarr and reuse it."
        ),
    ] = True,
    device: DeviceOpt = "cpu",
    format: OutFormatOpt = OutFormat.table,
) -> None:
    """Linear-mode-connectivity barrier (Eqn 6) of branch endpoints at every split point, or at
    every perturbation size of a `--perturb` folder.

    The training loss along the straight path between the last checkpoints of two branches,
    batch norm re-estimated on the training data at every α; the barrier is the largest excess
    over the chord at interior α (slightly negative when there is none), averaged over pairs.
    Beside it, the endpoint SVA (Eqn 5, mean of the top 10 S_ii, averaged over the model's
    weight matrices), from SVDs of the endpoints themselves. The result is cached in
    ROOT/specan.zarr and recomputed when a branch's last checkpoint changes.

    Run on every split with the default path (no --split-epochs, --cross-trunk or --alphas),
    it also keeps each ingested trunk's share in the trunk's store, as the registered analysis
    `lmc`: `specan plot` and `specan report` of the trunk then draw it, and
    `specan.open(trunk).analyse("lmc")` returns it.
    """
    from specan.lmc import ALPHAS, barriers, store_trunks
    from specan.progress import for_console

    if alphas < 3:
        raise typer.BadParameter(f"'--alphas' needs at least 3 points (one interior), not {alphas}")
    dev = _device(device)
    ds = barriers(
        root, split_epochs=split_epochs, cross_trunk=cross_trunk, n=alphas, device=dev,
        progress=for_console(err, "lmc", translate=for_cli), cache=cache,
    )  # fmt: skip
    if cache and split_epochs is None and not cross_trunk and alphas == ALPHAS:
        stored, bare = store_trunks(root, device=dev)
        for path in stored:
            err.print(f"kept for plot and report in {_e(path)}'s store")
        for path in bare:
            err.print(f"{_e(path)} has no store: `specan ingest` it to plot and report it")
    if plot is not None:
        from specan.lmc_plots import save_figures

        for path in save_figures(ds, plot, name="lmc-cross" if cross_trunk else "lmc"):
            err.print(f"wrote {_e(path)}")
    b = ds["barrier"].values
    perturbed = "eta" in ds.dims
    groups = ds["eta"].values if perturbed else ds["split"].values

    def lead(i: int) -> dict[str, float | int]:
        if perturbed:
            return {"eta": float(groups[i]), "split_step": int(ds["split"]),
                    "split_epoch": float(ds["epoch"])}  # fmt: skip
        return {"split_step": int(groups[i]), "split_epoch": float(ds["epoch"].values[i])}

    if format is not OutFormat.table:
        rows = [
            {**lead(i), "pair": str(p), "barrier": float(b[i, j]),
             "sva": float(ds["sva"].values[i, j]),
             "train_loss": [float(x) for x in ds["train_loss"].values[i, j]]}
            for i in range(len(groups)) for j, p in enumerate(ds["pair"].values)
        ]  # fmt: skip
        fields = [*lead(0), "pair", "barrier", "sva", "train_loss"]
        _emit_long(rows, format, fields)
        return
    kind = "different trunks" if cross_trunk else "one trunk, different branch seeds"
    if perturbed:
        kind += f", perturbed at epoch {float(ds['epoch']):g} (step {int(ds['split'])})"
    table = Table(title=f"LMC barrier (train loss), {_e(root)}: {kind}", title_justify="left")
    first = ("η",) if perturbed else ("split step", "epoch")
    for col in (*first, "barrier mean", "std", "min", "max", "SVA mean", "pairs"):
        table.add_column(col, justify="right")
    for i, g in enumerate(groups):
        row = b[i]
        cells = [f"{float(g):g}"] if perturbed else [str(int(g)), f"{float(ds['epoch'][i]):g}"]
        table.add_row(
            *cells, f"{row.mean():.4g}", f"{row.std():.2g}", f"{row.min():.4g}",
            f"{row.max():.4g}", f"{ds['sva'].values[i].mean():.3f}", str(len(row)),
        )  # fmt: skip
    out.print(table)


TICKET_EXAMPLES = "Examples:\n\n" + "\n\n".join(
    [
        "- `specan ticket runs/vgg-ticket`",
        "- `specan ticket runs/vgg-ticket --format csv`",
    ]
)


@app.command(epilog=TICKET_EXAMPLES)
def ticket(run: RunArg, format: OutFormatOpt = OutFormat.table) -> None:
    """A lottery ticket's mask against the weights it came from (SPEC §4): per masked weight
    matrix, the fraction kept and the SVA (Eqn 5, mean of the top 10 S_ii) between the source
    run's final weights W_T and m ⊙ W_T.

    RUN is a run written by `specan train vgg --ticket magnitude|random --from SOURCE`. For the
    retrained ticket against the dense run, checkpoint by checkpoint, use
    `specan sva RUN --against SOURCE`.
    """
    from specan.prune import mask_agreement

    ds = mask_agreement(run)
    views = [str(v) for v in ds["view"].values]
    if format is not OutFormat.table:
        rows = [
            {"view": v, "density": float(ds["density"].values[i]),
             "score": float(ds["score"].values[i])}
            for i, v in enumerate(views)
        ]  # fmt: skip
        _emit_long(rows, format, ["view", "density", "score"])
        return
    title = (
        f"{ds.attrs['ticket']} mask of {_e(run)} (kept {ds.attrs['sparsity']:g} of the weights): "
        f"SVA of W_T and m ⊙ W_T, W_T = {_e(ds.attrs['source'])} at step {ds.attrs['step']}"
    )
    table = Table(title=title, title_justify="left")
    for col in ("view", "kept", "SVA score"):
        table.add_column(col, justify="left" if col == "view" else "right")
    for i, v in enumerate(views):
        table.add_row(v, f"{ds['density'].values[i]:.4f}", f"{ds['score'].values[i]:.3f}")
    table.add_row("mean", "", f"{ds.attrs['mean']:.3f}")
    out.print(table)
