"""run.json and metrics.jsonl: the one reader, tolerant of what a killed training leaves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from specan.errors import RunFileError
from specan.runfile import metrics_at, read_config, read_config_text, read_metrics


def test_a_run_without_files_reads_empty(tmp_path: Path) -> None:
    assert read_config(tmp_path) == {}
    assert read_config_text(tmp_path) is None
    assert read_metrics(tmp_path) == []
    assert metrics_at(tmp_path, [0, 100]) == {}


def test_corrupt_run_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunFileError) as e:
        read_config(tmp_path)
    assert e.value.path.name == "run.json" and "corrupt JSON" in str(e.value)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunFileError, match="not a JSON object"):
        read_config(tmp_path)


def test_metrics_at_steps_half_line_and_resume(tmp_path: Path) -> None:
    lines = [
        {"step": 0, "epoch": 0, "loss": 2.0, "note": "start"},
        {"step": 100, "epoch": 1, "loss": 1.5, "acc": 0.5},
        {"step": 100, "epoch": 1, "loss": 1.25, "acc": 0.75},  # a resumed run logs it again
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 200, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert len(read_metrics(tmp_path)) == 3
    got = metrics_at(tmp_path, [0, 100, 200])
    assert list(got) == ["acc", "loss"]
    assert math.isnan(got["acc"][0]) and got["acc"][1:2] == [0.75] and math.isnan(got["acc"][2])
    assert got["loss"][:2] == [2.0, 1.25] and math.isnan(got["loss"][2])
