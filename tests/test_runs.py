"""Tests for specan.runs: layouts, step order, header validation, lazy tensor reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from specan import runs
from specan.errors import BadCheckpointError, EmptyRunError, RunNotFoundError
from specan.runs import CheckpointReader, TensorInfo, discover, read_header


def save(path: Path, tensors: dict[str, torch.Tensor] | None = None, **meta: object) -> Path:
    """Write a tiny safetensors file (metadata values as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else {"w": torch.randn(3, 2)}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()} or None)
    return path


def save_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write shards plus a model.safetensors.index.json mapping each tensor to its shard."""
    wm = {}
    for fname, tensors in shards.items():
        save(folder / fname, tensors)
        wm.update({k: fname for k in tensors})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return index


def steps(run: runs.Run) -> list[int | None]:
    return [c.step for c in run.checkpoints]


# --- layouts -----------------------------------------------------------------------------------


def test_specan_layout_numeric_order(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"trainer": "mlp", "seed": 1}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    for s in (100, 9, 10):
        save(tmp_path / "checkpoints" / f"step-{s}.safetensors")
    run = discover(tmp_path)
    assert run.layout == "specan"
    assert steps(run) == [9, 10, 100]
    assert run.config == {"trainer": "mlp", "seed": 1}
    assert run.checkpoints[0].name == "checkpoints/step-9.safetensors"
    assert run.bad == ()


def test_specan_padded_names_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    save(tmp_path / "checkpoints" / "step-00001000.safetensors", step=1000, epoch=2.5)
    # metadata beats the name
    save(tmp_path / "checkpoints" / "step-00000001.safetensors", step=5000, epoch="3")
    run = discover(tmp_path)
    assert steps(run) == [1000, 5000]
    assert [c.epoch for c in run.checkpoints] == [2.5, 3.0]
    c = run.checkpoints[0]
    assert c.size == c.files[0].stat().st_size and c.mtime_ns == c.files[0].stat().st_mtime_ns


def test_corrupt_run_json(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    save(tmp_path / "checkpoints" / "step-1.safetensors")
    with pytest.raises(BadCheckpointError) as e:
        discover(tmp_path)
    assert e.value.path.name == "run.json"


def test_flat_folder_names(tmp_path: Path) -> None:
    for n in ("ckpt_9", "ckpt_10", "epoch=3", "final", "alpha"):
        save(tmp_path / f"{n}.safetensors")
    run = discover(tmp_path)
    assert run.layout == "flat"
    # None steps last, in natural order of name
    assert [c.name for c in run.checkpoints] == [
        "epoch=3.safetensors",
        "ckpt_9.safetensors",
        "ckpt_10.safetensors",
        "alpha.safetensors",
        "final.safetensors",
    ]
    assert steps(run) == [3, 9, 10, None, None]


def test_duplicate_steps_kept_ordered_by_name(tmp_path: Path) -> None:
    save(tmp_path / "b_5.safetensors")
    save(tmp_path / "a_5.safetensors")
    save(tmp_path / "c.safetensors", step=5)
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == [
        "a_5.safetensors",
        "b_5.safetensors",
        "c.safetensors",
    ]


def test_hf_single_and_sharded(tmp_path: Path) -> None:
    save(tmp_path / "checkpoint-1000" / "model.safetensors", {"a": torch.ones(2, 2)})
    (tmp_path / "checkpoint-1000" / "optimizer.pt").write_bytes(b"x")
    (tmp_path / "checkpoint-1000" / "training_args.bin").write_bytes(b"x")
    a, b = torch.randn(4, 3), torch.randn(5)
    save_sharded(
        tmp_path / "checkpoint-500",
        {
            "model-00001-of-00002.safetensors": {"a": a},
            "model-00002-of-00002.safetensors": {"b": b},
        },
    )
    run = discover(tmp_path)
    assert run.layout == "hf"
    assert steps(run) == [500, 1000]
    sharded = run.checkpoints[0]
    assert sharded.name == "checkpoint-500/model.safetensors.index.json"
    assert [f.name for f in sharded.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert sharded.size == sum(f.stat().st_size for f in sharded.files)
    assert read_header(sharded) == {"a": TensorInfo((4, 3), "F32"), "b": TensorInfo((5,), "F32")}
    with CheckpointReader(sharded) as r:
        assert sorted(r.names()) == ["a", "b"]
        assert torch.equal(r.get("b"), b)
        assert torch.equal(r.get("a"), a)
        assert r._route is not None and r._route["b"].name == "model-00002-of-00002.safetensors"
        with pytest.raises(BadCheckpointError, match="missing tensor 'zz'"):
            r.get("zz")


def test_hf_index_names_missing_shard(tmp_path: Path) -> None:
    save(tmp_path / "checkpoint-1" / "model.safetensors")
    idx = save_sharded(
        tmp_path / "checkpoint-2", {"model-00001-of-00002.safetensors": {"a": torch.ones(1)}}
    )
    wm = json.loads(idx.read_text())
    wm["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    idx.write_text(json.dumps(wm))
    old = time.time_ns() - 60 * 10**9  # written a minute ago: bad, not a shard still to come
    for f in idx.parent.iterdir():
        os.utime(f, ns=(old, old))
    run = discover(tmp_path)
    assert steps(run) == [1]
    [(path, reason)] = run.bad
    assert path.name == "checkpoint-2"
    assert "missing shard 'model-00002-of-00002.safetensors'" in reason


def test_pythia_step_folders(tmp_path: Path) -> None:
    for s in (0, 1, 512, 1000, 143000):
        save(tmp_path / f"step{s}" / "model.safetensors", {"x": torch.ones(1) * s})
    save_sharded(tmp_path / "step2", {"model-00001-of-00001.safetensors": {"x": torch.ones(1)}})
    (tmp_path / "step2" / "config.json").write_text(json.dumps({"num_attention_heads": 8}))
    (tmp_path / "step0" / "config.json").write_text(json.dumps({"num_attention_heads": 12}))
    run = discover(tmp_path)
    assert run.layout == "pythia"
    assert steps(run) == [0, 1, 2, 512, 1000, 143000]
    # the first config.json in checkpoint order
    assert run.config["hf_config"] == {"num_attention_heads": 12}


def test_pythia_bin_shards_with_index(tmp_path: Path, pythia_like) -> None:
    """pythia-12b's revisions: pytorch_model-0000N-of-00003.bin + pytorch_model.bin.index.json."""
    cfg = pythia_like.config("14m", layers=2, vocab=64, positions=8)
    pythia_like.write(tmp_path, cfg, [0, 1000], bin_shards=3)
    save(tmp_path / "step2000" / "model.safetensors", {"x": torch.ones(1)})  # the other kind
    run = discover(tmp_path)
    assert run.layout == "pythia" and steps(run) == [0, 1000, 2000]
    c = run.checkpoints[1]
    assert c.name == "step1000/pytorch_model.bin.index.json"
    assert [f.name for f in c.files] == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    want = pythia_like.state_dict(cfg, seed=1000)
    header = read_header(c)
    assert header["gpt_neox.embed_in.weight"] == TensorInfo((64, 128), "F16")
    assert header["gpt_neox.layers.0.attention.bias"].dtype == "BOOL"
    assert set(header) == set(want)
    with CheckpointReader(c) as r:
        for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):  # first and last shard
            assert torch.equal(r.get(name), want[name].float())
        assert r._route is not None
        assert r._route["embed_out.weight"].name == "pytorch_model-00003-of-00003.bin"


