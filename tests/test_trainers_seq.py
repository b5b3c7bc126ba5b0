"""Trainers unet, lstm, lm: the run-directory contract, view rules, resuming, `specan ingest`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from specan import store
from specan.pipeline import ingest
from specan.runs import discover
from specan_trainers import lm, lstm, unet
from specan_trainers.checkpoint import RunWriter
from specan_trainers.data import synthetic_speech

UNET = ["--channels", "8,16", "--embed-dim", "16", "--limit-train", "320", "--batch-size", "64"]
LSTM = ["--hidden", "8", "--layers", "2", "--n-synthetic", "48", "--batch-size", "16"]
LM = ["--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--d-mlp", "32", "--context", "16"]
LM += ["--n-synthetic", "64", "--batch-size", "16", "--warmup", "2"]
SCHEDULE = ["--max-steps", "4", "--save-every", "2"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Toy models run fastest on one thread: on a shared 2-core machine, spinning OpenMP
    workers made these tests up to ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(module: ModuleType, args: list[str], out: Path, eval_every: int = 1) -> dict:
    """Train 4 steps; check what every run must hold; return run.json."""
    module.main([*args, *SCHEDULE, "--eval-every", str(eval_every), "--out", str(out)])
    meta = json.loads((out / "run.json").read_text())
    assert meta["trainer"] == module.__name__.rsplit(".", 1)[-1]
    state = module.build_model(meta["config"]).state_dict()
    for pair in meta["pairs"]:
        assert pair["prev"] in state and pair["next"] in state, pair
        assert state[pair["prev"]].dim() >= 2 and state[pair["next"]].dim() >= 2, pair
    assert [c.step for c in discover(out).checkpoints] == [0, 2, 4]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 5, eval_every))
    assert not list(out.rglob("*.tmp"))
    report = ingest(out)
    assert len(report.computed) == 3 and not report.bad
    return meta


def _views(out: Path) -> dict[str, str]:
    """Parameter name -> the rules of its views in the store."""
    views = store.read_attrs(store.store_path(out))["views"]
    rules: dict[str, set[str]] = {}
    for v in views.values():
        rules.setdefault(v["param"], set()).add(v["rule"])
    return {k: ",".join(sorted(v)) for k, v in rules.items()}


@pytest.mark.slow
def test_unet_run_marks_every_transposed_conv(tmp_path: Path) -> None:
    meta = _run(unet, UNET, tmp_path / "unet", eval_every=2)  # an evaluation: 500 images
    model = unet.build_model(meta["config"])
    transposed = {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)
    }
    assert transposed == {"tconvs.0.weight", "tconvs.1.weight"}
    assert meta["view_rules"] == dict.fromkeys(transposed, "conv_transpose")
    assert {p["kind"] for p in meta["pairs"]} == {"conv", "skip", "time"}
    assert {"prev": "convs.0.weight", "next": "tconvs.0.weight", "kind": "skip"} in meta["pairs"]
    assert {"prev": "denses.0.weight", "next": "convs.1.weight", "kind": "time"} in meta["pairs"]
    views = _views(tmp_path / "unet")
    assert {views[p] for p in transposed} == {"conv_transpose"}  # names alone would say "conv"
    assert views["convs.1.weight"] == "conv" and views["denses.0.weight"] == "linear"
    data = unet.eval_data(meta["config"])
    assert data["x_train"].shape == data["noise_train"].shape == (320, 1, 28, 28)
    assert set(unet.evaluate(model, data, meta["config"])) == {"train_loss", "val_loss"}


def test_unet_schedule_time_embedding_and_pairs_are_the_papers() -> None:
    """image_generation/model.py: sigmoid betas, Gaussian Fourier time features, its pair list."""
    config = dataclasses.asdict(unet.Config())
    x = np.linspace(-6, 6, 1000)
    expected = (0.5e-2 - 1e-5) / (1 + np.exp(-x)) + 1e-5
    np.testing.assert_allclose(unet.betas(config).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(unet.alpha_bars(config).numpy(), np.cumprod(1 - expected))

    torch.manual_seed(0)
    model = unet.build_model(config)
    freqs = model.time_freqs
    assert freqs.shape == (256,) and 25 < freqs.std().item() < 35  # N(0, 30^2), 512 features
    assert "time_freqs" in model.state_dict()  # saved with every checkpoint ...
    assert all(q is not freqs for q in model.parameters())  # ... and never trained
    assert model.time_linear.in_features == 512
    t = torch.tensor([0, 1, 2])
    angles = t.double()[:, None] * freqs.double()[None] * 2 * np.pi
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    torch.testing.assert_close(
        unet.fourier_features(t, freqs).double(), features, atol=1e-3, rtol=0
    )

    paper = [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "conv4"),
             ("dense1", "conv2"), ("dense2", "conv3"), ("dense3", "conv4"), ("dense4", "tconv4"),
             ("conv4", "tconv4"), ("tconv4", "tconv3"), ("tconv3", "tconv2"), ("tconv2", "tconv1"),
             ("conv1", "tconv1"), ("dense1", "tconv1"), ("conv2", "tconv2"), ("dense2", "tconv2"),
             ("conv3", "tconv3"), ("dense3", "tconv3")]  # fmt: skip
    ours = {"conv": "convs", "tconv": "tconvs", "dense": "denses"}

    def name(paper_name: str) -> str:
        return f"{ours[paper_name[:-1]]}.{int(paper_name[-1]) - 1}.weight"

    pairs = unet.pairs(config)
    assert [(p["prev"], p["next"]) for p in pairs] == [(name(a), name(b)) for a, b in paper]
    state = model.state_dict()
    for p in pairs:  # the previous layer's outputs are the next layer's inputs
        prev, nxt = state[p["prev"]], state[p["next"]]
        out = prev.shape[1] if p["prev"].startswith("tconvs") else prev.shape[0]
        assert out == (nxt.shape[0] if p["next"].startswith("tconvs") else nxt.shape[1]), p


def test_unet_data_is_standardised_and_holds_out_a_tenth_of_training() -> None:
    config = {**dataclasses.asdict(unet.Config()), "diffusion_steps": 10}
    data = unet.eval_data(config)
    n_train, n_val = len(data["x_train"]), len(data["x_val"])
    assert n_val == round(0.1 * 1797) and n_train + n_val == 1797  # the built-in digits
    x = torch.cat([data["x_train"], data["x_val"]])
    background = (0 - 0.1307) / 0.3081  # (pixel / 255 - MNIST mean) / MNIST deviation
    assert x.min().item() == pytest.approx(background)
    assert x.max().item() <= (1 - 0.1307) / 0.3081 + 1e-6
    rows = {tuple(r.tolist()) for r in data["x_train"].flatten(1)[:, ::7]}
    assert not any(tuple(r.tolist()) in rows for r in data["x_val"].flatten(1)[:, ::7])


def test_lstm_run_pairs_both_directions(tmp_path: Path) -> None:
    meta = _run(lstm, LSTM, tmp_path / "lstm")
    pairs = meta["pairs"]
    assert {p["kind"] for p in pairs} == {"lstm"}
    assert {p["direction"] for p in pairs} == {"forward", "reverse"}
    rev = {(p["prev"], p["next"]) for p in pairs if p["direction"] == "reverse"}
    assert rev == {
        ("lstm.weight_ih_l0_reverse", "lstm.weight_hh_l0_reverse"),
        ("lstm.weight_ih_l0_reverse", "lstm.weight_ih_l1_reverse"),
        ("lstm.weight_hh_l0_reverse", "lstm.weight_ih_l1_reverse"),
        ("lstm.weight_ih_l1_reverse", "out.weight"),
        ("lstm.weight_hh_l1_reverse", "out.weight"),
    }
    views = _views(tmp_path / "lstm")
    lstm_views = {p for p, r in views.items() if "lstm" in r.split(",")}  # and col_half views
    assert len(lstm_views) == 8 and "lstm.weight_hh_l1_reverse" in lstm_views
    data = lstm.eval_data(meta["config"])
    assert len(data["x_train_lengths"]) == 48 and len(data["y_val_lengths"]) == 4
    model = lstm.build_model(meta["config"])
    assert set(lstm.evaluate(model, data)) == {"train_loss", "val_loss"}


def test_lstm_pairs_are_the_papers_with_the_previous_layers_direction() -> None:
    """speech_recognition/model.py's inter_layer_pairs for 4 bidirectional layers, in order."""
    paper = []
    for layer in range(3):
        for ext in ("", "_reverse"):
            paper += [(f"weight_ih_l{layer}{ext}", f"weight_hh_l{layer}{ext}"),
                      (f"weight_ih_l{layer}{ext}", f"weight_ih_l{layer + 1}{ext}"),
                      (f"weight_hh_l{layer}{ext}", f"weight_ih_l{layer + 1}{ext}")]  # fmt: skip
    for ext in ("", "_reverse"):
        paper += [(f"weight_ih_l3{ext}", "linear"), (f"weight_hh_l3{ext}", "linear")]
    ours = {"linear": "out.weight"}
    pairs = lstm.pairs({"layers": 4})
    assert [(p["prev"], p["next"]) for p in pairs] == [
        (f"lstm.{a}", ours.get(b, f"lstm.{b}")) for a, b in paper
    ]
    for p in pairs:  # the output Linear after the reverse layer reads the reverse half
        assert p["direction"] == ("reverse" if p["prev"].endswith("_reverse") else "forward")
        assert p["kind"] == "lstm"


