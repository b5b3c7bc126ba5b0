"""The analysis layer against NumPy: every expected number is computed here, in float64, from the
raw weights written to the checkpoints, never through specan's own functions.

The weights are built with known, well-separated spectra (W = Q1 diag(s) Q2', s falling
geometrically) so that singular vectors are determined up to sign and float32 SVD agrees with
float64 to ~1e-5; the tolerances below are far tighter than any plausible mistake.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import specan
from specan import analysis
from specan.errors import StoreError
from specan.pipeline import IngestOptions, ingest

D, HEADS, HIDDEN, OUT = 16, 4, 24, 8
HD = D // HEADS
STEPS = [0, 10, 20, 30]
TOL = 2e-4


def orthogonal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def designed(rng: np.random.Generator, m: int, n: int, decay: float) -> np.ndarray:
    """An m x n matrix with singular values 3 * decay^i: well separated, so vectors are stable."""
    r = min(m, n)
    s = 3.0 * decay ** np.arange(r)
    return orthogonal(rng, m)[:, :r] * s @ orthogonal(rng, n)[:, :r].T


def weights(seed: int) -> dict[str, np.ndarray]:
    """A one-block torch-Transformer-named model; each Q/K head has its own spectrum."""
    rng = np.random.default_rng(seed)
    decay = 0.55 + 0.1 * rng.random()  # changes from checkpoint to checkpoint
    q = np.concatenate([designed(rng, HD, D, 0.3 + 0.15 * h) for h in range(HEADS)])
    k = np.concatenate([designed(rng, HD, D, 0.35 + 0.12 * h) for h in range(HEADS)])
    v = designed(rng, D, D, decay)
    w = {
        "embed.weight": designed(rng, 40, D, decay),
        "block.self_attn.in_proj_weight": np.concatenate([q, k, v]),
        "block.self_attn.out_proj.weight": designed(rng, D, D, decay),
        "block.linear1.weight": designed(rng, HIDDEN, D, decay),
        "block.linear2.weight": designed(rng, D, HIDDEN, decay),
        "head.weight": designed(rng, OUT, D, decay),
        "head.bias": rng.standard_normal(OUT),
    }
    return {n: a.astype(np.float32) for n, a in w.items()}


PAIRS = [
    {"prev": "embed.weight", "next": "block.self_attn.in_proj_weight", "kind": "embedding"},
    {"prev": "block.self_attn.in_proj_weight", "next": "block.self_attn.in_proj_weight",
     "kind": "qk"},
    {"prev": "block.self_attn.in_proj_weight", "next": "block.self_attn.out_proj.weight",
     "kind": "linear", "prev_part": "v"},
    {"prev": "block.self_attn.out_proj.weight", "next": "block.linear1.weight"},
    {"prev": "block.linear1.weight", "next": "block.linear2.weight"},
    {"prev": "block.linear2.weight", "next": "head.weight"},
]  # fmt: skip


def write_run(root: Path, steps: list[int], seed: int) -> dict[int, dict[str, np.ndarray]]:
    (root / "checkpoints").mkdir(parents=True)
    config = {"trainer": "test", "model": {"n_heads": HEADS}, "pairs": PAIRS}
    (root / "run.json").write_text(json.dumps(config))
    raw = {}
    for i, step in enumerate(steps):
        raw[step] = weights(seed + i)
        name = root / "checkpoints" / f"step-{step:08d}.safetensors"
        save_file(raw[step], str(name), metadata={"step": str(step)})
    ingest(root, IngestOptions(top_k=0))
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("analysis") / "run"
    return root, write_run(root, STEPS, seed=0)


# -- independent NumPy ---------------------------------------------------------------------------
def svd64(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)
    return u, s, vt.T


def erank_norm(a: np.ndarray) -> float:
    s = svd64(a)[1]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()) / len(s))


def q_head(w: dict, h: int) -> np.ndarray:
    return w["block.self_attn.in_proj_weight"][h * HD : (h + 1) * HD]


def k_head(w: dict, h: int) -> np.ndarray:
    return w["block.self_attn.in_proj_weight"][D + h * HD : D + (h + 1) * HD]


MATRICES = ["embed.weight", "block.self_attn.in_proj_weight", "block.self_attn.out_proj.weight",
            "block.linear1.weight", "block.linear2.weight", "head.weight"]  # fmt: skip


def items(ds: Any, item: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (diagonal [T, n] without its NaN padding, score [T]) of an align/sva Dataset."""
    return {
        str(label): (ds.diag.values[i, :, : ds.length.values[i]], ds.score.values[i])
        for i, label in enumerate(ds[item].values)
    }


