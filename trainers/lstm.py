"""LSTM speech recognition: a bidirectional LSTM maps log-mel frames to characters with CTC.

The paper's setting (SPEC §4, appendix D.3): 4 bidirectional LSTM layers of 256 units on 40 log-mel
features, a Linear to 29 outputs (CTC blank, space, apostrophe, a-z), trained on LibriSpeech
train-clean-100 with AdamW (batch 32, lr 3e-4, weight decay 0.1) for 50 epochs, the learning rate
annealed from 1 to 0 by a cosine over the epochs, set once an epoch (the paper's code steps
CosineAnnealingLR(T_max = epochs) at each epoch's end). Features are read from a folder of ``.npy``
arrays with same-stem ``.txt`` transcripts (`specan_trainers.data.read_speech_features`);
without --data it trains on seeded synthetic utterances. Run as

    python -m specan_trainers.lstm --data ~/data/librispeech-100-mel \\
        --val-data ~/data/dev-clean-mel --out runs/lstm
    python -m specan_trainers.lstm --hidden 64 --layers 2 --epochs 5 --out runs/lstm-tiny
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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

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
    data: str = ""  # folder of [T, 40] log-mel .npy + .txt transcripts; empty: synthetic speech
    val_data: str = ""  # the same for validation (dev-clean); empty: none (synthetic: a tenth more)
    n_synthetic: int = 2000  # training utterances generated when --data is empty
    hidden: int = 256  # LSTM units per direction
    layers: int = 4  # stacked bidirectional LSTM layers
    epochs: int = 50  # passes over the training set
    batch_size: int = 32  # utterances per step
    lr: float = 3e-4  # AdamW peak learning rate, cosine-annealed to 0 over the epochs
    wd: float = 0.1  # AdamW weight decay
    max_steps: int = 0  # stop after N steps (0: train all epochs; the schedule still spans them)
    eval_every: int = 500  # evaluate (CTC loss on 1000 training and the validation utterances)
    save_every: int = 1000  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/lstm"  # the run directory written


# -- model ------------------------------------------------------------------------------------
class SpeechLSTM(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            datasets.N_MELS, hidden, num_layers=layers, bidirectional=True, batch_first=True
        )
        self.out = nn.Linear(2 * hidden, datasets.N_TOKENS)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Padded features [B, T, 40] and their lengths -> logits [B, T, 29]."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return self.out(h)


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    return SpeechLSTM(config["hidden"], config["layers"])


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive layers for alignment (SPEC §3, LSTM), within each direction.

    The list and order of the paper's `inter_layer_pairs` (speech_recognition/model.py): layer by
    layer, forward then reverse, ih_k -> hh_k, ih_k -> ih_{k+1}, hh_k -> ih_{k+1}; the last layer
    pairs only with the output Linear (its ih -> hh is not in the paper's list). ``direction`` is
    the previous layer's: the analysis takes that half of a 2h-wide next input, the output
    Linear's included.
    """
    last = config["layers"] - 1
    directions = (("forward", ""), ("reverse", "_reverse"))
    out = []
    for k in range(last):
        for direction, sfx in directions:
            ih, hh = f"lstm.weight_ih_l{k}{sfx}", f"lstm.weight_hh_l{k}{sfx}"
            nxt = f"lstm.weight_ih_l{k + 1}{sfx}"
            out += [
                {"prev": ih, "next": hh, "kind": "lstm", "direction": direction},
                {"prev": ih, "next": nxt, "kind": "lstm", "direction": direction},
                {"prev": hh, "next": nxt, "kind": "lstm", "direction": direction},
            ]
    for direction, sfx in directions:
        out += [
            {"prev": f"lstm.weight_{g}_l{last}{sfx}", "next": "out.weight", "kind": "lstm",
             "direction": direction}
            for g in ("ih", "hh")
        ]  # fmt: skip
    return out


