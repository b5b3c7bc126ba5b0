"""specan.bench and `specan bench`: well-formed tables and JSON (no assertions on speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from specan import bench
from specan.cli import app

TINY = ["2x40x24", "3x16x48"]


def test_rows_cover_every_route_and_both_loops() -> None:
    result = bench.run(bench.BenchOptions(shapes=TINY, quick=True, k=8, randomized=False))
    h = result["header"]
    assert h["matmul_peak_gflops"] > 0 and h["dtype"] == "float32" and h["quick"]
    assert result["randomized"] is None
    rows = result["rows"]
    for name in ("2x40x24", "3x16x48"):
        mine = [r for r in rows if r["shape"] == name]
        methods = {(r["method"], r["vectors"]) for r in mine}
        assert {("loop svd", True), ("loop svdvals", False), ("auto", True), ("auto", False)} <= (
            methods
        )
        assert {("gram32", True), ("gram64", False), ("gesdd", True)} <= methods
        for r in mine:
            assert r["seconds"] > 0 and r["gflops"] > 0 and 0 < r["frac_peak"]
            assert r["matrices_per_s"] == pytest.approx(r["batch"] / r["seconds"])
            assert r["ok"], r  # every route meets the σ contract on these
            assert r["k"] == (8 if r["vectors"] else 0)
        loops = [r for r in mine if r["method"].startswith("loop")]
        assert all(r["speedup"] == pytest.approx(1.0) for r in loops)


def test_table_lines() -> None:
    result = bench.run(bench.BenchOptions(shapes=["2x30x20"], quick=True, randomized=False))
    text = "\n".join(bench.table_lines(result))
    assert "matmul peak" in text and "loop svdvals" in text and "x loop" in text
    assert text.count("2x30x20") == len(result["rows"])


def test_randomized_comparison_quick() -> None:
    rnd = bench.bench_randomized(bench.BenchOptions(quick=True), repeats=1)
    methods = [r["method"] for r in rnd["rows"]]
    assert methods[0] == "specan randomized"
    assert "sklearn randomized_svd" in methods and "torch.svd_lowrank" in methods
    assert rnd["rows"][0]["error"] <= rnd["target"]
    for r in rnd["rows"]:
        if r.get("equal_accuracy"):
            assert r["error"] <= rnd["target"] and r["x_ours"] > 0


def test_known_spectrum_matrix() -> None:
    s = np.linspace(3.0, 0.1, 64)
    a = bench.known_spectrum_matrix(64, 256, s)
    assert a.shape == (64, 256)
    got = np.linalg.svd(a.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(got, s, rtol=1e-5)


def test_parse_shape() -> None:
    assert bench.parse_shape("50304x768") == bench.SHAPES["50304x768"]
    assert bench.parse_shape("64x32") == (1, 64, 32)
    assert bench.parse_shape("3x64x32") == (3, 64, 32)
    with pytest.raises(ValueError, match="MxN"):
        bench.parse_shape("big")


def test_cli_json_and_table() -> None:
    runner = CliRunner()
    args = ["bench", "--quick", "--shapes", "2x24x12", "--no-randomized", "--top-k", "4"]
    res = runner.invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == {"header", "rows", "randomized"}
    assert data["header"]["top_k"] == 4 and len(data["rows"]) > 4
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "loop svd" in res.stdout


def test_cli_refuses_bad_options() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output
    # errors from the benchmark itself are typed, one line and exit 2 from the console entry
    # (tests/test_cli.py runs that for --device cuda)
    from specan.errors import OptionError

    res = runner.invoke(app, ["bench", "--quick", "--shapes", "nope", "--no-randomized"])
    assert isinstance(res.exception, OptionError) and "MxN" in str(res.exception)
    assert OptionError.exit_code == 2
