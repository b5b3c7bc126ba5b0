"""Grokking: a one-layer transformer learns (a + b) mod p from a fraction of all pairs.

The paper's setting (SPEC §4): p = 113, 30 % of the pairs for training, full-batch AdamW with
weight decay 1.0, 40 000 steps; with weight decay 0 the model memorises and never generalises.
Nothing to download: the data is every pair (a, b). Run as

    python -m specan_trainers.grokking --out runs/grok-wd1
    python -m specan_trainers.grokking --wd 0 --out runs/grok-wd0
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from specan_trainers.checkpoint import (
    RunWriter,
    parse_config,
    resolve_device,
    run_main,
    save_steps,
)


@dataclass
class Config:
    p: int = 113  # modulus; tokens are 0..p-1 and "=" (token p)
    train_frac: float = 0.3  # fraction of the p*p pairs used for training
    d_model: int = 128  # residual width
    n_heads: int = 4  # attention heads (head dim = d_model / n_heads = 32)
    d_mlp: int = 512  # MLP hidden width (ReLU)
    lr: float = 1e-3  # AdamW learning rate, constant
    wd: float = 1.0  # AdamW weight decay: 1.0 groks, 0 memorises
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    steps: int = 40000  # full-batch optimisation steps
    eval_every: int = 100  # evaluate (train and validation loss/accuracy) every N steps
    save_every: int = 100  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    seed: int = 0  # data split and initialisation
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/grokking"  # the run directory written


# -- model ------------------------------------------------------------------------------------
class Block(nn.Module):
    """Attention and MLP without LayerNorm, named as torch's TransformerEncoderLayer."""

    def __init__(self, d: int, heads: int, d_mlp: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1 = nn.Linear(d, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only the last position ("=") is read out, and with one layer nothing else depends on
        # the other positions' outputs: computing attention for the last query alone is exact.
        attn, _ = self.self_attn(x[:, -1:], x, x, need_weights=False)
        h = x[:, -1] + attn[:, 0]
        return h + self.linear2(F.relu(self.linear1(h)))


class Grokker(nn.Module):
    """Token embedding x sqrt(d) + sinusoids, one block, an untied decoder over all p + 1 tokens.

    Initialised as the paper's code (modular_addition/model.py, after torch's word-language-model
    tutorial): embedding and decoder weights U(-0.1, 0.1), decoder bias 0, the block torch's
    defaults. The decoder scores "=" too, as there, though it is never a label.
    """

    def __init__(self, p: int, d: int, heads: int, d_mlp: int) -> None:
        super().__init__()
        self.d = d
        self.embed = nn.Embedding(p + 1, d)
        self.blocks = nn.ModuleList([Block(d, heads, d_mlp)])
        self.decoder = nn.Linear(d, p + 1)  # untied, with bias
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # not nn.Embedding's N(0, 1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        pos = torch.arange(3)[:, None] * torch.exp(torch.arange(0, d, 2) * (-math.log(1e4) / d))
        table = torch.zeros(3, d)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pos", table, persistent=False)  # fixed: not a weight to analyse

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d) + self.pos
        (block,) = self.blocks
        return self.decoder(block(x))


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    return Grokker(config["p"], config["d_model"], config["n_heads"], config["d_mlp"])


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive layers for alignment (SPEC §3, Transformer)."""
    attn = "blocks.0.self_attn"
    return [
        {"prev": "embed.weight", "next": f"{attn}.in_proj_weight", "kind": "embedding"},
        {"prev": f"{attn}.in_proj_weight", "next": f"{attn}.in_proj_weight", "kind": "qk"},
        {"prev": f"{attn}.in_proj_weight", "prev_part": "v", "next": f"{attn}.out_proj.weight",
         "kind": "linear"},
        {"prev": f"{attn}.out_proj.weight", "next": "blocks.0.linear1.weight", "kind": "linear"},
        {"prev": "blocks.0.linear1.weight", "next": "blocks.0.linear2.weight", "kind": "linear"},
        {"prev": "blocks.0.linear2.weight", "next": "decoder.weight", "kind": "linear"},
    ]  # fmt: skip


# -- data -------------------------------------------------------------------------------------
def make_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every [a, b, =] with its label (a + b) mod p, split by a seeded permutation."""
    p = config["p"]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.flatten(), b.flatten(), torch.full((p * p,), p)], dim=1)
    y = (x[:, 0] + x[:, 1]) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(config["seed"]))
    n_train = int(config["train_frac"] * p * p)
    tr, va = perm[:n_train], perm[n_train:]
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[va], "y_val": y[va]}


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training and validation sets of a run (for `specan_trainers.eval_data`)."""
    return make_data(config)


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for split in ("train", "val"):
        logits = model(data[f"x_{split}"])
        y = data[f"y_{split}"]
        out[f"{split}_loss"] = F.cross_entropy(logits, y).item()
        out[f"{split}_acc"] = (logits.argmax(-1) == y).float().mean().item()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.grokking",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # once memorised, denormals made CPU steps 2-3x slower
    device = resolve_device(cfg.device)
    data = {k: v.to(device) for k, v in make_data(config).items()}
    model = build_model(config).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.wd, betas=(cfg.beta1, cfg.beta2)
    )
    writer = RunWriter(
        cfg.out, trainer="grokking", config=config, pairs=pairs(config),
        model={"n_heads": cfg.n_heads, "d_model": cfg.d_model},
    )  # fmt: skip
    saves = save_steps(cfg.steps, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
    start = writer.resume(model, opt)
    if start is None:
        start = 0
        writer.log({"step": 0, **evaluate(model, data)})
        writer.save(model, 0, optimizer=opt)
    else:
        print(f"resuming {cfg.out} from step {start}")
    # -- training loop: full batch
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        model.train()
        loss = F.cross_entropy(model(data["x_train"]), data["y_train"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step in saves:
            model.eval()
            metrics = {"step": step, **evaluate(model, data)}
            writer.log(metrics)
            print(
                f"step {step:6d}  train {metrics['train_loss']:.4f} ({metrics['train_acc']:.3f})"
                f"  val {metrics['val_loss']:.4f} ({metrics['val_acc']:.3f})"
                f"  {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
        if step in saves:
            writer.save(model, step, optimizer=opt)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