# -- rank ----------------------------------------------------------------------------------------
def test_rank_of_every_view_and_the_model_mean(run: tuple[Path, dict]) -> None:
    root, raw = run
    r = specan.open(root).rank()
    assert r.step.values.tolist() == STEPS
    row = dict(zip(r.view.values.tolist(), r.values, strict=True))
    for t, step in enumerate(STEPS):
        w = raw[step]
        for name in MATRICES:
            assert row[name][t] == pytest.approx(erank_norm(w[name]), abs=TOL)
        # per-head views: the mean over every head, not head 0 alone
        q = np.mean([erank_norm(q_head(w, h)) for h in range(HEADS)])
        k = np.mean([erank_norm(k_head(w, h)) for h in range(HEADS)])
        assert row["block.self_attn.in_proj_weight__q"][t] == pytest.approx(q, abs=TOL)
        assert row["block.self_attn.in_proj_weight__k"][t] == pytest.approx(k, abs=TOL)
        # the model's mean: its six weight matrices, one per parameter (SPEC §3)
        mean = np.mean([erank_norm(w[name]) for name in MATRICES])
        assert float(r.model_mean[t]) == pytest.approx(mean, abs=TOL)
    assert r.attrs["matrices"] == len(MATRICES) == int(r.in_mean.sum())


# -- alignment -----------------------------------------------------------------------------------
def test_alignment_diagonals_against_numpy(run: tuple[Path, dict]) -> None:
    root, raw = run
    a = specan.open(root).align()
    got = items(a, "pair")
    assert not a.attrs["skipped"] and len(got) == len(PAIRS)
    for t, step in enumerate(STEPS):
        w = raw[step]

        def check(label: str, prev: np.ndarray, nxt: np.ndarray, t: int = t) -> None:
            full = np.abs(nxt.T @ prev)  # A_ij = |<v_i(next), u_j(prev)>|
            n = min(full.shape)
            np.testing.assert_allclose(got[label][0][t], np.diag(full)[:n], atol=TOL)
            assert got[label][1][t] == pytest.approx(np.diag(full)[:10].mean(), abs=TOL)

        qkv = "block.self_attn.in_proj_weight"
        check(f"embed.weight -> {qkv}", svd64(w["embed.weight"])[2], svd64(w[qkv])[2])
        v_prev = svd64(w[qkv][2 * D :])[0]
        out_v = svd64(w["block.self_attn.out_proj.weight"])[2]
        check(f"{qkv}[v] -> block.self_attn.out_proj.weight", v_prev, out_v)
        for prev, nxt in zip(MATRICES[2:], MATRICES[3:], strict=False):
            check(f"{prev} -> {nxt}", svd64(w[prev])[0], svd64(w[nxt])[2])
        # Q·K per head, left with left, averaged over heads
        per_head = [
            np.diag(np.abs(svd64(k_head(w, h))[0].T @ svd64(q_head(w, h))[0])) for h in range(HEADS)
        ]
        np.testing.assert_allclose(got[f"{qkv} Q·K"][0][t], np.mean(per_head, axis=0), atol=TOL)


# -- SVA -----------------------------------------------------------------------------------------
def sva_diag(w_t: np.ndarray, w_ref: np.ndarray) -> np.ndarray:
    u, _, v = svd64(w_t)
    u_ref, _, v_ref = svd64(w_ref)
    return np.abs((u * u_ref).sum(axis=0)) * np.abs((v * v_ref).sum(axis=0))


def test_sva_against_the_final_checkpoint(run: tuple[Path, dict]) -> None:
    root, raw = run
    g = specan.open(root).sva()
    assert "step 30" in g.attrs["reference"] and not g.attrs["dropped"]
    by_key = items(g, "view")
    assert set(by_key) == set(MATRICES)
    final = raw[STEPS[-1]]
    for t, step in enumerate(STEPS):
        for name in MATRICES:
            expect = sva_diag(raw[step][name], final[name])
            np.testing.assert_allclose(by_key[name][0][t], expect, atol=TOL)
            assert by_key[name][1][t] == pytest.approx(expect[:10].mean(), abs=TOL)


