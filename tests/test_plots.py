"""Figures: each function returns a figure and writes nothing; report.save_all writes what has
data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

import specan
from specan import plots, report
from specan.demo import write_synthetic_run
from specan.pipeline import IngestOptions, ingest

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, steps: list[int]) -> None:
    lines = []
    for i, s in enumerate(steps):
        rec = {"step": s, "train_loss": 2.0 / (i + 1), "val_loss": 3.0 - 0.5 * i}
        if i != 1:  # one step without validation: a NaN the plot must skip
            rec["val_acc"] = 0.2 * i
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def write_mlp_run(root: Path, *, vectors: bool = True, seed: int = 0) -> Path:
    """A flat folder of three checkpoints of a 3-layer MLP, ingested."""
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for step in (0, 10, 1000):
        state = {
            "fc1.weight": torch.randn(32, 16, generator=gen),
            "fc2.weight": torch.randn(32, 32, generator=gen),
            "fc3.weight": torch.randn(10, 32, generator=gen),
        }
        save_file(state, root / f"step-{step}.safetensors")
    ingest(root, IngestOptions(vectors=vectors))
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_synthetic_run(tmp_path_factory.mktemp("s") / "run", width=16, checkpoints=4)
    ingest(run)
    write_metrics(run, [0, 100, 200, 300])
    return run


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mlp_run(tmp_path_factory.mktemp("m") / "mlp")


@pytest.fixture
def two_each(monkeypatch: pytest.MonkeyPatch) -> int:
    """At most two per-pair/per-view figures of each kind: rendering is the slow part."""
    monkeypatch.setattr(plots, "MAX_FIGURES", 2)
    return 2


def files_under(path: Path) -> set[Path]:
    """Files below ``path``, except the store's own (analyses cache results in its derived/)."""
    return {p for p in path.rglob("*") if p.is_file() and "specan.zarr" not in p.parts}


def check_pngs(paths: list[Path]) -> None:
    for p in paths:
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:8] == PNG


def test_save_all_synthetic_infers_lstm_pairs(
    synthetic: Path, tmp_path: Path, two_each: int
) -> None:
    before = files_under(synthetic)
    out = tmp_path / "figs"
    paths = report.save_all(synthetic, out)
    names = [p.name for p in paths]
    assert names[:3] == ["rank.png", "loss_rank.png", "align_scores.png"]
    assert len([n for n in names if n.startswith("align_") and n[6].isdigit()]) == two_each
    assert len([n for n in names if n.startswith("sva_")]) == 1 + two_each
    assert len([n for n in names if n.startswith("sigma_")]) == two_each
    assert "sigma_embed.weight.png" in names  # the largest view
    assert "stable_rank.png" in names  # a registered analysis: drawn without plots knowing it
    assert len(set(names)) == len(names) == 5 + 3 * two_each
    check_pngs(paths)
    assert files_under(out) == set(paths)
    assert files_under(synthetic) == before  # nothing written beside the run


def test_save_all_alignment_svg_and_views(mlp: Path, tmp_path: Path, two_each: int) -> None:
    paths = report.save_all(mlp, tmp_path / "out", svg=True, views=["fc3.weight"])
    names = {p.name for p in paths}
    stems = {
        "rank",
        "align_scores",
        "align_0",
        "align_1",
        "sva_scores",
        "sva_fc2.weight",
        "sva_fc1.weight",
        "sigma_fc3.weight",  # SVA: the two largest views
        "stable_rank",
    }
    assert names == {f"{s}.{e}" for s in stems for e in ("png", "svg")}  # no metrics: no loss
    check_pngs([p for p in paths if p.suffix == ".png"])
    for p in paths:
        if p.suffix == ".svg":
            assert "<svg" in p.read_text()[:2000]


def test_save_all_without_vectors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = write_mlp_run(tmp_path / "novec", vectors=False)
    with caplog.at_level(logging.WARNING, logger="specan.report"):
        paths = report.save_all(run, tmp_path / "out", views=["fc1.weight"])
    assert sorted(p.name for p in paths) == ["rank.png", "sigma_fc1.weight.png", "stable_rank.png"]
    check_pngs(paths)
    assert "without vectors" in caplog.text and "SVA" in caplog.text


