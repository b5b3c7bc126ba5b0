"""The command line: help that teaches, one-line errors with exit codes, lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specan.cli import app
from specan.demo import write_synthetic_run

runner = CliRunner()


def specan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point, error table included."""
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SPECAN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "specan.cli", *args], capture_output=True, text=True, cwd=cwd,
        env=env,
    )  # fmt: skip


def test_help_lists_commands_and_examples() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "info", "demo"):
        assert cmd in res.output
    res = runner.invoke(app, ["ingest", "--help"])
    assert res.exit_code == 0
    assert "--top-k" in res.output and "specan ingest runs/vgg" in res.output


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from specan.cli import app\n"
        "r = CliRunner().invoke(app, ['ingest', '--help'])\n"
        "assert r.exit_code == 0\n"
        "heavy = ('torch', 'dask', 'zarr', 'matplotlib', 'numpy')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ingest_then_info_table_and_json(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=3, width=16)
    res = specan("ingest", str(run))
    assert res.returncode == 0, res.stderr
    assert "3 checkpoint(s) ingested" in res.stdout
    res = specan("ingest", str(run))
    assert res.returncode == 0 and "up to date" in res.stdout
    res = specan("info", str(run))
    assert res.returncode == 0
    assert (
        "3 done" in res.stdout and "mlp.0.weight" in res.stdout and "conv_transpose" in res.stdout
    )
    res = specan("info", str(run), "--format", "json")
    data = json.loads(res.stdout)
    assert data["checkpoints"]["done"] == 3 and data["kernel"]["top_k"] == 128


@pytest.mark.parametrize(
    ("make", "code", "needle"),
    [
        (lambda p: p / "missing", 2, "no such folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", 2, "no checkpoints found"),
    ],
)
def test_bad_runs_give_one_line_and_exit_code(tmp_path: Path, make, code: int, needle: str) -> None:
    target = make(tmp_path)
    res = specan("ingest", str(target))
    assert res.returncode == code
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and needle in first and str(target) in first
    assert "Traceback" not in res.stderr


def test_strict_names_the_bad_file(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=2, width=16)
    bad = run / "checkpoints" / "step-00000050.safetensors"
    bad.write_bytes(b"garbage that is not safetensors at all")
    res = specan("ingest", str(run), "--strict")
    assert res.returncode == 3 and str(bad) in res.stderr and "Traceback" not in res.stderr
    res = specan("ingest", str(run))
    assert res.returncode == 0 and "skipped" in res.stderr and str(bad) in res.stderr


def test_info_without_store(tmp_path: Path) -> None:
    res = specan("info", str(tmp_path))
    assert res.returncode == 4 and "specan ingest" in res.stderr


def test_conflicting_flags_are_refused(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ingest", str(tmp_path), "--no-vectors", "--top-k", "5"])
    assert res.exit_code == 2 and "--no-vectors" in res.output


def test_demo_writes_ingests_and_reports(tmp_path: Path) -> None:
    res = specan("demo", "--out", str(tmp_path / "demo"), "--checkpoints", "3")
    assert res.returncode == 0, res.stderr
    assert "ingested 3 checkpoint(s)" in res.stdout and "lstm.weight_ih_l0_reverse" in res.stdout
    res = specan("demo", "--out", str(tmp_path / "demo"), "--checkpoints", "3")
    assert res.returncode == 0 and "ingested 0 checkpoint(s) (3 already there)" in res.stdout


def test_unavailable_backend_is_one_line(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=2, width=16)
    res = specan("ingest", str(run), "--backend", "nonsense")
    assert res.returncode == 2 and "--backend" in res.stderr and "torch-cpu" in res.stderr
    assert "Traceback" not in res.stderr and not (run / "specan.zarr").exists()
