"""The spectra store: one Zarr v3 group per run (DESIGN Contract 2).

Layout (``schema_version`` 1)::

    <run>/specan.zarr/
      zarr.json attrs
        schema_version, specan_version
        kernel       {backend, top_k, vectors, vector_dtype}   how the spectra were computed
        settings     {family, layers, heads, rules}            how the views were chosen
        views        {key: {param, rule, shape, heads, k, sigma_top, routes, info}}  one
                     per matrix view; sigma_top: only the top k σ kept (effective rank is
                     then a bound); routes: the kernel routes that computed it; info: the
                     fields of its `ViewFacts` that its rule set, plus param_shape
        checkpoints  [{name, size, mtime_ns, step, epoch, row, done, [bad], [probe],
                      [content], [duplicate_of]}]  bad: why its spectra could not be computed
                     (skipped until the file changes); probe: a cheap fingerprint of what the
                     files hold (runs.content_probe); content: all of it (runs.content_id),
                     kept where a probe matched another's;
                     duplicate_of: the checkpoint of the same content that was decomposed,
                     whose row this entry shares (docs/ARCHITECTURE.md, "Duplicates")
        bad_files    [{path, reason}]                           skipped at the last ingest
        run          the checkpoints' folder (absolute), so a store kept elsewhere
                     (``ingest --store``) still finds run.json and metrics.jsonl
      step                  int64   [T]                  dims (checkpoint,)
      views/<key>/          attrs param, rule, row_order ("step" or "ingestion", below)
      views/<key>/step      int64   [T]                  the same, beside each view's arrays,
                                                         which name it their "coordinates"
      views/<key>/sigma     float32 [T, (H,) R]           dims (checkpoint, (head,) rank)
      views/<key>/U         float32 [T, (H,) m, k]        dims (checkpoint, (head,) row, component)
      views/<key>/V         float32 [T, (H,) n, k]        dims (checkpoint, (head,) col, component)
      views/<key>/tail      float32 [T, (H,)]             sum of sigma^2 beyond the top k
      derived/<analysis>/   cached results of rank, align, sva; attrs "key" fingerprints the
                            inputs (done checkpoints, views, pairs), a mismatch means recompute

Rows are in ingestion order and are never moved: appending a checkpoint resizes the arrays and
writes only the new row's chunks. ``step`` says which step a row holds; readers sort by it.
Each view group's ``row_order`` attribute says "step" while its rows happen to be in step order
(every checkpoint so far came in order) and "ingestion" from the first one that came late (a
``--watch`` catching an earlier step after a later one, a re-ingest adding one): then
``xarray.open_zarr(store, group="views/<key>").sortby("step")`` gives step order. Keeping rows
sorted instead would move every later row's chunks, the singular vectors included, on each late
checkpoint; appending stays one row's writes. Stores made before this carry no ``row_order``.
A duplicate checkpoint has no row of its own: its entry points at its original's row, so the
``step`` array holds the original's step there, and readers go by the entries.
A row counts only once its checkpoint entry has ``done: true``, which is written after all its
arrays; zarr's LocalStore writes every chunk and every ``zarr.json`` to a temporary name and renames
it, so a crash leaves the store as it was before the interrupted write. One process writes a store
at a time (a lock file beside it); inside that process only the caller's thread writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan import __version__
from specan.errors import RunNotFoundError, StoreError, StoreExistsError, StoreLockedError
from specan.order import views_in_model_order
from specan.views import StoredView, ViewFacts

if TYPE_CHECKING:
    import numpy as np
    import zarr

__all__ = [
    "SCHEMA_VERSION",
    "STORE_NAME",
    "Store",
    "ViewResult",
    "create",
    "fingerprint",
    "read_derived",
    "write_derived",
    "lock",
    "open_store",
    "store_path",
    "read_attrs",
    "run_folder",
    "summary",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STORE_NAME = "specan.zarr"
STEP_COORD = {"coordinates": "step"}  # per-view arrays: their rows' steps, for xarray
SIGMA_CHUNK_ROWS = 64  # many checkpoints per sigma chunk: `rank` reads all of them at once


@dataclass
class ViewResult:
    """One view's spectrum at one checkpoint, as numpy arrays ready to write."""

    sigma: np.ndarray  # [(H,) R]
    U: np.ndarray | None  # [(H,) m, k]
    V: np.ndarray | None  # [(H,) n, k]
    tail: np.ndarray | float  # [(H,)]
    route: str = ""  # the kernel route(s) that produced it, e.g. "gram32" or "gram32+gram64"


