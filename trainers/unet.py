"""UNet diffusion: a residual UNet learns to predict the noise added to MNIST digits (DDPM).

The paper's setting (SPEC §4, appendix D.2): the 4-level residual UNet of Wang & Vastola (2022) —
convolutions down (stride 2), transposed convolutions up, additive skips, group norm, swish, a
time embedding fed to every level through its own Linear — with channels 64/128/256/512, trained
for ε-prediction (MSE) over 1000 diffusion steps; AdamW, batch 128, lr 3e-4, weight decay 0, 100
epochs. As the paper's code (image_generation/model.py): the time embedding is a Gaussian Fourier
projection of the integer step (sin and cos of 256 fixed random frequencies ~ N(0, 30²): 512
features) and a Linear; the betas follow a sigmoid, sigmoid(linspace(-6, 6, T)) · (5e-3 − 1e-5)
+ 1e-5. Without --data it trains on scikit-learn's bundled digits upsampled to 28×28 (no
download). Run as

    python -m specan_trainers.unet --data ~/data/mnist --out runs/unet
    python -m specan_trainers.unet --channels 16,32 --epochs 2 --out runs/unet-tiny
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
    data: str = ""  # MNIST IDX folder; empty: the bundled 8x8 digits upsampled to 28x28
    val_frac: float = 0.1  # fraction of the training set held out for validation (seed 42)
    limit_train: int = 0  # train on only the first N training images (0: all)
    channels: str = "64,128,256,512"  # channels of each resolution level, comma-separated
    embed_dim: int = 512  # width of the time embedding (Gaussian Fourier features, then a Linear)
    diffusion_steps: int = 1000  # diffusion steps T
    beta_min: float = 1e-5  # sigmoid beta schedule: betas run from about beta_min ...
    beta_max: float = 5e-3  # ... to about beta_max, sigmoid(linspace(-6, 6, T)) in between
    epochs: int = 100  # passes over the training set
    batch_size: int = 128  # images per step
    lr: float = 3e-4  # AdamW learning rate, constant
    wd: float = 0.0  # AdamW weight decay
    max_steps: int = 0  # stop after N steps (0: train all epochs)
    eval_every: int = 500  # evaluate (train and validation loss) every N steps
    save_every: int = 1000  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    seed: int = 0  # initialisation, batch order, noise
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/unet"  # the run directory written


# -- model ------------------------------------------------------------------------------------
def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def fourier_features(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Gaussian Fourier features of integer diffusion steps, [B] -> [B, 2 * len(freqs)]."""
    angles = t.float()[:, None] * freqs[None] * (2 * math.pi)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class UNet(nn.Module):
    """Wang & Vastola's UNet_res for any number of levels.

    Level k: ``convs[k]`` (stride 1 for k = 0, else 2) + ``denses[k]``(time), group norm, swish,
    output h_k. Up, from the deepest level: ``tconvs[k]`` takes h_{k} (deepest) or the previous
    output plus the skip h_k, adds ``tdenses[k]``(time), norm, swish; ``tconvs[0]`` gives ε.
    """

    def __init__(self, channels: list[int], embed_dim: int) -> None:
        super().__init__()
        # fixed random frequencies, not trained; a buffer, so every checkpoint carries them
        self.register_buffer("time_freqs", torch.randn(embed_dim // 2) * 30.0)
        self.time_linear = nn.Linear(embed_dim, embed_dim)
        c_in = [1, *channels[:-1]]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in[k], c, 3, stride=1 if k == 0 else 2, bias=False)
            for k, c in enumerate(channels)
        )
        self.denses = nn.ModuleList(nn.Linear(embed_dim, c) for c in channels)
        self.norms = nn.ModuleList(nn.GroupNorm(math.gcd(32 if k else 4, c), c)
                                   for k, c in enumerate(channels))  # fmt: skip
        # tconvs[k] undoes convs[k]: channels[k] -> c_in[k]; the last one (k = 0) outputs ε
        self.tconvs = nn.ModuleList(
            nn.ConvTranspose2d(c, c_in[k], 3, stride=1 if k == 0 else 2, bias=k == 0)
            for k, c in enumerate(channels)
        )
        self.tdenses = nn.ModuleList(nn.Linear(embed_dim, c_in[k]) for k in range(1, len(channels)))
        self.tnorms = nn.ModuleList(
            nn.GroupNorm(math.gcd(32, c_in[k]), c_in[k]) for k in range(1, len(channels))
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = swish(self.time_linear(fourier_features(t, self.time_freqs)))
        skips, sizes, h = [], [], x
        for conv, dense, norm in zip(self.convs, self.denses, self.norms, strict=True):
            sizes.append(h.shape[-2:])
            h = swish(norm(conv(h) + dense(emb)[:, :, None, None]))
            skips.append(h)
        h = skips.pop()
        for k in range(len(self.convs) - 1, 0, -1):
            h = self.tconvs[k](h, output_size=sizes[k])
            h = swish(self.tnorms[k - 1](h + self.tdenses[k - 1](emb)[:, :, None, None]))
            h = h + skips.pop()  # the additive skip from convs[k - 1]
        return self.tconvs[0](h, output_size=sizes[0])


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    return UNet([int(c) for c in config["channels"].split(",")], config["embed_dim"])


def view_rules(config: dict[str, Any]) -> dict[str, str]:
    """Every transposed convolution: its weight is stored (c_in, c_out, kh, kw)."""
    n = len(config["channels"].split(","))
    return {f"tconvs.{k}.weight": "conv_transpose" for k in range(n)}


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Alignment pairs (SPEC §3, UNet), the list and order of the paper's `inter_layer_pairs`.

    Level k's output h_k = conv_k(x) + dense_k(time) feeds conv_{k+1} (the deepest feeds
    tconv_top) and, through the additive skip, tconv_k: so both conv_k and dense_k pair with
    each. The up path's time projections (tdenses) and the time Linear are in no pair, as there.
    """
    n = len(config["channels"].split(","))
    conv, tconv, dense = "convs.{}.weight", "tconvs.{}.weight", "denses.{}.weight"
    down = [conv.format(k) for k in range(n)] + [tconv.format(n - 1)]
    out = [{"prev": a, "next": b, "kind": "conv"} for a, b in itertools.pairwise(down[:-1])]
    out += [{"prev": dense.format(k), "next": down[k + 1], "kind": "time"} for k in range(n)]
    out.append({"prev": down[-2], "next": down[-1], "kind": "conv"})  # the bottom of the U
    out += [{"prev": tconv.format(k), "next": tconv.format(k - 1), "kind": "conv"}
            for k in range(n - 1, 0, -1)]  # fmt: skip
    for k in range(n - 1):  # the additive skips: h_k joins tconv_k's input
        out += [{"prev": conv.format(k), "next": tconv.format(k), "kind": "skip"},
                {"prev": dense.format(k), "next": tconv.format(k), "kind": "skip"}]  # fmt: skip
    return out


# -- data -------------------------------------------------------------------------------------
# MNIST's usual pixel mean and deviation: the paper's code standardises with them (not to [-1, 1])
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_images(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 1, 28, 28] training and validation images.

    As the paper's code: validation is 10 % of MNIST's training set held out (seed 42), and its
    test set is not used. The built-in digits are split the same way.
    """
    if config["data"]:
        images, _ = datasets.read_mnist(config["data"], "train")
        images = images[:, None]
    else:
        images, _ = datasets.digits_images(size=28)
    train, val = datasets.split_validation(len(images), config["val_frac"], seed=42)
    if config["limit_train"] > 0:
        train = train[: config["limit_train"]]
    return images[train], images[val]


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole training split and the validation split, with fixed diffusion steps and noise.

    The diffusion loss is an expectation over t and ε; drawing them once (seed 0) makes L(W) a
    deterministic function of the weights, as an LMC barrier needs (SPEC §2, Eqn 6).
    """
    gen = torch.Generator().manual_seed(0)
    out = {}
    for split, images in zip(("train", "val"), load_images(config), strict=True):
        x = (torch.from_numpy(images).float() / 255.0 - MNIST_MEAN) / MNIST_STD
        out[f"x_{split}"] = x
        out[f"t_{split}"] = torch.randint(0, config["diffusion_steps"], (len(x),), generator=gen)
        out[f"noise_{split}"] = torch.randn(x.shape, generator=gen)
    return out


def betas(config: dict[str, Any]) -> torch.Tensor:
    """The paper's sigmoid schedule beta_t, t = 0..T-1, in float64."""
    x = torch.linspace(-6, 6, config["diffusion_steps"], dtype=torch.float64)
    return torch.sigmoid(x) * (config["beta_max"] - config["beta_min"]) + config["beta_min"]


