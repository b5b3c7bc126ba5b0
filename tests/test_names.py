"""Parameter names that try to escape: every command that writes keeps inside its own place
(the store, --out) and no two names share a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner, Result

import specan
from specan import plots, store
from specan.cli import app
from specan.errors import SpecanError

# Each pair after the first lines collides once made safe: "/" and "_", case, a cut at the
# length limit that keeps the same prefix.
NAMES = [
    "../../escape.weight", "/abs/w", "a/b", "a_b", "A_B", "nul\x00name", "..",
    "n" * 10_000, "n" * 9_999 + "m",
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict]]:
    """A run of two checkpoints of 6x4 matrices under the names above, and its weights."""
    base = tmp_path_factory.mktemp("names")
    run = base / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    weights = {}
    for step in (0, 1):
        weights[step] = {n: rng.standard_normal((6, 4)).astype(np.float32) for n in NAMES}
        save_file(weights[step], str(run / f"s{step}.safetensors"), {"step": str(step)})
    return run, weights


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# a NUL or a 10,000-character name in a figure warned of a missing glyph and collapsed axes
@pytest.mark.filterwarnings("error::UserWarning")
def test_every_command_that_writes_stays_inside(
    hostile: tuple[Path, dict[int, dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, weights = hostile
    base = run.parent
    before = files(base)
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(run), "--workers", "1"])
    assert res.exit_code == 0, res.output
    spath = store.store_path(run)

    # every name has its own view, holding its own matrix's spectrum (none overwrote another)
    st = store.open_store(spath)
    by_param = {v.param: k for k, v in st.views.items()}
    assert sorted(by_param) == sorted(NAMES)
    keys = list(by_param.values())
    assert len({k.lower() for k in keys}) == len(keys)
    for name, key in by_param.items():
        for row, step in enumerate((0, 1)):
            want = np.linalg.svd(weights[step][name].astype(np.float64), compute_uv=False)
            np.testing.assert_allclose(st.read_sigma(key)[row], want, rtol=1e-5, atol=1e-6)
        assert (spath / "views" / key / "zarr.json").is_file()  # its own folder, in the store

    # derived results: cached inside the store, one entry per name
    for command in ("rank", "align", "sva"):
        res = runner.invoke(app, [command, str(run), "--format", "json"])
        assert res.exit_code == 0, res.output
    assert (spath / "derived" / "rank").is_dir()
    rank = specan.open(run).rank()  # read back from the cache
    assert sorted(map(str, rank.coords["param"].values)) == sorted(NAMES)
    for param, row in zip(rank.coords["param"].values, rank.values, strict=True):
        for col, step in enumerate((0, 1)):
            s = np.linalg.svd(weights[step][str(param)].astype(np.float64), compute_uv=False)
            p = s / s.sum()
            assert row[col] == pytest.approx(np.exp(-(p * np.log(p)).sum()) / 4, rel=1e-5)

    # figures: all in --out, one file per view (a collision would leave fewer)
    figs = base / "figs"
    res = runner.invoke(app, ["plot", str(run), "--out", str(figs), "--max-figures", "0"])
    assert res.exit_code == 0, res.output
    drawn = files(figs)
    assert all(p.parent == figs for p in drawn)
    sigma = [p for p in drawn if p.name.startswith("sigma_")]
    assert len(sigma) == len(NAMES), sorted(p.name for p in sigma)

    # the report: one file, where it was asked to go (one figure of each kind: rendering is slow)
    monkeypatch.setattr(plots, "MAX_FIGURES", 1)
    page = base / "page.html"
    res = runner.invoke(app, ["report", str(run), "--out", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert "../../escape.weight" in text
    # HTML allows no NUL: the name is shown with U+FFFD in its place
    assert "\x00" not in text and "nul\ufffdname" in text

    made = files(base) - before
    inside = {p for p in made if spath in p.parents or p.parent == figs or p == page}
    assert made == inside, sorted(map(str, made - inside))
    assert not (base.parent / "escape.weight").exists() and not Path("/abs/w").exists()


# tiny settings: a few steps in a few seconds
GROKKING = ["grokking", "--p", "11", "--d-model", "16", "--n-heads", "2", "--d-mlp", "32",
            "--train-frac", "0.5", "--steps", "2", "--save-every", "2",
            "--eval-every", "2"]  # fmt: skip
VGG = ["vgg", "--width-mult", "0.0625", "--limit-train", "64", "--val-frac", "0.05",
       "--batch-size", "32", "--epochs", "1"]  # fmt: skip


def contents(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in files(root)}


def refused(res: Result) -> str:
    """The one line `specan train` stops with (main() prints a SpecanError as one line)."""
    assert res.exit_code != 0 and isinstance(res.exception, SpecanError), res.output
    line = str(res.exception)
    assert "\n" not in line
    return line


def trained(args: list[str], out: Path) -> dict[Path, bytes]:
    """`specan train ARGS --out OUT`, which must succeed and write only under the folder OUT
    names; what the folder above OUT's folder holds afterwards."""
    where = Path(os.path.normpath(out))
    kept = contents(where.parent)
    res = CliRunner().invoke(app, ["train", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    made = contents(where.parent)
    assert all(made[p] == b for p, b in kept.items())  # nothing there before was changed
    new = set(made) - set(kept)
    assert new and all(where in p.parents for p in new), sorted(map(str, new))
    return made


def test_train_writes_only_under_its_out_and_never_over_another_run(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    runner = CliRunner()
    trained(GROKKING, base / "other")
    # an --out with ".." segments: the run lands in the folder it names, nothing beside it
    trained(GROKKING, base / "a" / ".." / "grok")
    assert json.loads((base / "grok" / "finished.json").read_text()) == {"step": 2}

    # --out spelt with ".." onto another run: refused in one line, naming what differs
    kept = contents(base)
    line = refused(
        runner.invoke(app, ["train", *GROKKING, "--wd", "0", "--out", f"{base}/x/../other"])
    )
    assert "other" in line and "--wd 1.0, not 0" in line
    assert contents(base) == kept
    # a folder whose run.json holds hostile values: refused, nothing written
    hostile = base / "hostile"
    hostile.mkdir()
    values = [
        {"trainer": "../../escape", "config": {"out": "/abs"}},
        {"trainer": "grokking", "config": ["../../escape"], "pairs": "/abs"},
        {"trainer": "grokking", "config": {"out": "../../escape", "p": "\x00\n" * 5000}},
        {"trainer": "\n" * 10_000, "config": {}},
        {"trainer": "grokking", "config": {"\n" * 10_000: 1}},
        [],
    ]
    for meta in values:
        (hostile / "run.json").write_text(json.dumps(meta))
        kept = contents(base)
        line = refused(runner.invoke(app, ["train", *GROKKING, "--out", str(hostile)]))
        assert "hostile" in line, line
        assert contents(base) == kept, meta
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()


def test_train_from_a_run_with_hostile_values_writes_only_under_its_out(tmp_path: Path) -> None:
    """A lottery ticket ``--from`` a run whose run.json names paths outside (its --out, where it
    started, its parent, its pairs): the ticket is written under its own --out, and nothing
    else, the --from run included, changes."""
    base = tmp_path / "base"
    base.mkdir()
    dense = base / "dense"
    trained(VGG, dense)
    meta = json.loads((dense / "run.json").read_text())
    meta["config"].update(out="../../escape", init_from="/abs/escape.safetensors", from_="..")
    meta["parent"] = {"run": "../../..", "step": 0}
    meta["pairs"] = [{"prev": "../../escape", "next": "/abs/w", "kind": "linear"}]
    (dense / "run.json").write_text(json.dumps(meta))
    ticket = ["--ticket", "magnitude", "--rewind-epoch", "-1", "--from", str(dense)]
    trained([*VGG, *ticket], base / "b" / ".." / "ticket")
    assert (base / "ticket" / "mask.safetensors").is_file()
    assert json.loads((base / "ticket" / "run.json").read_text())["parent"]["run"] == str(
        dense.resolve()
    )
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()
