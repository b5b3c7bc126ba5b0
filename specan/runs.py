"""Find the checkpoints of a run folder, order them by step, read headers and tensors lazily.

Stdlib only at module level: the CLI calls `discover` on a fast path that must not import torch.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.errors import BadCheckpointError, EmptyRunError, RunNotFoundError
from specan.runfile import read_config
from specan.store import STORE_NAME

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"
# Bytes per element of each safetensors dtype; unknown (future) dtypes skip the size check.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "C64": 8,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors' own limit
# Folder names that are clearly one checkpoint, so a root that is itself a model folder takes its
# step from its name only then (a root like "pythia-70m" or a hub snapshot hash must not).
_CKPT_DIR = re.compile(r"^(checkpoint|global_step|step|epoch|ckpt)[-_=]?\d+$", re.IGNORECASE)
_PYTHIA_DIR = re.compile(r"^step[-_]?\d+$", re.IGNORECASE)


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
    layout: str  # "specan" | "flat" | "hf" | "pythia"
    checkpoints: tuple[Checkpoint, ...]
    bad: tuple[tuple[Path, str], ...] = ()
    config: dict = field(default_factory=dict)


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
    if not isinstance(meta, dict):
        raise BadCheckpointError(path, "malformed header (__metadata__ is not an object)")
    spans = []
    try:  # a lean loop: discover() runs it over every tensor of every checkpoint
        for name, t in header.items():
            begin, end = t["data_offsets"]
            item = _ITEMSIZE.get(t["dtype"])
            if item is not None and end - begin != math.prod(t["shape"]) * item:
                raise BadCheckpointError(
                    path, f"tensor {name!r}: {end - begin} data bytes for shape {t['shape']}"
                )
            spans.append((begin, end, name))
        spans.sort()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadCheckpointError(path, f"malformed header entry ({e!r})") from e
    pos = 0
    for begin, end, name in spans:
        if begin != pos or end < begin:
            raise BadCheckpointError(path, f"tensor {name!r}: data offsets overlap or leave a gap")
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


def read_header(ckpt: Checkpoint) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo over all files of a checkpoint; BadCheckpointError if bad."""
    out: dict[str, TensorInfo] = {}
    for f in ckpt.files:
        out.update(_read_file_header(f)[1])
    return out


def file_signature(ckpt: Checkpoint) -> tuple[int, int]:
    """(total size, newest mtime_ns) of a checkpoint's files now, to notice rewritten files."""
    st = [f.stat() for f in ckpt.files]
    return sum(s.st_size for s in st), max(s.st_mtime_ns for s in st)


def _visible(p: Path) -> bool:
    """False for hidden entries, the store, and temp/partial files that a trainer will rename."""
    n = p.name
    return not (n.startswith(".") or n == STORE_NAME or re.search(r"\.(tmp|partial)\b", n))


def _weights(folder: Path) -> list[Path]:
    """The *.safetensors files directly in a folder."""
    return sorted((p for p in folder.glob("*.safetensors") if _visible(p) and p.is_file()),
                  key=lambda p: natural_key(p.name))  # fmt: skip


def _model_files(folder: Path) -> tuple[Path, list[Path]] | str | None:
    """(primary file, files) of the model stored directly in `folder`, a reason, or None."""
    index = folder / ("model" + INDEX_SUFFIX)
    if not index.is_file():
        others = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if _visible(p))
        index = others[0] if len(others) == 1 else index
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(wm.values()), key=natural_key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable index {index.name} ({e!r})"
        for s in shards:
            if "/" in s or "\\" in s or not (folder / s).is_file():
                return f"index {index.name} names missing shard {s!r}"
        return index, [folder / s for s in shards]
    files = _weights(folder)
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors", [folder / "model.safetensors"]
    if len(files) == 1:
        return files[0], files
    if files:
        return f"{len(files)} safetensors files and no *{INDEX_SUFFIX}"
    if any(_visible(p) for p in folder.glob("pytorch_model*.bin")):
        return "only pytorch_model*.bin weights (not read; convert to safetensors)"
    return None


