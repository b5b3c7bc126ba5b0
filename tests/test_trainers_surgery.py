"""Perturbed LMC branches and lottery tickets (SPEC §4), checked against NumPy float64 from raw
weights: perturbation norms, mask densities, masked weights held at 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from specan_trainers import surgery, vgg
from specan_trainers.checkpoint import OptionValueError

TINY = ["--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05", "--batch-size", "32"]


def np_perturbed(w: np.ndarray, eps: np.ndarray, eta: float) -> np.ndarray:
    """SPEC §4: ε/‖ε‖, W + η‖W‖ε, then scaled back to ‖W‖."""
    w, eps = w.astype(np.float64), eps.astype(np.float64)
    eps = eps / np.linalg.norm(eps)
    new = w + eta * np.linalg.norm(w) * eps
    return np.linalg.norm(w) * new / np.linalg.norm(new)


def np_noise(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    """The standard normal draws of a CPU generator seeded with `seed`, in order."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.normal(0.0, 1.0, size=s, generator=gen).numpy() for s in shapes]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(7, 5), nn.Linear(5, 6), nn.Conv1d(6, 4, 3), nn.Flatten(), nn.Linear(4, 3)
    )


@pytest.mark.parametrize("eta", [0.0, 0.25, 2.5])
def test_perturbation_norms_and_values(eta: float) -> None:
    model = tiny_model()
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    names = surgery.perturb_(model, eta, generator=torch.Generator().manual_seed(3))
    after = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # every >= 2-D weight but the last (the output layer); biases and the output layer untouched
    assert names == ["0.weight", "1.weight", "2.weight"]
    for k in ("1.bias", "2.bias", "4.weight", "4.bias"):
        np.testing.assert_array_equal(after[k], before[k])
    for name, eps in zip(names, np_noise([before[n].shape for n in names], 3), strict=True):
        w = before[name].astype(np.float64)
        np.testing.assert_allclose(after[name], np_perturbed(w, eps, eta), rtol=1e-5, atol=1e-6)
        # the norm is restored
        assert np.linalg.norm(after[name]) == pytest.approx(np.linalg.norm(w), rel=1e-6)
        # and before the rescaling the step was eta ||W|| long: undo the rescaling to see it
        direction = after[name].astype(np.float64) / np.linalg.norm(after[name])
        unscaled = w + eta * np.linalg.norm(w) * eps / np.linalg.norm(eps)
        step = direction * np.linalg.norm(unscaled) - w
        assert np.linalg.norm(step) == pytest.approx(eta * np.linalg.norm(w), rel=1e-4, abs=1e-5)


def test_perturbation_can_spare_the_input_embedding() -> None:
    model = tiny_model()
    before = model.state_dict()["0.weight"].clone()
    names = surgery.perturb_(
        model, 1.0, generator=torch.Generator().manual_seed(0), skip_embeddings=True
    )
    assert names == ["1.weight", "2.weight"]
    assert torch.equal(model.state_dict()["0.weight"], before)


def np_magnitude_masks(weights: dict[str, np.ndarray], s: float) -> dict[str, np.ndarray]:
    """SPEC §4: one global threshold over every masked weight, kept strictly above it."""
    allmag = np.sort(np.concatenate([np.abs(w).ravel() for w in weights.values()]))
    threshold = allmag[-int(s * len(allmag))]
    return {k: (np.abs(w) > threshold).astype(np.float32) for k, w in weights.items()}


