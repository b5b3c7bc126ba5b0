"""One self-contained HTML page per run (or per comparison of runs): config, summary, figures;
and the figures of a run as files. Here the registered analyses are run (`analyse`, through
`Run.analyse`); `specan.plots` only draws them.

Figures come from `specan.plots` and are embedded as base64 PNG; the page needs no other file.
Every piece of text from the run (names, config, metrics) goes through `escape`: `html.escape`,
and control characters (a NUL in a tensor name) that HTML does not allow become U+FFFD.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specan import plots, runfile
from specan.errors import RunFileError, StoreError
from specan.order import views_in_model_order

if TYPE_CHECKING:
    from specan.api import Run
    from specan.comparison import Comparison
    from specan.views import StoredView

log = logging.getLogger(__name__)

# C0 controls but tab, newline and carriage return, and DEL: not allowed in an HTML document
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), 0x7F] if c not in (0x09, 0x0A, 0x0D)}


def escape(text: str) -> str:
    """``text`` safe inside HTML: markup escaped, forbidden control characters replaced."""
    return html.escape(text).translate(_CONTROLS)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.notes li { color: #8a5a00; }
.cols { display: grid; gap: 1.5em; }
.cols > div { min-width: 0; }
.scroll { overflow-x: auto; }
"""


@dataclass
class Analyses:
    """One run's registered analyses (name -> Dataset), its metrics at its checkpoints, the
    store's views, and why any figure will be missing."""

    run: Run
    name: str
    views: dict[str, StoredView]
    metrics: dict[str, np.ndarray]  # name -> [T] at the run's steps, NaN where not evaluated
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyse(run: Path | str | Run) -> Analyses:
    """Every registered analysis of a run, through `Run.analyse` (so cached in its store);
    one that cannot be done becomes a note. Those not ``automatic`` come from the cache only."""
    from specan import registry, runfile
    from specan.api import Run

    opened = run if isinstance(run, Run) else Run(run)
    views = views_in_model_order(opened._store.views)
    values = runfile.metrics_at(opened.path, opened.steps.tolist())
    out = Analyses(opened, opened.name, dict(views), {n: np.array(v) for n, v in values.items()})
    if not any(np.isfinite(v).any() for v in out.metrics.values()):
        out.notes.append("no metrics.jsonl values at the checkpoints' steps: loss figure skipped")
    for name in registry.names():
        a = registry.get(name)
        try:
            ds = opened.analyse(name, compute=a.automatic)
        except StoreError as e:
            out.notes.append(f"{a.title} skipped: {e}")
            continue
        if ds is None:
            out.notes.append(f"{a.title}: not computed yet (run `specan {name}` first)")
            continue
        if not ds.sizes[a.item]:
            why = f" ({ds.attrs['rule']})" if "rule" in ds.attrs else ""
            out.notes.append(f"{a.title} skipped: no {a.item} could be computed{why}")
        for why in ds.attrs.get("skipped", []):
            out.notes.append(f"{a.title}: {a.item} {why} (skipped)")
        out.results[name] = ds
    return out


