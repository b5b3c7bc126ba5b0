"""The public API (`import specan`): lazy where it says so, equal to the CLI, and right against
NumPy float64 from the raw weights (the run of `test_analysis`, with metrics added)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analysis import MATRICES, STEPS, TOL, erank_norm, svd64, write_run
from typer.testing import CliRunner

import specan
from specan.cli import app
from specan.errors import OptionError, ViewNotFoundError

xr = pytest.importorskip("xarray")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("api") / "run"
    raw = write_run(root, STEPS, seed=0)
    records = [{"step": s, "epoch": i, "loss": 1.0 / (i + 1)} for i, s in enumerate(STEPS)]
    records.insert(1, {"step": 5, "epoch": 0, "loss": 0.9, "val_acc": 0.25})  # no checkpoint
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, raw


def cli_json(*args: str) -> list[dict]:
    res = CliRunner().invoke(app, [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout[res.stdout.index("[") :])


def test_import_specan_is_cheap() -> None:
    code = "import sys, specan\nassert 'numpy' not in sys.modules and 'zarr' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(specan.__all__) == {"Comparison", "Run", "compare", "ingest", "open"}


def test_open_lists_steps_views_and_metrics(run: tuple[Path, dict]) -> None:
    root, _ = run
    r = specan.open(root)
    assert r.steps.tolist() == STEPS
    assert r.views[: len(MATRICES) - 1][:2] == ["embed.weight", "block.self_attn.in_proj_weight"]
    m = r.metrics
    assert m.step.values.tolist() == [0, 5, 10, 20, 30]  # every evaluation, not only checkpoints
    assert m["loss"].sel(step=[0, 5, 30]).values.tolist() == [1.0, 0.9, 0.25]
    assert np.isnan(m["val_acc"].sel(step=0)) and float(m["val_acc"].sel(step=5)) == 0.25
    assert specan.open(root / "specan.zarr").steps.tolist() == STEPS  # the store itself


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key read from a LocalStore from now on."""
    from zarr.storage import LocalStore

    keys: list[str] = []
    real = LocalStore.get

    async def get(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        keys.append(key)
        return await real(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", get)
    return keys


def test_open_and_sigma_are_lazy_one_step_reads_one_chunk(
    run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dask.array as da

    root, raw = run
    keys = _reads(monkeypatch)
    r = specan.open(root)
    _ = r.steps, r.views
    s = r.sigma("block.linear1.weight")
    one = s.sel(step=20)
    assert isinstance(s.data, da.Array) and isinstance(one.data, da.Array)
    assert not [k for k in keys if "/c/" in k or k.endswith("/c")]  # no chunk read yet
    got = one.values
    chunks = {k for k in keys if "/c/" in k}
    assert chunks == {"views/block.linear1.weight/sigma/c/0/0"}
    want = svd64(raw[20]["block.linear1.weight"])[1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert s.dims == ("step", "index") and s.step.values.tolist() == STEPS
    heads = r.sigma("block.self_attn.in_proj_weight__q")
    assert heads.dims == ("step", "head", "index")
    with pytest.raises(ViewNotFoundError, match="no view 'nope'"):
        r.sigma("nope")


def test_rank_against_numpy_and_equal_to_the_cli(run: tuple[Path, dict]) -> None:
    root, raw = run
    e = specan.open(root).rank()
    assert e.dims == ("view", "step")
    for step in STEPS:
        for name in MATRICES:
            want = erank_norm(raw[step][name])
            assert float(e.sel(view=name, step=step)) == pytest.approx(want, abs=TOL)
        mean = np.mean([erank_norm(raw[step][n]) for n in MATRICES])  # SPEC §3: one per matrix
        assert float(e.model_mean.sel(step=step)) == pytest.approx(mean, abs=TOL)
    assert sorted(e.view[e.in_mean].values.tolist()) == sorted(MATRICES)
    rows = cli_json("rank", str(root))
    assert len(rows) == e.size
    for row in rows:
        assert row["erank_norm"] == pytest.approx(float(e.sel(view=row["view"], step=row["step"])))
        assert row["in_mean"] == bool(e.in_mean.sel(view=row["view"]))


def test_align_and_sva_equal_the_cli(run: tuple[Path, dict]) -> None:
    root, raw = run
    r = specan.open(root)
    a = r.align()
    rows = cli_json("align", str(root))
    assert len(rows) == a.sizes["pair"] * a.sizes["step"]
    for row in rows:
        cell = a.sel(pair=row["pair"], step=row["step"])
        assert row["score"] == pytest.approx(float(cell.score))
        n = len(row["diag"])
        np.testing.assert_allclose(row["diag"], cell.diag.values[:n], rtol=1e-6)
        assert np.isnan(cell.diag.values[n:]).all()
    g = r.sva()
    rows = cli_json("sva", str(root))
    assert len(rows) == g.sizes["view"] * g.sizes["step"]
    for row in rows:
        cell = g.sel(view=row["view"], step=row["step"])
        assert row["score"] == pytest.approx(float(cell.score))
        n = len(row["diag"])
        np.testing.assert_allclose(row["diag"], cell.diag.values[:n], rtol=1e-6)
        assert np.isnan(cell.diag.values[n:]).all()
    # S_ii at step 0 against the final checkpoint, from the raw weights
    u0, _, v0 = svd64(raw[0]["block.linear1.weight"])
    u1, _, v1 = svd64(raw[STEPS[-1]]["block.linear1.weight"])
    want = np.abs(np.sum(u0 * u1, axis=0)) * np.abs(np.sum(v0 * v1, axis=0))
    got = g.diag.sel(view="block.linear1.weight", step=0).values[: len(want)]
    np.testing.assert_allclose(got, want, atol=TOL)


def test_sva_against_another_run_and_keyword_errors(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, raw = run
    other_raw = write_run(tmp_path / "other", [10, 20, 40], seed=7)
    g = specan.open(root).sva(against=specan.open(tmp_path / "other"))
    assert g.step.values.tolist() == [10, 20]
    dropped = " | ".join(g.attrs["dropped"])
    assert "steps 40 have no match" in dropped and "steps 0, 30 have no match" in dropped
    u0, _, v0 = svd64(raw[20]["head.weight"])
    u1, _, v1 = svd64(other_raw[20]["head.weight"])
    want = np.abs(np.sum(u0 * u1, axis=0)) * np.abs(np.sum(v0 * v1, axis=0))
    got = g.diag.sel(view="head.weight", step=20).values[: len(want)]
    np.testing.assert_allclose(got, want, atol=TOL)
    with pytest.raises(ValueError, match="by='epoch' needs against="):
        specan.open(root).sva(by="epoch")


def test_derived_results_open_with_xarray_alone(run: tuple[Path, dict]) -> None:
    root, _ = run
    e = specan.open(root).rank()
    ds = xr.open_zarr(root / "specan.zarr" / "derived" / "rank", consolidated=False)
    assert ds["value"].dims == ("view", "step") and ds.step.values.tolist() == STEPS
    np.testing.assert_array_equal(ds["value"].values, e.values)
    assert ds.attrs["info"]["labels"]["view"] == [["view"], e.view.values.tolist()]
    al = xr.open_zarr(root / "specan.zarr" / "derived" / "align", consolidated=False)
    assert al["diag"].dims == ("pair", "step", "index")


def test_cache_false_writes_nothing_and_an_unwritable_store_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import contextmanager

    from specan import store

    root = tmp_path / "run"
    write_run(root, STEPS[:2], seed=3)
    derived = root / "specan.zarr" / "derived"
    specan.open(root).rank(cache=False)
    assert not derived.exists()

    @contextmanager
    def read_only(path):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Read-only file system", str(path) + ".lock")
        yield

    monkeypatch.setattr(store, "lock", read_only)
    assert specan.open(root).rank().sizes["step"] == 2
    assert not derived.exists()


def test_ingest_is_keyword_only_and_speaks_of_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        specan.ingest(tmp_path, 5)  # type: ignore[misc]
    with pytest.raises(OptionError) as e:
        specan.ingest(tmp_path, vectors=False, top_k=3)
    assert "top_k" in str(e.value) and "--" not in str(e.value)


def test_registered_analyses_by_name(run: tuple[Path, dict]) -> None:
    from specan import registry

    root, _ = run
    r = specan.open(root)
    assert registry.names()[:3] == ["rank", "align", "sva"]
    np.testing.assert_array_equal(r.analyse("rank")["value"].values, r.rank().values)
    np.testing.assert_array_equal(r.analyse("sva")["value"].values, r.sva().score.values)
    with pytest.raises(ValueError, match="no analysis 'nope'; known: rank, align, sva"):
        r.analyse("nope")


def test_one_cache_keyed_by_version_and_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from specan import analysis, metrics

    root = tmp_path / "run"
    write_run(root, STEPS[:2], seed=4)
    r = specan.open(root)
    whole, per_head = r.align(), r.align(vo_per_head=True)
    assert per_head.attrs["rule"].endswith("; V -> O per head")
    assert not whole.attrs["rule"].endswith("per head")
    groups = sorted(p.name for p in (root / "specan.zarr" / "derived").iterdir())
    assert groups[0] == "align" and groups[1].startswith("align-") and len(groups) == 2
    calls: list[int] = []
    real = metrics.alignment
    monkeypatch.setattr(metrics, "alignment", lambda *a: calls.append(1) or real(*a))
    again = specan.open(root).align(vo_per_head=True)
    assert calls == [] and again.attrs["rule"] == per_head.attrs["rule"]  # from derived/
    np.testing.assert_array_equal(again.diag.values, per_head.diag.values)
    assert specan.open(root).align(vo_per_head=False).pair.values.tolist() == (
        whole.pair.values.tolist()
    )  # the default, given explicitly, is the default result
    assert calls == []
    monkeypatch.setattr(analysis, "ALIGN", dataclasses.replace(analysis.ALIGN, version=99))
    np.testing.assert_array_equal(specan.open(root).align().diag.values, whole.diag.values)
    assert calls  # a new version is recomputed


# A whole analysis as a user would add it: this module, and the one line registering it.
_FROBENIUS = """
import numpy as np
import xarray as xr

from specan.registry import Analysis


def compute(run):
    rows = [np.sqrt((run.sigma(v).values.astype(float) ** 2).sum(-1)
                    + np.nan_to_num(run.tail(v).values.astype(float))) for v in run.views]
    values = np.array([r.mean(-1) if r.ndim == 2 else r for r in rows])
    return xr.Dataset({"value": (("view", "step"), values)},
                      coords={"view": run.views, "step": run.steps})


ANALYSIS = Analysis(name="frobenius", title="Frobenius norm", reads=("sigma", "tail"),
                    compute=compute, summary="mean Frobenius norm", bounds=None)
"""


def test_a_new_analysis_is_one_module_and_one_registration_line(
    run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered, an analysis is computed, cached, compared, plotted and reported with no edit
    anywhere else."""
    from specan import registry

    root, raw = run
    (tmp_path / "frobenius_analysis.py").write_text(_FROBENIUS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.ANALYSES, "frobenius", "frobenius_analysis:ANALYSIS")

    def want(step: int, name: str) -> float:
        return float(np.linalg.norm(np.asarray(raw[step][name], dtype=np.float64)))

    ds = specan.open(root).analyse("frobenius")
    for step in STEPS:
        for name in MATRICES:
            assert float(ds.value.sel(view=name, step=step)) == pytest.approx(want(step, name))
    assert (root / "specan.zarr" / "derived" / "frobenius").is_dir()  # cached
    other = write_run(tmp_path / "other", STEPS, seed=9)
    rows = cli_json("compare", str(root), str(tmp_path / "other"), "--metric", "frobenius")
    head = [r for r in rows if r["view"] == "head.weight"]
    assert len(head) == 2 * len(STEPS)
    for r in head:
        w = (raw if r["run"] == "run" else other)[r["step"]]["head.weight"]
        assert r["frobenius"] == pytest.approx(float(np.linalg.norm(w.astype(np.float64))))
    out = tmp_path / "figs"
    res = CliRunner().invoke(app, ["plot", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "frobenius.png").stat().st_size > 0
    page = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(root), "--out", str(page)])
    assert res.exit_code == 0, res.output
    assert 'id="frobenius"' in page.read_text() and "mean Frobenius norm" in page.read_text()
