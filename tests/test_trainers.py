"""Trainers: the run-directory contract, resumability, and that `specan ingest` reads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import specan_trainers
from specan import store
from specan.pipeline import ingest
from specan.runs import discover
from specan_trainers import grokking
from specan_trainers.checkpoint import RunWriter, run_main, save_steps

TINY = ["--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--train-frac", "0.5"]


def test_save_steps_schedules() -> None:
    assert save_steps(1000, every=250) == {0, 250, 500, 750, 1000}
    assert save_steps(10, at="3, 7") == {0, 3, 7, 10}
    log = sorted(save_steps(10000, log=8))
    assert log[0] == 0 and log[-1] == 10000 and log[1] < 10 and len(log) >= 8
    with pytest.raises(ValueError, match="--save-at"):
        save_steps(10, at="a,b")


def test_writer_round_trips_model_optimizer_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    w = RunWriter(tmp_path / "run", trainer="grokking", config={"a": 1})
    w.log({"step": 0, "loss": 1.0})
    w.save(model, 5, epoch=0.5, optimizer=opt)
    w.log({"step": 7, "loss": 0.5})  # logged after the last checkpoint: lost on resume
    expected = torch.rand(3)
    torch.manual_seed(123)  # RNG restored on resume, whatever it is now

    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    w2 = RunWriter(tmp_path / "run", trainer="grokking", config={"a": 1})
    assert w2.resume(model2, opt2) == 5
    assert torch.equal(model2.weight, model.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0]
    with safe_open(str(tmp_path / "run/checkpoints/step-00000005.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "5" and f.metadata()["epoch"] == "0.5"
    with pytest.raises(FileExistsError, match="holds a run with --a 1, not 2 "):
        RunWriter(tmp_path / "run", trainer="grokking", config={"a": 2})
    with pytest.raises(FileExistsError, match="holds a grokking run, not vgg "):
        RunWriter(tmp_path / "run", trainer="vgg", config={"a": 1})


def test_grokking_run_contract_and_ingest(tmp_path: Path) -> None:
    out = tmp_path / "grok"
    grokking.main(
        [*TINY, "--steps", "6", "--save-every", "2", "--eval-every", "2", "--out", str(out)]
    )
    meta = json.loads((out / "run.json").read_text())
    assert meta["trainer"] == "grokking" and meta["config"]["wd"] == 1.0
    assert {p["kind"] for p in meta["pairs"]} == {"embedding", "qk", "linear"}
    run = discover(out)
    assert [c.step for c in run.checkpoints] == [0, 2, 4, 6]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6
    assert not list(out.rglob("*.tmp"))
    report = ingest(out)
    assert len(report.computed) == 4 and not report.bad
    views = store.read_attrs(store.store_path(out))["views"]
    assert {v["rule"] for v in views.values()} >= {"embedding", "in_proj", "q_heads", "linear"}
    assert views["blocks.0.self_attn.in_proj_weight__q"]["heads"] == 2  # from run.json
    model = specan_trainers.build_model(out)
    data = specan_trainers.eval_data(out)
    assert model(data["x_val"]).shape == (len(data["y_val"]), 12)  # p + 1 tokens


def test_grokking_resumes_after_a_kill_with_identical_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*TINY, "--steps", "8", "--save-every", "3", "--eval-every", "1"]
    grokking.main([*args, "--out", str(tmp_path / "whole")])

    real = RunWriter.save

    def killed_at_6(self: RunWriter, model, step, **kw):  # noqa: ANN001
        if step == 6:
            raise KeyboardInterrupt
        return real(self, model, step, **kw)

    monkeypatch.setattr(RunWriter, "save", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        grokking.main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(RunWriter, "save", real)
    grokking.main([*args, "--out", str(tmp_path / "cut")])  # resumes from step 3
    for name in ("step-00000006.safetensors", "step-00000008.safetensors"):
        with safe_open(str(tmp_path / "whole/checkpoints" / name), "pt") as a:
            with safe_open(str(tmp_path / "cut/checkpoints" / name), "pt") as b:
                for k in a.keys():  # noqa: SIM118
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), (name, k)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(9))


def test_help_names_the_paper_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        grokking.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("default: 113", "default: 0.3", "default: 40000", "weight decay"):
        assert default in text


def test_grokking_init_and_forward_are_the_papers() -> None:
    """Embedding and decoder U(-0.1, 0.1), decoder bias 0, tokens x sqrt(d): checked by hand."""
    torch.manual_seed(0)
    p, d, heads, d_mlp = 113, 128, 4, 512
    model = grokking.Grokker(p, d, heads, d_mlp)
    emb, dec = model.embed.weight.detach(), model.decoder.weight.detach()
    assert emb.shape == (p + 1, d) and dec.shape == (p + 1, d)
    for w in (emb, dec):  # U(-0.1, 0.1): bounded by 0.1, standard deviation 0.1 / sqrt(3)
        assert w.abs().max() <= 0.1 and abs(w.std().item() - 0.1 / 3**0.5) < 0.003
    assert torch.count_nonzero(model.decoder.bias) == 0

    tokens = torch.tensor([[3, 50, p], [112, 0, p]])
    pos = torch.zeros(3, d)
    for t in range(3):
        for i in range(0, d, 2):
            angle = t / 10000 ** (i / d)
            pos[t, i], pos[t, i + 1] = torch.tensor(angle).sin(), torch.tensor(angle).cos()
    x = emb[tokens] * d**0.5 + pos  # [B, 3, d]
    attn = model.blocks[0].self_attn
    wq, wk, wv = attn.in_proj_weight.detach().split(d)
    bq, bk, bv = attn.in_proj_bias.detach().split(d)
    hd = d // heads
    q = (x[:, -1] @ wq.T + bq).view(-1, heads, hd)  # the last position's query
    k = (x @ wk.T + bk).view(-1, 3, heads, hd)
    v = (x @ wv.T + bv).view(-1, 3, heads, hd)
    weights = torch.softmax(torch.einsum("bhe,bthe->bht", q, k) / hd**0.5, dim=-1)
    o = torch.einsum("bht,bthe->bhe", weights, v).reshape(-1, d)
    h = x[:, -1] + o @ attn.out_proj.weight.detach().T + attn.out_proj.bias.detach()
    blk = model.blocks[0]
    mlp = torch.relu(h @ blk.linear1.weight.detach().T + blk.linear1.bias.detach())
    h = h + mlp @ blk.linear2.weight.detach().T + blk.linear2.bias.detach()
    expected = h @ dec.T + model.decoder.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_a_refused_retrain_names_the_options_that_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grok"
    args = [*TINY, "--steps", "2", "--save-every", "2", "--eval-every", "2"]
    grokking.main([*args, "--out", str(out)])
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(SystemExit) as e:  # `python -m specan_trainers.grokking`
        run_main(grokking.main, [*args, "--wd", "0", "--lr", "0.01", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {out} holds a run with --lr 0.001, not 0.01; --wd 1.0, not 0.0"
        " (use another --out)\n"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    grokking.main([*args, "--out", f"{out}/"])  # the same run, its folder spelt another way


def test_device_without_cuda_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, why in (("cuda", "CUDA is not available here"), ("gpu0", "not a device")):
        with pytest.raises(SystemExit) as e:
            run_main(grokking.main, [*TINY, "--device", device, "--out", str(tmp_path / "g")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}: {why}") and err.count("\n") == 1
    assert not (tmp_path / "g").exists()  # refused before anything is written
