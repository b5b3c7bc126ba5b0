"""Losses of models rebuilt from a run, for the analyses that need them (pruning, LMC).

A run written by specan's trainers names its trainer and config in run.json; the trainer's
``build_model(config)``, ``eval_data(config)`` and ``evaluate(model, data)`` rebuild the model,
its own training and validation data (``--data`` as at training, or the built-in data) and the
loss it logged while training, evaluated in batches. Batch-norm statistics of an edited model
(pruned, interpolated) are re-estimated on the training data (`reestimate_bn`). Only the standard
library is imported at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specan.errors import ModelError

if TYPE_CHECKING:
    from types import ModuleType

    import torch

__all__ = ["RunModel", "load", "reestimate_bn", "state_of"]

BN_BATCH = 500  # examples per forward pass when batch-norm statistics are re-estimated


@dataclass
class RunModel:
    """A run's trainer module, config, a model of its architecture and its evaluation data;
    `family` and `rules` (run.json's ``view_rules``) plan its views as ingest does."""

    trainer: ModuleType
    config: dict[str, Any]
    family: str
    model: torch.nn.Module
    data: dict[str, torch.Tensor]
    rules: dict[str, str] = field(default_factory=dict)

    def evaluate(self, state: dict[str, torch.Tensor], *, bn: bool) -> dict[str, float]:
        """Load `state` into the model, re-estimate batch norm when `bn`, and return the trainer's
        losses and accuracies (``train_loss``, ``val_loss``, ...), evaluated in eval mode."""
        self.model.load_state_dict(state)
        if bn:
            reestimate_bn(self.model, self.data["x_train"])
        return dict(self.trainer.evaluate(self.model.eval(), self.data))


def load(run: Path | str, *, device: str = "cpu") -> RunModel:
    """Rebuild the model and the evaluation data of a trainer-written run folder."""
    from specan import runfile
    from specan.views import FAMILIES

    meta = runfile.read_config(run)
    if not meta or "trainer" not in meta:
        raise ModelError(
            f"{Path(run) / 'run.json'}: no trainer named (losses need a run written by "
            "`specan train`, whose trainer rebuilds the model)"
        )
    import torch

    import specan_trainers

    try:
        module = specan_trainers.trainer_module(meta["trainer"])
    except ValueError as e:
        raise ModelError(f"{Path(run) / 'run.json'}: {e}") from None
    config = meta["config"]
    family = (meta.get("model") or {}).get("family", "auto")
    dev = torch.device(device)
    data = {k: v.to(dev) for k, v in module.eval_data(config).items()}
    model = module.build_model(config).to(dev)
    family = family if family in FAMILIES else "auto"
    return RunModel(module, config, family, model, data, dict(meta.get("view_rules") or {}))


def state_of(reader: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state entries read from a `specan.runs.CheckpointReader`, in the dtypes and on
    the device of the model's own entries (integer buffers such as ``num_batches_tracked``
    stay integers)."""
    own = model.state_dict()
    return {k: reader.get(k).to(device=v.device, dtype=v.dtype) for k, v in own.items()}


def reestimate_bn(model: torch.nn.Module, x: torch.Tensor, *, batch: int = BN_BATCH) -> bool:
    """Recompute every batch-norm layer's running statistics on inputs `x`.

    The statistics are reset, then forward passes in train mode without gradients run over `x`
    in batches of `batch`, with a cumulative average (momentum None): the running mean is the
    mean of the batch means, the running variance the mean of the unbiased batch variances. The
    model's mode and the layers' momentum are restored. Group and layer norm keep no running
    statistics: nothing is done for them (SPEC Eqn 6). Returns whether any layer was updated.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return False
    momenta = [m.momentum for m in layers]
    training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(training)
    return True
