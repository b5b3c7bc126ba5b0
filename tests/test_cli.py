"""The command line: help that teaches, one-line errors with exit codes, lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specan.cli import app
from specan.demo import write_synthetic_run

runner = CliRunner()


def specan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point, error table included."""
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SPECAN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "specan.cli", *args], capture_output=True, text=True, cwd=cwd,
        env=env,
    )  # fmt: skip


def test_help_lists_commands_and_examples() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "info", "demo"):
        assert cmd in res.output
    res = runner.invoke(app, ["ingest", "--help"])
    assert res.exit_code == 0
    assert "--top-k" in res.output and "specan ingest runs/vgg" in res.output


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from specan.cli import app\n"
        "r = CliRunner().invoke(app, ['ingest', '--help'])\n"
        "assert r.exit_code == 0\n"
        "heavy = ('torch', 'dask', 'zarr', 'matplotlib', 'numpy')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ingest_then_info_table_and_json(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=3, width=16)
    res = specan("ingest", str(run))
    assert res.returncode == 0, res.stderr
    assert "3 checkpoint(s) ingested" in res.stdout
    res = specan("ingest", str(run))
    assert res.returncode == 0 and "up to date" in res.stdout
    res = specan("info", str(run))
    assert res.returncode == 0
    assert (
        "3 done" in res.stdout and "mlp.0.weight" in res.stdout and "conv_transpose" in res.stdout
    )
    res = specan("info", str(run), "--format", "json")
    data = json.loads(res.stdout)
    assert data["checkpoints"]["done"] == 3 and data["kernel"]["top_k"] == 128


@pytest.mark.parametrize(
    ("make", "code", "needle"),
    [
        (lambda p: p / "missing", 2, "no such folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", 2, "no checkpoints found"),
    ],
)
def test_bad_runs_give_one_line_and_exit_code(tmp_path: Path, make, code: int, needle: str) -> None:
    target = make(tmp_path)
    res = specan("ingest", str(target))
    assert res.returncode == code
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and needle in first and str(target) in first
    assert "Traceback" not in res.stderr


def test_strict_names_the_bad_file(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=2, width=16)
    bad = run / "checkpoints" / "step-00000050.safetensors"
    bad.write_bytes(b"garbage that is not safetensors at all")
    res = specan("ingest", str(run), "--strict")
    assert res.returncode == 3 and str(bad) in res.stderr and "Traceback" not in res.stderr
    res = specan("ingest", str(run))
    assert res.returncode == 0 and "skipped" in res.stderr and str(bad) in res.stderr


def test_info_without_store(tmp_path: Path) -> None:
    res = specan("info", str(tmp_path))
    assert res.returncode == 4 and "specan ingest" in res.stderr