def test_torch_files_flat_and_nested(tmp_path: Path) -> None:
    w = torch.randn(5, 4)
    torch.save({"w": w}, tmp_path / "epoch_3.pt")
    torch.save({"state_dict": {"w": w * 2}, "epoch": 4, "note": "x"}, tmp_path / "epoch_4.pt")
    torch.save({"w": w}, tmp_path / "optimizer.pt")  # a trainer's extra, never a checkpoint
    run = discover(tmp_path)
    assert run.layout == "flat" and steps(run) == [3, 4]
    with CheckpointReader(run.checkpoints[1]) as r:
        assert torch.equal(r.get("w"), w * 2)


class Custom:  # stands for any class a full unpickle would import and run
    pass


def test_torch_file_needing_full_unpickle_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, 2), "obj": Custom()}, tmp_path / "step_1.pt")
    torch.save(
        {"w": torch.ones(2, 2)}, tmp_path / "step_2.pt", _use_new_zipfile_serialization=False
    )
    (tmp_path / "step_3.bin").write_bytes(b"x" * 100)
    run = discover(tmp_path)  # torch files are opened at ingest, not at discovery
    for ckpt, words in zip(
        run.checkpoints,
        ["needs a full unpickle (it holds test_runs.Custom)", "not a zip-format torch file",
         "not a zip-format torch file"],
        strict=True,
    ):  # fmt: skip
        with pytest.raises(BadCheckpointError) as e:
            read_header(ckpt)
        assert str(e.value).startswith(str(ckpt.files[0])) and words in str(e.value)
        assert "\n" not in str(e.value)