def test_sva_against_another_run_matches_by_step(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, raw = run
    other_steps = [10, 25, 30, 40]
    other = write_run(tmp_path / "other", other_steps, seed=100)
    g = specan.open(root).sva(tmp_path / "other")
    assert g.step.values.tolist() == [10, 30]  # the shared steps
    dropped = g.attrs["dropped"]
    assert any("0, 20" in d for d in dropped) and any("25, 40" in d for d in dropped)
    by_key = items(g, "view")
    for t, step in enumerate([10, 30]):
        for name in MATRICES:
            expect = sva_diag(raw[step][name], other[step][name])
            np.testing.assert_allclose(by_key[name][0][t], expect, atol=TOL)


def test_sva_by_epoch_and_no_shared_steps(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = run
    write_run(tmp_path / "late", [100, 200], seed=7)
    with pytest.raises(StoreError, match="share no step"):
        specan.open(root).sva(tmp_path / "late")


def test_sva_refuses_a_different_model(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = run
    other = tmp_path / "wide"
    (other / "checkpoints").mkdir(parents=True)
    w = {"head.weight": np.ones((OUT + 1, D), dtype=np.float32)}
    save_file(w, str(other / "checkpoints" / "step-00000010.safetensors"), {"step": "10"})
    ingest(other, IngestOptions(top_k=0))
    with pytest.raises(StoreError, match="'head.weight' is 9x16 there but 8x16"):
        specan.open(root).sva(other)


def test_checkpoint_without_a_step_is_never_final(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(3)
    mats = {n: designed(rng, 6, 5, 0.5).astype(np.float32) for n in ("a", "final")}
    save_file({"w.weight": mats["a"]}, str(root / "step-5.safetensors"))
    save_file({"w.weight": mats["final"]}, str(root / "final.safetensors"))
    report = ingest(root, IngestOptions(top_k=0))
    assert any("final.safetensors" in w and "no step" in w for w in report.warnings)
    g = specan.open(root).sva()
    assert "step 5" in g.attrs["reference"]
    assert any("final.safetensors" in d for d in g.attrs["dropped"])
    # compared against step 5 (index 0), so the first row agrees with itself exactly
    np.testing.assert_allclose(g.diag.values[0, 0, : g.length.values[0]], 1.0, atol=1e-5)


def test_steps_selection_is_strict() -> None:
    steps = np.array(STEPS)
    assert list(analysis.select_steps(steps, "10:20")) == [1, 2]
    assert list(analysis.select_steps(steps, "30,0")) == [0, 3]
    with pytest.raises(ValueError, match="no checkpoint at step 77"):
        analysis.select_steps(steps, "10,77")
    with pytest.raises(ValueError, match="select no checkpoint"):
        analysis.select_steps(steps, "500:")


def test_listings_follow_model_order_in_an_older_file_ordered_store(tmp_path: Path) -> None:
    root = tmp_path / "mlp12"
    rng = np.random.default_rng(0)
    w = {f"layers.{i}.weight": designed(rng, 6, 6, 0.5).astype(np.float32) for i in range(12)}
    save_file(w, str(root.mkdir() or root / "step-1.safetensors"), {"step": "1"})
    ingest(root)
    # stores written before model order listed views in file (alphabetical) order
    from specan import store

    st = store.open_store(store.store_path(root), mode="r+")
    st.group.update_attributes({"views": dict(sorted(st.views.items()))})
    assert list(store.open_store(store.store_path(root)).views)[:3] == [
        "layers.0.weight", "layers.1.weight", "layers.10.weight"
    ]  # fmt: skip
    natural = [f"layers.{i}.weight" for i in range(12)]
    r = specan.open(root)
    assert r.rank().view.values.tolist() == natural
    assert r.sva().view.values.tolist() == natural
    assert r.align().pair.values.tolist() == [
        f"{a} -> {b}" for a, b in zip(natural, natural[1:], strict=False)
    ]
    assert [v["key"] for v in store.summary(store.store_path(root))["views"]] == natural


def test_sva_by_epoch_pairs_the_same_epoch(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    raw = {}
    for name, steps in (("a", [0, 10, 20]), ("b", [0, 5, 10])):
        root = tmp_path / name
        root.mkdir()
        for epoch, step in enumerate(steps):
            w = designed(rng, 12, 8, 0.5).astype(np.float32)
            raw[name, epoch] = w
            meta = {"step": str(step), "epoch": str(epoch)}
            save_file({"w.weight": w}, str(root / f"step-{step}.safetensors"), meta)
        ingest(root, IngestOptions(top_k=0))
    a = specan.open(tmp_path / "a")
    assert a.sva(tmp_path / "b").step.values.tolist() == [0, 10]
    g = a.sva(tmp_path / "b", by="epoch")
    # a's steps, matched by epoch
    assert g.step.values.tolist() == [0, 10, 20] and not g.attrs["dropped"]
    for epoch in range(3):
        expect = sva_diag(raw["a", epoch], raw["b", epoch])
        np.testing.assert_allclose(g.diag.values[0, epoch, : g.length.values[0]], expect, atol=TOL)
