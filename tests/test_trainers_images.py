"""Image trainers (deep-mlp, random-labels, vgg): run contract, ingest, resume, data, --help."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open

import specan_trainers
from specan.pipeline import ingest
from specan.runs import discover
from specan_trainers import data as datasets
from specan_trainers import deep_mlp, random_labels, vgg
from specan_trainers.checkpoint import OptionValueError, RunWriter

# Tiny settings on the built-in digits: a few steps of a few seconds at most.
TINY = {
    deep_mlp: ["--depth", "4", "--width", "32", "--batch-size", "50"],
    random_labels: ["--width", "32", "--limit-train", "200", "--batch-size", "50"],
    vgg: ["--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05",
          "--batch-size", "32"],
}  # fmt: skip
NAMES = {deep_mlp: "deep-mlp", random_labels: "random-labels", vgg: "vgg"}


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _check_run(module: ModuleType, out: Path, steps: list[int]) -> dict:
    """The run directory holds what DESIGN Contract 1 says, and specan reads all of it."""
    meta = json.loads((out / "run.json").read_text())
    assert meta["trainer"] == NAMES[module]
    assert meta["config"] == {**meta["config"], "out": str(out)}
    model = module.build_model(meta["config"])
    state = model.state_dict()
    assert meta["pairs"] == module.pairs(meta["config"]) and meta["pairs"]
    for pair in meta["pairs"]:
        assert pair["prev"] in state and pair["next"] in state, pair
        assert state[pair["prev"]].ndim >= 2 and state[pair["next"]].ndim >= 2
        # the previous layer's outputs are the next layer's inputs
        assert state[pair["prev"]].shape[0] == state[pair["next"]].shape[1], pair
    assert [c.step for c in discover(out).checkpoints] == steps
    logged = _steps(out)
    assert logged == sorted(set(logged)) and logged[0] == 0 and logged[-1] == steps[-1]
    assert not list(out.rglob("*.tmp"))
    report = ingest(out)
    assert len(report.computed) == len(steps) and not report.bad
    data = module.eval_data(meta["config"])
    with safe_open(str(out / "checkpoints" / f"step-{steps[-1]:08d}.safetensors"), "pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert model.eval()(data["x_val"][:5]).shape == (5, 10)
    if (
        NAMES[module] in specan_trainers.TRAINERS
    ):  # once registered, specan finds the trainer by name
        assert type(specan_trainers.build_model(out)) is type(model)
    return meta


def test_deep_mlp_run_contract_and_ingest(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    deep_mlp.main([*TINY[deep_mlp], "--max-steps", "4", "--save-every", "2", "--save-log", "0",
                   "--eval-every", "2", "--out", str(out)])  # fmt: skip
    meta = _check_run(deep_mlp, out, [0, 2, 4])
    assert meta["config"]["init_scale"] == 8.0 and meta["config"]["wd"] == 0.01
    assert [p["next"] for p in meta["pairs"]][-1] == "layers.3.weight"  # the output layer
    assert {p["kind"] for p in meta["pairs"]} == {"linear"}
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == pytest.approx(4 / 29)  # 1438 built-in examples / 50 = 29 steps an epoch


def test_deep_mlp_scales_every_parameter_of_the_default_init() -> None:
    config = {"depth": 3, "width": 16, "init_scale": 1.0}
    torch.manual_seed(0)
    plain = deep_mlp.build_model(config).state_dict()
    torch.manual_seed(0)
    scaled = deep_mlp.build_model({**config, "init_scale": 8.0}).state_dict()
    assert plain.keys() == scaled.keys()
    for k in plain:
        torch.testing.assert_close(scaled[k], 8 * plain[k])


def test_deep_mlp_data_is_the_first_n_training_images() -> None:
    data = deep_mlp.eval_data({"data": "", "n_train": 300})
    images, labels = datasets.digits_images(size=28)
    assert data["x_train"].shape == (300, 1, 28, 28) and data["x_val"].shape == (359, 1, 28, 28)
    assert torch.equal(data["y_train"], torch.from_numpy(labels[:300]))
    assert torch.equal(data["y_val"], torch.from_numpy(labels[-359:]))
    assert 0 <= data["x_train"].min() and data["x_train"].max() <= 1


def test_random_labels_run_contract_and_ingest(tmp_path: Path) -> None:
    out = tmp_path / "rl"
    random_labels.main([*TINY[random_labels], "--random-labels", "--epochs", "1",
                        "--out", str(out)])  # fmt: skip
    meta = _check_run(random_labels, out, [0, 4])  # 200 / 50 = 4 steps, saved per epoch
    assert meta["config"]["random_labels"] is True and meta["config"]["lr"] == 1e-3
    assert [p["prev"] for p in meta["pairs"]] == [f"layers.{i}.weight" for i in range(3)]


def test_random_labels_are_one_permutation_applied_before_the_split() -> None:
    config = {"data": "", "val_frac": 0.1, "limit_train": 0}
    true = random_labels.make_data({**config, "random_labels": False})
    rand = random_labels.make_data({**config, "random_labels": True})
    for split in ("train", "val"):  # same images in the same places, other labels
        assert torch.equal(true[f"x_{split}"], rand[f"x_{split}"])
        assert (true[f"y_{split}"] != rand[f"y_{split}"]).float().mean() > 0.7
    _, labels = datasets.digits_images(size=32, channels=3)
    train, val = datasets.split_validation(len(labels), 0.1, seed=42)
    permuted = labels[np.random.default_rng(12345).permutation(len(labels))]
    assert torch.equal(rand["y_train"], torch.from_numpy(permuted[train]))
    assert torch.equal(rand["y_val"], torch.from_numpy(permuted[val]))
    both = torch.cat([rand["y_train"], rand["y_val"]])  # a permutation keeps the class counts
    assert torch.equal(both.bincount(), torch.from_numpy(labels).bincount())


def test_vgg_run_contract_ingest_and_lr_schedule(tmp_path: Path) -> None:
    out = tmp_path / "vgg"
    # 64 examples / 32 = 2 steps an epoch; the lr drops at the start of epoch 1 (step 3)
    vgg.main([*TINY[vgg], "--epochs", "2", "--lr-epochs", "1", "--out", str(out)])
    meta = _check_run(vgg, out, [0, 2, 4])
    kinds = [p["kind"] for p in meta["pairs"]]
    assert kinds == ["conv"] * 12 + ["conv_to_linear"]  # 13 convolutions, then the classifier
    assert meta["pairs"][-1] == {
        "prev": "features.40.weight", "next": "classifier.weight", "kind": "conv_to_linear"
    }  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records}
    assert lrs == {0: 0.1, 2: 0.1, 4: pytest.approx(0.01)}
    with safe_open(str(out / "checkpoints/step-00000004.safetensors"), "pt") as f:
        assert "features.1.running_mean" in f.keys()  # noqa: SIM118  (batch-norm buffers)
        assert int(f.get_tensor("features.1.num_batches_tracked")) == 4


def test_vgg_full_size_has_the_papers_shape() -> None:
    with torch.device("meta"):
        model = vgg.build_model({"width_mult": 1.0})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 10)
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_vgg_pools_and_init_are_the_papers() -> None:
    """Four max pools (32 -> 2), the average pool takes 2x2 to 1x1; torch's default init."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    torch.manual_seed(0)
    model = vgg.build_model({"width_mult": 0.0625})
    layers = [
        "M" if isinstance(m, torch.nn.MaxPool2d) else max(1, round(m.out_channels / 0.0625))
        for m in model.features
        if isinstance(m, torch.nn.MaxPool2d | torch.nn.Conv2d)
    ]
    assert layers == plan
    seen = {}
    model.pool.register_forward_hook(lambda m, i, o: seen.update(shape=i[0].shape[-2:]))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert tuple(seen["shape"]) == (2, 2)
    first = model.features[0]  # torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    bound = 1 / (3 * 3 * 3) ** 0.5
    assert first.weight.abs().max() <= bound and first.bias.abs().max() <= bound
    assert abs(first.weight.std().item() - bound / 3**0.5) < 0.02
    assert torch.count_nonzero(first.bias) == first.out_channels
    assert torch.count_nonzero(model.classifier.bias) == 10


