"""Runs compared: three runs with partly different steps, aligned on the shared ones, with what
was dropped said; numbers against NumPy float64 from the raw weights."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analysis import MATRICES, TOL, erank_norm, write_run
from typer.testing import CliRunner

import specan
from specan.cli import app
from specan.errors import OptionError, RunsMismatchError

pytest.importorskip("xarray")

STEPS = {"wd0": [0, 10, 20, 30], "wd1": [0, 10, 20], "wd10": [10, 20, 30, 40]}
WD = {"wd0": 0.0, "wd1": 1.0, "wd10": 10.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    root = tmp_path_factory.mktemp("compare")
    paths, raw = [], {}
    for i, (name, steps) in enumerate(STEPS.items()):
        path = root / name
        raw[name] = write_run(path, steps, seed=10 * i)
        config = json.loads((path / "run.json").read_text())
        config["config"] = {"wd": WD[name], "lr": 1e-3, "out": str(path)}  # only wd differs
        (path / "run.json").write_text(json.dumps(config))
        lines = [{"step": s, "val_acc": 0.1 * i + s / 100} for s in steps]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        paths.append(path)
    return paths, raw


def test_shared_steps_and_what_was_dropped(runs: tuple[list[Path], dict]) -> None:
    paths, _ = runs
    c = specan.compare(paths)
    assert c.names == ["wd0", "wd1", "wd10"] and c.shared.tolist() == [10, 20]
    assert c.dropped == [
        "wd0: steps 0, 30 are not in every run",
        "wd1: steps 0 are not in every run",
        "wd10: steps 30, 40 are not in every run",
    ]
    assert c.settings() == {"wd": [0.0, 1.0, 10.0]}


def test_rank_on_a_run_dimension_against_numpy(runs: tuple[list[Path], dict]) -> None:
    paths, raw = runs
    ds = specan.compare(paths).rank()
    assert ds["erank"].dims == ("run", "view", "step")
    assert ds.run.values.tolist() == ["wd0", "wd1", "wd10"] and ds.step.values.tolist() == [10, 20]
    for name in STEPS:
        for step in (10, 20):
            w = raw[name][step]
            for view in MATRICES:
                got = float(ds["erank"].sel(run=name, view=view, step=step))
                assert got == pytest.approx(erank_norm(w[view]), abs=TOL)
            mean = np.mean([erank_norm(w[v]) for v in MATRICES])
            assert float(ds["model_mean"].sel(run=name, step=step)) == pytest.approx(mean, abs=TOL)


def test_cli_compare_table_csv_and_figure(runs: tuple[list[Path], dict], tmp_path: Path) -> None:
    paths, raw = runs
    args = ["compare", *map(str, paths), "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "steps 30, 40 are not in every run" in res.output and "wd10" in res.output
    assert (tmp_path / "compare_rank.png").stat().st_size > 0
    res = CliRunner().invoke(app, [*args, "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout[res.stdout.index("run,") :])))
    assert {r["step"] for r in rows} == {"10", "20"}
    mean = [
        r for r in rows if r["view"] == "model_mean" and r["run"] == "wd10" and r["step"] == "20"
    ]
    want = np.mean([erank_norm(raw["wd10"][20][v]) for v in MATRICES])
    assert float(mean[0]["rank"]) == pytest.approx(want, abs=TOL)
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    api = specan.compare(paths).result("rank")  # the library's numbers, cell for cell
    got = json.loads(res.stdout[res.stdout.index("[") :])
    assert len(got) == api.size
    for r in got:
        assert r["rank"] == float(api.sel(run=r["run"], view=r["view"], step=r["step"]))
    res = CliRunner().invoke(app, [*args, "--metric", "val_acc", "--format", "json"])
    got = json.loads(res.stdout[res.stdout.index("[") :])
    assert [r["val_acc"] for r in got if r["run"] == "wd1"] == pytest.approx([0.2, 0.3])


def test_one_store_given_twice_is_refused_by_name(runs: tuple[list[Path], dict]) -> None:
    paths, _ = runs
    with pytest.raises(OptionError, match=r"runs: '.*wd1' and '.*wd1/specan\.zarr' are one store"):
        specan.compare([paths[1], paths[0], paths[1] / "specan.zarr"])
    res = subprocess.run(  # the console entry point, its error table included
        [sys.executable, "-m", "specan.cli", "compare", str(paths[0]), str(paths[0])],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "give each run once" in res.stderr
    assert res.stderr.startswith("error: runs: ") and "Traceback" not in res.stderr


def test_runs_sharing_no_step_say_so(runs: tuple[list[Path], dict], tmp_path: Path) -> None:
    paths, _ = runs
    write_run(tmp_path / "late", [50, 60], seed=1)
    with pytest.raises(RunsMismatchError, match="share no step.*by='epoch'"):
        specan.compare([paths[0], tmp_path / "late"])


def test_report_of_several_runs_on_shared_axes(
    runs: tuple[list[Path], dict], tmp_path: Path
) -> None:
    paths, _ = runs
    out = tmp_path / "cmp.html"
    res = CliRunner().invoke(app, ["report", *map(str, paths), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    for fig in ("compare_loss_rank", "compare_rank", "compare_final"):
        assert f'id="{fig}"' in page
    assert "wd1: steps 0 are not in every run" in page and "<th>wd</th>" in page
