"""Random labels: an MLP on CIFAR-10 with true or randomly permuted labels.

The paper's setting (SPEC §4): MLP 3072 -> 256 -> 256 -> 256 -> 10 (ReLU, PyTorch's default init),
cross-entropy, SGD with momentum 0.9 and a constant lr 1e-3, batch 128, 300 epochs. With
``--random-labels`` the training labels are one fixed permutation of the true ones (seed 12345),
applied before 10 % of the training set is held out for validation (seed 42, as the VGG run), so
the held-out labels are permuted too and validation accuracy stays at chance. Inputs are scaled to
[0, 1] and standardised per channel with CIFAR-10's usual means and deviations (the text does not
say; weight decay defaults to 0, and `--wd` runs the sweep). Run as

    python -m specan_trainers.random_labels --data ~/data/cifar-10-batches-bin \\
        --out runs/true-labels
    python -m specan_trainers.random_labels --data ~/data/cifar-10-batches-bin --random-labels \\
        --out runs/random-labels
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from specan_trainers import data as datasets
from specan_trainers.checkpoint import (
    RunWriter,
    parse_config,
    resolve_device,
    run_main,
    save_steps,
)


@dataclass
class Config:
    data: str = ""  # cifar-10-batches-bin folder; empty: the built-in digits, as 3x32x32
    random_labels: bool = False  # permute the labels (seed 12345) before the validation split
    val_frac: float = 0.1  # fraction of the training set held out for validation (seed 42)
    limit_train: int = 0  # train on only the first N training examples (0: all)
    width: int = 256  # hidden width of the three hidden layers
    epochs: int = 300  # passes over the training set
    batch_size: int = 128  # examples per step
    lr: float = 1e-3  # SGD learning rate, constant
    momentum: float = 0.9  # SGD momentum
    wd: float = 0.0  # SGD weight decay
    max_steps: int = 0  # stop after N steps (0: run every epoch)
    eval_every: int = 0  # evaluate every N steps (0: at the end of every epoch)
    save_every: int = 0  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    save_per_epoch: bool = True  # also checkpoint at the end of every epoch
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/random-labels"  # the run directory written


# -- model ------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    return MLP([3 * 32 * 32, config["width"], config["width"], config["width"], 10])


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive Linear layers, the output layer the last "next" (SPEC §3, MLP)."""
    names = [f"layers.{i}.weight" for i in range(4)]
    return [{"prev": a, "next": b, "kind": "linear"} for a, b in pairwise(names)]


# -- data -------------------------------------------------------------------------------------
def make_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CIFAR-10's training set, labels permuted if asked, then split: train and validation."""
    return datasets.cifar_split(
        config["data"],
        val_frac=config["val_frac"],
        limit_train=config["limit_train"],
        permute_labels=config["random_labels"],  # before the split, as the paper
    )


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training and validation sets of a run (for `specan_trainers.eval_data`)."""
    return make_data(config)


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for split in ("train", "val"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        loss = correct = 0.0
        for i in range(0, len(y), 1000):
            logits = model(x[i : i + 1000])
            loss += F.cross_entropy(logits, y[i : i + 1000], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i : i + 1000]).sum().item()
        out[f"{split}_loss"] = loss / max(len(y), 1)
        out[f"{split}_acc"] = correct / max(len(y), 1)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.random_labels",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # denormal floats make CPU steps several times slower
    device = resolve_device(cfg.device)
    data = {k: v.to(device) for k, v in make_data(config).items()}
    n = len(data["y_train"])
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    model = build_model(config).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    writer = RunWriter(
        cfg.out, trainer="random-labels", config=config, pairs=pairs(config),
        model={"family": "mlp", "width": cfg.width},
    )  # fmt: skip
    saves = save_steps(total, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
    if cfg.save_per_epoch:
        saves.update(range(0, total + 1, per_epoch))
    eval_every = cfg.eval_every or per_epoch
    start = writer.resume(model, opt)
    if start is None:
        start = 0
        writer.log({"step": 0, "epoch": 0.0, **evaluate(model.eval(), data)})
        writer.save(model, 0, epoch=0.0, optimizer=opt)
    else:
        print(f"resuming {cfg.out} from step {start}")
    # -- training loop: epoch e shuffles with seed + e, so a resumed run draws the same batches
    t0 = time.perf_counter()
    order = None
    for step in range(start + 1, total + 1):
        epoch, batch = divmod(step - 1, per_epoch)
        if order is None or batch == 0:
            gen = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(n, generator=gen).to(device)
        idx = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
        model.train()
        loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step in saves:
            metrics = {"step": step, "epoch": step / per_epoch, **evaluate(model.eval(), data)}
            writer.log(metrics)
            print(
                f"step {step:6d}  epoch {step / per_epoch:7.2f}"
                f"  train {metrics['train_loss']:.4f} ({metrics['train_acc']:.3f})"
                f"  val {metrics['val_loss']:.4f} ({metrics['val_acc']:.3f})"
                f"  {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
        if step in saves:
            writer.save(model, step, epoch=step / per_epoch, optimizer=opt)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