# -- data -------------------------------------------------------------------------------------
def load_utterances(config: dict[str, Any]) -> tuple[list, list]:
    """(features, transcript) lists for training and validation."""
    if config["data"]:
        train = datasets.read_speech_features(config["data"])
        val = datasets.read_speech_features(config["val_data"]) if config["val_data"] else []
        return train, val
    n = config["n_synthetic"]
    return datasets.synthetic_speech(n, seed=0), datasets.synthetic_speech(n // 10, seed=1)


def to_tensors(utterances: list, split: str) -> dict[str, torch.Tensor]:
    """Concatenated features (each utterance normalised per mel bin) and CTC targets, flat.

    ``x_<split>`` [ΣT, 40], ``x_<split>_lengths`` [N], ``y_<split>`` [ΣU], ``y_<split>_lengths``.
    Flat, not padded: 1000 LibriSpeech utterances padded to the longest would be 10x larger.
    """
    feats = [(f - f.mean(0)) / (f.std(0) + 1e-5) for f, _ in utterances]
    targets = [datasets.encode_transcript(text) for _, text in utterances]
    return {
        f"x_{split}": torch.from_numpy(np.concatenate(feats) if feats else np.zeros((0, 40))),
        f"x_{split}_lengths": torch.tensor([len(f) for f in feats], dtype=torch.int64),
        f"y_{split}": torch.from_numpy(np.concatenate(targets) if targets else np.zeros(0, int)),
        f"y_{split}_lengths": torch.tensor([len(t) for t in targets], dtype=torch.int64),
    }


def eval_subset(train: list, val: list) -> dict[str, torch.Tensor]:
    """A fixed 1000-utterance training subset (SPEC §2, Eqn 6) and the validation set."""
    keep = np.sort(np.random.default_rng(0).permutation(len(train))[:1000])
    return {**to_tensors([train[i] for i in keep], "train"), **to_tensors(val, "val")}


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The run's evaluation data (for `specan_trainers.eval_data`): see `eval_subset`."""
    return eval_subset(*load_utterances(config))


def batch(data: dict[str, torch.Tensor], split: str, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Padded features, their lengths, concatenated targets and their lengths for ``idx``."""
    x_len, y_len = data[f"x_{split}_lengths"], data[f"y_{split}_lengths"]
    x_off = torch.cumsum(x_len, 0) - x_len
    y_off = torch.cumsum(y_len, 0) - y_len
    x = [data[f"x_{split}"][x_off[i] : x_off[i] + x_len[i]] for i in idx.tolist()]
    y = [data[f"y_{split}"][y_off[i] : y_off[i] + y_len[i]] for i in idx.tolist()]
    return pad_sequence(x, batch_first=True).float(), x_len[idx], torch.cat(y), y_len[idx]


def ctc_loss(
    model: nn.Module, x: torch.Tensor, x_len: torch.Tensor, y: torch.Tensor, y_len: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch of the CTC loss, each divided by its target length (torch default)."""
    log_probs = model(x, x_len).log_softmax(-1).transpose(0, 1)  # [T, B, 29]
    return F.ctc_loss(log_probs, y, x_len, y_len, blank=datasets.BLANK, zero_infinity=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64
) -> dict[str, float]:
    """Mean CTC loss per utterance (each normalised by its target length, as in training)."""
    device = next(model.parameters()).device
    out = {}
    for split in ("train", "val"):
        n = len(data[f"x_{split}_lengths"])
        if not n:
            continue
        total = 0.0
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            x, x_len, y, y_len = (v.to(device) for v in batch(data, split, idx))
            total += ctc_loss(model, x, x_len, y, y_len).item() * len(idx)
        out[f"{split}_loss"] = total / n
    return out


def epoch_lr(cfg: Config, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: a cosine from lr (epoch 0) towards 0 (epoch
    ``epochs``), constant within an epoch; it spans all epochs, even with --max-steps."""
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.lstm",
        description=__doc__.split("\n\n")[0],
    )
    config = dataclasses.asdict(cfg)
    # -- setup
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)
    device = resolve_device(cfg.device)
    train_utts, val_utts = load_utterances(config)
    train = to_tensors(train_utts, "train")
    data = eval_subset(train_utts, val_utts)
    model = build_model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    writer = RunWriter(cfg.out, trainer="lstm", config=config, pairs=pairs(config))
    n = len(train_utts)
    per_epoch = math.ceil(n / cfg.batch_size)
    planned = cfg.epochs * per_epoch
    total = planned if cfg.max_steps <= 0 else min(cfg.max_steps, planned)
    saves = save_steps(total, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
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
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(per_epoch):
            if epoch * per_epoch + i < start:
                continue
            if step >= total:
                break
            step += 1
            model.train()
            for group in opt.param_groups:
                group["lr"] = epoch_lr(cfg, epoch)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, x_len, y, y_len = (v.to(device) for v in batch(train, "train", idx))
            loss = ctc_loss(model, x, x_len, y, y_len)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ep = step / per_epoch
            if step % cfg.eval_every == 0 or step in saves:
                model.eval()
                metrics = {"step": step, "epoch": ep, **evaluate(model, data)}
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
