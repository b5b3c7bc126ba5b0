"""Linear mode connectivity (SPEC §2 Eqn 6): the loss along the straight path between two models.

For branch endpoints ``W¹, W²`` and ``L(α) = L((1−α)W¹ + αW²)`` on evenly spaced α in [0, 1]
(11 by default), the barrier is ``b = max_{α interior} [L(α) − ((1−α)L(0) + αL(1))]``: the max over
interior points only, so b can be slightly negative (a convex loss gives b ≤ 0). L is the training
loss. Every floating state entry is interpolated, buffers included (integer counters such as
``num_batches_tracked`` are taken from W¹); then batch-norm statistics are recomputed on the
training data, at every α, endpoints included, so that the chord and the path are measured alike.

`barriers` computes an LMC folder (`specan lmc`); the registered analysis ``lmc``
(`specan.registry`) is one trunk's share of it, on the trunk's split steps (`trunk_result`), so
that `Run.analyse`, `specan plot`, `report` and `compare` treat it as any other analysis of the
trunk run. Only the standard library and the registry's table are imported at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.registry import Analysis

if TYPE_CHECKING:
    import numpy as np
    import torch
    import xarray as xr

    from specan.api import Run

__all__ = [
    "ALPHAS",
    "alphas",
    "barrier",
    "barriers",
    "endpoint_losses",
    "interpolate",
    "loss_path",
    "select_splits",
    "store_trunks",
    "trunk_result",
]

ALPHAS = 11  # evenly spaced α in [0, 1], the paper's path


def alphas(n: int = ALPHAS) -> np.ndarray:
    """``n`` evenly spaced α from 0 to 1, both ends included (at least 3: one interior point)."""
    import numpy as np

    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"an LMC path needs at least 3 points (one interior α), not {n!r}")
    return np.linspace(0.0, 1.0, n)


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 − α)a + αb`` for every floating entry of two state dicts with the same entries;
    other entries (integer counters) are `a`'s."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the two states differ in entries: {', '.join(only[:5])}")
    out = {}
    for k, va in a.items():
        vb = b[k]
        if tuple(va.shape) != tuple(vb.shape):
            raise ValueError(f"{k}: shapes {tuple(va.shape)} and {tuple(vb.shape)} differ")
        out[k] = (1.0 - alpha) * va + alpha * vb if va.is_floating_point() else va.clone()
    return out


def barrier(alpha: Sequence[float], losses: Sequence[float]) -> float:
    """Eqn 6: the largest excess of the loss over the chord between the endpoints, over the
    interior α (the first and last α are the endpoints)."""
    import numpy as np

    x, y = np.asarray(alpha, dtype=float), np.asarray(losses, dtype=float)
    if x.shape != y.shape or len(x) < 3:
        raise ValueError("barrier needs as many losses as α, and at least 3 of each")
    if x[0] != 0.0 or x[-1] != 1.0:
        raise ValueError("the path's α must start at 0 and end at 1")
    chord = (1.0 - x) * y[0] + x * y[-1]
    return float(np.max((y - chord)[1:-1]))


def loss_path(
    model: torch.nn.Module,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    loss: Callable[[torch.nn.Module], Mapping[str, float] | float],
    *,
    alpha: Sequence[float] | None = None,
    bn_data: torch.Tensor | None = None,
    progress: Any = None,
) -> list[Any]:
    """Evaluate ``loss(model)`` with the model at each interpolated state.

    `bn_data` (training inputs): batch-norm statistics are re-estimated on it after each
    interpolation (`specan.losses.reestimate_bn`). `progress` is told ``start(len(alpha), 1, 0)``,
    ``advance("α=…", 1, 0)`` per point and ``finish()``. Returns what `loss` returned, per α.
    """
    import torch

    from specan.losses import reestimate_bn

    alpha = list(alphas() if alpha is None else alpha)
    out = []
    if progress is not None:
        progress.start(len(alpha), 1, 0)
    try:
        for x in alpha:
            model.load_state_dict(interpolate(a, b, float(x)))
            if bn_data is not None:
                reestimate_bn(model, bn_data)
            with torch.no_grad():
                out.append(loss(model.eval()))
            if progress is not None:
                progress.advance(f"α={float(x):.2f}", 1, 0)
    finally:
        if progress is not None:
            progress.finish()
    return out


def endpoint_losses(
    run: Path | str,
    first: Path | str,
    second: Path | str,
    *,
    n: int = ALPHAS,
    device: str = "cpu",
    progress: Any = None,
) -> xr.Dataset:
    """The LMC path between two checkpoint files of one architecture, the model and data those of
    the trainer-written run folder `run` (its ``build_model``/``eval_data``/``evaluate``).

    Returns a Dataset with ``train_loss``, ``val_loss`` (and the trainer's other numbers) on
    ``alpha``, and the barrier of the training loss (Eqn 6) as attribute ``barrier``.
    """
    from specan import losses

    return _path(losses.load(run, device=device), first, second, n=n, progress=progress)[0]


def endpoint_sva(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, family: str = "auto",
    rules: Mapping[str, str] | None = None, top: int = 10,
) -> dict[str, float]:  # fmt: skip
    """Eqn 5 between two endpoints, per parameter: the mean of the first `top` diagonal entries
    ``S_ii = |u_i(a)ᵀ u_i(b)| · |v_i(a)ᵀ v_i(b)|`` of the whole view of every ≥2-D float
    parameter (model order), from float64 SVDs of the weights themselves."""
    import torch

    from specan.metrics import diagonal_score, sva
    from specan.views import WHOLE_RULES, extract, plan_views

    shapes = {k: v for k, v in a.items() if v.is_floating_point()}
    out: dict[str, float] = {}
    rules = {k: v for k, v in (rules or {}).items() if k in shapes}
    for spec in plan_views(shapes, family=family, rules=rules):
        if spec.rule not in WHOLE_RULES or spec.param in out:
            continue
        svds = []
        for state in (a, b):
            matrix = extract(spec, state[spec.param].cpu(), dtype=torch.float64)
            u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
            svds += [u.numpy(), vh.T.numpy()]
        k = min(min(spec.shape), top)  # only S_ii for i <= top enter the score
        matrix = sva(svds[0][:, :k], svds[1][:, :k], svds[2][:, :k], svds[3][:, :k])
        out[spec.param] = float(diagonal_score(matrix, top=top))
    return out


def _path(
    rm: Any, first: Path | str, second: Path | str, *, n: int, progress: Any
) -> tuple[xr.Dataset, list[dict[str, torch.Tensor]]]:
    import numpy as np
    import xarray as xr

    from specan import losses, runs

    states = []
    for path in (first, second):
        ck = runs.Checkpoint(str(path), (Path(path),), None, None, 0, 0)
        with runs.CheckpointReader(ck) as reader:
            states.append(losses.state_of(reader, rm.model))
    grid = alphas(n)
    bn = rm.data["x_train"] if _batch_norms(rm.model) else None
    rows = loss_path(
        rm.model,
        states[0],
        states[1],
        lambda m: rm.trainer.evaluate(m, rm.data),
        alpha=grid,
        bn_data=bn,
        progress=progress,
    )
    names = [k for k, v in rows[0].items() if isinstance(v, float)]
    ds = xr.Dataset(
        {k: ("alpha", np.array([r[k] for r in rows])) for k in names}, coords={"alpha": grid}
    )
    ds.attrs["barrier"] = barrier(grid, ds["train_loss"].values)
    return ds, states


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def select_splits(splits: Sequence[int], per_epoch: int, spec: str | None) -> list[int]:
    """The split steps kept by ``--split-epochs``: ``a..b`` (epochs, inclusive, either end
    open), or a comma-separated list of epochs; None or "all" keeps every split. A selection
    that names an epoch with no split, or keeps none, is an error naming the splits there are."""
    import numpy as np

    epochs = {s: s / per_epoch for s in splits}
    have = "splits at epochs " + ", ".join(f"{e:g}" for e in epochs.values())
    if spec is None or spec.strip().lower() == "all":
        return list(splits)
    try:
        if ".." in spec:
            lo, hi = (x.strip() for x in spec.split("..", 1))
            low = float(lo) - 1e-9 if lo else -np.inf
            high = float(hi) + 1e-9 if hi else np.inf
            keep = [s for s, e in epochs.items() if low <= e <= high]
        else:
            wanted = [float(x) for x in spec.split(",") if x.strip()]
            keep = []
            for w in wanted:
                hit = [s for s, e in epochs.items() if abs(e - w) < 1e-9]
                if not hit:
                    raise LookupError(f"no split at epoch {w:g}")
                keep += hit
    except ValueError:
        raise ValueError(
            f"the split_epochs argument {spec!r}: expected A..B or a list of epochs"
        ) from None
    except LookupError as e:
        raise ValueError(f"the split_epochs argument {spec!r}: {e}; {have}") from None
    if not keep:
        raise ValueError(f"the split_epochs argument {spec!r} selects no split; {have}")
    return sorted(set(keep))


def barriers(
    root: Path | str,
    *,
    split_epochs: str | None = None,
    cross_trunk: bool = False,
    n: int = ALPHAS,
    device: str = "cpu",
    progress: Any = None,
    cache: bool = True,
) -> xr.Dataset:
    """Eqn 6 for every pair of branch endpoints of an LMC folder (`specan train vgg --lmc`).

    Pairs: the branches of one trunk and split with different seeds (3 seeds: 3 pairs per
    trunk); with `cross_trunk`, the control: branches of one split and seed on different trunks.
    Each endpoint is the branch's last checkpoint. A perturbation folder (``--lmc --perturb``)
    has one split and branches per perturbation size η: pairs are formed per η alike.

    Parameters
    ----------
    root : path
        The LMC folder (its ``lmc.json`` says the protocol, trunks, splits, seeds).
    split_epochs : str, optional
        Which splits (`select_splits`); not for a perturbation folder, which has one.
    cross_trunk : bool
        Pair across trunks instead of across branch seeds.
    n : int
        Evenly spaced α per path, ends included.
    device : str
        Where the models are evaluated.
    progress : optional
        Told ``start(paths, n, 0)``, ``advance(label, n, 0)`` per path and ``finish()``.
    cache : bool
        Read and write the result in ``root/specan.zarr``'s ``derived/`` (like a run's
        analyses), keyed by lmc.json, the selection, `n` and every endpoint file's size and
        mtime: a retrained branch recomputes.

    Returns
    -------
    xarray.Dataset
        ``barrier`` ``(group, pair)``; ``train_loss`` and ``val_loss`` ``(group, pair,
        alpha)``; endpoint SVA (`endpoint_sva`): ``sva_view`` ``(group, pair, view)`` per
        parameter and ``sva`` ``(group, pair)``, its mean over the model's weight matrices.
        ``group`` is ``split`` (the split step; coord ``epoch`` on it) or, for a perturbation
        folder, ``eta`` (coords ``split`` and ``epoch`` of its one split); ``pair`` labels
        (``trunk-0:3-4``, or ``3:trunk-0-trunk-1`` across trunks). attrs: ``protocol``,
        ``cross_trunk``.
    """
    from itertools import combinations

    from specan import store
    from specan.errors import OptionError
    from specan_trainers.checkpoint import branch_name

    root = Path(root)
    meta = _meta(root)
    protocol = meta.get("protocol", "split")
    if protocol == "perturb":
        split = meta["splits"][0]
        if split_epochs is not None:
            raise OptionError(
                f"{root}: a perturbation folder has one split (epoch "
                f"{split / meta['per_epoch']:g}); the split_epochs argument does not apply"
            )
        dim, groups = "eta", list(meta["etas"])

        def folder(g: Any, seed: int) -> str:
            return branch_name(split, seed, g)
    else:
        try:
            groups = select_splits(meta["splits"], meta["per_epoch"], split_epochs)
        except ValueError as e:
            raise OptionError(str(e)) from None
        dim = "split"

        def folder(g: Any, seed: int) -> str:
            return branch_name(g, seed)

    trunks, seeds = meta["trunks"], meta["branch_seeds"]
    if cross_trunk:
        if len(trunks) < 2:
            raise OptionError(
                f"{root}: the cross_trunk argument needs two trunks; this folder has one"
            )
        labels = [
            (f"{s}:{a}-{b}", (a, s), (b, s)) for s in seeds for a, b in combinations(trunks, 2)
        ]
    else:
        labels = [
            (f"{t}:{a}-{b}", (t, a), (t, b)) for t in trunks for a, b in combinations(seeds, 2)
        ]
    ends = {
        (g, t, seed): _last_checkpoint(root / t / folder(g, seed))
        for g in groups for _, *sides in labels for t, seed in sides
    }  # fmt: skip
    # endpoints named relative to the root: the folder spelt another way (a trunk run's
    # absolute path, the command line's relative one) must find the same result
    key = store.fingerprint(
        "lmc", LMC_VERSION, meta, groups, cross_trunk, n,
        sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
               for p in ends.values()),
    )  # fmt: skip
    name = "lmc_cross" if cross_trunk else "lmc"
    cache_at = root / CACHE
    if cache:
        hit = store.read_derived(cache_at, name, key)
        if hit is not None:
            from specan.api import _from_cache

            return _from_cache(*hit)
    ds = _barriers(root, meta, dim, groups, labels, ends, n=n, device=device, progress=progress)
    ds.attrs.update({"protocol": protocol, "cross_trunk": int(cross_trunk)})
    if protocol == "perturb":
        ds = ds.assign_coords(split=split, epoch=split / meta["per_epoch"])
    if cache:
        from specan.api import _to_cache

        arrays, info, dims = _to_cache(ds)
        store.write_derived(cache_at, name, key, arrays, info, dims=dims)
    return ds


def _meta(root: Path) -> dict[str, Any]:
    """An LMC folder's lmc.json (protocol, trunks, splits, branch seeds)."""
    import json

    from specan.errors import ModelError

    path = root / "lmc.json"
    if not path.is_file():
        raise ModelError(f"{path}: not an LMC folder (write one with `specan train vgg --lmc`)")
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