def test_magnitude_masks_are_global_and_random_masks_match_each_layers_density() -> None:
    rng = np.random.default_rng(0)
    # layers of very different scales: a global threshold keeps far more of the large one
    state = {
        "a.weight": torch.from_numpy(rng.standard_normal((60, 50)).astype(np.float32) * 1.3),
        "a.bias": torch.zeros(60),
        "b.weight": torch.from_numpy(rng.standard_normal((40, 60, 3)).astype(np.float32)),
        "out.weight": torch.from_numpy(rng.standard_normal((10, 40)).astype(np.float32) * 9),
    }
    masks = surgery.magnitude_masks(state, 0.05)
    weights = {k: state[k].numpy() for k in ("a.weight", "b.weight")}  # the output layer spared
    expected = np_magnitude_masks(weights, 0.05)
    assert list(masks) == list(expected)
    for k in expected:
        np.testing.assert_array_equal(masks[k].numpy(), expected[k])
    n = sum(w.size for w in weights.values())
    kept = sum(m.sum() for m in expected.values())
    assert kept == int(0.05 * n) - 1  # strictly above the int(s N)-th largest (no ties here)
    density = surgery.mask_density(masks)
    assert density["a.weight"] > 0.05 > density["b.weight"] > 0  # global, not per layer
    rand = surgery.random_masks(masks, generator=torch.Generator().manual_seed(3))
    for k, m in rand.items():
        p, size = expected[k].mean(), m.numel()
        assert set(np.unique(m.numpy())) <= {0.0, 1.0}
        # i.i.d. Bernoulli(p): the kept fraction within 5 standard deviations of p
        assert abs(float(m.mean()) - p) < 5 * np.sqrt(p * (1 - p) / size) + 1e-12
        assert not np.array_equal(m.numpy(), expected[k])