def test_hf_cache_layout(tmp_path: Path, pythia_like) -> None:
    cfg = pythia_like.config("14m", layers=1, vocab=64, positions=8)
    repo = pythia_like.write_hf_cache(tmp_path, cfg, [0, 1, 2, 1000], same={1: 0}, name="p14")
    assert repo.name == "models--EleutherAI--p14"
    refs = {r.name: r.read_text() for r in (repo / "refs").iterdir()}
    (repo / "refs" / "main").write_text(refs["step1000"])  # an alias of step1000: left out
    orphan = repo / "snapshots" / ("f" * 40)  # a snapshot no ref names (downloaded by commit)
    orphan.mkdir()
    for f in (repo / "snapshots" / refs["step2"]).iterdir():
        (orphan / f.name).symlink_to(os.readlink(f))
    run = discover(repo)
    assert run.layout == "hf-cache"
    assert [(c.name, c.step) for c in run.checkpoints] == [
        ("step0", 0), ("step1", 1), ("step2", 2), ("step1000", 1000), ("f" * 40, None),
    ]  # fmt: skip
    assert len(run.notes) == 1 and "f" * 40 in run.notes[0] and "no ref" in run.notes[0]
    assert run.config["hf_config"]["num_attention_heads"] == 4
    assert all(f.is_symlink() for c in run.checkpoints for f in c.files)
    ids = [runs.content_id(c) for c in run.checkpoints]
    assert ids[0] == ids[1] and ids[2] == ids[4] and len(set(ids)) == 3
    assert ids[0].startswith("blob:")  # from the symlinks, nothing read
    with CheckpointReader(run.checkpoints[3]) as r:
        want = pythia_like.state_dict(cfg, seed=1000)["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
        assert torch.equal(r.get("gpt_neox.layers.0.mlp.dense_h_to_4h.weight"), want.float())


def test_content_id_hashes_tensors_not_metadata(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    a = save(tmp_path / "a" / "step-1.safetensors", {"w": w}, step=1)
    b = save(tmp_path / "b" / "step-2.safetensors", {"w": w.clone()}, step=2)
    c = save(tmp_path / "c" / "step-3.safetensors", {"w": w + 1e-3}, step=3)
    (tmp_path / "pt").mkdir()
    torch.save({"w": w}, tmp_path / "pt" / "d.pt")
    torch.save({"w": w.clone()}, tmp_path / "pt" / "e.pt")
    ids = [runs.content_id(discover(p.parent).checkpoints[0]) for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2] and ids[0].startswith("sha256:")
    d, e = discover(tmp_path / "pt").checkpoints
    assert runs.content_id(d) == runs.content_id(e) != ids[0]


def test_single_model_root(tmp_path: Path) -> None:
    root = tmp_path / "pythia-70m"
    save_sharded(
        root,
        {
            "model-00001-of-00002.safetensors": {"a": torch.ones(2)},
            "model-00002-of-00002.safetensors": {"b": torch.zeros(2)},
        },
    )
    (root / "config.json").write_text(json.dumps({"num_attention_heads": 8}))
    run = discover(root)
    assert run.layout == "hf"
    assert len(run.checkpoints) == 1
    c = run.checkpoints[0]
    assert c.step is None  # "70" in the root's name is not a step
    assert c.name == "model.safetensors.index.json" and len(c.files) == 2
    assert run.config["hf_config"]["num_attention_heads"] == 8


def test_single_model_root_named_like_a_step(tmp_path: Path) -> None:
    save(tmp_path / "checkpoint-300" / "model.safetensors")
    run = discover(tmp_path / "checkpoint-300")
    assert steps(run) == [300]
    assert run.checkpoints[0].name == "model.safetensors"


def test_root_config_json(tmp_path: Path) -> None:
    save(tmp_path / "checkpoint-1" / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    assert discover(tmp_path).config == {"hf_config": {"num_attention_heads": 4}}


def test_ignored_entries(tmp_path: Path) -> None:
    save(tmp_path / "ckpt_1.safetensors")
    save(tmp_path / ".hidden_2.safetensors")
    save(tmp_path / "ckpt_3.tmp.safetensors")
    (tmp_path / "ckpt_4.safetensors.tmp").write_bytes(b"partial")
    save(tmp_path / "specan.zarr" / "x.safetensors")
    save(tmp_path / ".git" / "y.safetensors")
    run = discover(tmp_path)
    assert run.layout == "flat"
    assert [c.name for c in run.checkpoints] == ["ckpt_1.safetensors"]
    assert run.bad == ()


# --- dtypes and reading ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_get_float32_copy(tmp_path: Path, dtype: torch.dtype) -> None:
    w = torch.randn(6, 5).to(dtype)
    path = save(tmp_path / "step-1.safetensors", {"w": w, "n": torch.tensor(3)})
    run = discover(tmp_path)
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(dtype, "F64")
    assert read_header(run.checkpoints[0])["w"] == TensorInfo((6, 5), code)
    with CheckpointReader(run.checkpoints[0]) as r:
        got = r.get("w")
        assert got.dtype == torch.float32
        assert torch.equal(got, w.to(torch.float32))
        assert r.get("n").item() == 3.0
    # a copy: rewriting the file does not change what was returned
    save(path, {"w": torch.zeros(6, 5).to(dtype), "n": torch.tensor(3)})
    assert torch.equal(got, w.to(torch.float32))


# --- errors ------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError):
        discover(tmp_path / "nope")


def test_file_as_root(tmp_path: Path) -> None:
    f = save(tmp_path / "a.safetensors")
    with pytest.raises(RunNotFoundError, match="not a folder"):
        discover(f)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(EmptyRunError):
        discover(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    save(tmp_path / "step-1.safetensors")
    bad = save(tmp_path / "step-2.safetensors", {"w": torch.randn(64, 64)})
    data = bad.read_bytes()
    bad.write_bytes(data[:-100])
    old = time.time_ns() - 60 * 10**9  # cut short a minute ago: bad, not still being written
    os.utime(bad, ns=(old, old))
    run = discover(tmp_path)
    assert steps(run) == [1]
    [(path, reason)] = run.bad
    assert path == bad
    assert reason == "truncated: header says 16384 bytes of tensor data, file has 16284"
    ckpt = runs.Checkpoint("step-2.safetensors", (bad,), 2, None, 0, 0)
    with pytest.raises(BadCheckpointError, match="truncated"):
        read_header(ckpt)
    with pytest.raises(BadCheckpointError, match="truncated"):
        CheckpointReader(ckpt).get("w")


def test_text_file_renamed(tmp_path: Path) -> None:
    save(tmp_path / "step-1.safetensors")
    (tmp_path / "step-2.safetensors").write_text("this is not a checkpoint at all, just text")
    (tmp_path / "step-3.safetensors").write_bytes(b"abc")
    old = time.time_ns() - 60 * 10**9  # 3 bytes a minute ago: bad, not a file being written
    os.utime(tmp_path / "step-3.safetensors", ns=(old, old))
    run = discover(tmp_path)
    assert steps(run) == [1]
    reasons = dict((p.name, r) for p, r in run.bad)
    assert reasons["step-2.safetensors"].startswith("not a safetensors file (header length")
    assert reasons["step-3.safetensors"] == "not a safetensors file (3 bytes)"


def test_all_bad_is_empty_run_with_detail(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_text("garbage garbage garbage")
    with pytest.raises(EmptyRunError, match="a.safetensors: not a safetensors file"):
        discover(tmp_path)


def test_header_not_json(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(EmptyRunError, match="header is not JSON"):
        discover(tmp_path)


# --- speed and caching -------------------------------------------------------------------------


def test_known_skips_header_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for s in range(5):
        save(tmp_path / f"step-{s}.safetensors", step=s * 10)
    first = discover(tmp_path)
    known = {c.name: (c.size, c.mtime_ns, c.step, c.epoch) for c in first.checkpoints}
    calls: list[Path] = []
    real = runs._read_file_header
    monkeypatch.setattr(runs, "_read_file_header", lambda p, **k: calls.append(p) or real(p, **k))
    again = discover(tmp_path, known=known)
    assert calls == []
    assert again.checkpoints == first.checkpoints
    # a rewritten file is read again
    changed = save(tmp_path / "step-3.safetensors", {"w": torch.randn(4, 4)}, step=99)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = discover(tmp_path, known=known)
    assert calls == [changed]
    assert steps(third) == [0, 10, 20, 40, 99]
    assert runs.file_signature(third.checkpoints[-1]) == (
        third.checkpoints[-1].size,
        third.checkpoints[-1].mtime_ns,
    )


def test_discover_150_checkpoints_in_step_order(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": torch.zeros(8, 8) for i in range(50)}
    for s in reversed(range(150)):
        save(tmp_path / "checkpoints" / f"step-{s}.safetensors", tensors, step=s)
    run = discover(tmp_path)
    assert steps(run) == list(range(150))


def test_import_does_not_pull_torch() -> None:
    code = "import specan.runs, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
