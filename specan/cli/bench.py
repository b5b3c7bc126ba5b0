"""`specan bench`: SVD throughput of this machine."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from specan.cli._app import (
    Format,
    FormatOpt,
    app,
    err,
    out,
)

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
            help="Also compare randomized top-k with scikit-learn and torch.svd_lowrank "
            "(specan with bfloat16 products beside float32 ones where the CPU has AMX).",
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
    except ValueError as e:  # e.g. --device cuda without CUDA: one line, exit code 2
        from specan.errors import OptionError

        raise OptionError(str(e)) from None
    if format is Format.json:
        out.print_json(json.dumps(result))
    else:
        for line in table_lines(result):
            out.print(line, markup=False)
