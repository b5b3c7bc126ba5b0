"""Find the checkpoints of a run folder, order them by step, read headers and tensors lazily.

Weights are safetensors files, or pickled torch files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) that
are only ever read with ``torch.load(weights_only=True, mmap=True)``: a file that needs a full
unpickle is refused, naming it. Safetensors are preferred where a folder holds both.

Stdlib only at module level: the CLI calls `discover` on a fast path that must not import torch
(torch files are not opened at discovery: their step comes from their name).
Headers are parsed here rather than with `safetensors.safe_open`, because the library's errors
("incomplete metadata, file not fully covered") do not say what is wrong; the checks mirror its own
(contiguous offsets, buffer fully covered), so a file that passes here also opens there.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.errors import BadCheckpointError, EmptyRunError, RunNotFoundError
from specan.runfile import read_config
from specan.store import STORE_NAME

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"
BIN_INDEX_SUFFIX = ".bin.index.json"  # pytorch_model.bin.index.json: shards of pickled torch files
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# What a trainer saves beside the model in a checkpoint folder: never weights to analyse.
_TRAINER_EXTRAS = re.compile(r"^(optimizer|scheduler|rng_state.*|training_args|scaler)\.", re.I)
# Bytes per element of each safetensors dtype. The packed sub-byte ones skip the size check; a
# dtype named in neither is refused, as safetensors' own parser refuses it.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_PACKED = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
_MAX_HEADER = 100_000_000  # safetensors' own limit
# Folder names that are clearly one checkpoint, so a root that is itself a model folder takes its
# step from its name only then (a root like "pythia-70m" or a hub snapshot hash must not).
_CKPT_DIR = re.compile(r"^(checkpoint|global_step|step|epoch|ckpt)[-_=]?\d+$", re.IGNORECASE)
_PYTHIA_DIR = re.compile(r"^step[-_]?\d+$", re.IGNORECASE)
# A truncated file modified this recently is taken as one still being written in place (a trainer
# that does not write under a temporary name), not as a bad one: the next ingest looks again.
WRITING_SECONDS = 5.0
_TEMPORARY = re.compile(r"\.(tmp|partial)\b")
# _read_file_header's reasons for a file that ends before its header says it does: its data, or
# a header of plausible length (garbage read as a length is far beyond any header), or all of it
# (up to 7 bytes: not even the header's length yet)
_CUT_SHORT = re.compile(r"^truncated|header length \d{1,8} > file size|\([0-7] bytes\)$")
# _model_files' reasons for a sharded model folder whose shards or index have not all landed
_UNFINISHED = re.compile(r"names missing shard|and no shard index")
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.")  # model-00001-of-00004.safetensors


class _StillWriting(Exception):
    """A checkpoint whose files are not complete yet: left out, and looked at again later."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype code ("F32", "BF16", ...) of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: one safetensors file, or the shards of one sharded model."""

    name: str  # path of its primary file (or index) relative to the run root, posix
    files: tuple[Path, ...]
    step: int | None
    epoch: float | None
    size: int  # total bytes over files
    mtime_ns: int  # newest mtime over files


@dataclass(frozen=True)
class Run:
    """A run folder: its layout, its checkpoints ordered by step, and files it could not read."""

    root: Path
    layout: str  # "specan" | "flat" | "hf" | "pythia" | "hf-cache"
    checkpoints: tuple[Checkpoint, ...]
    bad: tuple[tuple[Path, str], ...] = ()
    config: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what discovery decided that a user should hear about
    writing: tuple[tuple[Path, str], ...] = ()  # still being written: left for the next ingest


def is_torch_file(path: Path) -> bool:
    """A pickled torch file (read only with weights_only + mmap), by its suffix."""
    return path.suffix.lower() in TORCH_SUFFIXES