def save_all(
    run: Path | str,
    out_dir: Path | str,
    *,
    svg: bool = False,
    views: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Path]:
    """Run the analyses and write every figure as ``<out_dir>/<name>.png`` (and ``.svg``).

    Figures without data, and those beyond ``limit`` per kind (see `plots.figures`), are skipped,
    each with a logged reason. Returns the written paths.
    """
    an = analyse(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for plot in plots.figures(an, views=views, limit=limit):
        for ext in ("png", "svg") if svg else ("png",):
            path = out / f"{plot.name}.{ext}"
            plot.figure.savefig(path, format=ext)
            paths.append(path)
    for note in an.notes:
        log.warning("%s: %s", an.name, note)
    return paths


TABLED = ("rank", "align", "sva")  # the analyses with tables of their own on the page


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None or not np.isfinite(x) else format(float(x), fmt)


def _first_last(v: np.ndarray) -> tuple[float | None, float | None]:
    ok = np.asarray(v, dtype=float)
    ok = ok[np.isfinite(ok)]
    return (float(ok[0]), float(ok[-1])) if ok.size else (None, None)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: int = 0) -> str:
    """An HTML table; cells are escaped here, the last ``numeric`` columns right-aligned."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = []
    for row in rows:
        n = len(row)
        cells = "".join(
            f'<td class="num">{escape(c)}</td>' if i >= n - numeric else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    table = f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def summary_html(an: Analyses) -> str:
    """Summary tables: views (rank first -> last, SVA at the start), pairs, metrics, and the
    first -> last mean of every other registered analysis."""
    rk = an.results["rank"]
    agreement, alignment = an.results.get("sva"), an.results.get("align")
    sva_start = {}
    if agreement is not None and agreement.sizes["step"]:
        sva_start = dict(zip(agreement["view"].values.tolist(),
                             agreement["value"].values[:, 0].tolist(), strict=True))  # fmt: skip
    rows = []
    for i, key in enumerate(rk["view"].values.tolist()):
        v = an.views[key]
        shape = "×".join(str(d) for d in v.shape) + (f" ×{v.heads} heads" if v.heads else "")
        first, last = _first_last(rk["value"].values[i])
        change = None if first is None or last is None else last - first
        rows.append(
            [
                key,
                str(rk["param"].values[i]),
                str(rk["rule"].values[i]),
                shape,
                _num(first),
                _num(last),
                _num(change, "+.3f"),
                _num(sva_start.get(key)),
            ]
        )
    parts = [
        f"<h3>Views ({len(rows)})</h3>",
        _table(
            [
                "view",
                "param",
                "rule",
                "shape",
                "erank first",
                "erank last",
                "change",
                "SVA at start",
            ],
            rows,
            numeric=4,
        ),
        "<p>erank: normalised effective rank (Eqn 1-2); SVA at start: s(t) at the first "
        "checkpoint against "
        + escape(agreement.attrs["reference"] if agreement else "the final checkpoint")
        + ".</p>",
    ]
    if alignment is not None and alignment.sizes["pair"]:
        pairs = [
            [str(label), *map(_num, _first_last(score))]
            for label, score in zip(alignment["pair"].values, alignment["value"].values,
                                    strict=True)
        ]  # fmt: skip
        parts += [
            "<h3>Alignment of consecutive layers (Eqn 4)</h3>",
            _table(["pair", "score first", "score last"], pairs, numeric=2),
            f"<p>{escape(alignment.attrs['rule'])}.</p>",
        ]
    if an.metrics:
        mrows = [
            [n, *(_num(x, ".4g") for x in _first_last(v))] for n, v in sorted(an.metrics.items())
        ]
        parts += ["<h3>Metrics</h3>", _table(["metric", "first", "last"], mrows, numeric=2)]
    others = {n: ds for n, ds in an.results.items() if n not in TABLED}
    if others:
        from specan import registry

        xrows = []
        for name, ds in others.items():
            a = registry.get(name)
            mean = ds["value"].mean(dim=a.item).values
            xrows.append([a.summary or a.title, *map(_num, _first_last(mean))])
        parts += ["<h3>Other analyses</h3>", _table(["analysis", "first", "last"], xrows, 2)]
    if an.notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in an.notes)
        parts.append(f'<h3>Notes</h3><ul class="notes">{items}</ul>')
    return "\n".join(parts)


def _img(plot: plots.Plot) -> str:
    data = base64.b64encode(plots.png_bytes(plot.figure)).decode("ascii")
    return (
        f'<figure id="{escape(plot.name)}"><img alt="{escape(plot.name)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{escape(plot.caption)}</figcaption>'
        "</figure>"
    )


def _config_html(run: Path) -> str:
    text = runfile.read_config_text(run)
    if text is None:
        return "<p>No run.json.</p>"
    try:
        text = json.dumps(runfile.read_config(run), indent=2)
    except RunFileError as e:
        log.warning("%s; shown as it is", e)
    return f"<details><summary>Run config (run.json)</summary><pre>{escape(text)}</pre></details>"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _write(out: Path, text: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def write_report(run: Path | str, out: Path | str | None = None) -> Path:
    """Write the run's report (default ``<run>/report.html``) and return its path."""
    run = Path(run)
    out = Path(out) if out is not None else run / "report.html"
    an = analyse(run)
    figs = "\n".join(_img(p) for p in plots.figures(an))
    body = (
        f"<p>Run folder: <code>{escape(str(run.resolve()))}</code></p>\n{_config_html(run)}\n"
        f"<h2>Summary</h2>\n{summary_html(an)}\n<h2>Figures</h2>\n{figs}"
    )
    return _write(out, _page(f"specan report: {an.name}", body))


