"""Bounded memory of `ingest`: what a checkpoint holds at once does not grow with its layers."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np

from specan import pipeline, store
from specan.pipeline import IngestOptions, ingest

D = 128  # hidden size of the synthetic GPT-NeoX checkpoints (pythia-14m's)


def peak_held(tmp_path: Path, pythia_like, layers: int, monkeypatch) -> tuple[int, int]:
    """Ingest one ``layers``-layer checkpoint; return (the most bytes of SVD results alive at
    once, the most bytes of input stacks started and not yet written), sampled whenever a task
    starts or a write ends."""
    cfg = pythia_like.config("14m", layers=layers, vocab=64, positions=8)
    run = pythia_like.write(tmp_path / f"run{layers}", cfg, [1000])
    # one 4d x d matrix per batch, in-flight budget two of them, and the MLP matrices large,
    # as pythia-1.4b's are at full size
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 4 * 4 * D * D)
    monkeypatch.setattr(pipeline, "IN_FLIGHT_BYTES", 2 * 4 * 4 * D * D)
    monkeypatch.setattr(pipeline, "BIG_ELEMENTS", 4 * D * D)
    lock = threading.Lock()
    alive = {"results": 0, "inputs": 0}
    peak = {"results": 0, "inputs": 0}

    def sample() -> None:
        for k in peak:
            peak[k] = max(peak[k], alive[k])

    def drop(nbytes: int) -> None:
        with lock:
            alive["results"] -= nbytes

    svd_group = pipeline._svd_group

    def counted(ckpt, keys, views, *args):
        m, n = views[keys[0]].shape
        nbytes = sum(4 * m * n * (views[k].heads or 1) for k in keys)
        with lock:
            alive["inputs"] += nbytes
            sample()
        out = svd_group(ckpt, keys, views, *args)
        for r in out.values():
            size = sum(a.nbytes for a in (r.sigma, r.U, r.V) if isinstance(a, np.ndarray))
            with lock:
                alive["results"] += size
            weakref.finalize(r, drop, size)  # runs when the last reference to it goes
        out["__inputs__"] = nbytes
        return out

    write_row = store.Store.write_row

    def written(self, row, results):
        nbytes = results.pop("__inputs__")
        write_row(self, row, results)
        with lock:
            alive["inputs"] -= nbytes
            sample()

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_svd_group", counted)
        patch.setattr(store.Store, "write_row", written)
        report = ingest(run, IngestOptions(store=tmp_path / f"s{layers}.zarr", workers=2))
    assert len(report.computed) == 1 and not report.bad
    return peak["results"], peak["inputs"]


def test_memory_held_does_not_grow_with_layers(tmp_path: Path, pythia_like, monkeypatch) -> None:
    few_results, few_inputs = peak_held(tmp_path, pythia_like, 4, monkeypatch)
    many_results, many_inputs = peak_held(tmp_path, pythia_like, 12, monkeypatch)
    # three times the layers, the same bound: the budget of started stacks (4 layers fill it
    # already) and the results of those tasks; of slack for the order in which threads happen
    # to run, less than one layer's per-head Q, K, V stacks (3 x 4 D^2 bytes), and one task's
    # results: the large MLP matrices run two at a time, and which finishes first varies
    # (U of 4D x D, V of D x D and D values, float32)
    layer = 3 * 4 * D * D
    task = 4 * (4 * D * D + D * D + D)
    assert many_inputs <= pipeline.IN_FLIGHT_BYTES
    assert many_inputs <= few_inputs + layer, (few_inputs, many_inputs)
    assert many_results <= few_results + task, (few_results, many_results)