def alpha_bars(config: dict[str, Any]) -> torch.Tensor:
    """Cumulative products of (1 - beta_t), t = 0..T-1, float64 for accuracy."""
    return torch.cumprod(1 - betas(config), dim=0)


def diffusion_loss(
    model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor
) -> torch.Tensor:
    """MSE between the noise and the model's prediction of it from x_t."""
    a = ab[t].float()[:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model(x_t, t), noise)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: dict[str, torch.Tensor], config: dict[str, Any], batch: int = 500
) -> dict[str, float]:
    device = next(model.parameters()).device
    ab = alpha_bars(config).to(device)
    out = {}
    for split in ("train", "val"):
        x, t, noise = data[f"x_{split}"], data[f"t_{split}"], data[f"noise_{split}"]
        if not len(x):
            continue
        total = 0.0
        for i in range(0, len(x), batch):
            args = (v[i : i + batch].to(device) for v in (x, t, noise))
            total += diffusion_loss(model, *args, ab).item() * len(x[i : i + batch])
        out[f"{split}_loss"] = total / len(x)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.unet",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    device = resolve_device(cfg.device)
    data = eval_data(config)
    x_train = data["x_train"].to(device)
    ab = alpha_bars(config).to(device)
    model = build_model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    writer = RunWriter(
        cfg.out, trainer="unet", config=config, pairs=pairs(config), view_rules=view_rules(config)
    )
    per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    planned = cfg.epochs * per_epoch
    total = planned if cfg.max_steps <= 0 else min(cfg.max_steps, planned)
    saves = save_steps(total, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
    start = writer.resume(model, opt)
    if start is None:
        start = 0
        writer.log({"step": 0, "epoch": 0.0, **evaluate(model, data, config)})
        writer.save(model, 0, epoch=0.0, optimizer=opt)
    else:
        print(f"resuming {cfg.out} from step {start}")
    # -- training loop: epochs of shuffled batches; a resumed run skips the batches it did
    t0 = time.perf_counter()
    step = start
    for epoch in range(start // per_epoch, cfg.epochs):
        order = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(cfg.seed + epoch)
        )
        for i in range(per_epoch):
            if epoch * per_epoch + i < start:
                continue
            if step >= total:
                break
            step += 1
            model.train()
            x0 = x_train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)]
            t = torch.randint(0, cfg.diffusion_steps, (len(x0),)).to(device)  # CPU RNG: resumable
            noise = torch.randn(x0.shape).to(device)
            loss = diffusion_loss(model, x0, t, noise, ab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ep = step / per_epoch
            if step % cfg.eval_every == 0 or step in saves:
                model.eval()
                metrics = {"step": step, "epoch": ep, **evaluate(model, data, config)}
                writer.log(metrics)
                val = f"  val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
                print(
                    f"step {step:6d}  epoch {ep:7.2f}  train {metrics['train_loss']:.4f}{val}"
                    f"  {time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )
            if step in saves:
                writer.save(model, step, epoch=ep, optimizer=opt)
        if step >= total:
            break


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