def test_lstm_lr_is_the_papers_per_epoch_cosine() -> None:
    """torch's CosineAnnealingLR(T_max=epochs), stepped once an epoch, gives these rates."""
    cfg = lstm.Config(lr=3e-4, epochs=50)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    for epoch in range(cfg.epochs):
        assert lstm.epoch_lr(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


def test_lstm_reads_feature_folders(tmp_path: Path) -> None:
    for split, n in (("train", 5), ("dev", 2)):
        (tmp_path / split).mkdir()
        for i, (feats, text) in enumerate(synthetic_speech(n, seed=n)):
            np.save(tmp_path / split / f"u{i}.npy", feats)
            (tmp_path / split / f"u{i}.txt").write_text(text.upper())
    args = [*LSTM, "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "dev")]
    lstm.main([*args, "--max-steps", "1", "--out", str(tmp_path / "run")])
    records = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [set(json.loads(r)) for r in records] == [
        {"step", "epoch", "train_loss", "val_loss"}
    ] * 2


def test_lm_run_pairs_and_heads(tmp_path: Path) -> None:
    meta = _run(lm, LM, tmp_path / "lm")
    assert meta["model"]["n_heads"] == 2
    kinds = [p["kind"] for p in meta["pairs"]]
    assert kinds.count("qk") == 2 and kinds.count("embedding") == 1
    assert meta["pairs"][-1] == {
        "prev": "layers.1.linear2.weight", "next": "decoder.weight", "kind": "linear"
    }  # fmt: skip
    assert {
        "prev": "layers.0.linear2.weight", "next": "layers.1.self_attn.in_proj_weight",
        "kind": "linear",
    } in meta["pairs"]  # fmt: skip
    views = store.read_attrs(store.store_path(tmp_path / "lm"))["views"]
    assert views["layers.1.self_attn.in_proj_weight__q"]["heads"] == 2
    assert _views(tmp_path / "lm")["embed.weight"] == "embedding"
    data = lm.eval_data(meta["config"])
    assert data["x_train"].shape == (64, 17) and data["x_val"].shape == (6, 17)


def test_lm_is_the_papers_model_and_decays_every_parameter() -> None:
    """x sqrt(d), no final LayerNorm, grokking's init, and AdamW decay on biases and norms too."""
    torch.manual_seed(0)
    d = 64
    model = lm.LM(d, 2, 2, 32, 16)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(n.startswith("layers.") for n in norms)  # only the blocks' own
    emb, dec = model.embed.weight.detach(), model.decoder.weight.detach()
    for w in (emb, dec):  # U(-0.1, 0.1), not N(0, 1)
        assert w.abs().max() <= 0.1 and abs(w.std().item() - 0.1 / 3**0.5) < 0.005
    assert torch.count_nonzero(model.decoder.bias) == 0
    tokens = torch.randint(0, 256, (2, 10))
    pos = torch.zeros(10, d)
    for t in range(10):
        for i in range(0, d, 2):
            angle = torch.tensor(t / 10000 ** (i / d))
            pos[t, i], pos[t, i + 1] = angle.sin(), angle.cos()
    x = emb[tokens] * d**0.5 + pos
    mask = torch.triu(torch.full((10, 10), float("-inf")), diagonal=1)
    with torch.no_grad():
        for layer in model.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        torch.testing.assert_close(model(tokens), model.decoder(x))  # straight to the decoder
    cfg = lm.Config(wd=0.1)
    opt = lm.make_optimizer(list(model.parameters()), cfg)
    decayed = {id(q) for g in opt.param_groups if g["weight_decay"] == 0.1 for q in g["params"]}
    assert decayed == {id(q) for q in model.parameters()}
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)


def test_lm_reads_a_text_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = [*LM, "--data", str(corpus), "--val-data", str(corpus), "--max-steps", "2"]
    lm.main([*args, "--out", str(tmp_path / "run")])
    data = lm.eval_data(json.loads((tmp_path / "run/run.json").read_text())["config"])
    assert data["x_train"].shape == ((40 * 45 - 1) // 16, 17)
    assert bytes(data["x_train"][0, :9].tolist()) == b"the quick"


def test_unet_resumes_after_a_kill_with_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 320 training digits, batch 64: 5 steps an epoch, so the resumed run crosses an epoch
    args = [*UNET, "--max-steps", "9", "--save-every", "4", "--eval-every", "3"]
    unet.main([*args, "--out", str(tmp_path / "whole")])

    real = RunWriter.save

    def killed_at_8(self: RunWriter, model, step, **kw):  # noqa: ANN001
        if step == 8:
            raise KeyboardInterrupt
        return real(self, model, step, **kw)

    monkeypatch.setattr(RunWriter, "save", killed_at_8)
    with pytest.raises(KeyboardInterrupt):
        unet.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(RunWriter, "save", real)
    unet.main([*args, "--out", str(tmp_path / "cut")])  # resumes from step 4
    for name in ("step-00000008.safetensors", "step-00000009.safetensors"):
        with safe_open(str(tmp_path / "whole/checkpoints" / name), "pt") as a:
            with safe_open(str(tmp_path / "cut/checkpoints" / name), "pt") as b:
                assert a.metadata()["epoch"] == b.metadata()["epoch"]
                for k in a.keys():  # noqa: SIM118
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (name, k)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 3, 4, 6, 8, 9]


@pytest.mark.parametrize(
    ("module", "defaults"),
    [
        (unet, ["default: 0.0003", "default: 128", "default: 64,128,256,512", "default: 1000"]),
        (lstm, ["default: 0.0003", "default: 0.1", "default: 32", "default: 256", "default: 50"]),
        (lm, ["default: 2048", "default: 0.0006", "default: 0.95", "default: 768", "default: 200"]),
    ],
)
def test_help_names_the_paper_defaults(
    module: ModuleType, defaults: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in defaults:
        assert default in text, default