def test_perturbed_lmc_layout_and_start_weights(tmp_path: Path) -> None:
    out = tmp_path / "pert"
    vgg.main([*TINY, "--epochs", "2", "--lmc", "--trunks", "1", "--branches", "2",
              "--perturb", "0,0.5", "--perturb-epoch", "0", "--out", str(out)])  # fmt: skip
    meta = json.loads((out / "lmc.json").read_text())
    assert meta["protocol"] == "perturb" and meta["etas"] == [0.0, 0.5] and meta["splits"] == [2]
    trunk = out / "trunk-0"
    start = load_file(str(trunk / "checkpoints/step-00000002.safetensors"))
    model = vgg.build_model(json.loads((trunk / "run.json").read_text())["config"])
    convs = [n for n, p in model.named_parameters() if p.ndim >= 2][:-1]
    for seed in (3, 4):
        for eta in (0.0, 0.5):
            branch = trunk / f"branch-2-{seed}-eta{eta:g}"
            run = json.loads((branch / "run.json").read_text())
            assert run["config"]["eta"] == eta and run["parent"]["step"] == 2
            assert run["parent"]["optimizer"] is True  # the trunk's momentum, as unperturbed
            first = load_file(str(branch / "checkpoints/step-00000002.safetensors"))
            noise = np_noise([start[n].shape for n in convs], seed)
            for name, eps in zip(convs, noise, strict=True):
                np.testing.assert_allclose(
                    first[name], np_perturbed(start[name], eps, eta), rtol=1e-5, atol=1e-6
                )
            np.testing.assert_array_equal(first["classifier.weight"], start["classifier.weight"])
            np.testing.assert_array_equal(first["features.0.bias"], start["features.0.bias"])
            assert sorted(p.name for p in (branch / "checkpoints").iterdir())[-1].endswith(
                "4.safetensors"
            )
    with pytest.raises(OptionValueError, match=r"--perturb-epoch 1: .* \(step 4\)"):
        vgg.main([*TINY, "--epochs", "2", "--lmc", "--perturb", "1", "--perturb-epoch", "1",
                  "--out", str(tmp_path / "x")])  # fmt: skip
    with pytest.raises(OptionValueError, match="give --lmc too"):
        vgg.main([*TINY, "--perturb", "1", "--out", str(tmp_path / "y")])
    with pytest.raises(OptionValueError, match="give --init-from too"):
        vgg.main([*TINY, "--eta", "1", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ticket") / "vgg"
    vgg.main([*TINY, "--epochs", "3", "--out", str(out)])
    return out


@pytest.mark.parametrize("kind", ["magnitude", "random"])
def test_ticket_masks_rewinding_and_zeros_after_every_step(dense_run: Path, kind: str) -> None:
    out = dense_run.parent / f"ticket-{kind}"
    vgg.main([*TINY, "--epochs", "3", "--ticket", kind, "--sparsity", "0.1",
              "--rewind-epoch", "0", "--from", str(dense_run), "--eval-every", "1",
              "--save-every", "1", "--out", str(out)])  # fmt: skip
    final = load_file(str(dense_run / "checkpoints/step-00000006.safetensors"))
    model = vgg.build_model(json.loads((dense_run / "run.json").read_text())["config"])
    names = [n for n, p in model.named_parameters() if p.ndim >= 2][:-1]
    expected = np_magnitude_masks({k: final[k] for k in names}, 0.1)
    masks = load_file(str(out / "mask.safetensors"))
    assert sorted(masks) == sorted(names)
    for k in names:
        if kind == "magnitude":
            np.testing.assert_array_equal(masks[k], expected[k])
        else:  # the same density per layer, not the same entries
            p = expected[k].mean()
            assert abs(masks[k].mean() - p) < 5 * np.sqrt(p * (1 - p) / masks[k].size) + 1e-12
    run = json.loads((out / "run.json").read_text())
    assert run["parent"]["step"] == 2 and run["parent"]["mask_from"] == 6
    rewound = load_file(str(dense_run / "checkpoints/step-00000002.safetensors"))
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert steps == [2, 3, 4, 5, 6]  # from the rewind point on, every step
    for step in steps:
        state = load_file(str(out / f"checkpoints/step-{step:08d}.safetensors"))
        for k in names:
            assert np.all(state[k][masks[k] == 0] == 0), (step, k)  # masked weights stay 0
            assert np.any(state[k][masks[k] == 1] != 0), (step, k)
        if step == 2:  # the rewound weights, masked
            for k in names:
                np.testing.assert_array_equal(state[k], rewound[k] * masks[k])
            np.testing.assert_array_equal(state["classifier.weight"], rewound["classifier.weight"])
    # `specan ticket`: SVA of W_T and m ⊙ W_T per masked matrix, from NumPy float64 SVDs
    from specan.prune import mask_agreement

    agree = mask_agreement(out)
    assert list(agree["view"].values) == names
    for k in names:
        w = final[k].astype(np.float64).reshape(len(final[k]), -1)
        m = masks[k].astype(np.float64).reshape(len(w), -1)
        (u, _, vt), (um, _, vtm) = np.linalg.svd(w), np.linalg.svd(w * m)
        r = min(10, *w.shape)
        s_ii = [abs(u[:, i] @ um[:, i]) * abs(vt[i] @ vtm[i]) for i in range(r)]
        assert agree["score"].sel(view=k).item() == pytest.approx(np.mean(s_ii), abs=1e-9)
        assert agree["density"].sel(view=k).item() == pytest.approx(masks[k].mean())
    from typer.testing import CliRunner

    from specan.cli import app

    res = CliRunner().invoke(app, ["ticket", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert [r["view"] for r in rows] == names
    np.testing.assert_allclose([r["score"] for r in rows], agree["score"].values)
    res = CliRunner().invoke(app, ["ticket", str(dense_run)])
    assert "not a lottery-ticket run" in str(res.exception)
    if kind == "magnitude":  # masked vs unmasked, matched by step (`specan sva --against`)
        import specan
        from specan.pipeline import ingest

        ingest(out), ingest(dense_run)
        sva = specan.open(out).sva(against=dense_run)
        assert list(sva["step"].values) == [2, 4, 6]  # the steps both runs saved
        dense = {
            s: load_file(str(dense_run / f"checkpoints/step-{s:08d}.safetensors"))
            for s in (2, 4, 6)
        }
        for s in (2, 6):
            mine = load_file(str(out / f"checkpoints/step-{s:08d}.safetensors"))
            a, b = (
                x["features.3.weight"].astype(np.float64).reshape(len(x["features.3.weight"]), -1)
                for x in (mine, dense[s])
            )
            (ua, _, vta), (ub, _, vtb) = np.linalg.svd(a), np.linalg.svd(b)
            r = min(10, *a.shape)
            s_ii = [abs(ua[:, i] @ ub[:, i]) * abs(vta[i] @ vtb[i]) for i in range(r)]
            got = sva["score"].sel(view="features.3.weight", step=s).item()
            assert got == pytest.approx(np.mean(s_ii), abs=2e-3)


def test_ticket_resumes_the_dense_runs_momentum_where_it_was_kept(tmp_path: Path) -> None:
    """SGD with momentum, by hand: from rewound weights w with the dense run's buffer b, the
    first step is w - lr (mu b + g + wd w); with fresh momentum w - lr (g + wd w), the same
    gradient (same weights, mask and batch). Unmasked entries differ by exactly -lr mu b."""
    from safetensors import safe_open

    dense = tmp_path / "dense"
    vgg.main([*TINY, "--epochs", "3", "--keep-optimizer-epochs", "0", "--out", str(dense)])
    kept = dense / "optimizer" / "step-00000002.safetensors"
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    ticket = ["--ticket", "magnitude", "--sparsity", "0.5", "--rewind-epoch", "0", "--save-every",
              "1", "--from"]  # fmt: skip
    vgg.main([*TINY, "--epochs", "3", *ticket, str(dense), "--out", str(tmp_path / "resumed")])
    assert json.loads((tmp_path / "resumed/run.json").read_text())["parent"]["optimizer"] is True
    bare = tmp_path / "bare"  # the same dense run without its optimizer state
    (bare / "checkpoints").mkdir(parents=True)
    for f in ("run.json", "checkpoints/step-00000002.safetensors",
              "checkpoints/step-00000006.safetensors"):  # fmt: skip
        (bare / f).write_bytes((dense / f).read_bytes())
    vgg.main([*TINY, "--epochs", "3", *ticket, str(bare), "--out", str(tmp_path / "fresh")])
    assert json.loads((tmp_path / "fresh/run.json").read_text())["parent"]["optimizer"] is False

    config = json.loads((dense / "run.json").read_text())["config"]
    index = {i: n for i, (n, _) in enumerate(vgg.build_model(config).named_parameters())}
    with safe_open(str(kept), "pt") as f:
        buffers = {
            index[int(k.split(".")[1])]: f.get_tensor(k).double().numpy()
            for k in f.keys()  # noqa: SIM118
            if k.endswith(".momentum_buffer")
        }
    mask = load_file(str(tmp_path / "resumed/mask.safetensors"))
    step3 = "checkpoints/step-00000003.safetensors"
    resumed, fresh = (load_file(str(tmp_path / r / step3)) for r in ("resumed", "fresh"))
    lr, mu = config["lr"], config["momentum"]
    for n, b in buffers.items():
        keep = mask[n].astype(bool) if n in mask else np.ones(b.shape, bool)
        got = resumed[n].astype(np.float64) - fresh[n].astype(np.float64)
        np.testing.assert_allclose(got[keep], (-lr * mu * b)[keep], rtol=0, atol=2e-6, err_msg=n)
        assert not got[~keep].any()  # masked weights are 0 in both
    assert max(np.abs(lr * mu * b).max() for b in buffers.values()) > 1e-3  # it can fail


def test_ticket_refuses_bad_options(dense_run: Path, tmp_path: Path) -> None:
    args = [*TINY, "--epochs", "3", "--ticket", "magnitude", "--out", str(tmp_path / "t")]
    with pytest.raises(OptionValueError, match="--ticket needs --from"):
        vgg.main(args)
    with pytest.raises(OptionValueError, match=r"--rewind-epoch 2: .* \(step 6\)"):
        vgg.main([*args, "--from", str(dense_run), "--rewind-epoch", "2"])
    with pytest.raises(OptionValueError, match="trained with --width-mult 0.0625"):
        vgg.main([*args, "--from", str(dense_run), "--width-mult", "0.125"])
    with pytest.raises(OptionValueError, match="--sparsity 0.0"):
        vgg.main([*args, "--from", str(dense_run), "--sparsity", "0"])
    with pytest.raises(OptionValueError, match="not a run of this trainer"):
        vgg.main([*args, "--from", str(tmp_path)])
    assert not (tmp_path / "t").exists()  # nothing written
