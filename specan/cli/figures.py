"""`specan plot` and `specan report`: figures and HTML pages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from specan.cli._app import (
    RunArg,
    app,
    out,
)

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
    from specan.report import save_all

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