def test_conflicting_flags_are_refused(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ingest", str(tmp_path), "--no-vectors", "--top-k", "5"])
    assert res.exit_code == 2 and "--no-vectors" in res.output


def test_demo_trains_twice_ingests_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import specan.demo

    tiny = ["--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--steps", "4",
            "--save-every", "2", "--eval-every", "2"]  # fmt: skip
    monkeypatch.setattr(specan.demo, "GROKKING_DEMO", tiny)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "grok-wd1" in res.output and "grok-wd0" in res.output
    report = tmp_path / "demo" / "report.html"
    assert report.exists() and report.read_text().count("data:image/png;base64") >= 2
    # the two runs on shared axes (the README's figure), not two per-run figures side by side
    assert 'id="compare_loss_rank"' in report.read_text()
    for name in ("grok-wd1", "grok-wd0"):
        assert (tmp_path / "demo" / name / "specan.zarr" / "zarr.json").exists()
        assert (tmp_path / "demo" / name / "report.html").exists()


def test_unavailable_backend_is_one_line(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=2, width=16)
    res = specan("ingest", str(run), "--backend", "nonsense")
    assert res.returncode == 2 and "--backend" in res.stderr and "torch-cpu" in res.stderr
    assert "Traceback" not in res.stderr and not (run / "specan.zarr").exists()


def test_train_then_every_analysis_command(tmp_path: Path) -> None:
    run = tmp_path / "grok"
    tiny = ["--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--steps", "6",
            "--save-every", "2", "--eval-every", "2", "--out", str(run)]  # fmt: skip
    res = runner.invoke(app, ["train", "grokking", *tiny])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["ingest", str(run)]).exit_code == 0
    res = runner.invoke(app, ["rank", str(run), "--format", "json", "--steps", "2:4"])
    rows = json.loads(res.stdout)
    assert {r["step"] for r in rows} == {2, 4} and all(0 < r["erank_norm"] <= 1 for r in rows)
    res = runner.invoke(app, ["rank", str(run)])
    assert res.exit_code == 0 and "val_acc" in res.output
    res = runner.invoke(app, ["align", str(run), "--format", "csv"])
    assert res.exit_code == 0 and "Q·K" in res.output and "embedding" in res.output
    res = runner.invoke(app, ["align", str(run), "--vo-per-head", "--format", "csv"])
    assert res.exit_code == 0 and "v per head" in res.output and "vo_heads" in res.output
    res = runner.invoke(app, ["sva", str(run), "--against", str(run), "--format", "json"])
    scores = [r["score"] for r in json.loads(res.stdout)]
    assert scores and all(abs(s - 1) < 1e-5 for s in scores)  # a run agrees with itself
    res = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0 and (tmp_path / "figs" / "rank.png").stat().st_size > 1000
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0 and (run / "report.html").exists()
    res = runner.invoke(app, ["rank", str(run), "--steps", "x:y"])
    assert res.exit_code != 0


def test_train_with_a_missing_dataset_names_the_expected_format(tmp_path: Path) -> None:
    res = specan("train", "vgg", "--data", str(tmp_path / "cifar"), "--out", str(tmp_path / "v"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "cifar") in res.stderr and "data_batch_1.bin" in res.stderr


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_synthetic_run(tmp_path_factory.mktemp("cli") / "syn", checkpoints=4, width=32)
    assert runner.invoke(app, ["ingest", str(run)]).exit_code == 0
    return run  # steps 0, 100, 200, 300


def test_scripts_get_the_diagonals(ingested: Path) -> None:
    res = runner.invoke(app, ["align", str(ingested), "--format", "csv"])
    lines = res.stdout.splitlines()
    assert lines[0] == "pair,kind,step,score,diag"
    diag = lines[1].rsplit(",", 1)[1].split(";")
    assert len(diag) > 10 and all(0 <= float(x) <= 1 + 1e-6 for x in diag)
    res = runner.invoke(app, ["sva", str(ingested), "--format", "json"])
    rows = json.loads(res.stdout)
    assert rows and all(len(r["diag"]) > 1 and r["diag"][0] >= 0 for r in rows)
    last = [r for r in rows if r["step"] == 300]
    assert last and all(abs(x - 1) < 1e-4 for r in last for x in r["diag"])  # final vs itself
    assert "reference: the final checkpoint, step 300" in res.stderr


def test_align_layers_filters_pairs(ingested: Path) -> None:
    every = runner.invoke(app, ["align", str(ingested), "--format", "json"])
    pat = "lstm.weight_ih_l1"
    res = runner.invoke(app, ["align", str(ingested), "--layers", pat, "--format", "json"])
    assert res.exit_code == 0, res.output
    pairs = {r["pair"] for r in json.loads(res.stdout)}
    assert pairs == {r["pair"] for r in json.loads(every.stdout) if pat + " " in r["pair"] + " "}
    assert len(pairs) == 3  # ih_l0 -> ih_l1, hh_l0 -> ih_l1, ih_l1 -> head (last: no -> hh)


@pytest.mark.parametrize("command", ["rank", "align", "sva"])
@pytest.mark.parametrize("steps", ["500:", "100,77", "x:y"])
def test_steps_that_select_nothing_are_one_line(ingested: Path, command: str, steps: str) -> None:
    res = specan(command, str(ingested), "--steps", steps, "--format", "csv")
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert "Traceback" not in res.stderr and "--steps" in res.stderr
    if steps == "100,77":
        assert "step 77" in res.stderr


def test_sva_and_align_on_a_store_without_vectors(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "novec", checkpoints=2, width=32)
    assert runner.invoke(app, ["ingest", str(run), "--no-vectors"]).exit_code == 0
    for command in ("sva", "align"):
        res = specan(command, str(run))
        assert res.returncode == 4 and "singular values only" in res.stderr, res.stderr
        assert res.stdout == ""


def test_a_file_instead_of_a_run_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 16)
    for command in ("rank", "info", "align"):
        res = specan(command, str(path))
        assert res.returncode == 2 and "not a folder" in res.stderr, res.stderr


