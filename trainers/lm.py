"""Language model: a pre-LN Transformer learns next-byte prediction on a plain-text corpus.

The paper's setting (SPEC §4, appendix D.4), after Pythia-160m: 12 layers, d 768, 12 heads, MLP
width 768, ReLU, pre-LN without a final LayerNorm, untied embeddings, embedding x sqrt(d) plus
sinusoidal positions, initialised as the grokking model; Wikitext-103 with context 2048, AdamW (lr
6e-4, betas 0.9/0.95, weight decay 0.1 on every parameter), batch 256, gradient clipping at 1.0,
200 linear warmup steps then a cosine to 10 % of the learning rate, 10 epochs. Tokens are UTF-8
bytes (`specan_trainers.data.ByteTokenizer`: nothing to download); without --data it trains
on seeded order-2 Markov sequences. Run as

    python -m specan_trainers.lm --data ~/data/wikitext-103/wiki.train.tokens \\
        --val-data ~/data/wikitext-103/wiki.valid.tokens --micro-batch 16 --device cuda \\
        --out runs/lm
    python -m specan_trainers.lm --d-model 64 --n-layers 2 --n-heads 2 --d-mlp 64 --context 64 \\
        --batch-size 32 --epochs 2 --out runs/lm-tiny
"""

from __future__ import annotations

import dataclasses
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

VOCAB = datasets.ByteTokenizer.vocab_size  # 256, for text and synthetic data alike


@dataclass
class Config:
    data: str = ""  # UTF-8 text file or folder of *.txt; empty: synthetic Markov sequences
    val_data: str = ""  # the same for validation; empty: none (synthetic: a tenth more sequences)
    n_synthetic: int = 2000  # training sequences generated when --data is empty
    d_model: int = 768  # residual width
    n_layers: int = 12  # Transformer blocks
    n_heads: int = 12  # attention heads per block
    d_mlp: int = 768  # MLP hidden width (ReLU)
    context: int = 2048  # tokens per training sequence
    epochs: int = 10  # passes over the training sequences
    batch_size: int = 256  # sequences per optimiser step
    micro_batch: int = 0  # sequences per forward pass, accumulating gradients (0: whole batch)
    lr: float = 6e-4  # AdamW peak learning rate
    min_lr: float = 6e-5  # the cosine decays to this (a tenth of lr, as Pythia)
    warmup: int = 200  # linear warmup steps
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    wd: float = 0.1  # AdamW weight decay, on every parameter (biases and norms too)
    clip: float = 1.0  # gradient norm clipping (0: off)
    max_steps: int = 0  # stop after N steps (0: train all epochs; the schedule still spans them)
    eval_every: int = 100  # evaluate (loss on 1000 training and the validation sequences)
    save_every: int = 200  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/lm"  # the run directory written


# -- model ------------------------------------------------------------------------------------
def sinusoids(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length)[:, None] * torch.exp(torch.arange(0, d, 2) * (-math.log(1e4) / d))
    table = torch.zeros(length, d)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos), torch.cos(pos)
    return table


