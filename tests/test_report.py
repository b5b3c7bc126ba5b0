"""HTML reports: self-contained, escaped, parseable, one embedded image per figure."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from specan import plots, report
from specan.pipeline import ingest


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag in ("link", "script") or (
            tag == "img" and not (a.get("src") or "").startswith("data:image/png;base64,")
        ):
            self.external.append(tag)


def parse(path: Path) -> Collect:
    p = Collect()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def make_run(root: Path, seed: int, note: str) -> Path:
    """A 3-layer MLP run with metrics and a run.json holding text that must be escaped."""
    (root / "checkpoints").mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    steps = (0, 10, 100)
    for step in steps:
        state = {
            "fc1.weight": torch.randn(32, 16, generator=gen),
            "fc2.weight": torch.randn(32, 32, generator=gen),
            "fc3.weight": torch.randn(10, 32, generator=gen),
        }
        save_file(state, root / "checkpoints" / f"step-{step}.safetensors")
    (root / "run.json").write_text(json.dumps({"schema_version": 1, "note": note}))
    lines = [
        {"step": s, "train_loss": 1.0 / (i + 1), "val_acc": 0.3 * i} for i, s in enumerate(steps)
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest(root)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("r")
    return [make_run(base / "wd1", 0, "<script>alert(1)</script>"), make_run(base / "wd0", 1, "&")]


@pytest.fixture(autouse=True)
def one_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """One per-pair/per-view figure of each kind: rendering is the slow part."""
    monkeypatch.setattr(plots, "MAX_FIGURES", 1)


def test_write_report(runs: list[Path]) -> None:
    run = runs[0]
    before = {p for p in run.rglob("*") if p.is_file()}
    out = report.write_report(run)
    assert out == run / "report.html"
    outside_store = {p for p in run.rglob("*") if p.is_file() and "specan.zarr" not in p.parts}
    assert outside_store == {p for p in before if "specan.zarr" not in p.parts} | {out}
    text = out.read_text()
    assert "wd1" in text and "<table>" in text and "<details>" in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "fc1.weight -&gt; fc2.weight" in text  # the alignment table
    assert "val_acc" in text
    p = parse(out)
    # rank, loss_rank, align_scores, align_0, sva_scores, sva_fc2.weight, stable_rank,
    # sigma_fc2.weight
    assert len(p.imgs) == 8 and "mean stable rank" in text
    assert p.external == []
    assert p.tags.count("table") == 4  # views, pairs, metrics, other analyses (stable rank)


def test_write_report_elsewhere(runs: list[Path], tmp_path: Path) -> None:
    out = report.write_report(runs[1], tmp_path / "sub" / "r.html")
    assert out.exists() and [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["r.html"]


def test_write_comparison(runs: list[Path], tmp_path: Path) -> None:
    out = report.write_comparison(runs, tmp_path / "cmp.html")
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.html"]
    text = out.read_text()
    assert "wd1" in text and "wd0" in text
    p = parse(out)
    assert len(p.imgs) == 2 and p.external == []
    # the runs on shared axes, not one figure per run side by side
    assert 'id="compare_loss_rank"' in text and 'id="compare_rank"' in text
