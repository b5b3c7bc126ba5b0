"""Live runs: `specan ingest --watch` beside a training that is still writing checkpoints.

Expected singular values come from NumPy (float64) on the weights the writer saved, never from
specan. Waits poll for a condition under a generous deadline, so a slow machine is not a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specan import runs, store
from specan.cli import app
from specan.pipeline import IngestOptions, ingest
from specan.watch import watch
from specan_trainers.checkpoint import FINISHED, RunWriter

DEADLINE = 120.0  # seconds: far beyond what any wait below needs


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))


def writer(root: Path) -> RunWriter:
    return RunWriter(root, trainer="synthetic", config={"test": "watch"})


def raw(m: torch.nn.Module) -> dict[str, np.ndarray]:
    """The matrices as saved, in float64: what the expected σ are computed from."""
    return {k: v.detach().double().numpy().copy() for k, v in m.state_dict().items() if v.ndim == 2}


def started(root: Path) -> tuple[RunWriter, dict[int, dict[str, np.ndarray]]]:
    """A run whose training has saved steps 0 and 1: its writer, and what it saved."""
    w = writer(root)
    saved = {}
    for step in (0, 1):
        m = model(step)
        w.save(m, step)
        saved[step] = raw(m)
    return w, saved


def check_sigmas(root: Path, saved: dict[int, dict[str, np.ndarray]]) -> None:
    """Every saved step is a done row of the store, its σ NumPy's on the raw weights."""
    st = store.open_store(store.store_path(root))
    rows, entries = st.done_rows()
    by_step = {e["step"]: r for r, e in zip(rows, entries, strict=True)}
    assert sorted(by_step) == sorted(saved)
    keys = {v.param: k for k, v in st.views.items()}
    for step, arrays in saved.items():
        for param, a in arrays.items():
            s = np.linalg.svd(a, compute_uv=False)
            got = st.read_sigma(keys[param])[rows.index(by_step[step])]
            np.testing.assert_allclose(got[: len(s)], s, rtol=1e-5, atol=1e-6)


