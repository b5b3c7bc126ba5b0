"""Small trainers that write specan run directories (DESIGN Contract 1), one file per experiment.

`build_model(run)` and `eval_data(run)` rebuild a run's model and evaluation data from its
run.json alone, for the analyses that need losses (LMC, pruning).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

    import torch

# `specan train NAME` -> module trainers.<module>; grows as trainers land.
TRAINERS = {
    "grokking": "grokking",
    "deep-mlp": "deep_mlp",
    "random-labels": "random_labels",
    "vgg": "vgg",
    "unet": "unet",
    "lstm": "lstm",
    "lm": "lm",
}


def trainer_module(name: str) -> ModuleType:
    """The module of a trainer by its CLI name; ValueError lists the known names."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; known: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(f"specan_trainers.{TRAINERS[name]}")


def _run_config(run: Path | str) -> tuple[ModuleType, dict[str, Any]]:
    from specan.runfile import read_config

    meta = read_config(run)
    if not meta:
        path = Path(run) / "run.json"
        raise FileNotFoundError(f"{path}: no run.json (not a run written by specan's trainers)")
    return trainer_module(meta["trainer"]), meta["config"]


def build_model(run: Path | str) -> torch.nn.Module:
    """A freshly initialised model of the run's architecture (load a checkpoint into it)."""
    module, config = _run_config(run)
    return module.build_model(config)


def eval_data(run: Path | str) -> dict[str, torch.Tensor]:
    """The run's training and evaluation data, as its trainer made them."""
    module, config = _run_config(run)
    return module.eval_data(config)