def natural_key(s: str) -> tuple:
    """Sort key that compares digit runs as numbers (step-9 before step-10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p)


def step_from_name(name: str) -> int | None:
    """The last integer in a folder name or file stem, or None."""
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def _read_file_header(
    path: Path, infos: bool = True
) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Validate one safetensors header: (metadata, tensors if `infos`). Reads header bytes only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise BadCheckpointError(path, f"not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > _MAX_HEADER:
                what = f"file size {size}" if n > size - 8 else "the 100 MB limit"
                raise BadCheckpointError(
                    path, f"not a safetensors file (header length {n} > {what})"
                )
            raw = f.read(n)
    except OSError as e:
        raise BadCheckpointError(path, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadCheckpointError(path, f"not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise BadCheckpointError(path, "not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    # safetensors itself reads the metadata as strings only: refuse here what it would refuse
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadCheckpointError(path, "malformed header (__metadata__ is not strings by name)")
    spans = []
    # a lean loop: discover() runs it over every tensor of every checkpoint
    for name, t in header.items():
        try:
            dtype, shape, (begin, end) = t["dtype"], t["shape"], t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BadCheckpointError(
                path,
                f"tensor {name!r:.80}: malformed entry (needs dtype, shape and two data_offsets)",
            ) from None
        # exact types: JSON's 6.0 or true would pass a numeric check, and safetensors refuses them
        if (
            type(dtype) is not str
            or type(shape) is not list
            or any(type(d) is not int or d < 0 for d in shape)
        ):
            raise BadCheckpointError(
                path,
                f"tensor {name!r:.80}: dtype {dtype!r:.40}, shape {shape!r:.80} (want a dtype "
                "code and non-negative integers)",
            )
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            raise BadCheckpointError(
                path,
                f"tensor {name!r:.80}: data_offsets {[begin, end]!r:.80} are not two ascending "
                "offsets",
            )
        item = _ITEMSIZE.get(dtype)
        if item is None and dtype not in _PACKED:
            raise BadCheckpointError(path, f"tensor {name!r:.80}: unknown dtype {dtype!r:.40}")
        if item is not None and end - begin != math.prod(shape) * item:
            raise BadCheckpointError(
                path, f"tensor {name!r:.80}: {end - begin} data bytes for shape {shape}"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos or end < begin:
            raise BadCheckpointError(
                path, f"tensor {name!r:.80}: data offsets overlap or leave a gap"
            )
        pos = end
    have = size - 8 - n
    if pos > have:
        raise BadCheckpointError(
            path, f"truncated: header says {pos} bytes of tensor data, file has {have}"
        )
    if pos < have:
        raise BadCheckpointError(path, f"{have - pos} unexpected bytes after the tensor data")
    if not infos:
        return meta, {}
    tensors = {k: TensorInfo(tuple(t["shape"]), t["dtype"]) for k, t in header.items()}
    return meta, tensors


def torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled torch file, memory-mapped (no tensor data is read here).

    Loaded only with ``torch.load(weights_only=True, mmap=True)``: torch's restricted unpickler
    builds tensors and plain containers and refuses everything else, so no code in the file runs.
    A state dict nested one level down (``{"state_dict": ...}``, ``{"model": ...}``, as trainers
    save them) is taken from there. Raises BadCheckpointError, one line naming the file.
    """
    import pickle

    import torch

    try:
        obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL x" for a class it does not know, and
        # "unsupported GLOBAL x whose module x is blocked" for os.system, exec and the like; its
        # first line advises weights_only=False, which is what specan must never do
        found = re.search(r"unsupported global:?(?: GLOBAL)? (\S+)", str(e), re.IGNORECASE)
        if not found:  # an opcode it does not know: corrupt bytes, or a pickle beyond torch's
            raise BadCheckpointError(
                path, "unreadable torch file (its pickle is corrupt or holds more than tensors)"
            ) from None
        raise BadCheckpointError(
            path,
            f"needs a full unpickle (it holds {found.group(1)}), which specan never does: re-save"
            " its tensors with torch.save(model.state_dict(), ...) or safetensors",
        ) from None
    except RuntimeError as e:
        if "mmap can only be used" in str(e):
            reason = (
                "not a zip-format torch file (a torch.save from before torch 1.6, or not torch at"
                " all): specan memory-maps torch files; re-save it with torch.save"
            )
        else:
            reason = f"unreadable torch file ({_line(e)})"
        raise BadCheckpointError(path, reason) from None
    except (OSError, EOFError, ValueError) as e:
        raise BadCheckpointError(path, f"cannot read: {_line(e)}") from None
    except Exception as e:  # torch's unpickler lets corrupt bytes raise anything
        # (KeyError and IndexError from its memo and stack, seen on flipped bytes)
        raise BadCheckpointError(
            path, f"corrupt torch file ({type(e).__name__}: {_line(e)})"
        ) from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise BadCheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise BadCheckpointError(path, "holds no tensors")
    return out


