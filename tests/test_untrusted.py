"""Pickled checkpoints from strangers: a payload is refused in one line and never runs."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specan import store
from specan.errors import BadCheckpointError
from specan.pipeline import IngestOptions, ingest
from specan.runs import discover, read_header

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command that creates `marker`: proof the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(Payload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def hostile_files(folder: Path, marker: Path) -> dict[str, str]:
    """Pickled files whose unpickling would create `marker`; {file name: words of the refusal}."""
    folder.mkdir(parents=True, exist_ok=True)
    w = torch.ones(3, 2)
    torch.save({"w": w, "x": Payload(marker)}, folder / "step-1.pt")
    torch.save({"state_dict": {"w": w}, "hparams": ExecPayload(marker)}, folder / "step-2.ckpt")
    torch.save(
        {"w": w, "x": Payload(marker)}, folder / "step-3.pth", _use_new_zipfile_serialization=False
    )
    # a bare pickle, as pickle.dump writes it, under a torch suffix
    (folder / "step-4.bin").write_bytes(pickle.dumps({"w": w, "x": Payload(marker)}, protocol=2))
    # the payload is the whole file: a reduce at the top level
    torch.save(Payload(marker), folder / "step-5.pt")
    return {
        "step-1.pt": "needs a full unpickle (it holds posix.system",
        "step-2.ckpt": "needs a full unpickle (it holds exec",
        "step-3.pth": "not a zip-format torch file",
        "step-4.bin": "not a zip-format torch file",
        "step-5.pt": "needs a full unpickle (it holds posix.system",
    }


def test_a_payload_is_refused_by_the_reader_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    words = hostile_files(tmp_path / "run", marker)
    run = discover(tmp_path / "run")
    assert sorted(Path(c.name).name for c in run.checkpoints) == sorted(words)
    for ckpt in run.checkpoints:
        with pytest.raises(BadCheckpointError) as e:
            read_header(ckpt)
        msg = str(e.value)
        assert msg.startswith(str(ckpt.files[0]) + ": ") and "\n" not in msg
        assert words[ckpt.files[0].name] in msg, msg
    assert not marker.exists()


def test_a_payload_at_ingest_is_one_line_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    words = hostile_files(run, marker)
    torch.save({"w": torch.ones(3, 2) * 2}, run / "step-0.pt")  # one good checkpoint
    # a sharded torch model whose second shard carries the payload
    shards = run / "checkpoint-9"
    shards.mkdir()
    torch.save({"w": torch.ones(3, 2)}, shards / "pytorch_model-1.bin")
    torch.save({"v": torch.ones(3, 2), "x": Payload(marker)}, shards / "pytorch_model-2.bin")
    (shards / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-1.bin", "v": "pytorch_model-2.bin"}})
    )
    report = ingest(run, IngestOptions(workers=1))
    assert not marker.exists()
    assert report.computed == ["step-0.pt"]
    bad = {Path(p).name: r for p, r in report.bad}
    assert sorted(bad) == sorted([*words, "pytorch_model-2.bin"])
    for name, reason in bad.items():
        assert "\n" not in reason and words.get(name, "needs a full unpickle") in reason, reason
    assert store.open_store(store.store_path(run)).done_rows()[0] == [0]

    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SPECAN_DEBUG", None)
    res = subprocess.run(
        [sys.executable, "-m", "specan.cli", "ingest", str(run), "--strict"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {run}") and "full unpickle" in res.stderr.splitlines()[0]
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def test_no_code_path_unpickles_beyond_weights_only() -> None:
    """Every torch.load in the package passes weights_only=True; nothing else unpickles."""
    loads = 0
    for folder in ("specan", "kernels", "trainers"):
        for path in (ROOT / folder).rglob("*.py"):
            for call in _calls(ast.parse(path.read_text(), str(path))):
                name = _name(call.func)
                kw = {k.arg: k.value for k in call.keywords}
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                if name.endswith("torch.load"):
                    loads += 1
                    flag = kw.get("weights_only")
                    assert isinstance(flag, ast.Constant) and flag.value is True, where
                assert not name.startswith(("pickle.", "dill.", "cloudpickle.", "joblib.")), where
                if name.endswith(("np.load", "numpy.load")) and "allow_pickle" in kw:
                    flag = kw["allow_pickle"]
                    assert isinstance(flag, ast.Constant) and flag.value is False, where
    assert loads >= 1  # the reader of torch files is found, so the check sees real code