def wait_for(cond, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < DEADLINE, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_watch_follows_a_training_to_its_end_marker(tmp_path: Path) -> None:
    root = tmp_path / "run"
    w = writer(root)
    saved: dict[int, dict[str, np.ndarray]] = {}
    passes: list[int] = []

    def train() -> None:
        for step in range(5):
            # each checkpoint lands only after the watch has made a pass since the last one
            seen = len(passes)
            wait_for(lambda seen=seen: len(passes) > seen, "a pass")
            m = model(step)
            w.save(m, step)
            saved[step] = raw(m)
        w.finish()

    t = threading.Thread(target=train)
    t.start()
    try:
        done = watch(root, interval=0.05, on_pass=lambda rep, wr: passes.append(1), workers=1)
    finally:
        t.join(DEADLINE)
    assert done.stopped == "finished" and (root / FINISHED).is_file()
    assert sorted(done.computed) == [runs.discover(root).checkpoints[i].name for i in range(5)]
    check_sigmas(root, saved)
    assert not Path(str(store.store_path(root)) + ".lock").exists()


def test_watch_from_the_command_line(tmp_path: Path) -> None:
    root = tmp_path / "run"
    w = writer(root)
    saved: dict[int, dict[str, np.ndarray]] = {}

    def train() -> None:
        for step in (0, 10, 20):
            m = model(step)
            w.save(m, step)
            saved[step] = raw(m)
            time.sleep(0.1)
        w.finish()

    t = threading.Thread(target=train)
    t.start()
    res = CliRunner().invoke(
        app, ["ingest", str(root), "--watch", "--interval", "0.1", "--report", "--workers", "1"]
    )
    t.join(DEADLINE)
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert "watch ended (the run finished): 3 checkpoint(s) ingested" in last, res.stdout
    assert (root / "report.html").is_file()
    check_sigmas(root, saved)


def test_report_needs_watch(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["ingest", str(tmp_path), "--report"])
    assert res.exit_code != 0 and "--watch" in res.output


def test_files_still_being_written_wait_for_the_next_ingest(tmp_path: Path) -> None:
    root = tmp_path / "run"
    w, saved = started(root)
    m = model(2)
    full = w.save(m, 2).read_bytes()
    target = w.checkpoint_path(2)
    # a temporary name (the trainers' own, and a hidden one): not a checkpoint yet
    target.unlink()
    tmp = target.with_name(target.name + ".tmp")
    hidden = target.with_name("." + target.name)
    tmp.write_bytes(full)
    hidden.write_bytes(full[:100])
    run = runs.discover(root)
    assert [c.step for c in run.checkpoints] == [0, 1] and not run.bad
    assert sorted(p.name for p, _ in run.writing) == sorted([tmp.name, hidden.name])
    report = ingest(root)
    assert len(report.computed) == 2 and not report.bad
    tmp.unlink()
    hidden.unlink()
    # written in place, cut short, modified just now: waiting, not bad
    for cut in (0, 60, len(full) - 7):  # nothing yet, half the header, most data
        target.write_bytes(full[:cut])
        run = runs.discover(root)
        assert [p for p, _ in run.writing] == [target] and not run.bad, cut
        report = ingest(root)
        assert not report.computed and not report.bad, cut
        assert store.read_attrs(store.store_path(root))["bad_files"] == []
    # the same file cut short a minute ago is bad
    old = time.time_ns() - 60 * 10**9
    os.utime(target, ns=(old, old))
    assert [p for p, _ in runs.discover(root).bad] == [target]
    # complete: taken by the next ingest
    target.write_bytes(full)
    saved[2] = raw(m)
    report = ingest(root)
    assert [runs.step_from_name(n) for n in report.computed] == [2] and not report.bad
    check_sigmas(root, saved)


def test_a_file_growing_while_its_header_is_read_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    w = writer(root)
    w.save(model(0), 0)
    grow = w.save(model(1), 1)
    read = runs._read_file_header

    def read_then_grow(path: Path, infos: bool = True):
        out = read(path, infos)
        if path == grow:
            with open(path, "ab") as f:  # the writer appends while discovery reads
                f.write(b"\0" * 16)
        return out

    monkeypatch.setattr(runs, "_read_file_header", read_then_grow)
    run = runs.discover(root)
    assert [c.step for c in run.checkpoints] == [0]
    assert [p for p, _ in run.writing] == [grow] and not run.bad


def test_ctrl_c_leaves_the_store_readable_and_unlocked(tmp_path: Path) -> None:
    root = tmp_path / "run"
    w, saved = started(root)
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specan.cli", "ingest", str(root), "--watch", "--interval", "0.1",
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # as from a terminal: a suite started in the background of a non-interactive shell
        # ignores SIGINT, and an ignored signal is inherited, so Ctrl-C would never arrive
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:

        def ingested() -> bool:
            attrs = store.read_attrs(store.store_path(root)) or {}
            return sum(bool(c.get("done")) for c in attrs.get("checkpoints", [])) == 2

        wait_for(ingested, "the first two checkpoints")
        m = model(2)
        w.save(m, 2)  # one more, so the interrupt may land inside a pass
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "watch ended (interrupted)" in stdout.strip().splitlines()[-1], stdout
    assert not Path(str(store.store_path(root)) + ".lock").exists()
    store.open_store(store.store_path(root)).done_rows()  # readable
    report = ingest(root)  # and completed by the next ingest, whatever the interrupt cut short
    saved[2] = raw(m)
    assert not report.bad
    check_sigmas(root, saved)


def test_trainers_mark_a_run_finished_only_when_training_returns(tmp_path: Path) -> None:
    from specan_trainers.checkpoint import finish_runs

    def train(argv: list[str]) -> None:
        writer(Path(argv[0])).save(model(0), 7)
        if argv[1:] == ["crash"]:
            raise RuntimeError("killed mid-run")

    with pytest.raises(RuntimeError):
        finish_runs(train, [str(tmp_path / "a"), "crash"])
    assert not (tmp_path / "a" / FINISHED).exists()  # resumable, not done
    finish_runs(train, [str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / FINISHED).read_text()) == {"step": 7}
    writer(tmp_path / "a")  # reopened to train on: no longer finished
    assert not (tmp_path / "a" / FINISHED).exists()


def test_readers_never_see_a_half_written_store_while_an_ingest_appends(tmp_path: Path) -> None:
    root = tmp_path / "run"
    w, saved = started(root)
    ingest(root, IngestOptions(workers=1))
    for step in range(2, 10):
        m = model(step)
        w.save(m, step)
        saved[step] = raw(m)
    sp = store.store_path(root)
    errors: list[BaseException] = []
    reads: list[int] = []
    stop = threading.Event()

    def read() -> None:
        # what a reader sees mid-ingest: done rows only, each with NumPy's σ
        while not stop.is_set():
            try:
                st = store.open_store(sp)
                rows, entries = st.done_rows()
                keys = {v.param: k for k, v in st.views.items()}
                for row, e in zip(rows, entries, strict=True):
                    for param, a in saved[e["step"]].items():
                        s = np.linalg.svd(a, compute_uv=False)
                        got = st.read_sigma(keys[param])[rows.index(row)]
                        np.testing.assert_allclose(got[: len(s)], s, rtol=1e-5, atol=1e-6)
                reads.append(len(rows))
            except BaseException as e:  # noqa: BLE001 - any of them is the failure reported
                errors.append(e)
                return

    t = threading.Thread(target=read)
    t.start()
    try:
        wait_for(lambda: reads or errors, "a first read")
        ingest(root, IngestOptions(workers=1))
    finally:
        stop.set()
        t.join(DEADLINE)
    assert not errors, repr(errors[0])
    assert reads and reads[0] >= 2


def test_a_file_shorter_than_the_header_length_waits_while_recent_and_is_bad_once_old(
    tmp_path: Path,
) -> None:
    """1 to 7 bytes: not even safetensors' 8-byte header length. Just written, it is a file a
    training has begun (waited for, and named so by `--watch`); a minute old, it is bad, in one
    line (the ingest is not `--watch`)."""
    root = tmp_path / "run"
    w, saved = started(root)
    full = w.save(model(2), 2).read_bytes()
    target = w.checkpoint_path(2)
    target.unlink()
    ingest(root)
    w.finish()  # so that the watch below makes one pass and stops
    runner = CliRunner()
    for cut in range(1, 8):
        target.write_bytes(full[:cut])
        run = runs.discover(root)
        assert [p for p, _ in run.writing] == [target] and not run.bad, cut
        res = runner.invoke(app, ["ingest", str(root), "--watch", "--workers", "1"])
        assert res.exit_code == 0, res.output
        said = f"waiting {target}: still being written (not a safetensors file ({cut} bytes))"
        assert "".join(said.split()) in "".join(res.stderr.split()), res.stderr  # however wrapped
        assert ", 0 bad" in res.stdout, res.stdout
        old = time.time_ns() - 60 * 10**9
        os.utime(target, ns=(old, old))
        report = ingest(root)
        assert report.bad == [(str(target), f"not a safetensors file ({cut} bytes)")], cut
        res = runner.invoke(app, ["ingest", str(root), "--workers", "1"])
        skipped = [line for line in res.stderr.splitlines() if line.startswith("skipped")]
        assert len(skipped) == 1 and f"({cut} bytes)" in skipped[0], res.stderr
    target.write_bytes(full)  # complete at last: taken
    saved[2] = raw(model(2))
    report = ingest(root)
    assert [runs.step_from_name(n) for n in report.computed] == [2] and not report.bad
    check_sigmas(root, saved)


def test_the_synthetic_run_ends_with_the_end_marker_so_a_watch_stops(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from specan.demo import write_synthetic_run

    root = write_synthetic_run(tmp_path / "syn", checkpoints=3, width=8)
    assert json.loads((root / FINISHED).read_text()) == {"step": 200}
    done = watch(root, interval=60, workers=1)  # a watch waiting for more would block here
    assert done.stopped == "finished" and done.passes == 1 and len(done.computed) == 3
    saved = {}
    for p in sorted((root / "checkpoints").iterdir()):
        weights = load_file(str(p))
        saved[int(p.stem.split("-")[1])] = {
            k: v.astype(np.float64) for k, v in weights.items() if k == "head.weight"
        }
    st = store.open_store(store.store_path(root))
    rows, entries = st.done_rows()
    for row, e in zip(rows, entries, strict=True):
        s = np.linalg.svd(saved[e["step"]]["head.weight"], compute_uv=False)
        got = st.read_sigma("head.weight")[rows.index(row)]
        np.testing.assert_allclose(got, s, rtol=1e-5, atol=1e-6)
    # a complete run is kept as it is; one the writer did not finish is written again
    mtime = (root / FINISHED).stat().st_mtime_ns
    write_synthetic_run(root, checkpoints=3, width=8)
    assert (root / FINISHED).stat().st_mtime_ns == mtime
    (root / FINISHED).unlink()
    write_synthetic_run(root, checkpoints=3, width=8)
    assert json.loads((root / FINISHED).read_text()) == {"step": 200}


def hf_step(folder: Path, m: torch.nn.Module, shards: int = 1) -> list[tuple[Path, bytes]]:
    """A Hugging Face-style checkpoint folder's files as a writer would leave them: config.json,
    then model.safetensors, or `shards` shards and their index (written last)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    config = (folder / "config.json", json.dumps({"model_type": "mlp"}).encode())
    if shards == 1:
        return [config, (folder / "model.safetensors", save(state))]
    names = sorted(state)
    files, weight_map = [config], {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        weight_map.update(dict.fromkeys(part, shard))
        files.append((folder / shard, save(part)))
    index = {"metadata": {}, "weight_map": weight_map}
    return [*files, (folder / "model.safetensors.index.json", json.dumps(index).encode())]


def test_hf_checkpoint_folders_still_being_written_wait_named(tmp_path: Path) -> None:
    """``stepN/`` folders: a model or shard under a temporary name, cut short in place, shards
    without their index yet, an index before its last shard. Each waits, named by discovery and
    by `ingest --watch`'s waiting line, and is taken once complete; shards a writer left
    incomplete a minute ago are bad."""
    root = tmp_path / "run"
    saved = {}
    for step, shards in ((0, 1), (1, 2)):
        (root / f"step{step}").mkdir(parents=True)
        m = model(step)
        for path, data in hf_step(root / f"step{step}", m, shards):
            path.write_bytes(data)
        saved[step] = raw(m)
    (root / FINISHED).write_text("{}")  # so that each watch below makes one pass and stops
    ingest(root)
    runner = CliRunner()
    step2 = root / "step2"
    m2 = model(2)
    single, sharded = hf_step(step2, m2), hf_step(step2, m2, shards=2)
    config, shard1, shard2, index = sharded
    tmp = step2 / "model.safetensors.tmp"
    cases = {  # what is on disk -> the file the waiting line names
        "temporary name": ([config, (tmp, single[1][1])], tmp),
        "cut short": ([config, (single[1][0], single[1][1][:100])], single[1][0]),
        "a shard under a temporary name": (
            [config, shard1, (shard2[0].with_name(shard2[0].name + ".partial"), shard2[1])],
            shard2[0].with_name(shard2[0].name + ".partial"),
        ),
        "shards, no index yet": ([config, shard1, shard2], step2),
        "an index before its last shard": ([config, shard1, index], step2),
        "the last shard cut short": (
            [config, shard1, (shard2[0], shard2[1][:-5]), index], shard2[0]
        ),
        "one shard of two, no index yet": ([config, shard1], step2),
    }  # fmt: skip
    for case, (files, named) in cases.items():
        shutil.rmtree(step2, ignore_errors=True)
        step2.mkdir()
        for path, data in files:
            path.write_bytes(data)
        run = runs.discover(root)
        assert [c.step for c in run.checkpoints] == [0, 1] and not run.bad, case
        assert [p for p, _ in run.writing] == [named], case
        res = runner.invoke(app, ["ingest", str(root), "--watch", "--workers", "1"])
        assert res.exit_code == 0, res.output
        said = "".join(f"waiting {named}:".split())
        assert said in "".join(res.stderr.split()), (case, res.stderr)  # however wrapped
        assert ", 0 bad" in res.stdout, (case, res.stdout)
    # shards whose writer stopped a minute ago: bad, in one line
    stopped = (
        "shards, no index yet",
        "an index before its last shard",
        "one shard of two, no index yet",
    )
    for files in (cases[c][0] for c in stopped):
        shutil.rmtree(step2)
        step2.mkdir()
        old = time.time_ns() - 60 * 10**9
        for path, data in files:
            path.write_bytes(data)
            os.utime(path, ns=(old, old))
        run = runs.discover(root)
        assert [p for p, _ in run.bad] == [step2] and not run.writing, run.bad
    # complete: taken
    shutil.rmtree(step2)
    step2.mkdir()
    for path, data in sharded:
        path.write_bytes(data)
    saved[2] = raw(m2)
    report = ingest(root)
    assert len(report.computed) == 1 and not report.bad
    check_sigmas(root, saved)