def test_a_pickle_that_needs_a_full_unpickle_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "pt").mkdir()
    torch.save({"w": torch.ones(2, 2), "f": Path("x")}, tmp_path / "pt" / "epoch_3.pt")
    res = specan("ingest", str(tmp_path / "pt"))
    assert res.returncode == 2, res.stderr
    assert "epoch_3.pt: needs a full unpickle (it holds pathlib" in res.stderr
    assert "Traceback" not in res.stderr


def test_messages_are_one_line_in_a_pipe(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "run"
    deep.mkdir(parents=True)
    res = specan("ingest", str(deep))
    first = res.stderr.splitlines()[0]
    assert first.startswith("error:") and str(deep) in first and len(first) > 120


def test_plot_says_what_it_left_out(ingested: Path, tmp_path: Path) -> None:
    res = specan("plot", str(ingested), "--out", str(tmp_path / "f"), "--max-figures", "1")
    assert res.returncode == 0, res.stderr
    assert "drew 1 of" in res.stderr and "--max-figures 0" in res.stderr


def test_names_with_brackets_are_not_markup(tmp_path: Path) -> None:
    res = specan("rank", str(tmp_path / "runs[v]" / "x"))
    assert res.returncode == 2 and "runs[v]" in res.stderr, res.stderr


def test_train_on_a_missing_cuda_device_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "g"
    res = specan("train", "grokking", "--device", "cuda", "--out", str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: --device cuda: CUDA is not available here")
    assert res.stderr.count("\n") == 2  # the error, then the SPECAN_DEBUG hint
    res = subprocess.run(
        [sys.executable, "-m", "specan_trainers.grokking", "--device", "cuda", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: --device cuda: CUDA is not available here")
    assert not out.exists()


def test_bench_and_ingest_on_a_missing_gpu_are_one_line(tmp_path: Path) -> None:
    """No silent fallback to the CPU: asking for the GPU where there is none is an error."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = specan("bench", "--device", "cuda", "--quick")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: --device cuda: CUDA is not available here")
    assert res.stderr.count("\n") == 2  # the error, then the SPECAN_DEBUG hint
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(8, 4)}, str(tmp_path / "step-1.safetensors"))
    for backend in ("torch-cuda", "cupy"):
        res = specan("ingest", str(tmp_path), "--backend", backend)
        assert res.returncode == 2 and res.stderr.count("\n") == 2, res.stderr
        assert res.stderr.startswith(f"error: --backend: SVD backend '{backend}' is not available")


def test_train_refuses_a_folder_holding_another_run_naming_the_option(tmp_path: Path) -> None:
    out = tmp_path / "g"
    tiny = ["--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--steps", "2",
            "--save-every", "2", "--eval-every", "2", "--out", str(out)]  # fmt: skip
    assert specan("train", "grokking", *tiny).returncode == 0
    res = specan("train", "grokking", *tiny, "--wd", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{out} holds a run with --wd 1.0, not 0.0 (use another --out)" in res.stderr


def test_hf_cache_to_a_store_elsewhere_with_duplicates(tmp_path: Path, pythia_like) -> None:
    """The README's Pythia commands, on a tiny HF cache: --store, info's duplicates, --dedupe."""
    cfg = pythia_like.config("14m", layers=1, vocab=64, positions=8)
    repo = pythia_like.write_hf_cache(tmp_path / "hub", cfg, [0, 1, 2], name="p", same={1: 0})
    sp = tmp_path / "stores" / "p.zarr"
    res = specan("ingest", str(repo), "--store", str(sp))
    assert res.returncode == 0, res.stderr
    assert "duplicate: step1 has the content of step0" in res.stdout and f"-> {sp}" in res.stdout
    assert not (repo / "specan.zarr").exists()
    res = specan("info", str(sp))
    assert res.returncode == 0, res.stderr
    assert "identical checkpoints" in res.stdout and "step0, step1" in res.stdout
    assert f"checkpoints read from {repo.resolve()}" in res.stdout
    res = specan("rank", str(sp), "--dedupe", "--format", "json")
    assert res.returncode == 0, res.stderr
    assert sorted({r["step"] for r in json.loads(res.stdout)}) == [1, 2]
    res = specan("rank", str(repo))  # the run folder has no store: the message says where to look
    assert res.returncode != 0 and "specan ingest" in res.stderr


def test_scheduler_option_is_refused_early(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", checkpoints=1, width=8)
    res = specan("ingest", str(run), "--scheduler", "local:two")
    assert res.returncode == 2 and "--scheduler: local:N" in res.stderr, res.stderr
    res = specan("ingest", str(run), "--scheduler", "local:2", "--workers", "2")
    assert res.returncode == 2 and "'--workers'" in res.stderr and "'--scheduler'" in res.stderr


def _tiny_mlp_run(out: Path) -> Path:
    from specan_trainers import deep_mlp

    args = ["--depth", "3", "--width", "16", "--n-train", "100", "--batch-size", "50"]
    deep_mlp.main([*args, "--max-steps", "2", "--save-at", "0,2", "--save-log", "0",
                   "--out", str(out)])  # fmt: skip
    return out


def test_prune_without_a_store_evaluates_the_asked_models(tmp_path: Path) -> None:
    from specan.prune import prune_losses

    run = _tiny_mlp_run(tmp_path / "mlp")
    res = runner.invoke(app, ["prune", str(run), "--sv", "top-half", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    assert [(r["keep"], r["step"]) for r in rows] == [("top-half", 0), ("top-half", 2)]
    ds = prune_losses(run, keeps=["top-half"])
    assert [r["train_loss"] for r in rows] == pytest.approx(ds["train_loss"].values[0].tolist())
    assert not (run / "specan.zarr").exists()
    res = runner.invoke(app, ["prune", str(run), "--sv", "top,full"])
    assert res.exit_code == 2 and "'--sv' takes full, top-half, bottom-half" in res.output


def test_prune_with_a_store_caches_for_plot(tmp_path: Path) -> None:
    import specan
    from specan.report import analyse

    run = _tiny_mlp_run(tmp_path / "mlp")
    specan.ingest(run)
    notes = analyse(run).notes
    assert any("SV-pruned models: not computed yet (run `specan prune` first)" in n for n in notes)
    res = runner.invoke(app, ["prune", str(run), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "train_loss bottom-half" in res.stdout
    an = analyse(run)
    assert list(an.results["prune"]["keep"].values) == ["full", "top-half", "bottom-half"]
    assert list(an.results["prune"]["step"].values) == [0, 2]
    from specan.plots import figures

    (fig,) = [p.figure for p in figures(an) if p.name == "prune"]
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["full", "top-half", "bottom-half"]
    expected = an.results["prune"]["train_loss"].sel(keep="bottom-half").values
    assert list(lines[2].get_ydata()) == pytest.approx(expected.tolist())


def test_prune_of_a_run_without_trainer_is_one_line(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "syn")
    res = specan("prune", str(run))
    assert res.returncode == 2
    assert "unknown trainer 'synthetic'" in res.stderr and "Traceback" not in res.stderr


def test_library_messages_name_arguments_and_the_cli_its_flags(ingested: Path) -> None:
    from specan.errors import ViewRuleError
    from specan.views import select

    with pytest.raises(ViewRuleError) as e:
        select(["fc.weight"], "nope*")
    assert "--" not in str(e.value) and "layers" in str(e.value)
    res = specan("align", str(ingested), "--layers", "nope*")
    assert res.returncode != 0
    assert "error: --layers: pattern 'nope*' matches no parameter" in res.stderr
