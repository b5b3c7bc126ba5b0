"""Randomly mangled checkpoints at `ingest`: no uncaught exception, one line per bad checkpoint,
the store always readable, the good checkpoints still ingested.

Sized by two environment variables so that a long run can hunt further than CI does:
``SPECAN_FUZZ_SEED`` (default 0) and ``SPECAN_FUZZ_CASES`` (mangled checkpoints in all, default
240). A failure names the seed and the case, so it can be replayed alone.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from specan import store
from specan.cli import app
from specan.errors import BadCheckpointError
from specan.pipeline import IngestOptions, ingest

SEED = int(os.environ.get("SPECAN_FUZZ_SEED", "0"))
CASES = int(os.environ.get("SPECAN_FUZZ_CASES", "240"))
BATCH = 60  # mangled checkpoints per run folder: one ingest each, with and without strict

# The model every good checkpoint holds: names, shapes (float32).
MODEL = {"a.weight": (6, 4), "b.weight": (4, 5), "b.bias": (5,)}


# --- writing safetensors by hand, so that every byte can be wrong ------------------------------
def tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in MODEL.items()}


def layout(arrays: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """A valid safetensors header (as a dict) and its data bytes."""
    header, chunks, pos = {}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [pos, pos + len(raw)],
        }
        chunks.append(raw)
        pos += len(raw)
    return header, b"".join(chunks)


def pack(header: dict | bytes, data: bytes, n: int | None = None) -> bytes:
    """File bytes: 8-byte little-endian header length (``n`` if given), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def good_file(arrays: dict[str, np.ndarray], step: int) -> bytes:
    header, data = layout(arrays)
    header["__metadata__"] = {"step": str(step)}
    return pack(header, data)


# --- the mangles: each returns (file bytes, whether the file must be refused) -------------------
Mangle = Callable[[np.random.Generator, dict, bytes], tuple[bytes, bool]]


def _pick(rng: np.random.Generator, seq: list) -> object:
    return seq[int(rng.integers(len(seq)))]


def _name(rng: np.random.Generator, header: dict) -> str:
    return str(_pick(rng, sorted(k for k in header if k != "__metadata__")))


def truncated(rng, header, data):
    whole = pack(header, data)
    return whole[: int(rng.integers(0, len(whole)))], True


def length_lies(rng, header, data):
    raw = json.dumps(header).encode()
    delta = int(_pick(rng, [-1, 1, -7, 9, -len(raw), len(data) + 1, 3 * len(raw)]))
    return pack(raw, data, max(0, len(raw) + delta)), True


def huge_header(rng, header, data):
    n = int(_pick(rng, [2**64 - 1, 2**63, 2**40, 100_000_001, 2**31]))
    return pack(header, data, n), True


def offsets_past_end(rng, header, data):
    t = header[_name(rng, header)]
    t["data_offsets"][1] += int(rng.integers(1, 10_000))
    return pack(header, data), True


def overlapping(rng, header, data):
    a, b = header["a.weight"], header["b.weight"]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + 80]
    return pack(header, data), True


def unknown_dtype(rng, header, data):
    header[_name(rng, header)]["dtype"] = _pick(rng, ["F128", "", "f32", 7, None, ["F32"], "Q4_K"])
    return pack(header, data), True


def wrong_count(rng, header, data):
    t = header[_name(rng, header)]
    t["shape"] = [d + int(rng.integers(1, 3)) for d in t["shape"]] or [3]
    return pack(header, data), True


def bad_shape(rng, header, data):
    t = header["a.weight"]
    t["shape"] = _pick(rng, [[-6, -4], ["6", 4], [6.0, 4], None, {}, 24, [2**70, 0], [6, 4, -1]])
    return pack(header, data), True


def bad_offsets(rng, header, data):
    t = header["a.weight"]
    t["data_offsets"] = _pick(rng, [["0", 96], [0], [0, 96, 96], None, [-96, 0], [0.0, 96.0], {}])
    return pack(header, data), True


def non_utf8(rng, header, data):
    raw = json.dumps(header).encode().replace(b'"a.weight"', b'"a.\xff\xfeweight"')
    return pack(raw, data), True


def duplicate_names(rng, header, data):
    # JSON allows a repeated key; read as a dict, one of the two entries would vanish unseen
    raw = json.dumps(header).encode()
    twin = {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}
    extra = json.dumps({_name(rng, header): twin}).encode()[1:-1]
    raw = raw[:-1] + b", " + extra + b"}"
    return pack(raw, data), True