class LM(nn.Module):
    """Embedding x sqrt(d) + sinusoids, pre-LN blocks (torch's own layer), decoder.

    As the paper's code (language_modeling/model.py): torch's TransformerEncoder without a final
    norm, so the last block's output goes straight to the decoder; embedding and decoder weights
    U(-0.1, 0.1), decoder bias 0, the blocks torch's defaults.
    """

    def __init__(self, d: int, n_layers: int, heads: int, d_mlp: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, d_mlp, dropout=0.0, activation="relu", norm_first=True, batch_first=True
            )
            for _ in range(n_layers)
        )
        self.decoder = nn.Linear(d, VOCAB)  # untied
        self.d = d
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # not nn.Embedding's N(0, 1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.register_buffer("pos", sinusoids(context, d), persistent=False)  # not a weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.d) + self.pos[:n]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.decoder(x)


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    c = config
    return LM(c["d_model"], c["n_layers"], c["n_heads"], c["d_mlp"], c["context"])


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive layers for alignment (SPEC §3, Transformer)."""
    n = config["n_layers"]
    out = [
        {"prev": "embed.weight", "next": "layers.0.self_attn.in_proj_weight", "kind": "embedding"}
    ]
    for i in range(n):
        attn, blk = f"layers.{i}.self_attn", f"layers.{i}"
        nxt = f"layers.{i + 1}.self_attn.in_proj_weight" if i + 1 < n else "decoder.weight"
        out += [
            {"prev": f"{attn}.in_proj_weight", "next": f"{attn}.in_proj_weight", "kind": "qk"},
            {"prev": f"{attn}.in_proj_weight", "prev_part": "v", "next": f"{attn}.out_proj.weight",
             "kind": "linear"},
            {"prev": f"{attn}.out_proj.weight", "next": f"{blk}.linear1.weight", "kind": "linear"},
            {"prev": f"{blk}.linear1.weight", "next": f"{blk}.linear2.weight", "kind": "linear"},
            {"prev": f"{blk}.linear2.weight", "next": nxt, "kind": "linear"},
        ]  # fmt: skip
    return out


def make_optimizer(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on every parameter, biases and norms included (the paper's code)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.wd, betas=(cfg.beta1, cfg.beta2))


# -- data -------------------------------------------------------------------------------------
def chunks(tokens: np.ndarray, context: int) -> torch.Tensor:
    """Non-overlapping windows of context + 1 tokens (inputs and shifted targets), uint8."""
    n = (len(tokens) - 1) // context
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None]
    return torch.from_numpy(tokens[idx].astype(np.uint8))


def load_sequences(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, context + 1] training and validation sequences."""
    ctx = config["context"]
    if config["data"]:
        tok = datasets.ByteTokenizer()
        train = chunks(tok.encode(datasets.read_text(config["data"])), ctx)
        if not len(train):
            raise datasets.DataError(
                f"{config['data']}: shorter than one context ({ctx + 1} bytes)"
            )
        val = config["val_data"]
        return train, (chunks(tok.encode(datasets.read_text(val)), ctx) if val else train[:0])
    n = config["n_synthetic"]
    seqs = datasets.synthetic_sequences(n + n // 10, ctx + 1, VOCAB, seed=0)  # one chain for both
    seqs = torch.from_numpy(seqs.astype(np.uint8))
    return seqs[:n], seqs[n:]


def eval_subset(train: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fixed 1000-sequence training subset (SPEC §2, Eqn 6) and the validation sequences."""
    keep = np.sort(np.random.default_rng(0).permutation(len(train))[:1000])
    return {"x_train": train[torch.from_numpy(keep)], "x_val": val}


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The run's evaluation data (for `specan_trainers.eval_data`): see `eval_subset`."""
    return eval_subset(*load_sequences(config))


def lm_loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over a batch of uint8 [B, context + 1] sequences."""
    seqs = seqs.long()
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(
    model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 16
) -> dict[str, float]:
    device = next(model.parameters()).device
    out = {}
    for split in ("train", "val"):
        x = data[f"x_{split}"]
        if not len(x):
            continue
        total = sum(
            lm_loss(model, x[i : i + batch_size].to(device)).item() * len(x[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        )
        out[f"{split}_loss"] = total / len(x)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.lm",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    device = resolve_device(cfg.device)
    train, val = load_sequences(config)
    data = eval_subset(train, val)
    model = build_model(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    writer = RunWriter(
        cfg.out, trainer="lm", config=config, pairs=pairs(config),
        model={"n_heads": cfg.n_heads, "d_model": cfg.d_model},
    )  # fmt: skip
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    planned = cfg.epochs * per_epoch  # the schedule spans all epochs, even with --max-steps
    total = planned if cfg.max_steps <= 0 else min(cfg.max_steps, planned)
    saves = save_steps(total, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
    micro = cfg.micro_batch if cfg.micro_batch > 0 else cfg.batch_size
    start = writer.resume(model, opt)
    if start is None:
        start = 0
        writer.log({"step": 0, "epoch": 0.0, **evaluate(model, data)})
        writer.save(model, 0, epoch=0.0, optimizer=opt)
    else:
        print(f"resuming {cfg.out} from step {start}")
    # -- training loop: epochs of shuffled batches; a resumed run skips the batches it did
    t0 = time.perf_counter()
    step = start
    for epoch in range(start // per_epoch, cfg.epochs):
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch)
        )
        for i in range(per_epoch):
            if epoch * per_epoch + i < start:
                continue
            if step >= total:
                break
            step += 1
            model.train()
            if step <= cfg.warmup:  # linear warmup, then a cosine from lr to min_lr
                lr = cfg.lr * step / cfg.warmup
            else:
                progress = (step - cfg.warmup) / max(1, planned - cfg.warmup)
                lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = lr
            seqs = train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            opt.zero_grad(set_to_none=True)
            for j in range(0, len(seqs), micro):  # gradient accumulation over micro-batches
                part = seqs[j : j + micro].to(device)
                (lm_loss(model, part) * len(part) / len(seqs)).backward()
            if cfg.clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            ep = step / per_epoch
            if step % cfg.eval_every == 0 or step in saves:
                model.eval()
                metrics = {"step": step, "epoch": ep, "lr": lr, **evaluate(model, data)}
                writer.log(metrics)
                val_text = f"  val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
                print(
                    f"step {step:6d}  epoch {ep:7.2f}  train {metrics['train_loss']:.4f}{val_text}"
                    f"  {time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )
            if step in saves:
                writer.save(model, step, epoch=ep, optimizer=opt)
        if step >= total:
            break


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
