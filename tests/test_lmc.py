"""Tests for specan.lmc: interpolation and the barrier (Eqn 6) against NumPy computations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from specan.errors import ModelError, OptionError
from specan.lmc import alphas, barrier, endpoint_losses, interpolate, loss_path

GRID = np.linspace(0, 1, 11)


def np_barrier(x: np.ndarray, y: np.ndarray) -> float:
    return max(y[i] - ((1 - x[i]) * y[0] + x[i] * y[-1]) for i in range(1, len(x) - 1))


def mse(x: torch.Tensor, y: torch.Tensor):
    return lambda model: float(((model(x) - y) ** 2).mean())


def test_alphas_are_eleven_even_points_by_default():
    np.testing.assert_array_equal(alphas(), GRID)
    assert len(alphas(5)) == 5
    with pytest.raises(ValueError, match="at least 3"):
        alphas(2)


def test_interpolate_every_float_entry_and_keep_counters():
    a = {"w": torch.tensor([[1.0, 2.0]]), "n": torch.tensor(3), "m": torch.tensor([4.0])}
    b = {"w": torch.tensor([[3.0, -2.0]]), "n": torch.tensor(9), "m": torch.tensor([0.0])}
    out = interpolate(a, b, 0.25)
    np.testing.assert_allclose(out["w"].numpy(), [[1.5, 1.0]])
    np.testing.assert_allclose(out["m"].numpy(), [3.0])
    assert out["n"].item() == 3
    with pytest.raises(ValueError, match="differ in entries: x"):
        interpolate(a, {**b, "x": torch.zeros(1)}, 0.5)


def test_barrier_is_the_largest_interior_excess_over_the_chord():
    y = np.array([1.0, 3.0, 0.0, 5.0, 2.0])
    x = np.linspace(0, 1, 5)
    assert barrier(x, y) == pytest.approx(np_barrier(x, y))
    assert barrier(x, y) == pytest.approx(5.0 - (0.25 * 1.0 + 0.75 * 2.0))
    # the endpoints never count, even when they are the largest
    assert barrier([0, 0.5, 1], [10.0, 0.0, 10.0]) == -10.0


def test_identical_pair_has_barrier_zero_with_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = loss_path(model, state, state, mse(x, y), alpha=GRID, bn_data=x)
    assert barrier(GRID, losses) == pytest.approx(0.0, abs=1e-6)
    assert np.ptp(losses) < 1e-6


def test_convex_loss_of_a_linear_model_has_no_barrier():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 1))
    w1, w2 = rng.standard_normal((2, 1, 4))
    b1, b2 = rng.standard_normal((2, 1))
    model = nn.Linear(4, 1).double()
    t = torch.from_numpy
    a = {"weight": t(w1), "bias": t(b1)}
    b = {"weight": t(w2), "bias": t(b2)}
    losses = loss_path(model, a, b, mse(t(x), t(y)), alpha=GRID)
    expected = [
        np.mean((x @ ((1 - s) * w1 + s * w2).T + ((1 - s) * b1 + s * b2) - y) ** 2) for s in GRID
    ]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    # L(α) − chord = −α(1−α)·mean((XΔw + Δb)²): largest at α = 0.1 and 0.9
    c = np.mean((x @ (w2 - w1).T + (b2 - b1)) ** 2)
    assert barrier(GRID, losses) == pytest.approx(-0.09 * c, rel=1e-9)
    assert barrier(GRID, losses) <= 0.0


def test_a_non_convex_path_has_a_positive_barrier():
    # f(x) = w2·w1·x fits y = x at (1, 1) and at (−1, −1); the midpoint (0, 0) does not
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    a = {"0.weight": torch.tensor([[1.0]]), "1.weight": torch.tensor([[1.0]])}
    b = {k: -v for k, v in a.items()}
    a, b = ({k: v.double() for k, v in s.items()} for s in (a, b))
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    losses = loss_path(model, a, b, mse(x, x), alpha=GRID)
    expected = [((1 - 2 * s) ** 2 - 1) ** 2 * np.mean([1.0, 4.0]) for s in GRID]
    np.testing.assert_allclose(losses, expected, atol=1e-12)
    assert barrier(GRID, losses) == pytest.approx(np_barrier(GRID, np.array(expected)))
    assert barrier(GRID, losses) == pytest.approx(2.5)


def test_endpoint_losses_of_a_tiny_vgg(tmp_path):
    from specan_trainers import vgg

    out = tmp_path / "vgg"
    args = ["--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05"]
    vgg.main([*args, "--batch-size", "32", "--epochs", "1", "--out", str(out)])
    ck = sorted((out / "checkpoints").glob("*.safetensors"))
    ds = endpoint_losses(out, ck[0], ck[-1], n=5)
    assert list(ds["alpha"].values) == [0, 0.25, 0.5, 0.75, 1]
    loss = ds["train_loss"].values
    assert ds.attrs["barrier"] == pytest.approx(np_barrier(ds["alpha"].values, loss))
    # α = 1 by hand: the last checkpoint
    from safetensors.numpy import load_file

    assert loss[-1] == pytest.approx(hand_train_loss(out, load_file(str(ck[-1]))), rel=1e-5)


def hand_train_loss(run, state: dict[str, np.ndarray]) -> float:
    """The training loss of `state` in the run's model, batch norm recomputed by hand over the
    whole training set (cumulative averages), in eval mode."""
    import specan_trainers

    model = specan_trainers.build_model(run)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    data = specan_trainers.eval_data(run)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(data["x_train"])
        logits = model.eval()(data["x_train"])
    return torch.nn.functional.cross_entropy(logits, data["y_train"]).item()


# -- LMC folders (`specan train vgg --lmc`) ----------------------------------------------------
@pytest.fixture(scope="module")
def lmc_root(tmp_path_factory):
    from specan_trainers import vgg

    root = tmp_path_factory.mktemp("lmc") / "vgg-lmc"
    args = ["--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05"]
    vgg.main([*args, "--batch-size", "32", "--epochs", "2", "--lmc", "--trunks", "2",
              "--branches", "2", "--out", str(root)])  # fmt: skip
    return root


def test_select_splits():
    from specan.lmc import select_splits

    splits = [0, 2, 4, 6, 8, 10, 20]  # 10 steps an epoch
    assert select_splits(splits, 10, None) == splits
    assert select_splits(splits, 10, "0..1") == [0, 2, 4, 6, 8, 10]
    assert select_splits(splits, 10, "0.6..") == [6, 8, 10, 20]
    assert select_splits(splits, 10, "2,0.2") == [2, 20]
    with pytest.raises(ValueError, match="no split at epoch 3; splits at epochs 0, 0.2, .* 2$"):
        select_splits(splits, 10, "0,3")
    with pytest.raises(ValueError, match="selects no split"):
        select_splits(splits, 10, "5..9")
    with pytest.raises(ValueError, match="expected A..B or a list"):
        select_splits(splits, 10, "one")


def test_barriers_of_every_branch_pair(lmc_root):
    from specan.lmc import barriers
    from specan.runs import discover

    ds = barriers(lmc_root, n=5)
    assert list(ds["split"].values) == [0, 1, 2]
    assert list(ds["epoch"].values) == [0, 0.5, 1]
    assert list(ds["pair"].values) == ["trunk-0:3-4", "trunk-1:3-4"]
    assert ds["train_loss"].shape == (3, 2, 5)
    for i in range(3):
        for j in range(2):
            assert ds["barrier"].values[i, j] == pytest.approx(
                np_barrier(np.linspace(0, 1, 5), ds["train_loss"].values[i, j])
            )
    # the path at split 1 of trunk-1, directly
    t1 = lmc_root / "trunk-1"
    a, b = (discover(t1 / f"branch-1-{s}").checkpoints[-1].files[0] for s in (3, 4))
    direct = endpoint_losses(t1 / "branch-1-3", a, b, n=5)
    np.testing.assert_allclose(ds["train_loss"].values[1, 1], direct["train_loss"].values)
    # endpoint SVA of features.3.weight (the second conv) by hand: NumPy float64 SVDs
    from safetensors.numpy import load_file

    wa, wb = (load_file(str(p))["features.3.weight"].astype(np.float64) for p in (a, b))
    (ua, _, vta), (ub, _, vtb) = (np.linalg.svd(w.reshape(len(w), -1)) for w in (wa, wb))
    r = min(10, len(wa))
    s_ii = [abs(ua[:, i] @ ub[:, i]) * abs(vta[i] @ vtb[i]) for i in range(r)]
    assert ds["sva_view"].sel(view="features.3.weight").values[1, 1] == pytest.approx(
        np.mean(s_ii), rel=1e-9
    )
    assert list(ds["view"].values)[-1] == "classifier.weight" and len(ds["view"]) == 14
    np.testing.assert_allclose(ds["sva"].values, ds["sva_view"].values.mean(axis=-1))
    assert ((ds["sva"].values > 0) & (ds["sva"].values <= 1)).all()
    cross = barriers(lmc_root, n=3, cross_trunk=True, split_epochs="1")
    assert list(cross["pair"].values) == ["3:trunk-0-trunk-1", "4:trunk-0-trunk-1"]
    assert list(cross["split"].values) == [2]


def test_specan_lmc_command(lmc_root):
    import json

    from typer.testing import CliRunner

    from specan.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["lmc", str(lmc_root), "--split-epochs", "0..0.5", "--alphas", "3",
                              "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert [(r["split_step"], r["pair"]) for r in rows] == [
        (0, "trunk-0:3-4"), (0, "trunk-1:3-4"), (1, "trunk-0:3-4"), (1, "trunk-1:3-4")
    ]  # fmt: skip
    assert all(len(r["train_loss"]) == 3 and 0 < r["sva"] <= 1 for r in rows)
    res = runner.invoke(app, ["lmc", str(lmc_root), "--alphas", "3", "--split-epochs", "1"])
    assert res.exit_code == 0 and "barrier mean" in res.stdout and "SVA mean" in res.stdout
    res = runner.invoke(app, ["lmc", str(lmc_root), "--split-epochs", "3"])
    # (main() turns these into one line and the error's exit code)
    assert isinstance(res.exception, OptionError) and res.exception.exit_code == 2
    assert "no split at epoch 3; splits at epochs 0, 0.5, 1" in str(res.exception)
    res = runner.invoke(app, ["lmc", str(lmc_root.parent)])
    assert isinstance(res.exception, ModelError) and "not an LMC folder" in str(res.exception)


# -- perturbed LMC folders, the cache, the figures ----------------------------------------------
@pytest.fixture(scope="module")
def perturb_root(tmp_path_factory):
    from specan_trainers import vgg

    root = tmp_path_factory.mktemp("lmc") / "vgg-perturb"
    args = ["--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05"]
    vgg.main([*args, "--batch-size", "32", "--epochs", "2", "--lmc", "--trunks", "1",
              "--branches", "2", "--perturb", "0,2.5", "--perturb-epoch", "0",
              "--out", str(root)])  # fmt: skip
    return root


def test_barriers_against_perturbation_size(perturb_root, monkeypatch):
    from specan import lmc
    from specan.runs import discover

    ds = lmc.barriers(perturb_root, n=3)
    assert list(ds["eta"].values) == [0.0, 2.5] and ds["barrier"].dims == ("eta", "pair")
    assert int(ds["split"]) == 2 and float(ds["epoch"]) == 1.0
    assert list(ds["pair"].values) == ["trunk-0:3-4"]
    t = perturb_root / "trunk-0"
    for i, eta in enumerate(("0", "2.5")):
        a, b = (discover(t / f"branch-2-{s}-eta{eta}").checkpoints[-1].files[0] for s in (3, 4))
        direct = endpoint_losses(t / "branch-2-3-eta0", a, b, n=3)
        np.testing.assert_allclose(ds["train_loss"].values[i, 0], direct["train_loss"].values)
        assert ds["barrier"].values[i, 0] == pytest.approx(
            np_barrier(np.linspace(0, 1, 3), direct["train_loss"].values)
        )
    with pytest.raises(OptionError, match="one split .* the split_epochs argument does not apply"):
        lmc.barriers(perturb_root, split_epochs="0..1")

    # cached: a second call computes nothing, until an endpoint changes
    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(lmc, "_barriers", fail)
    again = lmc.barriers(perturb_root, n=3)
    np.testing.assert_array_equal(again["barrier"].values, ds["barrier"].values)
    assert list(again["eta"].values) == [0.0, 2.5] and list(again["pair"].values) == ["trunk-0:3-4"]
    # the folder spelt another way (as a trunk run names it) finds the same result
    np.testing.assert_array_equal(
        lmc.barriers(perturb_root / "trunk-0" / "..", n=3)["barrier"].values, ds["barrier"].values
    )
    with pytest.raises(AssertionError, match="recomputed"):
        lmc.barriers(perturb_root, n=5)  # another path: not the cached result
    last = discover(t / "branch-2-4-eta2.5").checkpoints[-1].files[0]
    last.write_bytes(last.read_bytes())  # rewritten: new mtime
    with pytest.raises(AssertionError, match="recomputed"):
        lmc.barriers(perturb_root, n=3)


def test_specan_lmc_perturb_command_and_figures(perturb_root, tmp_path):
    import json

    from typer.testing import CliRunner

    from specan.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["lmc", str(perturb_root), "--alphas", "3", "--format", "json",
                              "--plot", str(tmp_path / "figs")])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert [(r["eta"], r["split_step"], r["pair"]) for r in rows] == [
        (0.0, 2, "trunk-0:3-4"), (2.5, 2, "trunk-0:3-4")
    ]  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["lmc-barrier.png", "lmc-sva-layers.png", "lmc-sva.png"]
    res = runner.invoke(app, ["lmc", str(perturb_root), "--alphas", "3"])
    assert res.exit_code == 0 and "η" in res.stdout and "perturbed at epoch 1" in res.stdout


def test_lmc_figures_draw_the_result(lmc_root):
    from specan.lmc import barriers
    from specan.lmc_plots import figures

    ds = barriers(lmc_root, n=3)
    plots = figures(ds)
    assert [p.name for p in plots] == ["lmc-barrier", "lmc-sva", "lmc-sva-layers"]
    mean_line = plots[0].figure.axes[0].get_lines()[-1]
    np.testing.assert_allclose(mean_line.get_xdata(), [0, 0.5, 1])
    np.testing.assert_allclose(mean_line.get_ydata(), ds["barrier"].values.mean(axis=1))
    heat = plots[2].figure.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(heat, ds["sva_view"].values.mean(axis=1).T)


# -- the registered analysis `lmc`: one trunk's pairs, through the API, plot and report ----------
def test_lmc_is_a_registered_analysis_of_each_trunk(lmc_root):
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    import specan
    from specan import plots, report
    from specan.cli import app
    from specan.pipeline import ingest
    from specan.runs import discover

    trunk = lmc_root / "trunk-1"
    ingest(trunk)
    run = specan.open(trunk)
    assert run.analyse("lmc", compute=False) is None  # too costly to run unasked
    assert "not computed yet (run `specan lmc` first)" in " ".join(report.analyse(trunk).notes)
    res = CliRunner().invoke(app, ["lmc", str(lmc_root)])  # every split, the default 11 α
    assert res.exit_code == 0, res.output
    ds = run.analyse("lmc", compute=False)  # kept in the trunk's store by `specan lmc`
    assert ds is not None and ds["value"].dims == ("pair", "step")
    assert list(ds["step"].values) == [0, 1, 2] and list(ds["epoch"].values) == [0, 0.5, 1]
    assert list(ds["pair"].values) == ["trunk-1:3-4"]  # this trunk's branch pairs only
    # split 1 by hand: the endpoints and their midpoint (α = 0.5, in float64), batch norm redone
    a, b = (load_file(str(discover(trunk / f"branch-1-{s}").checkpoints[-1].files[0]))
            for s in (3, 4))  # fmt: skip
    mid = {k: ((v.astype(np.float64) + b[k]) / 2).astype(v.dtype) if v.dtype.kind == "f" else v
           for k, v in a.items()}  # fmt: skip
    path = ds["train_loss"].sel(step=1).values[0]
    expected = [hand_train_loss(trunk, s) for s in (a, mid, b)]
    np.testing.assert_allclose(path[[0, 5, 10]], expected, rtol=1e-5)
    assert ds["value"].sel(step=1).item() == pytest.approx(np_barrier(GRID, path))
    # the API computes the same where nothing is cached
    again = run.analyse("lmc", cache=False)
    np.testing.assert_allclose(again["value"].values, ds["value"].values)
    # plot and report draw it from the store, with no case of their own
    an = report.analyse(trunk)
    assert "lmc" in an.results
    drawn = {p.name: p for p in plots.figures(an)}
    assert {"lmc-barrier", "lmc-sva", "lmc-sva-layers"} <= set(drawn)
    mean_line = drawn["lmc-barrier"].figure.axes[0].get_lines()[-1]
    np.testing.assert_allclose(mean_line.get_ydata(), ds["value"].values.mean(axis=0))
    html = report.summary_html(an)
    assert "LMC barrier, mean of branch pairs" in html
    # a run that is no trunk: one line, naming it
    branch = trunk / "branch-2-3"
    ingest(branch)
    with pytest.raises(ModelError, match="branch-2-3: not the trunk of an LMC folder"):
        specan.open(branch).analyse("lmc")
    # a branch retrained (its endpoint rewritten): the trunk's stored result no longer stands
    end = discover(trunk / "branch-1-3").checkpoints[-1].files[0]
    end.write_bytes(end.read_bytes())
    os.utime(end, ns=(end.stat().st_atime_ns, end.stat().st_mtime_ns + 10**9))
    assert run.analyse("lmc", compute=False) is None


def test_registered_lmc_of_a_perturbation_trunk(perturb_root):
    import specan
    from specan import lmc
    from specan.lmc_plots import figures, registered_figures
    from specan.pipeline import ingest
    from specan.registry import get

    trunk = perturb_root / "trunk-0"
    ingest(trunk)
    ds = specan.open(trunk).analyse("lmc")
    assert list(ds["pair"].values) == ["η=0 trunk-0:3-4", "η=2.5 trunk-0:3-4"]
    assert list(ds["eta"].values) == [0.0, 2.5] and list(ds["step"].values) == [2]
    whole = lmc.barriers(perturb_root)
    np.testing.assert_allclose(ds["value"].values[:, 0], whole["barrier"].values[:, 0])
    np.testing.assert_allclose(ds["sva_view"].values[:, 0], whole["sva_view"].values[:, 0])
    # drawn as `specan lmc --plot` draws the folder: barrier against η
    mine = list(registered_figures(None, get("lmc"), ds, None))
    theirs = figures(whole)
    for p, q in zip(mine, theirs, strict=True):
        assert p.name == q.name
        for x, y in zip(p.figure.axes[0].get_lines(), q.figure.axes[0].get_lines(), strict=True):
            np.testing.assert_allclose(x.get_ydata(), y.get_ydata())
