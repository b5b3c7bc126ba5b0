"""The store's schema version: recorded, and a store of another version refused, never misread."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import specan
from specan import store
from specan.errors import StoreError
from specan.pipeline import IngestOptions, ingest


def specan_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SPECAN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "specan.cli", *args], capture_output=True, text=True, env=env
    )


def make_run(root: Path, steps: tuple[int, ...] = (0, 1)) -> dict[int, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(steps))
    weights = {}
    for step in steps:
        weights[step] = rng.standard_normal((5, 3)).astype(np.float32)
        save_file({"w": weights[step]}, str(root / f"s{step}.safetensors"), {"step": str(step)})
    return weights


def set_version(spath: Path, version: object) -> bytes:
    """Rewrite the store's recorded schema version; return the new zarr.json bytes."""
    meta = json.loads((spath / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = version
    meta["attributes"]["specan_version"] = "99.0"
    (spath / "zarr.json").write_text(json.dumps(meta))
    return (spath / "zarr.json").read_bytes()


def test_the_store_records_its_schema_version(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    ingest(tmp_path / "run", IngestOptions(workers=1))
    meta = json.loads((tmp_path / "run" / store.STORE_NAME / "zarr.json").read_text())
    assert meta["attributes"]["schema_version"] == store.SCHEMA_VERSION == 1
    assert meta["attributes"]["specan_version"] == specan.__version__


def test_a_newer_store_is_refused_by_every_reader_and_writer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    ingest(run, IngestOptions(workers=1))
    spath = run / store.STORE_NAME
    raw = set_version(spath, store.SCHEMA_VERSION + 1)
    words = f"written by specan 99.0 with store schema {store.SCHEMA_VERSION + 1}"
    # nothing new to ingest: the check must not be skipped on the fast path
    for args in (["ingest", str(run)], ["info", str(spath)], ["rank", str(run)]):
        res = specan_cli(*args)
        assert res.returncode == 4, (args, res.stderr)
        first = res.stderr.splitlines()[0]
        assert first.startswith(f"error: {spath}: ") and words in first and "upgrade" in first
        assert "Traceback" not in res.stderr
    make_run(run, (2,))  # a new checkpoint: still refused, the store not touched
    for call in (
        lambda: ingest(run, IngestOptions(workers=1)),
        lambda: store.open_store(spath),
        lambda: store.summary(spath),
        lambda: specan.open(run).rank(),
    ):
        with pytest.raises(StoreError, match=words):
            call()
    assert (spath / "zarr.json").read_bytes() == raw
    assert store.is_store(spath)  # still known as a store, so the error speaks of it


@pytest.mark.parametrize("elsewhere", [False, True])
def test_an_older_store_names_the_command_that_rebuilds_it(tmp_path: Path, elsewhere) -> None:
    run = tmp_path / "run"
    weights = make_run(run)
    spath = tmp_path / "kept.zarr" if elsewhere else run / store.STORE_NAME
    ingest(run, IngestOptions(workers=1, store=spath if elsewhere else None))
    raw = set_version(spath, 0)
    with pytest.raises(StoreError) as e:
        ingest(run, IngestOptions(workers=1, store=spath if elsewhere else None))
    assert (spath / "zarr.json").read_bytes() == raw
    msg = str(e.value)
    assert msg.startswith(f"{spath}: store schema 0 is older") and "\n" not in msg
    command = shlex.split(msg.split("rebuild it: ")[1])
    assert command[:3] == ["specan", "ingest", str(run)] and command[-1] == "--overwrite"
    assert ("--store" in command) == elsewhere
    res = specan_cli(*command[1:], "--workers", "1")  # the command, as the user would run it
    assert res.returncode == 0, res.stderr
    st = store.open_store(spath)
    assert st.attrs["schema_version"] == store.SCHEMA_VERSION
    rows, entries = st.done_rows()
    for row, e in zip(rows, entries, strict=True):
        want = np.linalg.svd(weights[e["step"]].astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(st.read_sigma("w")[rows.index(row)], want, rtol=1e-5)
    assert sorted(e["step"] for e in entries) == [0, 1]


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_an_unreadable_version_is_refused(tmp_path: Path, version: object) -> None:
    run = tmp_path / "run"
    make_run(run)
    ingest(run, IngestOptions(workers=1))
    spath = run / store.STORE_NAME
    set_version(spath, version)
    with pytest.raises(StoreError, match="schema_version" if version is not None else "not a"):
        store.open_store(spath)
