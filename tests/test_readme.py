"""The README's code runs as written, against a store shaped like the one `specan demo` writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specan.pipeline import ingest
from specan_trainers import grokking

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def demo_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/demo/grok-wd1 as the demo names it: the demo's model, tiny, checkpoints at 0..1000."""
    root = tmp_path_factory.mktemp("readme")
    for name, wd in (("grok-wd1", "1.0"), ("grok-wd0", "0")):
        run = root / "runs" / "demo" / name
        tiny = ["--p", "5", "--d-model", "8", "--n-heads", "2", "--d-mlp", "16", "--wd", wd,
                "--steps", "1000", "--save-every", "500", "--eval-every", "500",
                "--out", str(run)]  # fmt: skip
        grokking.main(tiny)
        ingest(run)
    return root


def test_the_xarray_example_runs(demo_shaped: Path) -> None:
    pytest.importorskip("xarray")
    (block,) = [b for b in python_blocks() if "xr.open_zarr" in b]
    res = subprocess.run(
        [sys.executable, "-c", block], cwd=demo_shaped, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    printed = np.array(res.stdout.strip().strip("[]").split(), dtype=float)
    assert printed.shape == (5,) and np.all(np.diff(printed) <= 0) and printed[0] > 0


def test_the_python_api_example_runs(demo_shaped: Path) -> None:
    (block,) = [b for b in python_blocks() if "import specan" in b]
    res = subprocess.run(
        [sys.executable, "-c", block], cwd=demo_shaped, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("[   0  500 1000]") and "'embed.weight'" in lines[0]
    assert 0 < float(lines[1]) <= 1  # the model mean
    sigma = np.array(lines[2].strip("[]").split(), dtype=float)
    assert sigma.shape == (3,) and np.all(np.diff(sigma) <= 0)
    assert "every step shared" in res.stdout
    assert "grok-wd0" in res.stdout and "grok-wd1" in res.stdout
