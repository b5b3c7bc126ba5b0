"""The analyses specan knows, by name: what each reads, how it computes, how it is drawn and
summarised. `Run.analyse`, `specan compare --metric`, `specan plot` and `specan report` go through
this table, and so does the cache in the store's ``derived/``.

Adding an analysis is one module that defines an `Analysis` and one line in `ANALYSES` naming it
(``"name": "module:attribute"``); modules are imported only when their analysis is used, so this
table costs nothing on the CLI's start-up path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["ANALYSES", "Analysis", "get", "names"]

# name -> "module:attribute" of its `Analysis`. One line per analysis.
ANALYSES = {
    "rank": "specan.analysis:RANK",
    "align": "specan.analysis:ALIGN",
    "sva": "specan.analysis:SVA",
    "stable_rank": "specan.stable_rank:ANALYSIS",
    "prune": "specan.prune:ANALYSIS",
    "lmc": "specan.lmc:ANALYSIS",
}


@dataclass(frozen=True)
class Analysis:
    """One analysis of a run's store.

    ``compute(run)`` returns a Dataset whose ``value`` variable is ``(item, step)``, the number
    a figure draws and a comparison lines up (``item`` is ``view`` or ``pair``); it may carry
    more variables (diagonals, ...). ``reads`` names the store arrays it needs per view
    (``sigma``, ``tail``, ``U``, ``V``): a store without them is said to lack them, not crashed
    on. ``summary`` is the row label of its first -> last table line; ``bounds`` the figure's
    value range (None: from the data). `Run.analyse` keeps every result in ``derived/<name>``
    and recomputes it when ``version``, the store's checkpoints or views, run.json or a
    keyword named in ``params`` changed. ``figure``: how `specan plot` and the report draw it,
    a key of `specan.plots.FIGURES` ("heatmap": items x checkpoints; "lines": one line per item
    over steps; "rank", "align", "sva": the paper's figures of the built-ins). ``automatic``:
    False for an analysis too costly to run unasked (one that re-evaluates models): plot and
    report then draw only a result already cached by its own command or `Run.analyse`.

    ``depends(run)``, when given, names inputs outside the store; the cache key includes them.

    ``compute`` may take keywords: those in ``params`` change the result (a result per value
    is cached); any other (``progress``, ``device``) must leave it alone and is passed through.
    """

    name: str
    title: str
    reads: tuple[str, ...]
    compute: Callable[..., xr.Dataset]
    item: str = "view"
    summary: str = ""
    bounds: tuple[float, float] | None = None
    figure: str = "heatmap"
    version: int = 1  # bump when compute changes: cached results are then recomputed
    automatic: bool = True  # False: plot and report draw it only from the cache
    params: tuple[str, ...] = ()  # compute's keywords that change its result
    # what the result depends on outside the store (JSON-able, e.g. file signatures): part of
    # the cache key, so a change there recomputes it (lmc: its branches' endpoints)
    depends: Callable[..., Any] | None = None


def names() -> list[str]:
    """Every registered analysis, in table order."""
    return list(ANALYSES)


def get(name: str) -> Analysis:
    """The registered analysis ``name``; ValueError listing the known ones."""
    if name not in ANALYSES:
        raise ValueError(f"no analysis {name!r}; known: {', '.join(ANALYSES)}")
    module, _, attr = ANALYSES[name].partition(":")
    found: Any = getattr(importlib.import_module(module), attr)
    return found