LMC_VERSION = 1  # bump when the computation changes: cached results are then recomputed
CACHE = "specan.zarr"  # the cache of an LMC folder, beside lmc.json


def _last_checkpoint(branch: Path) -> Path:
    from specan import runs

    return runs.discover(branch).checkpoints[-1].files[0]


def _barriers(
    root: Path,
    meta: dict[str, Any],
    dim: str,
    groups: list[Any],
    labels: list[tuple[str, tuple[str, int], tuple[str, int]]],
    ends: dict[tuple[Any, str, int], Path],
    *,
    n: int,
    device: str,
    progress: Any,
) -> xr.Dataset:
    import numpy as np
    import xarray as xr

    from specan import losses

    rm = losses.load(ends[(groups[0], *labels[0][1])].parent.parent, device=device)
    out: dict[str, list] = {"barrier": [], "train_loss": [], "val_loss": [], "sva_view": []}
    if progress is not None:
        progress.start(len(groups) * len(labels), n, 0)
    try:
        for g in groups:
            row: dict[str, list] = {k: [] for k in out}
            for label, a, b in labels:
                first, second = ends[(g, *a)], ends[(g, *b)]
                ds, states = _path(rm, first, second, n=n, progress=None)
                scores = endpoint_sva(states[0], states[1], family=rm.family, rules=rm.rules)
                row["sva_view"].append(list(scores.values()))
                row["barrier"].append(ds.attrs["barrier"])
                row["train_loss"].append(ds["train_loss"].values)
                row["val_loss"].append(ds["val_loss"].values)
                if progress is not None:
                    progress.advance(f"{dim} {g:g} {label}", n, 0)
            for k in out:
                out[k].append(row[k])
    finally:
        if progress is not None:
            progress.finish()
    coords: dict[str, Any] = {
        dim: np.array(groups, dtype=np.int64 if dim == "split" else float),
        "pair": [x[0] for x in labels],
        "alpha": alphas(n),
        "view": list(scores),
    }
    if dim == "split":
        coords["epoch"] = ("split", np.array(groups) / meta["per_epoch"])
    return xr.Dataset(
        {
            "barrier": ((dim, "pair"), np.array(out["barrier"])),
            "train_loss": ((dim, "pair", "alpha"), np.array(out["train_loss"])),
            "val_loss": ((dim, "pair", "alpha"), np.array(out["val_loss"])),
            "sva_view": ((dim, "pair", "view"), np.array(out["sva_view"])),
            "sva": ((dim, "pair"), np.array(out["sva_view"]).mean(axis=-1)),
        },
        coords=coords,
    )


