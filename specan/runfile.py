"""The two files a run folder holds beside its checkpoints, and their one reader (Contract 1).

    run.json        the trainer, its config, the model config, the alignment pairs
    metrics.jsonl   one JSON object per evaluation: step, epoch, losses, accuracies

Runs not written by specan's trainers may have neither: both readers then return empty results.
Everything in specan that needs these files (discovery, pairs, the analyses, the report, the
trainers' `build_model`) reads them through this module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specan.errors import RunFileError

__all__ = ["CONFIG", "METRICS", "metrics_at", "read_config", "read_config_text", "read_metrics"]

log = logging.getLogger(__name__)

CONFIG = "run.json"
METRICS = "metrics.jsonl"


def read_config_text(run: Path | str) -> str | None:
    """run.json as written (for showing it), or None when the run has none."""
    try:
        return (Path(run) / CONFIG).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def read_config(run: Path | str) -> dict[str, Any]:
    """run.json as a dict; ``{}`` when the run has none; RunFileError naming it when corrupt."""
    text = read_config_text(run)
    if text is None:
        return {}
    path = Path(run) / CONFIG
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise RunFileError(path, f"corrupt JSON ({e})") from e
    if not isinstance(obj, dict):
        raise RunFileError(path, "not a JSON object")
    return obj


def read_metrics(run: Path | str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl in file order (``[]`` when there is none).

    A line that is not a JSON object is skipped with a warning: a training killed mid-write leaves
    half a line, and the rest of the file is still good.
    """
    path = Path(run) / METRICS
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            log.warning("%s: skipping a line that is not a JSON object", path)
            continue
        records.append(rec)
    return records


def metrics_at(run: Path | str, steps: Sequence[int]) -> dict[str, list[float]]:
    """Each numeric metric at each of ``steps`` (NaN where that step was not evaluated).

    Names are sorted; ``step`` and ``epoch`` are not metrics. A step logged twice (a resumed
    training) keeps its last record.
    """
    by_step = {int(r.get("step", -1)): r for r in read_metrics(run)}
    names = sorted(
        {k for r in by_step.values() for k, v in r.items() if _number(v)} - {"step", "epoch"}
    )
    nan = float("nan")
    return {
        n: [float(v) if _number(v := by_step.get(int(s), {}).get(n)) else nan for s in steps]
        for n in names
    }


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