def zero_size(rng, header, data):
    end = len(data)
    if rng.integers(2):  # an analysed matrix with no rows: a shape the run's others lack
        header["b.weight"] = {"dtype": "F32", "shape": [0, 5], "data_offsets": [96, 96]}
        header["b.bias"]["data_offsets"] = [96, 116]
        return pack(header, data[:96] + data[-20:]), True
    header["empty"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [end, end]}  # an extra
    return pack(header, data), False


def nan_inf(rng, header, data):
    a = np.frombuffer(data, dtype="<f4").copy()
    a[int(rng.integers(0, 24))] = _pick(rng, [np.nan, np.inf, -np.inf])  # inside a.weight
    return pack(header, a.tobytes()), True


def not_an_object(rng, header, data):
    raw = _pick(rng, [b"[1, 2]", b"42", b'"x"', b"null", b"{", b"", b"{}" + b" " * 5])
    return pack(raw, data), True


def odd_metadata(rng, header, data):
    header["__metadata__"] = _pick(
        rng,
        [[1], "x", {"step": [1]}, {"step": {}}, {"step": 5}, {"step": None}, {"epoch": "inf"},
         {"epoch": "nan"}, {"step": "1e400"}, {"step": "-3"}, {"epoch": [0.5]}, {"x": 1}],
    )  # fmt: skip
    return pack(header, data), False  # a readable file whatever its metadata holds, or refused


def garbage(rng, header, data):
    return rng.bytes(int(rng.integers(0, 300))), True


def trailing(rng, header, data):
    return pack(header, data) + rng.bytes(int(rng.integers(1, 64))), True


def flipped(rng, header, data):
    whole = bytearray(pack(header, data))
    for _ in range(int(rng.integers(1, 4))):
        whole[int(rng.integers(0, len(whole)))] = int(rng.integers(0, 256))
    return bytes(whole), False  # a flip in the tensor data leaves a valid file


def hostile_names(rng, header, data):
    end = len(data)
    name = str(
        _pick(
            rng,
            [
                "../../x",
                "/abs/y",
                "a\x00b",
                "n" * 10_000,
                "..",
                "\udcff".encode("utf-8", "surrogatepass").decode("latin-1"),
            ],
        )
    )
    header[name] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [end, end + 16]}
    return pack(header, data + b"\x00" * 16), False  # extra tensors are ignored


FILE_MANGLES: list[Mangle] = [
    truncated, length_lies, huge_header, offsets_past_end, overlapping, unknown_dtype,
    wrong_count, bad_shape, bad_offsets, non_utf8, duplicate_names, zero_size, nan_inf,
    not_an_object, odd_metadata, garbage, trailing, flipped, hostile_names,
]  # fmt: skip


def sharded(rng: np.random.Generator, folder: Path, arrays: dict[str, np.ndarray]) -> bool:
    """A sharded checkpoint in `folder`, its index mangled; True when it must be refused."""
    folder.mkdir()
    one = {k: arrays[k] for k in ("a.weight",)}
    two = {k: arrays[k] for k in ("b.weight", "b.bias")}
    (folder / "s-1.safetensors").write_bytes(pack(*layout(one)))
    (folder / "s-2.safetensors").write_bytes(pack(*layout(two)))
    wm: object = {"a.weight": "s-1.safetensors", "b.weight": "s-2.safetensors",
                  "b.bias": "s-2.safetensors"}  # fmt: skip
    kind = int(rng.integers(9))
    bad = True
    if kind == 0:  # a shard that is not there
        wm["b.bias"] = "s-3.safetensors"
    elif kind == 1:  # shards outside the folder
        wm["b.bias"] = str(_pick(rng, ["../s-2.safetensors", "/etc/passwd", "..", "a\\b"]))
    elif kind == 2:  # a foreign shard: another model's tensors
        (folder / "s-2.safetensors").write_bytes(pack(*layout({"c": arrays["a.weight"]})))
    elif kind == 3:
        wm = _pick(rng, [[], "x", None, 3, {}])
    elif kind == 4:
        wm["b.bias"] = _pick(rng, [3, None, ["s-2.safetensors"], {"f": 1}, ""])
    elif kind == 5:  # a shard index that is not JSON
        (folder / "model.safetensors.index.json").write_bytes(rng.bytes(40))
        return True
    elif kind == 6:  # a truncated shard
        (folder / "s-1.safetensors").write_bytes(pack(*layout(one))[:50])
    else:  # a valid sharded checkpoint
        bad = False
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return bad


