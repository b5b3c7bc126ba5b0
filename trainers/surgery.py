"""Weight edits of the paper's §7 protocols (SPEC §4): perturbed branches and lottery tickets.

Both act on the model's ≥2-D parameters in `named_parameters` order, the last one (the output
layer) left out, as the paper's code (its `ModelPerturber`, `ModelMasker`) does.

- `perturb_`: for each such weight ``ε ~ N(0, I)``, ``ε ← ε/‖ε‖``, ``W' = W + η‖W‖ε``, then
  ``W' ← ‖W‖·W'/‖W'‖`` (Frobenius norms; the norm is restored). The noise is drawn on the CPU
  from a generator the caller seeds (the paper seeds it with the branch's seed, so each branch
  of a split gets its own perturbation).
- `magnitude_masks`: one global threshold over all those weights' magnitudes (not per layer),
  keeping the entries strictly above it; `random_masks`: i.i.d. Bernoulli per layer with each
  layer's density in the magnitude masks; `apply_masks_`: weights (and gradients) multiplied by
  their masks, after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "apply_masks_",
    "edited_params",
    "magnitude_masks",
    "mask_density",
    "perturb_",
    "random_masks",
]


def edited_params(
    shapes: Mapping[str, tuple[int, ...]], *, skip_embeddings: bool = False, embeddings=()
) -> list[str]:
    """The parameters the protocols edit: every ≥2-D one in the given (model) order but the
    last. `skip_embeddings` also leaves out the names in `embeddings` (the paper's text spares a
    Transformer's input embedding when perturbing; its code does not)."""
    names = [n for n, s in shapes.items() if len(s) >= 2][:-1]
    if skip_embeddings:
        names = [n for n in names if n not in set(embeddings)]
    return names


def embedding_params(model: torch.nn.Module) -> list[str]:
    """The weights of the model's `nn.Embedding` layers."""
    from torch import nn

    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
            if isinstance(m, nn.Embedding)]  # fmt: skip


def perturb_(
    model: torch.nn.Module, eta: float, *, generator: torch.Generator, skip_embeddings: bool = False
) -> list[str]:
    """Perturb the model's weights in place (see the module docs); returns the names perturbed.

    The arithmetic is done in float64 on the CPU and cast back, so ‖W'‖ = ‖W‖ to the weight's own
    precision. ``eta = 0`` draws the noise all the same (the generator advances alike) and leaves
    the weights as they are.
    """
    import torch

    params = dict(model.named_parameters())
    names = edited_params(
        {n: tuple(p.shape) for n, p in params.items()},
        skip_embeddings=skip_embeddings,
        embeddings=embedding_params(model),
    )
    with torch.no_grad():
        for name in names:
            p = params[name]
            eps = torch.normal(0.0, 1.0, size=tuple(p.shape), generator=generator)
            eps = eps.double() / eps.double().norm()
            w = p.detach().cpu().double()
            norm = w.norm()
            new = w + eta * norm * eps
            p.copy_((norm * new / new.norm()).to(p.dtype))
    return names


def magnitude_masks(state: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks over the edited weights of `state` (`edited_params`, in the
    state's order): the threshold is the ``⌊density·N⌋``-th largest magnitude among all N of
    their entries, and an entry is kept when its magnitude is strictly greater (the paper's
    code), so slightly fewer than ``density·N`` survive. Masks are float 0/1 tensors."""
    import torch

    if not 0.0 < density <= 1.0:
        raise ValueError(f"mask density must be in (0, 1], not {density}")
    names = edited_params({k: tuple(v.shape) for k, v in state.items()})
    if not names:
        raise ValueError("no weight to mask: the model has one ≥2-D parameter or none")
    magnitudes = torch.cat([state[k].detach().flatten().abs().cpu() for k in names]).sort()[0]
    keep = max(int(density * len(magnitudes)), 1)
    threshold = magnitudes[-keep]
    return {k: (state[k].detach().abs().cpu() > threshold).float() for k in names}


def random_masks(
    reference: Mapping[str, torch.Tensor], *, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The control: for each mask of `reference`, i.i.d. Bernoulli entries with that mask's
    density (``rand < density``)."""
    import torch

    out = {}
    for k, m in reference.items():
        density = float(m.sum()) / m.numel()
        out[k] = (torch.rand(tuple(m.shape), generator=generator) < density).float()
    return out


def mask_density(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of entries each mask keeps."""
    return {k: float(m.sum()) / m.numel() for k, m in masks.items()}


def apply_masks_(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Multiply the masked weights, and their gradients when present, by their masks in place.
    `masks` must already be on the model's device."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            p = params[k]
            p.mul_(m)
            if p.grad is not None:
                p.grad.mul_(m)
