"""The stable rank, a registered analysis: against NumPy float64 from the raw weights, through
every path the registry gives it (the API, the cache, `specan compare`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_analysis import MATRICES, STEPS, write_run
from typer.testing import CliRunner

import specan
from specan.cli import app

xr = pytest.importorskip("xarray")


def stable_rank(w: np.ndarray) -> float:
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    return float((np.asarray(w, dtype=np.float64) ** 2).sum() / s[0] ** 2 / len(s))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict]]:
    root = tmp_path_factory.mktemp("stable_rank")
    return [root / "a", root / "b"], [
        write_run(root / "a", STEPS, 0),
        write_run(root / "b", STEPS, 5),
    ]


def test_stable_rank_against_numpy_and_cached(runs: tuple[list[Path], list[dict]]) -> None:
    (root, _), (raw, _) = runs
    ds = specan.open(root).analyse("stable_rank")
    for step in STEPS:
        for name in MATRICES:
            got = float(ds["value"].sel(view=name, step=step))
            assert got == pytest.approx(stable_rank(raw[step][name]), rel=1e-5)
        # per-head views: the mean over heads
        q = raw[step]["block.self_attn.in_proj_weight"][:16].reshape(4, 4, 16)
        want = np.mean([stable_rank(h) for h in q])
        got = float(ds["value"].sel(view="block.self_attn.in_proj_weight__q", step=step))
        assert got == pytest.approx(want, rel=1e-5)
    cached = xr.open_zarr(root / "specan.zarr" / "derived" / "stable_rank", consolidated=False)
    np.testing.assert_array_equal(cached["value"].values, ds["value"].values)
    again = specan.open(root).analyse("stable_rank")  # from the cache
    xr.testing.assert_identical(again, ds)


def test_compare_takes_the_registered_name(runs: tuple[list[Path], list[dict]]) -> None:
    paths, raws = runs
    res = CliRunner().invoke(
        app, ["compare", *map(str, paths), "--metric", "stable_rank", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    for row in rows:
        if row["view"] == "head.weight":
            raw = raws[0 if row["run"] == "a" else 1]
            assert row["stable_rank"] == pytest.approx(
                stable_rank(raw[row["step"]]["head.weight"]), rel=1e-5
            )
    assert {r["run"] for r in rows} == {"a", "b"}