# --- the runs ------------------------------------------------------------------------------------
def make_run(root: Path, seed: int, count: int) -> tuple[Path, dict[str, bool], dict]:
    """Two good checkpoints (steps 0 and 1) and `count` mangled ones after them; return the
    run, {case path: must be refused} and the good checkpoints' arrays by file name."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    good = {}
    for step in (0, 1):
        arrays = tensors(rng)
        (root / f"good-{step}.safetensors").write_bytes(good_file(arrays, step))
        good[f"good-{step}.safetensors"] = arrays
    cases: dict[str, bool] = {}
    for i in range(count):
        arrays = tensors(rng)
        if rng.random() < 0.15:
            folder = root / f"shard-{1000 + i}"
            cases[folder.name] = sharded(rng, folder, arrays)
            continue
        mangle = FILE_MANGLES[int(rng.integers(len(FILE_MANGLES)))]
        header, data = layout(arrays)
        raw, must_fail = mangle(rng, header, data)
        name = f"m-{1000 + i}-{mangle.__name__}.safetensors"
        (root / name).write_bytes(raw)
        cases[name] = must_fail
    old = time.time_ns() - 60 * 10**9  # mangled a minute ago: bad, not still being written
    for f in root.rglob("*"):
        os.utime(f, ns=(old, old))
    return root, cases, good


def case_of(run: Path, cases: dict[str, bool], where: str) -> str:
    """The case a reported path or checkpoint name belongs to."""
    rel = Path(where).relative_to(run) if Path(where).is_absolute() else Path(where)
    assert not Path(where).is_absolute() or Path(where).resolve().is_relative_to(run.resolve())
    top = rel.parts[0]
    assert top in cases or top.startswith("good-"), where
    return top


def sigmas_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.linalg.svd(a.astype(np.float64), compute_uv=False)
            for k, a in arrays.items() if a.ndim == 2}  # fmt: skip


def check_store(run: Path, good: dict[str, dict[str, np.ndarray]]) -> None:
    """The store opens, and each good checkpoint's row holds its singular values."""
    st = store.open_store(store.store_path(run))
    rows, entries = st.done_rows()
    by_name = {e["name"]: r for r, e in zip(rows, entries, strict=True)}
    keys = {v.param: k for k, v in st.views.items()}
    for name, arrays in good.items():
        assert name in by_name, f"good checkpoint {name} not ingested"
        for param, s in sigmas_of(arrays).items():
            got = st.read_sigma(keys[param])[rows.index(by_name[name])]
            np.testing.assert_allclose(got[: len(s)], s, rtol=1e-4, atol=1e-5)


def check_report(run: Path, cases: dict[str, bool], report) -> None:
    """Every case is either ingested (or a duplicate) or on exactly one bad line."""
    bad = [case_of(run, cases, p) for p, _ in report.bad]
    assert len(bad) == len(set(bad)), f"a checkpoint reported twice: {report.bad}"
    ok = {case_of(run, cases, n) for n in report.computed}
    ok |= {case_of(run, cases, n) for n, _ in report.duplicates}
    assert not ok & set(bad)
    for name, must_fail in cases.items():
        assert name in ok or name in bad, f"{name}: neither ingested nor reported bad"
        assert not (must_fail and name in ok), f"{name}: a broken file was ingested"
    for path, reason in report.bad:
        assert reason and "\n" not in reason and len(reason) < 600, (path, reason)
        # specan's header check refuses all that safetensors' parser would, with its own words
        assert "deserializing header" not in reason, (path, reason)