def store_path(run_root: Path | str) -> Path:
    """Where the store of a run lives: ``<run>/specan.zarr``, or ``run_root`` itself when it is a
    store (one kept away from its checkpoints with ``ingest --store``).

    Raises RunNotFoundError when ``run_root`` is missing or is a file, so that every command
    says so instead of failing on a path inside it.
    """
    root = Path(run_root)
    if not root.exists():
        raise RunNotFoundError(root)
    if not root.is_dir():
        raise RunNotFoundError(root, "not a folder (give the run folder, the one holding "
                               f"{STORE_NAME} or the checkpoints, or the store)")  # fmt: skip
    if is_store(root):
        return root
    return root / STORE_NAME


def is_store(path: Path | str) -> bool:
    """True when ``path`` is a specan store (its zarr.json carries a schema_version), of any
    schema: a store this specan cannot read is still one, refused by `read_attrs` with why."""
    try:
        return _attrs(path) is not None
    except StoreError:
        return False


def run_folder(path: Path | str) -> Path:
    """The run folder behind a path given to a command: the path itself, or, for a store, the
    folder its checkpoints were read from (where run.json and metrics.jsonl live)."""
    path = Path(path)
    if not is_store(path):
        return path
    run = (read_attrs(path) or {}).get("run")
    if run and Path(run).is_dir():
        return Path(run)
    return path.parent if path.name == STORE_NAME else path  # an older store, or a moved run


def read_attrs(path: Path | str) -> dict[str, Any] | None:
    """The store's attributes read straight from its ``zarr.json``, or None if there is none.

    Cheap on purpose (no zarr import): a re-ingest of an unchanged run decides from this alone
    that there is nothing to do. Every reader and writer comes through here, so a store of
    another schema version is refused here, never misread: a newer one asks for a newer specan,
    an older one names the command that rebuilds it.
    """
    attrs = _attrs(path)
    if attrs is None:
        return None
    version = attrs["schema_version"]
    if type(version) is not int:
        raise StoreError(f"{path}: unreadable schema_version {version!r:.40} in its zarr.json")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by specan {attrs.get('specan_version', '?')} with store schema "
            f"{version}; this specan {__version__} reads schema {SCHEMA_VERSION}: upgrade specan"
        )
    if version < SCHEMA_VERSION:
        run = Path(attrs.get("run") or Path(path).parent)
        where = "" if Path(path) == run / STORE_NAME else f" --store {path}"
        raise StoreError(
            f"{path}: store schema {version} is older than this specan's {SCHEMA_VERSION} and "
            f"cannot be upgraded in place; rebuild it: specan ingest {run}{where} --overwrite"
        )
    return attrs