def comparison_figures(c: Comparison) -> list[plots.Plot]:
    """The runs on shared axes: losses above the mean effective rank, every view's effective
    rank, and (when the runs differ in one numeric setting) the final rank against it."""
    rank = c.rank()
    metrics = {name: run.metrics for name, run in zip(c.names, c.runs, strict=True)}
    result = c.result("rank")
    figs = [
        plots.Plot(
            "compare_loss_rank",
            "Losses and accuracies (top; colour: run, line style: metric) above each run's mean "
            "normalised effective rank over its weight matrices (bottom), on shared axes.",
            plots.compare_overview(
                metrics, rank, title=f"{' vs '.join(c.names)}: loss and effective rank"
            ),
        ),
        plots.Plot(
            "compare_rank",
            f"Normalised effective rank of each view, one line per run, on the {c.by}s every run "
            "has (the first panel: the mean over the model's weight matrices).",
            plots.compare_lines(result, title="effective rank per view", ylabel="erank"),
        ),
    ]
    setting = swept(c)
    if setting is not None:
        name, values = setting
        figs.append(
            plots.Plot(
                "compare_final",
                f"Final normalised effective rank of each view against {name}, the one setting "
                "in which the runs differ (red: the mean over weight matrices).",
                plots.final_vs_setting(
                    result, name, values, title=f"final effective rank vs {name}"
                ),
            )
        )
    return figs


def swept(c: Comparison) -> tuple[str, list[float]] | None:
    """(name, value per run) of the one numeric setting the runs differ in, else None."""
    differ = c.settings()
    if len(differ) != 1:
        return None
    ((name, values),) = differ.items()
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    return name, [float(v) for v in values]


def write_comparison(runs: Sequence[Path | str], out: Path | str, *, by: str = "step") -> Path:
    """One page comparing runs on shared axes (matched by ``by``; when they share no step, by
    epoch), above each run's summary."""
    from specan.comparison import compare
    from specan.errors import RunsMismatchError

    try:
        c = compare(runs, by=by)
    except RunsMismatchError:
        if by != "step":
            raise
        c = compare(runs, by="epoch")
    rank = c.rank()
    differ = c.settings()
    head = []
    for i, (name, run) in enumerate(zip(c.names, c.runs, strict=True)):
        first, last = _first_last(rank.model_mean.isel(run=i).values)
        m = run.metrics
        finals = [f"{n} {_num(_first_last(m[n].values)[1], '.4g')}" for n in sorted(m.data_vars)]
        settings = [str(v[i]) for v in differ.values()]
        head.append([name, *settings, _num(first), _num(last), ", ".join(finals) or "—"])
    cols = ["run", *differ, "mean erank first", "mean erank last", "final metrics"]
    figs = "\n".join(_img(p) for p in comparison_figures(c))
    notes = "".join(f"<li>{escape(n)}</li>" for n in c.dropped)
    summaries = []
    for name, run in zip(c.names, c.runs, strict=True):
        an = analyse(run)
        summaries.append(f"<div><h2>{escape(name)}</h2>{summary_html(an)}</div>")
    body = (
        _table(cols, head, numeric=0)
        + (f'<h3>Left out</h3><ul class="notes">{notes}</ul>' if notes else "")
        + f"\n<h2>Figures</h2>\n{figs}\n"
        + f'<div class="cols" style="grid-template-columns: repeat({len(summaries)}, 1fr)">'
        + "\n".join(summaries)
        + "</div>"
    )
    return _write(Path(out), _page(f"specan comparison: {' vs '.join(c.names)}", body))