# -- the registered analysis: one trunk's branch pairs, on the trunk's split steps -------------
def trunk_result(ds: xr.Dataset, trunk: str) -> xr.Dataset:
    """A `barriers` result (branch pairs, not across trunks) as the registered analysis ``lmc``
    gives it for the trunk run `trunk` (its folder name): every variable on ``(pair, step)``,
    the step being the split step (``epoch`` on it), ``value`` the barrier.

    A perturbation folder has one split: there a pair is one η and one branch pair, labelled
    ``η=<η> <pair>``, with coordinates ``eta`` and ``branches`` (the branch pair) on ``pair``.
    """
    import numpy as np
    import xarray as xr

    mine = [str(p) for p in ds["pair"].values if str(p).startswith(f"{trunk}:")]
    ds = ds.sel(pair=mine)
    if "eta" in ds.dims:
        etas = [float(e) for e in ds["eta"].values]
        data = {}
        for name, var in ds.data_vars.items():
            rest = [d for d in var.dims if d not in ("eta", "pair")]
            values = var.transpose("eta", "pair", *rest).values
            data[name] = (("pair", *rest), values.reshape(len(etas) * len(mine), *values.shape[2:]))
        out = xr.Dataset(
            data,
            coords={
                "pair": [f"η={e:g} {p}" for e in etas for p in mine],
                "eta": ("pair", np.repeat(etas, len(mine))),
                "branches": ("pair", mine * len(etas)),
                "alpha": ds["alpha"].values,
                "view": ds["view"].values,
            },
        ).expand_dims(step=[int(ds["split"])])
        out = out.assign_coords(epoch=("step", [float(ds["epoch"])]))
    else:
        out = ds.rename(split="step")
    out["value"] = out["barrier"]
    out = out.transpose("pair", "step", ...)
    out.attrs = {**ds.attrs, "trunk": trunk}
    return out


