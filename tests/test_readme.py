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
    run = root / "runs" / "demo" / "grok-wd1"
    tiny = ["--p", "5", "--d-model", "8", "--n-heads", "2", "--d-mlp", "16", "--steps", "1000",
            "--save-every", "500", "--eval-every", "500", "--out", str(run)]  # fmt: skip
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
