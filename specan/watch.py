"""Follow a training run: ingest each checkpoint as it lands, until the run says it has finished.

Each pass is an ordinary incremental ingest (`specan.api.ingest`), so a pass that finds nothing
new reads no tensor and takes no lock, and stopping between passes, or inside one, leaves the store
as an interrupted ingest does: readable, completed by the next ingest. Files still being written
are left out by discovery (`specan.runs`, ``Run.writing``) and taken by a later pass. The run ends
with the trainers' end marker (``finished.json``, written after the last checkpoint); it is looked
for before a pass, so the pass that sees it also ingests the last checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specan import runs, store
from specan.errors import EmptyRunError
from specan.pipeline import IngestReport, Progress
from specan_trainers.checkpoint import FINISHED


@dataclass
class WatchReport:
    """What a watch did; ``stopped`` says why it ended: "finished", "interrupted" or "stopped"."""

    store: Path | None = None
    passes: int = 0
    computed: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # as the last pass reported them
    reports: int = 0  # HTML reports written
    stopped: str = ""


def still_writing(root: Path | str, store_at: Path | str | None = None) -> list[tuple[Path, str]]:
    """The checkpoint files of a run that are still being written, with why, as discovery sees them.

    Parameters
    ----------
    root : path
        The run folder.
    store_at : path, optional
        Its store, when not ``<root>/specan.zarr``: files it vouches for are not opened again.

    Returns
    -------
    list of (path, reason)
        Empty when every file is complete, or when the run has no checkpoint at all yet.
    """
    attrs = store.read_attrs(Path(store_at) if store_at else store.store_path(root)) or {}
    known = {c["name"]: (c["size"], c["mtime_ns"], c["step"], c["epoch"])
             for c in attrs.get("checkpoints", [])}  # fmt: skip
    try:
        return list(runs.discover(root, known=known).writing)
    except EmptyRunError:
        return []


def watch(
    path: Path | str,
    *,
    interval: float = 5.0,
    report: bool | Path | str = False,
    progress: Progress | None = None,
    on_pass: Callable[[IngestReport | None, list[tuple[Path, str]]], None] | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> WatchReport:
    """Ingest a run's checkpoints as a training writes them, until it finishes or is stopped.

    Parameters
    ----------
    path : path
        The run folder; it must exist, its first checkpoint need not yet.
    interval : float
        Seconds between passes over the folder.
    report : bool or path
        Rewrite the HTML report (`specan.report.write_report`) after each pass that ingested
        something: True for ``report.html`` beside the store, or the file to write.
    progress : Progress, optional
        Receives each pass's progress, as in `specan.api.ingest`.
    on_pass : callable, optional
        Called after each pass with its `IngestReport` (None while the run has no complete
        checkpoint) and the files still being written.
    stop : threading.Event, optional
        Set it to end the watch after the pass under way.
    **options
        The options of `specan.api.ingest` (``top_k``, ``store``, ``workers``, ...).

    Returns
    -------
    WatchReport
        What was ingested over all passes, and why the watch ended. Ctrl-C ends it too
        (``stopped="interrupted"``): the store lock is released and the store stays readable.
    """
    from specan.api import ingest

    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    root = Path(path)
    stop = stop or threading.Event()
    done = WatchReport()
    try:
        while True:
            finished = (root / FINISHED).is_file()  # before the pass: it then sees the last one
            try:
                rep: IngestReport | None = ingest(root, progress=progress, **options)
            except EmptyRunError:
                rep = None  # nothing complete yet
            done.passes += 1
            if rep is not None:
                options["overwrite"] = False  # the store is replaced once, not at every pass
                done.store, done.bad = rep.store, rep.bad
                done.computed += rep.computed
                if rep.computed and report:
                    from specan.report import write_report

                    out = rep.store.parent / "report.html" if report is True else Path(report)
                    write_report(rep.store, out)
                    done.reports += 1
            if on_pass is not None:
                on_pass(rep, still_writing(root, options.get("store")))
            if finished:
                done.stopped = "finished"
                break
            if stop.wait(interval):
                done.stopped = "stopped"
                break
    except KeyboardInterrupt:
        done.stopped = "interrupted"
    return done