def _compute(run: Run, *, progress: Any = None, device: str = "cpu") -> xr.Dataset:
    from specan.errors import ModelError

    root = run.path.parent
    meta = _meta(root) if (root / "lmc.json").is_file() else {}
    if run.path.name not in meta.get("trunks", []):
        raise ModelError(
            f"{run.label}: not the trunk of an LMC folder (a trunk-<t>/ beside the lmc.json "
            "that `specan train vgg --lmc` writes)"
        )
    ds = barriers(root, device=device, progress=progress)
    return trunk_result(ds, run.path.name)


def _branch_files(run: Run) -> list[Any]:
    """The trunk's branches' checkpoint files (relative name, size, mtime) and lmc.json: what
    its ``lmc`` result depends on beside its own store, so a retrained branch recomputes it."""
    root = run.path.parent
    files = sorted(run.path.glob("branch-*/checkpoints/*.safetensors"))
    meta = _meta(root) if (root / "lmc.json").is_file() else {}
    return [meta] + [
        [p.relative_to(run.path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]


def store_trunks(root: Path | str, *, device: str = "cpu") -> tuple[list[Path], list[Path]]:
    """Keep the registered ``lmc`` result of every trunk of an LMC folder in the trunk's store
    (`Run.analyse`), so that `specan plot`, `report` and `compare` find it: computed through
    `barriers` with every split and the default path, so read from the folder's cache when
    `barriers` has run. Returns the trunks so stored and those without a store (not ingested).
    """
    from specan import store
    from specan.api import Run

    root = Path(root)
    done, bare = [], []
    for trunk in _meta(root)["trunks"]:
        path = root / trunk
        if store.store_path(path).exists():
            Run(path).analyse("lmc", device=device)
            done.append(path)
        else:
            bare.append(path)
    return done, bare


ANALYSIS = Analysis(
    name="lmc",
    title="LMC barrier of the branch pairs (train loss, Eqn 6)",
    reads=(),
    compute=_compute,
    item="pair",
    summary="LMC barrier, mean of branch pairs, first → last split",
    figure="lmc",
    automatic=False,  # it re-evaluates 11 models per pair and split: `specan lmc` computes it
    depends=_branch_files,
)