def _make(
    root: Path,
    primary: Path,
    files: list[Path],
    name_for_step: str | None,
    known: Mapping[str, tuple[int, int, int | None, float | None]] | None,
) -> Checkpoint:
    """Build a Checkpoint, reading headers for step/epoch unless `known` vouches for the files."""
    name = primary.relative_to(root).as_posix()
    st = [f.stat() for f in files]
    size, mtime = sum(s.st_size for s in st), max(s.st_mtime_ns for s in st)
    hit = (known or {}).get(name)
    if hit is not None and hit[0] == size and hit[1] == mtime:
        return Checkpoint(name, tuple(files), hit[2], hit[3], size, mtime)
    meta: dict[str, str] = {}
    for i, f in enumerate(files):  # every shard is read so that truncation is caught here
        m = _read_file_header(f, infos=False)[0]
        if i == 0:
            meta = m
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


_PICKLED = ("*.pt", "*.pth", "*.bin", "*.ckpt")


def _pickles(root: Path) -> str:
    """Why a folder without safetensors has no checkpoints, when it holds pickled torch files."""
    found = [p for pat in _PICKLED for p in (*root.glob(pat), *root.glob("*/" + pat))]
    if not found:
        return ""
    return (
        f"it holds {len(found)} pickled torch file(s) such as {found[0].relative_to(root)}, "
        "which specan does not read: convert each with "
        "safetensors.torch.save_file(torch.load(f, weights_only=True), ...)"
    )


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
    found: list[tuple[Path, list[Path], str | None]] = []  # primary, files, name for the step
    folders: list[Path] = [root]  # where to look for config.json, in order

    run_json, ckpt_dir = root / "run.json", root / "checkpoints"
    if run_json.is_file() or ckpt_dir.is_dir():
        layout = "specan"
        if run_json.is_file():
            config = read_config(root)
        if ckpt_dir.is_dir():
            found = [(p, [p], p.name.removesuffix(".safetensors")) for p in _weights(ckpt_dir)]
    else:
        subs = sorted((p for p in root.iterdir() if _visible(p) and p.is_dir()),
                      key=lambda p: natural_key(p.name))  # fmt: skip
        for sub in subs:
            got = _model_files(sub)
            if isinstance(got, str):
                bad.append((sub, got))
            elif got is not None:
                found.append((got[0], got[1], sub.name))
                folders.append(sub)
        has_root_model = (root / "model.safetensors").is_file() or any(
            _visible(p) for p in root.glob("*" + INDEX_SUFFIX)
        )
        if found or bad:
            pythia = all(_PYTHIA_DIR.match(p.parent.name) for p, _, _ in found)
            layout = "pythia" if found and pythia else "hf"
            if not has_root_model:  # loose files beside the folders are checkpoints too
                found += [(p, [p], p.name.removesuffix(".safetensors")) for p in _weights(root)]
        elif has_root_model:  # the root is itself one (possibly sharded) model folder
            layout = "pythia" if _PYTHIA_DIR.match(root.name) else "hf"
            got = _model_files(root)
            if isinstance(got, str):
                bad.append((root, got))
            elif got is not None:
                found = [(got[0], got[1], root.name if _CKPT_DIR.match(root.name) else None)]
        else:  # a flat folder: every *.safetensors is its own checkpoint
            layout = "flat"
            found = [(p, [p], p.name.removesuffix(".safetensors")) for p in _weights(root)]

    ckpts: list[Checkpoint] = []
    for primary, files, step_name in found:
        try:
            ckpts.append(_make(root, primary, files, step_name, known))
        except BadCheckpointError as e:
            bad.append((e.path, e.reason))
        except OSError as e:  # vanished or unreadable between listing and stat
            bad.append((primary, f"cannot read: {e.strerror or e}"))
    if not ckpts:
        detail = f"{len(bad)} unreadable, first {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise EmptyRunError(root, detail or _pickles(root))
    ckpts.sort(key=lambda c: (c.step is None, c.step or 0, natural_key(c.name)))

    for folder in folders:  # the view planner needs num_attention_heads from the first config.json
        if (folder / "config.json").is_file():
            config = {**config, "hf_config": _load_json(folder / "config.json")}
            break
    return Run(root, layout, tuple(ckpts), tuple(bad), config)


class CheckpointReader:
    """Reads one tensor at a time from a checkpoint's memory-mapped safetensors files."""

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
                for name in _read_file_header(f)[1]:
                    route.setdefault(name, f)
            self._route = route
        return self._route

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, in file order."""
        return list(self._routes())

    def get(self, name: str) -> torch.Tensor:
        """A float32 copy of one tensor (the file stays memory-mapped, not loaded)."""
        import torch
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
                t = h.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise BadCheckpointError(path, f"cannot read tensor {name!r}: {e}") from e
        # copy=True: get_tensor returns a view of the memory map, which a rewrite would change.
        return t.to(torch.float32, copy=True)