def _attrs(path: Path | str) -> dict[str, Any] | None:
    """`read_attrs` without the version check."""
    meta = Path(path) / "zarr.json"
    try:
        text = meta.read_text()
    except FileNotFoundError:
        return None
    try:
        attrs = json.loads(text).get("attributes", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise StoreError(f"{meta}: not a readable zarr.json ({e})") from e
    if attrs.get("schema_version") is None:
        raise StoreError(f"{path}: a Zarr group, but not a specan store (no schema_version)")
    return attrs


@contextmanager
def lock(path: Path | str) -> Iterator[None]:
    """Hold the store's writer lock (``<store>.lock``) for the duration of the block.

    A lock left by a process that no longer runs on this host (``kill -9``) is taken over, so an
    interrupted ingest is simply run again.
    """
    lock_file = Path(str(path) + ".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock_file)
            if holder is not None and _alive(holder):
                raise StoreLockedError(
                    f"{path}: being written by process {holder['pid']} on {holder['host']} "
                    f"(remove {lock_file} if that process is gone)"
                ) from None
            log.warning("%s: taking over a stale lock from %s", path, holder)
            lock_file.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - two processes racing for a stale lock
        raise StoreLockedError(f"{path}: could not take the lock {lock_file}")
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)


def _read_lock(lock_file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _alive(holder: Mapping[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another host's processes: assume it is live
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True


def _clear_leftovers(target: Path) -> None:
    """Remove what a killed writer left beside ``target`` (``<name>.partial-<pid>``, the group it
    was building; ``<name>.old-<pid>``, the one it was replacing). Called under the store's lock:
    no other writer can be building one now, whichever host it ran on."""
    import shutil

    for pattern in (f"{target.name}.partial-*", f"{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _zstd() -> list[Any]:
    from zarr.codecs import ZstdCodec

    # level 1: the same ratio as 3 on singular vectors (0.925, near-random floats) at 2x the speed
    return [ZstdCodec(level=1)]


@functools.cache
def _array_meta(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    fill: int | str,
    dims: tuple[str, ...],
    labelled: bool = True,
) -> Any:
    """The zarr metadata of an empty zstd-compressed array, for `zarr.create_hierarchy`: made
    once per distinct array (a store's views share a few shapes) by zarr itself, in memory.
    ``fill`` "nan" is NaN (a float NaN, unequal to itself, would defeat the cache)."""
    import zarr

    return zarr.create_array(
        zarr.storage.MemoryStore(), shape=shape, chunks=chunks, dtype=dtype,
        fill_value=float(fill) if fill == "nan" else fill,
        dimension_names=list(dims), compressors=_zstd(),
        attributes=STEP_COORD if labelled else {},
    ).metadata  # fmt: skip


def _hand_over(ckpts: Sequence[dict[str, Any]], name: str) -> bool:
    """Make the first duplicate of ``name`` the owner of its row (and the others its duplicates),
    before ``name`` leaves that row; False when nothing points at ``name``."""
    heirs = [d for d in ckpts if d.get("duplicate_of") == name]
    if heirs:
        heirs[0].pop("duplicate_of")
        for d in heirs[1:]:
            d["duplicate_of"] = heirs[0]["name"]
    return bool(heirs)


class Store:
    """An open store. ``mode`` ``"r"`` reads; ``"r+"`` also writes (hold :func:`lock` first).

    Arrays are opened lazily and read eagerly into numpy by the ``read_*`` methods.
    """

    def __init__(self, group: zarr.Group, path: Path, *, dedupe: bool = False) -> None:
        self.group = group
        self.path = path
        self.dedupe = dedupe  # done_rows() shows identical checkpoints once
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """Open each array once: opening reads its zarr.json, which costs a millisecond."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    # -- attributes ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def views(self) -> dict[str, StoredView]:
        """The store's views by key, in the order they were planned."""
        return _views_from_json(self.group.attrs.get("views", {}), self.path)

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get("checkpoints", []))

    def _set_attrs(self, **values: Any) -> None:
        self.group.update_attributes(values)

    # -- writing ------------------------------------------------------------------------------
    def reserve(self, entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Give each new checkpoint entry a row (not yet done); reuse rows of known names.

        ``entries`` carry name, size, mtime_ns, step, epoch and optionally content. Returns
        name -> row. Grows every array when rows run out; existing rows and their chunks are
        untouched. A row shared by duplicates is never rewritten: a duplicate being recomputed
        gets a new row, and an original being recomputed hands its row to its first duplicate.
        """
        ckpts = self.checkpoints
        by_name = {c["name"]: c for c in ckpts}
        n_rows = old_rows = self._array("step").shape[0]
        for e in entries:
            c = by_name.get(e["name"])
            if c is None:
                c = {"name": e["name"], "row": n_rows}
                n_rows += 1
                ckpts.append(c)
                by_name[c["name"]] = c
            elif c.pop("duplicate_of", None) is not None or _hand_over(ckpts, c["name"]):
                c["row"], n_rows = n_rows, n_rows + 1
            c.update({k: e[k] for k in ("size", "mtime_ns", "step", "epoch")}, done=False)
            c.pop("bad", None)
            for kind in ("probe", "content"):  # fingerprints of what the files hold now
                c.pop(kind, None)
                if e.get(kind):
                    c[kind] = e[kind]
        self._ensure_rows(n_rows)
        step = self._array("step")
        values = step[:]  # one read and one write of the small step array, not one per entry
        was_in_order = _in_step_order(values[:old_rows])  # new rows hold the fill value, -1
        for e in entries:
            c = by_name[e["name"]]
            values[c["row"]] = -1 if c["step"] is None else int(c["step"])
        if was_in_order and not _in_step_order(values):
            # said before the late step is written: a crash in between leaves the warning, never
            # a false "step"; once out of order, rows never return to it (they do not move)
            self._set_row_order("ingestion")
        step[:] = values
        self._write_view_steps(values)
        self._set_attrs(checkpoints=ckpts)
        return {e["name"]: by_name[e["name"]]["row"] for e in entries}

    def _set_row_order(self, order: str) -> None:
        """Say in every view group's ``row_order`` attribute whether its rows are in step order
        ("step") or no longer ("ingestion"); written once per store, when an append breaks it."""
        for key in self.views:
            self.group[f"views/{key}"].update_attributes({"row_order": order})

    def _view_steps(self) -> list[str]:
        """The per-view copies of ``step`` (empty for stores made before views carried one)."""
        keys = list(self.views)
        if not keys or "step" not in self.group[f"views/{keys[0]}"]:
            return []
        return [f"views/{key}/step" for key in keys]

    def _write_view_steps(self, values: np.ndarray) -> None:
        """Copy ``step`` into every view's group, all writes at once (one per view), so that
        ``xarray.open_zarr(store, group="views/<key>")`` labels rows by step without specan."""
        import asyncio

        from zarr.core.sync import sync

        writes = [self._array(name).async_array.setitem(slice(None), values)
                  for name in self._view_steps()]  # fmt: skip

        async def _all() -> None:
            await asyncio.gather(*writes)

        sync(_all())

    def add_duplicates(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Record checkpoints identical to done ones: each entry (name, size, mtime_ns, step,
        epoch, content, duplicate_of) shares its original's row and is done at once, with one
        write of the attributes. Nothing is decomposed or copied."""
        ckpts = self.checkpoints
        by_name = {c["name"]: c for c in ckpts}
        keys = ("name", "size", "mtime_ns", "step", "epoch", "content", "duplicate_of")
        for e in entries:
            original = by_name[e["duplicate_of"]]
            if not original.get("done") or original.get("duplicate_of"):
                raise StoreError(f"{self.path}: {e['duplicate_of']!r} is no done original")
            entry = {k: e[k] for k in keys} | {"row": original["row"], "done": True}
            if e.get("probe"):
                entry["probe"] = e["probe"]
            if e["name"] in by_name:
                _hand_over(ckpts, e["name"])
                by_name[e["name"]].clear()
                by_name[e["name"]].update(entry)
            else:
                ckpts.append(entry)
                by_name[e["name"]] = entry
        self._set_attrs(checkpoints=ckpts)

    def _ensure_rows(self, n: int) -> None:
        import asyncio

        from zarr.core.sync import sync

        step = self._array("step")
        if step.shape[0] >= n:
            return
        vectors = self.attrs["kernel"].get("vectors")
        names = ("sigma", "tail", "U", "V") if vectors else ("sigma", "tail")
        arrays = [self._array(f"views/{key}/{name}") for key in self.views for name in names]
        arrays += [self._array(name) for name in self._view_steps()]

        async def _all() -> None:
            # exactly n rows: xarray users see T rows, not a padded capacity. Every zarr.json
            # at once: one resize at a time took 0.7 s for a Pythia-160m store's 490 arrays.
            await asyncio.gather(*(a.async_array.resize((n, *a.shape[1:])) for a in arrays))

        sync(_all())
        step.resize((n,))  # last: a store whose step array has grown has grown everywhere

    def write_row(self, row: int, results: Mapping[str, ViewResult]) -> None:
        """Write one checkpoint's spectra into ``row`` (all views; marks nothing done).

        All chunk writes of the row go out concurrently: one at a time, zarr's per-call overhead
        was most of an ingest's time on small models.
        """
        import asyncio

        from zarr.core.sync import sync

        vectors = bool(self.attrs.get("kernel", {}).get("vectors", True))
        self._record_routes(results)
        writes = []
        for key, r in results.items():
            parts = [("sigma", r.sigma), ("tail", r.tail)]
            if vectors and r.U is not None:
                parts += [("U", r.U), ("V", r.V)]
            for name, value in parts:
                arr = self._array(f"views/{key}/{name}").async_array
                writes.append(arr.setitem(row, value))

        async def _all() -> None:
            await asyncio.gather(*writes)

        sync(_all())

    def _record_routes(self, results: Mapping[str, ViewResult]) -> None:
        """Keep each view's kernel routes in its attributes (``views[key]["routes"]``); the
        attributes are rewritten only when a route not seen before appears."""
        views = dict(self.group.attrs.get("views", {}))
        new = False
        for key, r in results.items():
            known = views[key].setdefault("routes", [])
            for route in filter(None, r.route.split("+")):
                if route not in known:
                    known.append(route)
                    new = True
        if new:
            self._set_attrs(views=views)

    def mark_done(self, name: str) -> None:
        """Mark a checkpoint complete; called only after :meth:`write_row` returned."""
        ckpts = self.checkpoints
        for c in ckpts:
            if c["name"] == name:
                c["done"] = True
        self._set_attrs(checkpoints=ckpts)

    def mark_bad(self, name: str, reason: str) -> None:
        """Mark a checkpoint whose spectra could not be computed (NaN weights, a failed SVD):
        its row stays not done, and later ingests skip it until its file changes."""
        ckpts = self.checkpoints
        for c in ckpts:
            if c["name"] == name:
                c["bad"] = reason
        self._set_attrs(checkpoints=ckpts)

    def set_bad_files(self, bad: Sequence[Mapping[str, str]]) -> None:
        self._set_attrs(bad_files=[dict(b) for b in bad])

    # -- reading ------------------------------------------------------------------------------
    def done_rows(self) -> tuple[list[int], list[dict[str, Any]]]:
        """Rows of complete checkpoints, ordered by step (then name), with their entries.

        With ``dedupe`` (given to :func:`open_store`), checkpoints of identical content are
        shown once, at the largest step that holds it (see ``dedupe``)."""
        done = [c for c in self.checkpoints if c.get("done")]
        done.sort(key=lambda c: (c["step"] is None, c["step"] or 0, c["name"]))
        if self.dedupe:
            done = dedupe(done)
        return [c["row"] for c in done], done

    def read_sigma(self, key: str) -> np.ndarray:
        """All singular values of a view, ``[T, (H,) R]`` over done checkpoints in step order."""
        rows, _ = self.done_rows()
        return self._take(f"views/{key}/sigma", rows)

    def read_tail(self, key: str) -> np.ndarray:
        rows, _ = self.done_rows()
        return self._take(f"views/{key}/tail", rows)

    def read_vectors(self, key: str, *, step_index: int | None = None) -> tuple[Any, Any]:
        """Top-k (U, V) of a view: ``[T, (H,) m, k]``, or one checkpoint's with ``step_index``."""
        g = self.group[f"views/{key}"]
        if "U" not in g:
            raise StoreError(f"{self.path}: view {key!r} was ingested without vectors")
        rows, _ = self.done_rows()
        if step_index is not None:
            rows = [rows[step_index]]
        return self._take(f"views/{key}/U", rows), self._take(f"views/{key}/V", rows)

    def read_view(self, key: str, row: int) -> ViewResult:
        """One view's arrays at one row, as :meth:`write_row` takes them (a copy to another
        row); eager."""
        vectors = bool(self.attrs.get("kernel", {}).get("vectors", True))

        def get(name: str) -> np.ndarray:
            return self._array(f"views/{key}/{name}")[row]

        return ViewResult(
            sigma=get("sigma"),
            U=get("U") if vectors else None,
            V=get("V") if vectors else None,
            tail=get("tail"),
        )

    def _take(self, name: str, rows: Sequence[int]) -> np.ndarray:
        import numpy as np

        arr = self._array(name)
        if not rows:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        lo, hi = min(rows), max(rows) + 1
        block = arr[lo:hi]  # one contiguous read, then reorder in memory
        return block[np.asarray(rows) - lo]


def create(
    path: Path | str,
    *,
    views: Sequence[StoredView],
    kernel: Mapping[str, Any],
    settings: Mapping[str, Any],
    overwrite: bool = False,
    run: Path | str | None = None,
) -> Store:
    """Create a new, empty store (no rows) for the given views.

    ``views`` are planned views (their ``k`` is set here, from the kernel's ``top_k``); ``run``
    is the folder of the checkpoints, recorded for commands given the store's path. Raises
    :class:`StoreExistsError` if a store exists and ``overwrite`` is False.
    """
    import shutil

    import zarr
    from zarr.core.group import GroupMetadata

    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreExistsError(
            f"{path}: a store exists already (pass overwrite=True to replace it)"
        )
    # Build it under a temporary name and rename it into place: a crash mid-creation must not
    # leave a store without its attributes where the next ingest would find it.
    building = path.with_name(f"{path.name}.partial-{os.getpid()}")
    _clear_leftovers(path)
    top_k = kernel.get("top_k")
    vectors = bool(kernel.get("vectors", True))
    vdtype = kernel.get("vector_dtype", "float32")
    steps = _array_meta((0,), (1024,), "int64", -1, ("checkpoint",), labelled=False)
    nodes: dict[str, Any] = {"step": steps, "views": GroupMetadata(zarr_format=3)}
    view_attrs: dict[str, Any] = {}
    for v in views:
        m, n = v.shape
        k = min(int(top_k), min(m, n)) if top_k else min(m, n)  # top_k 0/None: every vector
        r = v.sigma_top or min(m, n)  # σ kept: all, or only the top k
        heads = v.heads
        hd = (heads,) if heads else ()
        hn = ("head",) if heads else ()
        at = f"views/{v.key}"
        nodes[at] = GroupMetadata(
            attributes={"param": v.param, "rule": v.rule, "row_order": "step"}, zarr_format=3
        )
        # each row's step beside the spectra: xarray reads it as the coordinate the arrays'
        # "coordinates" attribute names (CF), so the group opens labelled without specan
        nodes[f"{at}/step"] = steps
        nodes[f"{at}/sigma"] = _array_meta(
            (0, *hd, r), (SIGMA_CHUNK_ROWS, *hd, r), "float32", "nan",
            ("checkpoint", *hn, "rank"),
        )  # fmt: skip
        nodes[f"{at}/tail"] = _array_meta(
            (0, *hd), (1024, *hd), "float32", "nan", ("checkpoint", *hn),
        )  # fmt: skip
        if vectors:
            for name, rows, dim in (("U", m, "row"), ("V", n, "col")):
                nodes[f"{at}/{name}"] = _array_meta(
                    (0, *hd, rows, k), (1, *hd, rows, k), vdtype, "nan",
                    ("checkpoint", *hn, dim, "component"),
                )  # fmt: skip
        view_attrs[v.key] = _view_to_json(v, k if vectors else 0)
    nodes[""] = GroupMetadata(
        attributes={
            "schema_version": SCHEMA_VERSION,
            "specan_version": __version__,
            "kernel": dict(kernel),
            "settings": dict(settings),
            "views": view_attrs,
            "checkpoints": [],
            "bad_files": [],
            "run": str(Path(run).resolve()) if run is not None else None,
        },
        zarr_format=3,
    )
    # every node's zarr.json written concurrently: 0.3 s for a Pythia-160m store's 600 nodes
    # against 1.4 s one create_array at a time
    for _ in zarr.create_hierarchy(store=zarr.storage.LocalStore(building), nodes=nodes):
        pass
    if path.exists():  # overwrite=True: the old store goes only once the new one is complete
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        path.rename(old)
        building.rename(path)
        shutil.rmtree(old)
    else:
        building.rename(path)
    return Store(zarr.open_group(path, mode="r+", zarr_format=3), path)


def _view_to_json(v: StoredView, k: int) -> dict[str, Any]:
    """A view as the store's ``views`` attribute keeps it (the parameter's shape in ``info``,
    where stores have always kept it)."""
    info = _facts_to_json(v.facts)
    if v.param_shape is not None:
        info["param_shape"] = list(v.param_shape)
    return {"param": v.param, "rule": v.rule, "shape": list(v.shape), "heads": v.heads, "k": k,
            "sigma_top": v.sigma_top, "info": info}  # fmt: skip


def _facts_to_json(facts: ViewFacts) -> dict[str, Any]:
    """A view's facts as its ``info`` object: the fields a rule set (tuples as lists); a field
    left unset (None, or ``heads_unknown`` False) is left out, as stores have always had it."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(facts):
        value = getattr(facts, f.name)
        if value is None or value is False:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


_FACT_NAMES = frozenset(f.name for f in dataclasses.fields(ViewFacts))


def _facts_from_json(info: Mapping[str, Any], where: str) -> ViewFacts:
    """The inverse of `_facts_to_json` (an older store's ``"heads": null`` reads as unset)."""
    unknown = sorted(set(info) - _FACT_NAMES)
    if unknown:
        raise StoreError(f"{where}: unknown view facts {unknown} (a newer specan wrote it?)")
    values = {n: tuple(v) if isinstance(v, list) else v for n, v in info.items()}
    values["heads_unknown"] = bool(values.get("heads_unknown"))
    return ViewFacts(**values)


def _views_from_json(
    views: Mapping[str, Mapping[str, Any]], path: Path | str
) -> dict[str, StoredView]:
    """The ``views`` attribute of the store at ``path`` as typed views, by key."""
    out = {}
    for key, v in views.items():
        info = dict(v.get("info") or {})
        shape = info.pop("param_shape", None)
        m, n = v["shape"]
        out[key] = StoredView(
            key=key, param=v["param"], rule=v["rule"], shape=(int(m), int(n)),
            heads=v.get("heads"), facts=_facts_from_json(info, f"{path}: view {key!r}"),
            k=int(v.get("k") or 0), sigma_top=v.get("sigma_top"),
            routes=tuple(v.get("routes") or ()),
            param_shape=tuple(shape) if shape is not None else None,
        )  # fmt: skip
    return out


def _in_step_order(steps: np.ndarray) -> bool:
    """Rows whose steps never decrease (a step unknown, -1, after a known one breaks it)."""
    return bool((steps[1:] >= steps[:-1]).all())


def dedupe(entries: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Done entries in step order, each content kept once: at its largest step.

    The largest, not the first: a content served at several steps cannot say which step it
    belongs to, and the copies Pythia is known for (pythia-2.8b's intermediate revisions serving
    the final weights) are wrong at the earlier steps; keeping the last also keeps the final
    checkpoint, the reference of SVA. Entries without a content id (older stores) all stay.
    """
    last = {c["content"]: c["name"] for c in entries if c.get("content") and c["step"] is not None}
    return [c for c in entries if last.get(c.get("content"), c["name"]) == c["name"]]


def duplicate_groups(entries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Names of done checkpoints sharing one content, in step order; groups of two or more."""
    groups: dict[str, list[str]] = {}
    ordered = sorted(entries, key=lambda c: (c["step"] is None, c["step"] or 0, c["name"]))
    for c in ordered:
        if c.get("done") and c.get("content"):
            groups.setdefault(c["content"], []).append(c["name"])
    return [g for g in groups.values() if len(g) > 1]


def open_store(path: Path | str, *, mode: str = "r", dedupe: bool = False) -> Store:
    """Open an existing store (lazy: arrays are read on demand). ``mode`` is ``"r"`` or ``"r+"``;
    ``dedupe`` makes the readers show identical checkpoints once (:func:`dedupe`)."""
    import zarr

    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(
            f"{path}: no specan store here (run `specan ingest` first, or give the path of "
            "a store made with `ingest --store`)"
        )
    return Store(zarr.open_group(path, mode=mode, zarr_format=3), path, dedupe=dedupe)


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def summary(path: Path | str) -> dict[str, Any]:
    """What a store holds, for `specan info`: plain JSON-ready values, no arrays read."""
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(
            f"{path}: no specan store here (run `specan ingest` first, or give the path of "
            "a store made with `ingest --store`)"
        )
    ckpts = attrs.get("checkpoints", [])
    done = sorted(
        (c for c in ckpts if c.get("done")), key=lambda c: (c["step"] is None, c["step"] or 0)
    )
    views = [
        {"key": key, "param": v.param, "rule": v.rule, "shape": list(v.shape),
         "heads": v.heads, "k": v.k, "bytes": _du(path / "views" / key)}
        for key, v in views_in_model_order(_views_from_json(attrs.get("views", {}), path)).items()
    ]  # fmt: skip
    return {
        "path": str(path),
        "schema_version": attrs.get("schema_version"),
        "specan_version": attrs.get("specan_version"),
        "kernel": attrs.get("kernel", {}),
        "settings": attrs.get("settings", {}),
        "checkpoints": {
            "done": len(done),
            "bad": sum(1 for c in ckpts if not c.get("done") and c.get("bad")),
            "pending": sum(1 for c in ckpts if not c.get("done") and not c.get("bad")),
            "first_step": done[0]["step"] if done else None,
            "last_step": done[-1]["step"] if done else None,
            "list": ckpts,
        },
        "duplicates": duplicate_groups(ckpts),
        "run": attrs.get("run"),
        "views": views,
        "bad_files": attrs.get("bad_files", []),
        "bytes": _du(path),
    }


# -- derived results ----------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able inputs: a cached result is valid while its fingerprint matches."""
    import hashlib

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_derived(
    path: Path | str, name: str, key: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A cached analysis result (arrays, attrs) under ``derived/<name>``, if its key matches."""
    import zarr

    try:
        group = zarr.open_group(Path(path) / "derived" / name, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    attrs = dict(group.attrs)
    if attrs.get("key") != key:
        return None
    return {n: a[...] for n, a in group.arrays()}, attrs.get("info", {})


def write_derived(
    path: Path | str,
    name: str,
    key: str,
    arrays: Mapping[str, np.ndarray],
    info: Mapping,
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
) -> bool:
    """Cache an analysis result under ``derived/<name>``; False (nothing written) while another
    process holds the writer lock or the store is read-only: a cache is never worth failing for.
    ``dims`` names each array's dimensions (``dimension_names``, what xarray reads).

    The group is built beside and renamed into place, so readers see the old result or the new.
    """
    import shutil

    import zarr

    target = Path(path) / "derived" / name
    try:
        with lock(path):
            building = target.with_name(f"{target.name}.partial-{os.getpid()}")
            _clear_leftovers(target)
            group = zarr.open_group(building, mode="w-", zarr_format=3)
            for n, a in arrays.items():
                names = (dims or {}).get(n)
                group.create_array(n, data=a, compressors=_zstd(), dimension_names=names)
            group.update_attributes({"key": key, "info": dict(info)})
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            if target.exists():
                target.rename(old)
            building.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    except (StoreLockedError, OSError) as e:  # locked, or a read-only store: just don't cache
        log.debug("not caching %s in %s: %s", name, path, e)
        return False
    return True
