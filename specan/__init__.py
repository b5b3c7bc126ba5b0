"""specan: spectral dynamics of neural-network weights, from checkpoints to figures.

The public API, a handful of verbs and one run object::

    import specan
    run = specan.open("runs/grok-wd1")        # reads no array data
    run.steps, run.views, run.metrics          # what is there
    run.sigma("attn.in_proj_weight")           # lazy xarray.DataArray (step, index)
    run.rank(), run.align(), run.sva()         # xarray results
    specan.ingest("runs/vgg", top_k=128)
    specan.compare(["runs/grok-wd0", "runs/grok-wd1"]).rank()

Names are imported on first use: ``import specan`` stays as cheap as the CLI's start-up needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Comparison", "Run", "compare", "ingest", "open"]

_HOME = {"Run": "specan.api", "open": "specan.api", "ingest": "specan.api",
         "compare": "specan.comparison", "Comparison": "specan.comparison"}  # fmt: skip

if TYPE_CHECKING:
    from specan.api import Run, ingest, open
    from specan.comparison import Comparison, compare


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'specan' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
