"""Stable rank ``‖W‖_F² / ‖W‖_2²`` of every view over training, divided by R = min(m, n).

In (0, 1] like the normalised effective rank, and exact from a top-k store too: the Frobenius
norm is the stored σ² plus the stored tail energy. Per-head views: the mean over heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from specan.registry import Analysis

if TYPE_CHECKING:
    import xarray as xr

    from specan.api import Run


def compute(run: Run) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    rows = []
    for view in run.views:
        sigma = run.sigma(view)
        s = sigma.values.astype(np.float64)  # [T, (H,) R]
        energy = (s**2).sum(axis=-1) + np.nan_to_num(run.tail(view).values.astype(np.float64))
        top = s[..., 0] ** 2
        ratio = np.divide(energy, top, out=np.zeros_like(energy), where=top > 0)
        ratio /= min(sigma.attrs["shape"])
        rows.append(ratio.mean(axis=1) if ratio.ndim == 2 else ratio)
    values = np.array(rows).reshape(len(rows), len(run.steps))
    return xr.Dataset(
        {"value": (("view", "step"), values)},
        coords={"view": run.views, "step": run.steps, "epoch": ("step", run.epochs)},
    )


ANALYSIS = Analysis(
    name="stable_rank",
    title="normalised stable rank",
    reads=("sigma", "tail"),
    compute=compute,
    summary="mean stable rank",
    bounds=(0.0, 1.0),
)