def test_figures_write_nothing(synthetic: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = specan.open(synthetic)
    rk = run.analyse("rank", cache=False)
    fig = plots.rank_heatmap(rk, title="r: rank")
    (im,) = fig.axes[0].images
    assert im.get_clim() == (0.0, 1.0)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "attn.in_proj_weight [q_heads]" in labels and "mlp.0.weight" in labels
    assert fig.axes[0].get_title() == "r: rank"
    assert len(fig.axes) == 2  # the colour bar

    metrics = {n: run.metrics[n].reindex(step=run.steps).values for n in run.metrics.data_vars}
    fig = plots.loss_under_rank(rk, metrics, title="r: loss")
    top = fig.axes[0]
    assert {ln.get_label() for ln in top.get_lines()} == {"train_loss", "val_loss"}
    twin = next(a for a in fig.axes if a.get_ylabel() == "accuracy")
    (acc,) = twin.get_lines()
    assert len(acc.get_xdata()) == 3  # the NaN step is skipped
    steps, sigma = run.steps, run.sigma("attn.in_proj_weight__q").values
    assert sigma.ndim == 3
    fig = plots.singular_values(steps, sigma, title="r: q")
    assert len(fig.axes[0].get_lines()) == sigma.shape[-1]
    assert "heads" in fig.axes[0].get_ylabel()
    assert list(tmp_path.iterdir()) == []


def test_step_axis_scales() -> None:
    sigma = np.abs(np.random.default_rng(0).normal(size=(4, 5))) + 0.1
    fig = plots.singular_values(np.array([0, 10, 100, 10000]), sigma, title="t")
    assert fig.axes[0].get_xscale() == "symlog"
    fig = plots.singular_values(np.array([1, 10, 100, 10000]), sigma, title="t")
    assert fig.axes[0].get_xscale() == "log"
    fig = plots.singular_values(np.array([0, 100, 200, 300]), sigma, title="t")
    assert fig.axes[0].get_xscale() == "linear"


def test_empty_data_draws_a_placeholder() -> None:
    empty = xr.Dataset(
        {"value": (("pair", "step"), np.zeros((0, 2)))}, coords={"pair": [], "step": [0, 1]}
    )
    fig = plots.alignment_scores(empty, title="t")
    assert fig.axes[0].texts[0].get_text() == "no data"
    fig = plots.sva_diagonal(np.array([0, 1]), np.random.default_rng(0).random((2, 7)), title="t")
    assert fig.axes[0].images[0].get_array().shape == (7, 2)  # index rows x checkpoints
    plots.png_bytes(fig)


def test_figures_draw_only_the_results_given(
    mlp: Path, monkeypatch: pytest.MonkeyPatch, two_each: int
) -> None:
    from specan.api import Run

    an = report.analyse(mlp)
    rank = an.results["rank"].copy()
    rank["value"] = rank["value"] * 0 + 0.25  # a result no analysis would give
    an.results = {"rank": rank}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a figure ran an analysis")

    monkeypatch.setattr(Run, "analyse", refuse)
    plots_ = list(plots.figures(an))
    assert [p.name for p in plots_][:1] == ["rank"]
    assert not any(p.name.startswith(("align", "sva")) for p in plots_)  # not given: not drawn
    (im,) = plots_[0].figure.axes[0].images
    np.testing.assert_array_equal(im.get_array(), 0.25)


def test_labels_escape_control_characters_and_cut_long_names_in_the_middle() -> None:
    from specan.plots import as_label

    assert as_label("layers.0.weight") == "layers.0.weight"
    assert as_label("nul\x00name") == "nul\\x00name"
    long_a, long_b = "n" * 10_000, "n" * 9_999 + "m"
    got_a, got_b = as_label(long_a), as_label(long_b)
    assert len(got_a) == len(got_b) == 60 and "…" in got_a
    assert got_a != got_b and got_b.endswith("m")
