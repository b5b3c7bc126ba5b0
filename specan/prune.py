"""Singular-value pruning (SPEC §2, Fig. 4): weights rebuilt from half their singular triplets.

For every ≥2-D parameter but the last one in model order (the output layer), on its whole matrix
view (`specan.views.WHOLE_RULES`: conv reshaped, transposed conv swapped, LSTM 4h x in and fused
Q/K/V 3d x d whole, embeddings as stored), keep the top ``num = ⌈R/2⌉`` singular triplets
("top-half") or the other ``R - num`` ("bottom-half") and put the product back in the parameter's
own shape (`specan.views.restore`). "full" is the checkpoint as it is.

The bottom half needs every singular vector, which a store rarely holds (ingest keeps the top k,
128 by default, in float32). So `prune_state` recomputes the SVD of each view from the
checkpoint's own weights, in float64; `rebuild` works on given triplets and refuses, in one line,
triplets that do not reach the half asked for. Only the standard library is imported at module
level; torch inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.errors import PruneError
from specan.registry import Analysis
from specan.views import WHOLE_RULES, ViewSpec, extract, plan_views, restore

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from specan.api import Run

__all__ = [
    "KEEPS",
    "kept",
    "mask_agreement",
    "prunable",
    "prune_losses",
    "prune_param",
    "prune_state",
    "rebuild",
]

KEEPS = ("full", "top-half", "bottom-half")


def kept(rank: int, keep: str) -> slice:
    """The singular triplets (0-based, descending σ) that `keep` keeps out of `rank`."""
    num = math.ceil(rank / 2)
    slices = {"full": slice(0, rank), "top-half": slice(0, num), "bottom-half": slice(num, rank)}
    if keep not in slices:
        raise ValueError(f"keep {keep!r}: expected one of {', '.join(KEEPS)}")
    return slices[keep]


def rebuild(
    spec: ViewSpec, sigma: torch.Tensor, U: torch.Tensor, V: torch.Tensor, *, keep: str
) -> torch.Tensor:
    """The parameter of the whole view `spec` rebuilt from the kept triplets of its SVD.

    Parameters
    ----------
    spec : ViewSpec
        A whole view (`WHOLE_RULES`) of shape (m, n), R = min(m, n).
    sigma, U, V : torch.Tensor
        ``[r]``, ``[m, k]``, ``[n, k]``: singular values (descending) and left and right vectors
        as columns; r, k ≤ R (a top-k store holds only the first k).
    keep : str
        One of `KEEPS`.

    Returns
    -------
    torch.Tensor
        ``Σ_{i kept} σ_i u_i v_iᵀ`` in the parameter's stored shape, in the dtype of `U`.

    Raises PruneError when the triplets given stop before the last one `keep` needs.
    """
    rank = min(spec.shape)
    want = kept(rank, keep)
    have = min(int(sigma.shape[0]), int(U.shape[1]), int(V.shape[1]))
    if want.stop > have:
        raise PruneError(
            f"{spec.key}: only the top {have} of {rank} singular triplets are stored, so the "
            f"{keep} (triplets {want.start + 1}..{want.stop}) is not available"
        )
    matrix = (U[:, want] * sigma[want].to(U.dtype)) @ V[:, want].T
    return restore(spec, matrix)


def prune_param(spec: ViewSpec, tensor: torch.Tensor, *, keep: str) -> torch.Tensor:
    """`tensor` (the raw parameter of `spec`) rebuilt from the `keep` half of its view's SVD,
    computed here in float64 (every triplet); returned in the tensor's own dtype."""
    import torch

    matrix = extract(spec, tensor, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return rebuild(spec, s, u, vh.T, keep=keep).to(tensor.dtype)


def prunable(
    shapes: Mapping[str, object], *, family: str = "auto", rules: Mapping[str, str] | None = None
) -> list[ViewSpec]:
    """The whole views that pruning rebuilds: one per ≥2-D float parameter, in model order,
    the last one (the output layer) left out. `family` and `rules` as for `plan_views` (a
    transposed convolution whose name does not say so needs its rule)."""
    rules = {k: v for k, v in (rules or {}).items() if k in shapes}
    seen: set[str] = set()
    whole = []
    for spec in plan_views(shapes, family=family, rules=rules):
        if spec.rule in WHOLE_RULES and spec.param not in seen:
            seen.add(spec.param)
            whole.append(spec)
    return whole[:-1]


def prune_state(
    state: Mapping[str, torch.Tensor],
    *,
    keep: str,
    family: str = "auto",
    rules: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of the state dict with every prunable parameter (`prunable`) rebuilt from the `keep`
    half of its singular triplets; everything else (biases, norms, buffers, the output layer) as
    it was. ``keep="full"`` returns the entries unchanged."""
    out = dict(state)
    if keep == "full":
        return out
    kept(1, keep)  # an unknown keep fails before any SVD
    shapes = {k: v for k, v in state.items() if v.is_floating_point()}
    for spec in prunable(shapes, family=family, rules=rules):
        out[spec.param] = prune_param(spec, state[spec.param], keep=keep)
    return out


def prune_losses(
    run: Path | str,
    *,
    keeps: Sequence[str] = KEEPS,
    steps: Collection[int] | None = None,
    device: str = "cpu",
    progress: Any = None,
) -> xr.Dataset:
    """Train and validation loss of the SV-pruned model at every checkpoint of a trainer's run.

    Each checkpoint is loaded into the run's model (`specan.losses.load`: the trainer's
    ``build_model`` and ``eval_data``); for each of `keeps` its parameters are pruned
    (`prune_state`, on the model's parameters only, buffers untouched), batch-norm statistics are
    re-estimated on the training data (not for "full", which keeps the checkpoint's own), and the
    trainer's ``evaluate`` gives the losses, in batches, on `device`.

    The SVD is always recomputed from the checkpoint's weights in float64, never read from the
    store: the bottom half needs every singular vector, and ingest keeps only the top k (128 by
    default, ``--top-k``) in float32, so even the top half of a view wider than 2k would be
    missing. Eager; reads the checkpoints, not the store.

    Parameters
    ----------
    run : path
        A run folder written by `specan train` (run.json names the trainer).
    keeps : sequence of str
        Which of `KEEPS` to evaluate.
    steps : collection of int, optional
        Only the checkpoints at these steps (default: all).
    device : str
        Where the model is evaluated ("cpu", "cuda", ...).
    progress : optional
        Told ``start(checkpoints, variants, 0)``, ``advance(name, variants, 0)`` and ``finish()``.

    Returns
    -------
    xarray.Dataset
        ``value`` (the training loss) and ``train_loss``, ``val_loss`` and whatever else the
        trainer reports (accuracies), each ``(keep, step)``; ``epoch`` on ``step``.
    """
    import numpy as np
    import xarray as xr

    from specan import losses, runs

    for keep in keeps:
        kept(1, keep)
    rm = losses.load(run, device=device)
    found = runs.discover(run)
    ckpts = [c for c in found.checkpoints if steps is None or c.step in set(steps)]
    params = {n for n, _ in rm.model.named_parameters()}
    records: list[list[dict[str, float]]] = []
    if progress is not None:
        progress.start(len(ckpts), len(keeps), 0)
    try:
        for ck in ckpts:
            with runs.CheckpointReader(ck) as reader:
                state = losses.state_of(reader, rm.model)
            weights = {k: v for k, v in state.items() if k in params}
            row = []
            for keep in keeps:
                pruned = {
                    **state,
                    **prune_state(weights, keep=keep, family=rm.family, rules=rm.rules),
                }
                row.append(rm.evaluate(pruned, bn=keep != "full"))
            records.append(row)
            if progress is not None:
                progress.advance(ck.name, len(keeps), 0)
    finally:
        if progress is not None:
            progress.finish()
    names = [n for n in (records[0][0] if records else {}) if isinstance(records[0][0][n], float)]
    data = {
        n: (("keep", "step"), np.array([[r[j][n] for r in records] for j in range(len(keeps))]))
        for n in names
    }
    if "train_loss" in data:
        data["value"] = data["train_loss"]
    step = np.array([-1 if c.step is None else c.step for c in ckpts], dtype=np.int64)
    epoch = np.array([np.nan if c.epoch is None else c.epoch for c in ckpts], dtype=float)
    return xr.Dataset(
        data,
        coords={"keep": list(keeps), "step": step, "epoch": ("step", epoch)},
        attrs={"run": str(run), "svd": "float64, recomputed from the checkpoints"},
    )


def mask_agreement(run: Path | str, *, top: int = 10) -> xr.Dataset:
    """How much of the final weights' top singular directions a lottery ticket's mask keeps
    (SPEC §4): SVA (Eqn 5) between ``W_T``, the final checkpoint of the run the mask came from,
    and ``m ⊙ W_T``, per masked weight matrix.

    Parameters
    ----------
    run : path
        A ticket run (`specan train vgg --ticket ... --from SOURCE`): its ``mask.safetensors``
        and run.json's ``parent`` (the source run and the step of its checkpoint that gave the
        mask).
    top : int
        The score is the mean of the first `top` diagonal entries ``S_ii``.

    Returns
    -------
    xarray.Dataset
        ``score`` and ``density`` (the fraction the mask keeps) on ``view`` (the masked
        parameters, model order); attrs ``ticket``, ``sparsity``, ``source``, ``step`` and
        ``mean`` (the score's mean over the masked weight matrices).
    """
    import numpy as np
    import xarray as xr
    from safetensors.torch import load_file

    from specan import losses, runfile, runs
    from specan.errors import ModelError
    from specan.lmc import endpoint_sva
    from specan_trainers.checkpoint import mask_path

    meta = runfile.read_config(run)
    parent = meta.get("parent") or {}
    path = mask_path(run)
    if not path.is_file() or "mask_from" not in parent:
        raise ModelError(
            f"{path}: not a lottery-ticket run (write one with `specan train vgg --ticket`)"
        )
    masks = load_file(str(path))
    source = Path(parent["run"])
    ckpt = [c for c in runs.discover(source).checkpoints if c.step == parent["mask_from"]]
    if not ckpt:
        raise ModelError(f"{source}: the checkpoint at step {parent['mask_from']} is gone")
    rm = losses.load(run)
    with runs.CheckpointReader(ckpt[0]) as reader:
        final = {k: reader.get(k).double() for k in masks}
    masked = {k: final[k] * masks[k].double() for k in masks}
    scores = endpoint_sva(final, masked, family=rm.family, rules=rm.rules, top=top)
    views = list(scores)
    return xr.Dataset(
        {
            "score": ("view", np.array([scores[v] for v in views])),
            "density": ("view", np.array([float(masks[v].mean()) for v in views])),
        },
        coords={"view": views},
        attrs={"ticket": parent.get("ticket", ""), "sparsity": parent.get("sparsity", np.nan),
               "source": str(source), "step": int(parent["mask_from"]),
               "mean": float(np.mean([scores[v] for v in views]))},
    )  # fmt: skip


def _compute(run: Run, *, progress: Any = None, device: str = "cpu") -> xr.Dataset:
    steps = set(run.steps.tolist())
    return prune_losses(run.path, steps=steps, device=device, progress=progress)


ANALYSIS = Analysis(
    name="prune",
    title="training loss of SV-pruned models",
    reads=(),
    compute=_compute,
    item="keep",
    summary="training loss, mean of full, top-half and bottom-half",
    figure="lines",
    automatic=False,  # it re-evaluates 3 models per checkpoint: `specan prune` computes it
)
