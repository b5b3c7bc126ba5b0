"""Deep MLP: a 12-layer ReLU MLP with a large initialisation, MSE loss, 2000 MNIST examples.

The paper's setting (SPEC §4; it released no code for this run, so this is from its text): 12
layers, width 400, init scale 8, MSE loss against one-hot targets, 2000 MNIST training examples,
batch 100, weight decay 0.01. The text does not name the optimiser, the step count or how the
scale is applied; those follow Omnigrok (Liu et al. 2023, "grokking on MNIST"), whose setting this
is: AdamW with a constant lr 1e-3, 100 000 steps (5000 epochs of 20 batches), inputs in [0, 1],
and every parameter (weights and biases) of the default PyTorch init multiplied by the scale.
A large init memorises first; weight decay then shrinks the weights and the net generalises late.
Run as

    python -m specan_trainers.deep_mlp --data ~/data/mnist --out runs/deep-mlp
    python -m specan_trainers.deep_mlp --out runs/deep-mlp-digits   # built-in digits, no download
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

import numpy as np
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
    data: str = ""  # MNIST IDX folder; empty: scikit-learn's digits upsampled to 28x28 (built in)
    n_train: int = 2000  # training examples: the first N of the training set
    depth: int = 12  # Linear layers (depth - 1 hidden ReLU layers)
    width: int = 400  # hidden width
    init_scale: float = 8.0  # every parameter's default init is multiplied by this
    epochs: int = 5000  # passes over the training set (5000 x 20 batches = 100 000 steps)
    batch_size: int = 100  # examples per step
    lr: float = 1e-3  # AdamW learning rate, constant
    wd: float = 0.01  # AdamW weight decay
    max_steps: int = 0  # stop after N steps (0: run every epoch)
    eval_every: int = 1000  # evaluate every N steps (0: at the end of every epoch)
    save_every: int = 0  # checkpoint every N steps (0: off)
    save_log: int = 100  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    save_per_epoch: bool = False  # also checkpoint at the end of every epoch
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/deep-mlp"  # the run directory written


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
    sizes = [28 * 28] + [config["width"]] * (config["depth"] - 1) + [10]
    model = MLP(sizes)
    # "Init scale 8": Omnigrok multiplies every parameter of PyTorch's default init, biases too.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(config["init_scale"])
    return model


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive Linear layers, the output layer the last "next" (SPEC §3, MLP)."""
    names = [f"layers.{i}.weight" for i in range(config["depth"])]
    return [{"prev": a, "next": b, "kind": "linear"} for a, b in pairwise(names)]


# -- data -------------------------------------------------------------------------------------
def make_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The first n_train training images in [0, 1] and their labels; validation: MNIST's test set.

    The built-in digits (1797) hold out their last fifth for validation and train on the first
    n_train of the rest.
    """
    if config["data"]:
        images, labels = datasets.read_mnist(config["data"], "train")
        val_images, val_labels = datasets.read_mnist(config["data"], "test")
    else:
        images, labels = datasets.digits_images(size=28)
        n_val = len(images) // 5
        images, val_images = images[:-n_val], images[-n_val:]
        labels, val_labels = labels[:-n_val], labels[-n_val:]
    images, labels = images[: config["n_train"]], labels[: config["n_train"]]

    def pixels(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.reshape(len(x), 1, 28, 28).astype(np.float32) / 255.0)

    return {
        "x_train": pixels(images),
        "y_train": torch.from_numpy(labels),
        "x_val": pixels(val_images),
        "y_val": torch.from_numpy(val_labels),
    }


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training and validation sets of a run (for `specan_trainers.eval_data`)."""
    return make_data(config)


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """MSE against one-hot targets (mean over all outputs, as nn.MSELoss) and accuracy."""
    out = {}
    for split in ("train", "val"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        loss = correct = 0.0
        for i in range(0, len(y), 1000):
            outputs = model(x[i : i + 1000])
            target = F.one_hot(y[i : i + 1000], 10).float()
            loss += F.mse_loss(outputs, target, reduction="sum").item() / 10
            correct += (outputs.argmax(-1) == y[i : i + 1000]).sum().item()
        out[f"{split}_loss"] = loss / len(y)
        out[f"{split}_acc"] = correct / len(y)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.deep_mlp",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # once memorised, denormals made CPU steps 2-3x slower
    device = resolve_device(cfg.device)
    data = {k: v.to(device) for k, v in make_data(config).items()}
    n = len(data["y_train"])
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    model = build_model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    writer = RunWriter(
        cfg.out, trainer="deep-mlp", config=config, pairs=pairs(config),
        model={"family": "mlp", "depth": cfg.depth, "width": cfg.width},
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
        target = F.one_hot(data["y_train"][idx], 10).float()
        loss = F.mse_loss(model(data["x_train"][idx]), target)
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