@pytest.mark.parametrize(
    "module", [deep_mlp, random_labels, pytest.param(vgg, marks=pytest.mark.slow)]
)
def test_resumes_after_a_kill_with_identical_weights(
    module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batch order is seeded per epoch and the lr is a function of the step, so a resumed run
    # redoes the same arithmetic: equal to the bit, batch norm included (its running statistics
    # and counter are in the state dict, and CPU batch norm is deterministic).
    args = [*TINY[module], "--max-steps", "6", "--save-every", "2", "--save-log", "0",
            "--save-at", "5", "--no-save-per-epoch", "--eval-every", "1"]  # fmt: skip
    module.main([*args, "--out", str(tmp_path / "whole")])

    real = RunWriter.save

    def killed_at_5(self: RunWriter, model, step, **kw):  # noqa: ANN001
        if step == 5:
            raise KeyboardInterrupt
        return real(self, model, step, **kw)

    monkeypatch.setattr(RunWriter, "save", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        module.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(RunWriter, "save", real)
    module.main([*args, "--out", str(tmp_path / "cut")])  # resumes from step 4
    for name in ("step-00000005.safetensors", "step-00000006.safetensors"):
        with safe_open(str(tmp_path / "whole/checkpoints" / name), "pt") as a:
            with safe_open(str(tmp_path / "cut/checkpoints" / name), "pt") as b:
                assert a.keys() == b.keys()
                for k in a.keys():  # noqa: SIM118
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (name, k)
    assert _steps(tmp_path / "cut") == list(range(7))


@pytest.mark.parametrize(
    ("module", "defaults"),
    [
        (deep_mlp, ["default: 12", "default: 400", "default: 8.0", "default: 2000",
                    "default: 100", "default: 0.01"]),
        (random_labels, ["default: 256", "default: 300", "default: 128", "default: 0.001",
                         "default: 0.9", "default: False"]),
        (vgg, ["default: 164", "default: 0.1", "default: 82,123,160", "default: 0.0001",
               "default: 128", "default: 0.9", "default: 1.0"]),
    ],
)  # fmt: skip
def test_help_names_the_paper_defaults(
    module: ModuleType, defaults: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in [*defaults, "weight decay"]:
        assert default in text, default


def test_lmc_split_points_are_the_papers() -> None:
    # 10 steps an epoch: 0, 1/5 ... 4/5 of epoch 1, the end of epochs 1-5
    assert vgg.lmc_splits(10, 1000) == [0, 2, 4, 6, 8, 10, 20, 30, 40, 50]
    assert vgg.lmc_splits(10, 30) == [0, 2, 4, 6, 8, 10, 20]  # only those before the last step
    assert vgg.lmc_splits(2, 4) == [0, 1, 2]  # tiny: rounded, merged


@pytest.fixture(scope="module")
def lmc_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lmc") / "lmc"
    vgg.main([*TINY[vgg], "--epochs", "2", "--lmc", "--trunks", "2", "--branches", "2",
              "--out", str(out)])  # fmt: skip
    return out


def test_lmc_trunks_and_branches_layout(lmc_folder: Path, tmp_path: Path) -> None:
    out = lmc_folder
    meta = json.loads((out / "lmc.json").read_text())
    assert meta["splits"] == [0, 1, 2] and meta["branch_seeds"] == [3, 4]
    assert meta["trunks"] == ["trunk-0", "trunk-1"]
    for t in (0, 1):
        trunk = out / f"trunk-{t}"
        assert _steps(trunk) == [0, 1, 2]  # saved at every split, trained to the last one
        assert json.loads((trunk / "run.json").read_text())["config"]["seed"] == t
        finals = []
        for split in (0, 1, 2):
            for seed in (3, 4):
                branch = trunk / f"branch-{split}-{seed}"
                run = json.loads((branch / "run.json").read_text())
                assert run["parent"] == {"run": "..", "trunk": t, "step": split,
                                         "epoch": split / 2, "optimizer": True}  # fmt: skip
                assert run["config"]["seed"] == seed
                assert _steps(branch) == sorted({split, 2, 4})  # its start, epochs, the end
                with (
                    safe_open(str(trunk / f"checkpoints/step-{split:08d}.safetensors"), "pt") as a,
                    safe_open(str(branch / f"checkpoints/step-{split:08d}.safetensors"), "pt") as b,
                ):
                    for k in a.keys():  # noqa: SIM118
                        assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
                with safe_open(str(branch / "checkpoints/step-00000004.safetensors"), "pt") as f:
                    finals.append(f.get_tensor("features.0.weight"))
                assert discover(branch).checkpoints[-1].step == 4
        assert not torch.equal(finals[0], finals[1])  # two seeds from one split part ways
        assert [c.step for c in discover(trunk).checkpoints] == [0, 1, 2]  # branches not mixed in
        # the optimizer state kept at every split is no checkpoint: ingest reads the 3 only
        kept = sorted(p.name for p in (trunk / "optimizer").iterdir())
        assert kept == [f"step-{s:08d}.safetensors" for s in (0, 1, 2)]
        report = ingest(trunk)
        assert len(report.computed) == 3 and not report.bad
    with pytest.raises(OptionValueError, match="--branches >= 2"):
        vgg.main([*TINY[vgg], "--lmc", "--branches", "1", "--out", str(tmp_path / "x")])


def test_lmc_branch_resumes_the_trunks_momentum(lmc_folder: Path, tmp_path: Path) -> None:
    """SGD with momentum, by hand: a branch's first step from split weights w with the trunk's
    buffer b is w - lr (mu b + g + wd w); from fresh momentum it is w - lr (g + wd w), the same
    gradient g (same weights, same batch). So the two differ by exactly -lr mu b."""
    trunk = lmc_folder / "trunk-0"
    split = 1
    config = json.loads((trunk / f"branch-{split}-3" / "run.json").read_text())["config"]
    # the same branch again, from a copy of the split's weights with no optimizer state beside
    bare = tmp_path / "bare" / "checkpoints"
    bare.mkdir(parents=True)
    name = f"step-{split:08d}.safetensors"
    (bare / name).write_bytes((trunk / "checkpoints" / name).read_bytes())
    fresh = tmp_path / "fresh"
    cfg = vgg.Config(**{**config, "init_from": str(bare / name), "out": str(fresh),
                        "max_steps": split + 1})  # fmt: skip
    vgg.train(cfg, parent={"run": "elsewhere"})
    assert json.loads((fresh / "run.json").read_text())["parent"]["optimizer"] is False

    model = vgg.build_model(config)
    index = {i: n for i, (n, _) in enumerate(model.named_parameters())}
    with safe_open(str(trunk / "optimizer" / name), "pt") as f:
        buffers = {
            index[int(k.split(".")[1])]: f.get_tensor(k).double().numpy()
            for k in f.keys()  # noqa: SIM118
            if k.endswith(".momentum_buffer")
        }
    assert set(buffers) == set(index.values())
    after = f"checkpoints/step-{split + 1:08d}.safetensors"
    with (
        safe_open(str(trunk / f"branch-{split}-3" / after), "pt") as resumed,
        safe_open(str(fresh / after), "pt") as started,
    ):
        lr, mu = config["lr"], config["momentum"]
        for n, b in buffers.items():
            got = resumed.get_tensor(n).double().numpy() - started.get_tensor(n).double().numpy()
            np.testing.assert_allclose(got, -lr * mu * b, rtol=0, atol=2e-6, err_msg=n)
        moved = max(np.abs(lr * mu * b).max() for b in buffers.values())
        assert moved > 1e-3  # the momentum term is far above the tolerance: the test can fail