def batches() -> list[tuple[int, int]]:
    return [(SEED * 1000 + b, min(BATCH, CASES - b * BATCH)) for b in range(-(-CASES // BATCH))]


@pytest.mark.parametrize("seed,count", batches())
def test_mangled_checkpoints_at_ingest(tmp_path: Path, seed: int, count: int) -> None:
    run, cases, good = make_run(tmp_path / "run", seed, count)
    # --strict first: it stops at a bad checkpoint, naming it, and leaves nothing half-read
    with pytest.raises(BadCheckpointError) as e:
        ingest(run, IngestOptions(strict=True, workers=1))
    assert case_of(run, cases, str(e.value.path)) in cases, f"seed {seed}: {e.value}"
    spath = store.store_path(run)
    if store.read_attrs(spath) is not None:
        store.open_store(spath).done_rows()
    report = ingest(run, IngestOptions(workers=1))
    check_report(run, cases, report)
    check_store(run, good)
    # again, nothing changed: the known bad are listed again (once), nothing recomputed
    again = ingest(run, IngestOptions(workers=1))
    assert not again.computed
    assert sorted(again.bad) == sorted(report.bad)
    with pytest.raises(BadCheckpointError):
        ingest(run, IngestOptions(strict=True, workers=1))
    check_store(run, good)


def make_torch_run(root: Path, seed: int, count: int) -> tuple[Path, dict[str, bool], dict]:
    """As `make_run`, in torch files (torch.save's zip): truncated, bytes flipped or inserted."""
    import torch

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    good = {}
    for step in (0, 1):
        good[f"good-{step}.pt"] = arrays = tensors(rng)
        torch.save({k: torch.from_numpy(a) for k, a in arrays.items()}, root / f"good-{step}.pt")
    whole = (root / "good-0.pt").read_bytes()
    cases: dict[str, bool] = {}
    for i in range(count):
        raw, kind = bytearray(whole), int(rng.integers(3))
        if kind == 0:  # the zip's directory is at the end: any cut loses it
            raw = raw[: int(rng.integers(0, len(raw)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 6))):
                raw[int(rng.integers(0, len(raw)))] = int(rng.integers(0, 256))
        else:
            at = int(rng.integers(0, len(raw)))
            raw = raw[:at] + rng.bytes(int(rng.integers(1, 40))) + raw[at:]
        name = f"m-{1000 + i}-{('truncated', 'flipped', 'inserted')[kind]}.pt"
        (root / name).write_bytes(bytes(raw))
        cases[name] = kind == 0
    return root, cases, good


@pytest.mark.parametrize("seed,count", batches()[:2])  # torch.load is slow: fewer cases
def test_mangled_torch_files_at_ingest(tmp_path: Path, seed: int, count: int) -> None:
    run, cases, good = make_torch_run(tmp_path / "run", seed, count)
    report = ingest(run, IngestOptions(workers=1))
    check_report(run, cases, report)
    check_store(run, good)
    with pytest.raises(BadCheckpointError):
        ingest(run, IngestOptions(strict=True, workers=1))
    check_store(run, good)


def test_mangled_checkpoints_at_the_command_line(tmp_path: Path) -> None:
    """Through the CLI: one `skipped` line per bad checkpoint, and --strict one error line."""
    run, cases, good = make_run(tmp_path / "run", SEED * 1000 + 999, 30)
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("SPECAN_DEBUG", None)
    res = subprocess.run(
        [sys.executable, "-m", "specan.cli", "ingest", str(run), "--strict", "--workers", "1"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    assert lines[-2].startswith("error: " + str(run)), res.stderr
    res = CliRunner().invoke(app, ["ingest", str(run), "--workers", "1"])
    assert res.exit_code == 0, res.output
    skipped = [ln for ln in res.output.splitlines() if ln.startswith("skipped ")]
    must = [n for n, f in cases.items() if f]
    assert len(skipped) >= len(must)
    for name in must:
        assert sum(f"{run / name}" in ln for ln in skipped) == 1, (name, skipped)
    check_store(run, good)


def test_fuzz_cases_are_what_they_claim(tmp_path: Path) -> None:
    """The generator's broken files are broken for safetensors itself (so the fuzz test is not
    testing a stricter reading than the format's), and its good files open there."""
    from safetensors import SafetensorError, safe_open

    run, cases, _ = make_run(tmp_path / "run", SEED * 1000 + 7, 60)
    for name in ["good-0.safetensors", *cases]:
        path = run / name
        # zero_size: a valid file, refused only because its shapes differ from the run's others
        if path.is_dir() or (name in cases and not cases[name]) or "zero_size" in name:
            continue
        try:
            with safe_open(str(path), framework="np") as f:
                finite = all(np.isfinite(f.get_tensor(k)).all() for k in f.keys())
        except SafetensorError:
            finite = None
        assert (finite is True) == (name not in cases), (name, finite)