def _line(e: BaseException) -> str:
    """An exception's first line, cut short: a bad file's reason is one line."""
    return (str(e).splitlines() or [""])[0][:160]


_TORCH_CODES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
}  # fmt: skip


def _torch_header(path: Path) -> dict[str, TensorInfo]:
    return {
        name: TensorInfo(tuple(t.shape), _TORCH_CODES.get(str(t.dtype).removeprefix("torch."), "?"))
        for name, t in torch_tensors(path).items()
    }


def read_header(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo over all files of a checkpoint; BadCheckpointError if bad."""
    out: dict[str, TensorInfo] = {}
    for f in ckpt.files:
        out.update(_torch_header(f) if is_torch_file(f) else _read_file_header(f)[1])
    return out


def content_id(ckpt: Checkpoint) -> str:
    """What a checkpoint holds, as a string equal for identical checkpoints.

    In the Hugging Face cache every file is a symlink into ``blobs/``, named by the hash of its
    content: the blob names are the identity and nothing is read. Otherwise a SHA-256 over the
    tensors (names, dtypes, shapes and bytes; safetensors metadata such as a step left out), read
    once; the store keeps it beside the file signature so it is not computed again. Ingest
    computes it only where `content_probe` finds two checkpoints alike.
    """
    return _fingerprint(ckpt, blocks=None)


def content_probe(ckpt: Checkpoint) -> str:
    """A cheap fingerprint: equal whenever `content_id` is, and different for checkpoints that
    differ anywhere in their layout or in any of the sampled bytes (which two checkpoints of a
    training run always do).

    The same SHA-256 as `content_id` over the tensors' names, dtypes and shapes, then the data's
    length and `PROBE_BLOCKS` blocks of 4 KiB at evenly spaced offsets of each safetensors file's
    data instead of all of it (64 KiB of a 324 MB Pythia-160m checkpoint); torch pickles, which
    have no such data region, are hashed whole, and Hugging Face blobs are named as in
    `content_id`. Hashing every checkpoint whole took 0.3 s per Pythia-160m checkpoint before the
    first one could start, and read each file twice on a cold cache.
    """
    return _fingerprint(ckpt, blocks=PROBE_BLOCKS)


PROBE_BLOCKS = 16
_BLOCK = 4096


def _fingerprint(ckpt: Checkpoint, blocks: int | None) -> str:
    """`content_id` (``blocks`` None: every byte) or `content_probe`."""
    import hashlib

    blobs = file_blobs(ckpt)
    if all(blobs):
        return "blob:" + "+".join(b for b in blobs if b)
    h = hashlib.sha256()
    for f in ckpt.files:
        if is_torch_file(f):
            for name, t in sorted(torch_tensors(f).items()):
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(t.contiguous().reshape(-1).view(_u8()).numpy())
            continue
        _, tensors = _read_file_header(f)  # validated: the data below is exactly the tensors'
        for name, t in sorted(tensors.items()):
            h.update(f"{name}|{t.dtype}|{t.shape}\n".encode())
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                start = 8 + n
                length = os.fstat(fh.fileno()).st_size - start
                if blocks is None or length <= blocks * _BLOCK:
                    fh.seek(start)
                    while chunk := fh.read(8 * 2**20):
                        h.update(chunk)
                    continue
                h.update(f"{length}\n".encode())
                for i in range(blocks):
                    fh.seek(start + i * (length - _BLOCK) // (blocks - 1))
                    h.update(fh.read(_BLOCK))
        except OSError as e:
            raise BadCheckpointError(f, f"cannot read: {e.strerror or e}") from None
    return ("probe:" if blocks is not None else "sha256:") + h.hexdigest()


def _u8() -> Any:
    import torch

    return torch.uint8


def file_blobs(ckpt: Checkpoint) -> list[str | None]:
    """The blob (content hash) behind each of a checkpoint's files in a Hugging Face cache, None
    for a file elsewhere. Nothing is read."""
    return [_blob(f) for f in ckpt.files]


def _blob(path: Path) -> str | None:
    """The blob a Hugging Face cache symlink points to (its content hash), else None."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    return target.name if target.parent.name == "blobs" else None


def file_signature(ckpt: Checkpoint) -> tuple[int, int]:
    """(total size, newest mtime_ns) of a checkpoint's files now, to notice rewritten files."""
    st = [f.stat() for f in ckpt.files]
    return sum(s.st_size for s in st), max(s.st_mtime_ns for s in st)


def _visible(p: Path) -> bool:
    """False for hidden entries, the store, and temp/partial files that a trainer will rename."""
    n = p.name
    return not (n.startswith(".") or n == STORE_NAME or _TEMPORARY.search(n))


def _temporaries(folder: Path) -> list[tuple[Path, str]]:
    """Weight files under a temporary or hidden name in `folder`: a writer will rename them."""
    return [
        (p, "still being written (temporary name)")
        for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
        if not _visible(p) and p.name != STORE_NAME and p.is_file()
        and (".safetensors" in p.name or any(x in p.name for x in TORCH_SUFFIXES))
    ]  # fmt: skip


def _weights(folder: Path) -> list[Path]:
    """The *.safetensors files directly in a folder; without any, its pickled torch files."""
    found = [p for p in folder.glob("*.safetensors") if _visible(p) and p.is_file()]
    if not found:
        found = [p for p in folder.iterdir() if is_torch_file(p) and _visible(p) and p.is_file()
                 and not _TRAINER_EXTRAS.match(p.name)]  # fmt: skip
    return sorted(found, key=lambda p: natural_key(p.name))


def _index(folder: Path) -> Path | None:
    """The shard index of a sharded model in `folder`: safetensors' first, then torch's."""
    for suffix in (INDEX_SUFFIX, BIN_INDEX_SUFFIX):
        stem = "model" if suffix == INDEX_SUFFIX else "pytorch_model"
        index = folder / (stem + suffix)
        if index.is_file():
            return index
        others = sorted(p for p in folder.glob("*" + suffix) if _visible(p))
        if len(others) == 1:
            return others[0]
    return None


def _model_files(folder: Path) -> tuple[Path, list[Path]] | str | None:
    """(primary file, files) of the model stored directly in `folder`, a reason, or None."""
    index = _index(folder)
    if index is not None:
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except OSError as e:
            return f"cannot read index {index.name}: {e.strerror or e}"
        except UnicodeDecodeError:
            return f"unreadable index {index.name} (not UTF-8 text)"
        except (ValueError, KeyError, TypeError) as e:
            what = "no weight_map" if isinstance(e, (KeyError, TypeError)) else f"not JSON: {e}"
            return f"unreadable index {index.name} ({what})"
        if not isinstance(wm, dict):
            return f"unreadable index {index.name} (its weight_map is not an object)"
        try:
            shards = sorted(set(wm.values()), key=lambda s: natural_key(str(s)))
        except TypeError:  # a list or object where a file name should be
            return f"index {index.name} names a shard that is not a file name"
        if not shards:
            return f"index {index.name} names no shards"
        for s in shards:
            if not isinstance(s, str) or not s or "/" in s or "\\" in s or "\0" in s:
                return f"index {index.name} names a shard that is not a file name: {s!r}"
            if not (folder / s).is_file():
                return f"index {index.name} names missing shard {s!r}"
        return index, [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return folder / single, [folder / single]
    files = _weights(folder)
    if len(files) == 1:
        part = _SHARD.search(files[0].name)
        if part and int(part[2]) > 1:  # one shard of several: the others and the index to come
            return f"{files[0].name}: one shard of {int(part[2])} and no shard index"
        return files[0], files
    if files:
        kind = "safetensors" if files[0].suffix == ".safetensors" else "torch"
        return (
            f"{len(files)} {kind} files and no shard index (*{INDEX_SUFFIX}, *{BIN_INDEX_SUFFIX})"
        )
    return None


def _unfinished(folder: Path, reason: str | None) -> list[tuple[Path, str]]:
    """Why a checkpoint folder without a complete model (`_model_files` gave `reason`, or None
    for no model) is one still being written, file by file; [] when it is not.

    Files under a temporary name will be renamed into place. Shards are written before their
    index (as transformers' ``save_pretrained`` does) and one at a time, so a folder of shards
    without an index, or with an index naming a shard not there yet, is still being written
    while it changed in the last ``WRITING_SECONDS``; later it is bad.
    """
    temporaries = _temporaries(folder)
    if temporaries or reason is None or not _UNFINISHED.search(reason):
        return temporaries
    newest = max((p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()), default=0)
    if time.time_ns() - newest < WRITING_SECONDS * 1e9:
        return [(folder, f"still being written ({reason})")]
    return []


def _make(
    root: Path,
    primary: Path,
    files: list[Path],
    name_for_step: str | None,
    known: Mapping[str, tuple[int, int, int | None, float | None]] | None,
    name: str | None = None,
) -> Checkpoint:
    """Build a Checkpoint, reading headers for step/epoch unless `known` vouches for the files.

    Torch files are not opened here (that needs torch): their step comes from the name."""
    name = name or primary.relative_to(root).as_posix()
    st = [f.stat() for f in files]
    size, mtime = sum(s.st_size for s in st), max(s.st_mtime_ns for s in st)
    hit = (known or {}).get(name)
    if hit is not None and hit[0] == size and hit[1] == mtime:
        return Checkpoint(name, tuple(files), hit[2], hit[3], size, mtime)
    meta: dict[str, str] = {}
    for i, f in enumerate(files):  # every shard is read so that truncation is caught here
        if is_torch_file(f):
            continue
        try:
            m = _read_file_header(f, infos=False)[0]
        except BadCheckpointError as e:
            recent = time.time_ns() - mtime < WRITING_SECONDS * 1e9
            if recent and _CUT_SHORT.search(e.reason):
                raise _StillWriting(f, f"still being written ({e.reason})") from None
            raise
        if i == 0:
            meta = m
    if [(s.st_size, s.st_mtime_ns) for s in st] != [
        (s.st_size, s.st_mtime_ns) for s in (f.stat() for f in files)
    ]:  # written to while its header was read
        raise _StillWriting(primary, "still being written (size or mtime changed while reading)")
    step = _parse(meta.get("step"), int)
    if step is None and name_for_step is not None:
        step = step_from_name(name_for_step)
    return Checkpoint(name, tuple(files), step, _parse(meta.get("epoch"), float), size, mtime)


def _parse(v: str | None, kind: type) -> Any:
    """int/float from a metadata string, or None; "1000.0" is accepted as step 1000."""
    if v is None:
        return None
    try:
        return kind(v)
    except ValueError:
        try:
            x = float(v)
            return kind(x) if kind is float or x.is_integer() else None
        except ValueError:
            return None


def _load_json(path: Path) -> dict:
    """A JSON object from a file; BadCheckpointError naming it if corrupt."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadCheckpointError(path, f"corrupt JSON ({e})") from e
    if not isinstance(obj, dict):
        raise BadCheckpointError(path, "not a JSON object")
    return obj


def discover(
    root: Path | str,
    known: Mapping[str, tuple[int, int, int | None, float | None]] | None = None,
) -> Run:
    """Find and order the checkpoints under `root` (see module docs for the layouts).

    `known` maps checkpoint name -> (size, mtime_ns, step, epoch) from an earlier discovery; files
    whose size and mtime still match are not opened. Unreadable checkpoints go to `Run.bad`.
    Precedence: run.json/checkpoints/ (specan), then checkpoint subfolders (hf/pythia; a model
    directly in the root beside them, e.g. a trainer's final save, is then ignored), then one model
    in the root (hf), then a flat folder of *.safetensors (flat).
    """
    root = Path(root)
    if not root.exists():
        raise RunNotFoundError(root)
    if not root.is_dir():
        raise RunNotFoundError(root, "not a folder")
    config: dict = {}
    bad: list[tuple[Path, str]] = []
    writing: list[tuple[Path, str]] = []
    found: list[tuple[Path, list[Path], str | None]] = []  # primary, files, name for the step
    folders: list[Path] = [root]  # where to look for config.json, in order

    run_json, ckpt_dir = root / "run.json", root / "checkpoints"
    if run_json.is_file() or ckpt_dir.is_dir():
        layout = "specan"
        if run_json.is_file():
            config = read_config(root)
        if ckpt_dir.is_dir():
            found = [(p, [p], p.stem) for p in _weights(ckpt_dir)]
            writing = _temporaries(ckpt_dir)
    elif (root / "snapshots").is_dir():  # a Hugging Face cache folder, models--org--name
        return _discover_hf_cache(root, known)
    else:
        subs = sorted((p for p in root.iterdir() if _visible(p) and p.is_dir()),
                      key=lambda p: natural_key(p.name))  # fmt: skip
        for sub in subs:
            got = _model_files(sub)
            waits = [] if isinstance(got, tuple) else _unfinished(sub, got)
            if waits:
                writing += waits
            elif isinstance(got, str):
                bad.append((sub, got))
            elif got is not None:
                found.append((got[0], got[1], sub.name))
                folders.append(sub)
        has_root_model = any(
            (root / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")
        )
        has_root_model = has_root_model or _index(root) is not None
        if found or bad or writing:  # a run whose first checkpoint folder is being written
            pythia = all(_PYTHIA_DIR.match(p.parent.name) for p, _, _ in found)
            layout = "pythia" if found and pythia else "hf"
            if not has_root_model:  # loose files beside the folders are checkpoints too
                found += [(p, [p], p.stem) for p in _weights(root)]
        elif has_root_model:  # the root is itself one (possibly sharded) model folder
            layout = "pythia" if _PYTHIA_DIR.match(root.name) else "hf"
            got = _model_files(root)
            if isinstance(got, str):
                bad.append((root, got))
            elif got is not None:
                found = [(got[0], got[1], root.name if _CKPT_DIR.match(root.name) else None)]
        else:  # a flat folder: every *.safetensors is its own checkpoint
            layout = "flat"
            found = [(p, [p], p.stem) for p in _weights(root)]
            writing = _temporaries(root)

    found4 = [(*f, None) for f in found]
    return _finish(root, layout, found4, bad, folders, config, known, writing=writing)


def _finish(
    root: Path,
    layout: str,
    found: list[tuple[Path, list[Path], str | None, str | None]],
    bad: list[tuple[Path, str]],
    folders: list[Path],
    config: dict,
    known: Mapping[str, tuple[int, int, int | None, float | None]] | None,
    notes: tuple[str, ...] = (),
    writing: list[tuple[Path, str]] | None = None,
) -> Run:
    """Build the checkpoints (primary, files, name for the step, name), order them, find config."""
    ckpts: list[Checkpoint] = []
    writing = list(writing or [])
    for primary, files, step_name, name in found:
        try:
            ckpts.append(_make(root, primary, files, step_name, known, name))
        except _StillWriting as e:
            writing.append((e.path, e.reason))
        except BadCheckpointError as e:
            bad.append((e.path, e.reason))
        except OSError as e:  # vanished or unreadable between listing and stat
            bad.append((primary, f"cannot read: {e.strerror or e}"))
    if not ckpts:
        detail = f"{len(bad)} unreadable, first {bad[0][0]}: {bad[0][1]}" if bad else ""
        if writing:
            detail = f"{len(writing)} still being written{', ' if detail else ''}{detail}"
        raise EmptyRunError(root, detail)
    ckpts.sort(key=lambda c: (c.step is None, c.step or 0, natural_key(c.name)))

    for folder in folders:  # the view planner needs num_attention_heads from the first config.json
        if (folder / "config.json").is_file():
            config = {**config, "hf_config": _load_json(folder / "config.json")}
            break
    return Run(root, layout, tuple(ckpts), tuple(bad), config, notes, tuple(writing))


def _discover_hf_cache(
    root: Path, known: Mapping[str, tuple[int, int, int | None, float | None]] | None
) -> Run:
    """A Hugging Face cache folder: ``snapshots/<commit>/`` named by the files in ``refs/``.

    Each revision is a checkpoint named after its ref (``step1000``), its step taken from that
    name. Refs without a step (``main``) naming a commit that a step ref names too are aliases and
    left out. A snapshot that no ref names (downloaded by commit hash, or left behind when a branch
    moved) is taken under its commit hash, without a step, and said so in ``Run.notes``.
    """
    by_commit: dict[str, list[str]] = {}
    refs = root / "refs"
    for ref in sorted(refs.rglob("*")) if refs.is_dir() else []:
        if ref.is_file() and _visible(ref):
            try:
                commit = ref.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            by_commit.setdefault(commit, []).append(ref.relative_to(refs).as_posix())
    found: list[tuple[Path, list[Path], str | None, str | None]] = []
    bad: list[tuple[Path, str]] = []
    folders: list[Path] = []
    unnamed: list[str] = []
    snaps = sorted(p for p in (root / "snapshots").iterdir() if _visible(p) and p.is_dir())
    for snap in snaps:
        got = _model_files(snap)
        if isinstance(got, str):
            bad.append((snap, got))
            continue
        if got is None:
            continue
        folders.append(snap)
        names = sorted(by_commit.get(snap.name, []), key=natural_key)
        stepped = [n for n in names if _CKPT_DIR.match(n)]
        if not names:
            unnamed.append(snap.name)
        for name in stepped or names[:1] or [snap.name]:
            found.append((got[0], got[1], name if stepped else None, name))
    notes = ()
    if unnamed:
        notes = (f"{len(unnamed)} snapshot(s) named by no ref in {refs} ({', '.join(unnamed[:3])}"
                 f"{', ...' if len(unnamed) > 3 else ''}): taken under their commit hash, without"
                 " a step",)  # fmt: skip
    return _finish(root, "hf-cache", found, bad, folders, {}, known, notes)


class CheckpointReader:
    """Reads one tensor at a time from a checkpoint's memory-mapped files (safetensors, or torch
    files loaded with ``weights_only=True, mmap=True``)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._route: dict[str, Path] | None = None
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()  # the threaded Dask scheduler may share one reader

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the open file handles (and their memory maps)."""
        with self._lock:
            self._handles.clear()

    def _routes(self) -> dict[str, Path]:
        """Tensor name -> the shard that holds it, from the shards' headers."""
        if self._route is None:
            route: dict[str, Path] = {}
            for f in self.ckpt.files:
                if is_torch_file(f):  # its memory-mapped tensors are its handle
                    names = self._handles.setdefault(f, torch_tensors(f))
                else:
                    names = _read_file_header(f)[1]
                for name in names:
                    route.setdefault(name, f)
            self._route = route
        return self._route

    def files(self) -> dict[str, Path]:
        """Tensor name -> the file (shard) that holds it."""
        with self._lock:
            return dict(self._routes())

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, in file order."""
        with self._lock:
            return list(self._routes())

    def get(self, name: str) -> torch.Tensor:
        """A float32 copy of one tensor (the file stays memory-mapped, not loaded)."""
        import torch

        with self.mapped(name) as t:
            # copy=True: the tensor is a view of the memory map, which a rewrite would change.
            return t.to(torch.float32, copy=True)

    @contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor as stored (its dtype), a view of the file's memory map where the format
        allows: valid inside the block only, where the caller copies what it needs. Inside the
        lock: `close` may drop the map of a torch file while another thread reads."""
        from safetensors import SafetensorError, safe_open

        with self._lock:
            route = self._routes()
            if name not in route:
                raise BadCheckpointError(self.ckpt.files[0], f"missing tensor {name!r}")
            path = route[name]
            try:
                h = self._handles.get(path)
                if h is None:
                    h = self._handles[path] = safe_open(str(path), framework="pt")
                t = h[name] if is_torch_file(path) else h.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise BadCheckpointError(path, f"cannot read tensor {name!r}: {e}") from e
            yield t
