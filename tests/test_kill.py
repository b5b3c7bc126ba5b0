"""`kill -9` during `specan ingest` and `specan train`, at many points: what was written stays
readable, and the next run completes it, equal to an uninterrupted one.

The kill points are file writes: the command runs in a child process whose writer (Zarr's for
ingest; the run writer's files and metrics lines for train) is wrapped to write half of its N-th
file and then SIGKILL its own process (a torn write, as a real crash leaves).
``SPECAN_KILL_POINTS`` (default 5; 6 for train, so that they fall on a metrics line and before the
first checkpoint too) kill points are spread over the writes of an uninterrupted run, the first
and the last among them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from specan import store
from specan.errors import EmptyRunError
from specan.pipeline import IngestOptions, ingest

POINTS = int(os.environ.get("SPECAN_KILL_POINTS", "5"))
TRAIN_POINTS = int(os.environ.get("SPECAN_KILL_POINTS", "6"))

# The child: the real console entry point, its Zarr writer wrapped.
CHILD = """
import os, signal, sys
import zarr.storage._local as local

kill_at, calls, put = int(os.environ["KILL_AT"]), [0], local._put

def torn_put(path, value, exclusive=False):
    calls[0] += 1
    if calls[0] == kill_at:
        path.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(value.as_buffer_like()).cast("B")
        with local._atomic_write(path, "wb", exclusive=exclusive) as f:
            f.write(view[: len(view) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return put(path, value, exclusive=exclusive)

local._put = torn_put
sys.argv = ["specan", *sys.argv[1:]]
from specan.cli import main
main()
"""


def make_run(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Four checkpoints of two matrices; step 3 holds step 1's tensors (a duplicate)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    out = {}
    for step in range(4):
        tensors = (
            out["s1.safetensors"]
            if step == 3
            else {
                "fc1.weight": rng.standard_normal((12, 8)).astype(np.float32),
                "fc2.weight": rng.standard_normal((5, 12)).astype(np.float32),
            }
        )
        name = f"s{step}.safetensors"
        save_file(tensors, str(root / name), {"step": str(step)})
        out[name] = tensors
    return out


def count_writes(run: Path) -> int:
    """The store's file writes in an uninterrupted ingest of `run` (in this process)."""
    import zarr.storage._local as local

    calls, put = [0], local._put

    def counting(path, value, exclusive=False):
        calls[0] += 1
        return put(path, value, exclusive=exclusive)

    local._put = counting
    try:
        ingest(run, IngestOptions(workers=1))
    finally:
        local._put = put
    return calls[0]


def snapshot(spath: Path) -> dict[str, tuple]:
    """Each done checkpoint: (step, duplicate_of, sigma and tail of every view)."""
    st = store.open_store(spath)
    rows, entries = st.done_rows()
    sig = {k: st.read_sigma(k) for k in st.views}
    tail = {k: st.read_tail(k) for k in st.views}
    out = {}
    for i, e in enumerate(entries):
        assert rows[i] == e["row"]
        out[e["name"]] = (
            e["step"],
            e.get("duplicate_of"),
            {k: (sig[k][i].tolist(), float(tail[k][i])) for k in sorted(st.views)},
        )
    return out


def check_against_weights(snap: dict[str, tuple], weights: dict[str, dict]) -> None:
    """What the store calls done holds the spectra of the raw weights (NumPy, float64)."""
    for name, (_step, _dup, views) in snap.items():
        for key, (sigma, _tail) in views.items():
            w = weights[name][key].astype(np.float64)
            want = np.linalg.svd(w, compute_uv=False)
            np.testing.assert_allclose(sigma, want, rtol=1e-5, atol=1e-6, err_msg=name)


def prepare(phase: str, pristine: Path, run: Path) -> Path:
    """A copy of the run to ingest: "pristine", no store yet; "append", its first two
    checkpoints ingested and two more come since (the store must grow). A store records its
    run's path, so each copy makes its own."""
    run.mkdir()
    names = sorted(p.name for p in pristine.iterdir())
    first = names[:2] if phase == "append" else names
    for name in first:
        shutil.copy2(pristine / name, run / name)
    if phase == "append":
        ingest(run, IngestOptions(workers=1))
        for name in names[2:]:
            shutil.copy2(pristine / name, run / name)
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Uninterrupted ingests: the number of store writes in each phase, the store's contents
    at the end (the same for both), and the weights."""
    base = tmp_path_factory.mktemp("kill")
    weights = make_run(base / "pristine")
    writes = {}
    for phase in ("pristine", "append"):
        done = prepare(phase, base / "pristine", base / f"{phase}-done")
        writes[phase] = count_writes(done)
        snap = snapshot(done / store.STORE_NAME)
        assert snap["s3.safetensors"][1] == "s1.safetensors"
        check_against_weights(snap, weights)
    assert sorted(snap) == sorted(weights)
    return {"pristine": base / "pristine", "writes": writes, "want": snap, "weights": weights}


def kill_points(writes: int, points: int = POINTS) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(1, writes, points)})


@pytest.mark.parametrize("phase", ["pristine", "append"])
def test_ingest_killed_at_many_points_is_completed_by_the_next(
    reference: dict, tmp_path: Path, phase: str
) -> None:
    pristine, writes = reference["pristine"], reference["writes"][phase]
    want, weights = reference["want"], reference["weights"]
    assert writes > 10  # the points below fall in creation or growth, rows and attributes alike
    env = {**os.environ}
    env.pop("SPECAN_DEBUG", None)
    for k in kill_points(writes):
        run = prepare(phase, pristine, tmp_path / f"run-{k}")
        res = subprocess.run(
            [sys.executable, "-c", CHILD, "ingest", str(run), "--workers", "1"],
            capture_output=True, text=True, env={**env, "KILL_AT": str(k)},
        )  # fmt: skip
        assert res.returncode == -signal.SIGKILL, (k, res.returncode, res.stderr[-2000:])
        spath = run / store.STORE_NAME
        if (spath / "zarr.json").exists():  # readable, and what it calls done is right
            partial = snapshot(spath)
            check_against_weights(partial, weights)
        # the next run takes over the dead writer's lock and completes the store
        ingest(run, IngestOptions(workers=1))
        got = snapshot(spath)
        assert got == want, f"kill at write {k} of {writes}"
        assert not Path(str(spath) + ".lock").exists()
        # nothing beside the run's files and the store: the next writer removed what the
        # killed one left half-made
        left = {p.name for p in run.iterdir()} - {*weights, store.STORE_NAME}
        assert not left, left


def test_a_full_disk_during_ingest_is_one_error_and_the_next_run_completes(
    reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's N-th write fails with ENOSPC: ingest stops with that OSError (one line at
    the command line), releases the lock, leaves a readable store; freed space, it completes."""
    import errno

    import zarr.storage._local as local

    pristine, writes = reference["pristine"], reference["writes"]["pristine"]
    want, weights = reference["want"], reference["weights"]
    put = local._put
    for k in kill_points(writes):
        calls = [0]

        def full(path, value, exclusive=False, k=k, calls=calls):
            calls[0] += 1
            if calls[0] >= k:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return put(path, value, exclusive=exclusive)

        run = tmp_path / f"run-{k}"
        shutil.copytree(pristine, run, copy_function=shutil.copy2)
        spath = run / store.STORE_NAME
        monkeypatch.setattr(local, "_put", full)
        with pytest.raises(OSError) as e:
            ingest(run, IngestOptions(workers=1))
        monkeypatch.setattr(local, "_put", put)
        assert e.value.errno == errno.ENOSPC, f"write {k}: {e.value!r}"
        assert not Path(str(spath) + ".lock").exists()
        if (spath / "zarr.json").exists():
            check_against_weights(snapshot(spath), weights)
        ingest(run, IngestOptions(workers=1))
        assert snapshot(spath) == want, f"disk full at write {k} of {writes}"


# -- train --------------------------------------------------------------------------------------
# The child: `specan train`, the run writer's file writes and metrics lines wrapped; KILL_AT=0
# never kills and prints how many writes it made.
TRAIN_CHILD = """
import atexit, json, os, signal, sys
from specan_trainers import checkpoint as ck

kill_at, calls, atomic, log = int(os.environ["KILL_AT"]), [0], ck._atomic, ck.RunWriter.log
atexit.register(lambda: print("writes", calls[0], file=sys.stderr))

def due():
    calls[0] += 1
    return calls[0] == kill_at

def torn_atomic(path, write):
    def torn(tmp):
        write(tmp)
        if due():
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    atomic(path, torn)

def torn_log(self, record):
    if due():
        line = json.dumps(record) + "\\n"
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, record)

ck._atomic, ck.RunWriter.log = torn_atomic, torn_log
sys.argv = ["specan", *sys.argv[1:]]
from specan.cli import main
main()
"""
# a tiny grokking run: an evaluation every step, a checkpoint every second one
TRAIN = ["train", "grokking", "--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32",
         "--train-frac", "0.5", "--steps", "4", "--save-every", "2",
         "--eval-every", "1"]  # fmt: skip


def train_child(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPECAN_DEBUG"}
    return subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, *TRAIN, "--out", str(out)],
        capture_output=True, text=True, env={**env, "KILL_AT": str(kill_at)},
    )  # fmt: skip


def run_files(run: Path) -> dict[str, object]:
    """What a finished run holds: each checkpoint's (and the resume state's) tensors and
    metadata, the metrics lines, run.json, the end marker; and every other file's name."""
    out: dict[str, object] = {}
    for p in sorted(run.rglob("*")):
        if not p.is_file() or store.STORE_NAME in p.relative_to(run).parts:
            continue
        name = p.relative_to(run).as_posix()
        if p.suffix == ".safetensors":
            with safe_open(str(p), "np") as f:
                meta = f.metadata()
            out[name] = (meta, {k: v.tobytes() for k, v in load_file(str(p)).items()})
        elif p.name in ("metrics.jsonl", "finished.json", "run.json"):
            out[name] = p.read_text()
        else:
            out[name] = None
    return out


def test_train_killed_at_many_points_is_completed_by_the_next(tmp_path: Path) -> None:
    """After each kill the run folder ingests with no bad file and only whole checkpoints, each
    done row NumPy's σ of the weights a whole run saved; the same command run again finishes
    the run with the same checkpoints (bitwise), metrics lines and end marker."""
    # every attempt trains into the same folder: the config (and so each checkpoint's metadata)
    # holds --out
    run = tmp_path / "run"
    ref = train_child(run, 0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    writes = int(ref.stderr.split("writes")[-1])
    want = run_files(run)
    assert json.loads(want["finished.json"]) == {"step": 4}
    weights = {p.name: load_file(str(p)) for p in (run / "checkpoints").iterdir()}
    shutil.rmtree(run)
    assert writes > 10  # run.json, the metrics lines, checkpoints, resume states, end marker
    for k in kill_points(writes, TRAIN_POINTS):
        res = train_child(run, k)
        assert res.returncode == -signal.SIGKILL, (k, res.returncode, res.stderr[-2000:])
        assert not (run / "finished.json").exists(), k
        try:
            report = ingest(run, IngestOptions(workers=1))
        except EmptyRunError:  # killed before its first checkpoint was whole
            assert not list((run / "checkpoints").glob("*.safetensors")), k
        else:
            assert not report.bad, (k, report.bad)
            st = store.open_store(store.store_path(run))
            rows, entries = st.done_rows()
            assert entries, k
            checked = 0
            for row, e in zip(rows, entries, strict=True):
                for param, w in weights[Path(e["name"]).name].items():
                    if param not in st.views:  # a vector, or a matrix split into heads
                        continue
                    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
                    got = st.read_sigma(param)[rows.index(row)]
                    np.testing.assert_allclose(got[: len(s)], s, rtol=1e-5, atol=1e-6)
                    checked += 1
            assert checked >= 2 * len(entries), k  # the embedding, decoder, MLP matrices
        again = train_child(run, 0)
        assert again.returncode == 0, (k, again.stderr[-2000:])
        got = run_files(run)
        assert got == want, f"kill at write {k} of {writes}: {sorted(set(got) ^ set(want))}"
        shutil.rmtree(run)
