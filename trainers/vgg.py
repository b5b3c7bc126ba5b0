"""VGG-16 with batch norm on CIFAR-10, the step schedule of the ResNet paper.

The paper's setting (SPEC §4): VGG-16 with batch norm, average pool to 1x1 and Linear(512, 10);
CIFAR-10 without augmentation, 10 % of the training set held out for validation (seed 42); SGD,
batch 128, lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 at epochs 82, 123 and 160 (the text
says 120, the code 123); 164 epochs. Where the text is silent this follows the paper's code
(image_classification/model.py, after open_lth's CIFAR VGG): four max pools, so the last three
convolutions see 2x2 and the average pool takes that to 1x1; convolutions with bias; torch's
default initialisation everywhere; weight decay on every parameter; inputs standardised per
channel with CIFAR-10's usual means and deviations. Run as

    python -m specan_trainers.vgg --data ~/data/cifar-10-batches-bin --out runs/vgg
    python -m specan_trainers.vgg --width-mult 0.0625 --epochs 2 --out runs/vgg-tiny  # digits
    python -m specan_trainers.vgg --lmc --trunks 3 --branches 3 --out runs/vgg-lmc

With --lmc (SPEC §4, LMC) --out holds trunk-<t>/ (seed t, trained to the last split point and
saved at every split point: step 0, 1/5 ... 4/5 of epoch 1, the end of epochs 1-5, with its
optimizer state at each in optimizer/) and, inside each, branch-<split step>-<seed>/ (branch
seeds 3, 4, ...), each trained to the end from its trunk's weights AND optimizer state (SGD
momentum buffers) at that step, as the paper's code does: its branches are Lightning runs
resumed from the trunk's checkpoint (``trainer.fit(ckpt_path=...)``), which restores the
weights, the optimizer state, the lr scheduler and the step/epoch counters. Here the lr is a
function of the epoch alone, so the schedule continues from the split's step without scheduler
state; the branch's seed sets its batch order. Its run.json names its parent and says
``"optimizer": true`` when the trunk's state was resumed. lmc.json in --out lists the trunks,
split steps and branch seeds.

With --lmc --perturb 0,0.1,... (SPEC §4, perturbed LMC) there is one split, at the end of epoch
--perturb-epoch, and each trunk's branches are branch-<split>-<seed>-eta<eta>/: the trunk's
weights and optimizer state at the split (the paper resumes these branches from the trunk's
checkpoint too and perturbs at the start of the next epoch), the weights perturbed
(`specan_trainers.surgery.perturb_`, noise seeded by the branch seed, the output layer spared,
the momentum buffers left as they were), batch norm re-estimated, then trained to the end.

With --ticket magnitude|random --from RUN (SPEC §4, lottery tickets): masks from RUN's final
checkpoint (`specan_trainers.surgery`: one global magnitude threshold keeping --sparsity of the
weights, or per-layer random masks of the same densities), the weights rewound to RUN's
checkpoint at the end of epoch --rewind-epoch, masked, batch norm re-estimated, and retrained
with the masked weights set to 0 after every step; the masks are kept in mask.safetensors. A
ticket resumes RUN's optimizer state at the rewind step, as the paper's tickets do, when RUN kept
it there (train RUN with --keep-optimizer-epochs E, E the --rewind-epoch; LMC trunks keep it at
their splits); otherwise it starts with fresh SGD momentum and says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from specan_trainers import data as datasets
from specan_trainers import surgery
from specan_trainers.checkpoint import (
    OptionValueError,
    RunWriter,
    branch_name,
    load_optimizer,
    optimizer_path,
    parse_config,
    resolve_device,
    run_main,
    save_steps,
)

# Four max pools, not torchvision's five: 32x32 -> 2x2 before the average pool (open_lth's plan).
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


@dataclass
class Config:
    data: str = ""  # cifar-10-batches-bin folder; empty: the built-in digits, as 3x32x32
    val_frac: float = 0.1  # fraction of the training set held out for validation (seed 42)
    limit_train: int = 0  # train on only the first N training examples (0: all)
    width_mult: float = 1.0  # channel multiplier (1/16 makes a tiny VGG for smoke tests)
    epochs: int = 164  # passes over the training set
    batch_size: int = 128  # examples per step
    lr: float = 0.1  # SGD learning rate before the first decay
    lr_epochs: str = "82,123,160"  # multiply the lr by lr_decay from these epochs on (0-based)
    lr_decay: float = 0.1  # factor applied at each of lr_epochs
    momentum: float = 0.9  # SGD momentum
    wd: float = 1e-4  # SGD weight decay
    max_steps: int = 0  # stop after N steps (0: run every epoch)
    eval_every: int = 0  # evaluate every N steps (0: at the end of every epoch)
    save_every: int = 0  # checkpoint every N steps (0: off)
    save_log: int = 0  # also checkpoint at about N log-spaced steps
    save_at: str = ""  # also checkpoint at these steps, e.g. 0,100,1000
    save_per_epoch: bool = True  # also checkpoint at the end of every epoch
    seed: int = 0  # initialisation and batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    out: str = "runs/vgg"  # the run directory written
    init_from: str = ""  # start from this checkpoint's weights and step (an LMC branch)
    lmc: bool = False  # trunk + branch protocol (SPEC §4): --out holds trunks and branches
    trunks: int = 3  # with --lmc: trunks, seeds 0, 1, ...
    branches: int = 3  # with --lmc: branches per split point, seeds 3, 4, ...
    perturb: str = ""  # with --lmc: perturbation sizes eta, e.g. 0,0.1,0.25,0.5,1,2.5 (SPEC §4)
    perturb_epoch: int = 4  # with --perturb: branch at the end of this epoch (0-based: 4 = after 5)
    eta: float = -1.0  # perturb the start weights by eta (set per branch by --perturb; -1: no)
    ticket: str = ""  # magnitude or random: retrain a lottery ticket of the --from run
    sparsity: float = 0.05  # with --ticket: fraction of the masked weights kept
    rewind_epoch: int = 4  # with --ticket: rewind to the end of this epoch (0-based; -1: step 0)
    from_: str = ""  # with --ticket: the trained run whose final weights give the mask
    keep_optimizer_epochs: str = ""  # keep optimizer state at these epoch ends, e.g. 4 (--ticket)


# -- model ------------------------------------------------------------------------------------
class VGG(nn.Module):
    """Named as torchvision's: features.<i> (conv, batch norm, ReLU, max pool), classifier.

    Parameters keep torch's default initialisation, as the paper's code (it passes no
    initializer).
    """

    def __init__(self, channels: Sequence[int | str], classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # on CIFAR's 2x2 maps: the paper's AvgPool2d(2)
        self.classifier = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run from its run.json config (for `specan_trainers.build_model`)."""
    mult = config["width_mult"]
    return VGG([c if c == "M" else max(1, round(c * mult)) for c in VGG16])


def pairs(config: dict[str, Any]) -> list[dict[str, str]]:
    """Consecutive convolutions, then the last one -> classifier (SPEC §3, VGG).

    Batch-norm parameters are 1-D and in no pair. For conv -> conv the analysis slices the next
    layer's right vectors at the kernel centre; conv -> classifier meets 512 channels with 512
    inputs, since the average pool leaves 1x1.
    """
    with torch.device("meta"):  # names only: no memory, and no draw from the RNG
        model = build_model(config)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out = [{"prev": a, "next": b, "kind": "conv"} for a, b in pairwise(convs)]
    return [*out, {"prev": convs[-1], "next": "classifier.weight", "kind": "conv_to_linear"}]


# -- data -------------------------------------------------------------------------------------
def make_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CIFAR-10's training set split into training and held-out validation, standardised."""
    return datasets.cifar_split(
        config["data"], val_frac=config["val_frac"], limit_train=config["limit_train"]
    )


def eval_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Training and validation sets of a run (for `specan_trainers.eval_data`)."""
    return make_data(config)


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Losses and accuracies in eval mode (batch norm uses its running statistics)."""
    out = {}
    for split in ("train", "val"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        loss = correct = 0.0
        for i in range(0, len(y), 500):
            logits = model(x[i : i + 500])
            loss += F.cross_entropy(logits, y[i : i + 500], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i : i + 500]).sum().item()
        out[f"{split}_loss"] = loss / max(len(y), 1)
        out[f"{split}_acc"] = correct / max(len(y), 1)
    return out


def lmc_splits(per_epoch: int, total: int) -> list[int]:
    """SPEC §4's split points: step 0, 1/5 ... 4/5 of epoch 1, the end of epochs 1-5, in steps
    (rounded; duplicates at tiny sizes merged), those before the run's last step."""
    points = {0, *(round(per_epoch * k / 5) for k in range(1, 5))}
    points |= {per_epoch * e for e in range(1, 6)}
    return sorted(s for s in points if s < total)


def _schedule(cfg: Config, config: dict[str, Any]) -> tuple[int, int]:
    n = len(make_data(config)["y_train"])
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(
        Config,
        argv,
        prog="python -m specan_trainers.vgg",
        description=__doc__.split("\n\n")[0],
    )
    if cfg.lmc:
        train_lmc(cfg)
    elif cfg.ticket:
        train_ticket(cfg)
    elif cfg.perturb:
        raise OptionValueError("--perturb sets the branches of --lmc: give --lmc too")
    elif cfg.eta >= 0 and not cfg.init_from:
        raise OptionValueError("--eta perturbs a branch's start weights: give --init-from too")
    else:
        train(cfg)


def _kept_steps(cfg: Config, per_epoch: int, total: int) -> list[int]:
    """The steps of --keep-optimizer-epochs (epoch ends, 0-based as --rewind-epoch)."""
    try:
        epochs = [int(e) for e in cfg.keep_optimizer_epochs.split(",") if e.strip()]
    except ValueError:
        raise OptionValueError(
            "--keep-optimizer-epochs takes comma-separated epochs, "
            f"not {cfg.keep_optimizer_epochs!r}"
        ) from None
    return [_epoch_end(e, per_epoch, total, "--keep-optimizer-epochs") for e in epochs]


def train_lmc(cfg: Config) -> None:
    """The trunks, then every branch of every split of every trunk (see the module docs)."""
    if cfg.init_from:
        raise OptionValueError("--lmc branches from its own trunks: not with --init-from")
    if cfg.trunks < 1 or cfg.branches < 2:
        raise OptionValueError("--lmc needs --trunks >= 1 and --branches >= 2 (one pair)")
    if cfg.ticket:
        raise OptionValueError("--lmc and --ticket are separate protocols: give one")
    per_epoch, total = _schedule(cfg, dataclasses.asdict(cfg))
    etas = _etas(cfg.perturb)
    if etas:
        split = _epoch_end(cfg.perturb_epoch, per_epoch, total, "--perturb-epoch")
        splits = [split]
    else:
        splits = lmc_splits(per_epoch, total)
    out = Path(cfg.out)
    seeds = [3 + b for b in range(cfg.branches)]
    base = dataclasses.replace(cfg, lmc=False, perturb="")
    out.mkdir(parents=True, exist_ok=True)
    trunks = [f"trunk-{t}" for t in range(cfg.trunks)]
    protocol = {"protocol": "perturb" if etas else "split", "per_epoch": per_epoch,
                "steps": total, "splits": splits, "trunks": trunks, "branch_seeds": seeds,
                **({"etas": etas} if etas else {})}  # fmt: skip
    (out / "lmc.json").write_text(json.dumps(protocol, indent=2) + "\n")
    for t in range(cfg.trunks):
        trunk = out / f"trunk-{t}"
        train(dataclasses.replace(
            base, seed=t, out=str(trunk), max_steps=max(splits[-1], 1), save_every=0,
            save_log=0, save_per_epoch=False, save_at=",".join(map(str, splits)),
        ), keep_optimizer=splits)  # fmt: skip
        for split in splits:
            start = trunk / "checkpoints" / f"step-{split:08d}.safetensors"
            if not optimizer_path(start).is_file():  # a trunk written before they were kept
                raise OptionValueError(
                    f"{trunk}: no optimizer state kept at split step {split}, so its branches "
                    "cannot resume it; train the LMC folder again into a new --out"
                )
            parent = {"run": "..", "trunk": t, "step": split, "epoch": split / per_epoch}
            for seed in seeds:
                for eta in etas or [None]:
                    name = branch_name(split, seed, eta)
                    branch = dataclasses.replace(
                        base, seed=seed, init_from=str(start), out=str(trunk / name),
                        eta=-1.0 if eta is None else eta,
                    )  # fmt: skip
                    train(branch, parent=parent)


def _etas(spec: str) -> list[float]:
    try:
        etas = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise OptionValueError(f"--perturb takes comma-separated sizes, not {spec!r}") from None
    if any(e < 0 for e in etas) or len(set(etas)) != len(etas):
        raise OptionValueError(f"--perturb {spec}: sizes must be distinct and >= 0")
    return etas


def _epoch_end(epoch: int, per_epoch: int, total: int, flag: str) -> int:
    """The step at the end of 0-based `epoch` (-1: step 0), which must come before the end."""
    step = (epoch + 1) * per_epoch
    if epoch < -1 or step >= total:
        raise OptionValueError(
            f"{flag} {epoch}: the run has {total / per_epoch:g} epochs of {per_epoch} steps, so "
            f"the end of epoch {epoch} (step {step}) is not a point inside it"
        )
    return step


def train_ticket(cfg: Config) -> None:
    """A lottery ticket of the --from run, retrained from its rewound weights (module docs)."""
    from specan.runfile import read_config
    from specan.runs import CheckpointReader, discover

    if cfg.ticket not in ("magnitude", "random"):
        raise OptionValueError(f"--ticket takes magnitude or random, not {cfg.ticket!r}")
    if not cfg.from_:
        raise OptionValueError("--ticket needs --from, the trained run whose weights give the mask")
    if cfg.init_from:
        raise OptionValueError("--ticket starts from --from's checkpoint: not with --init-from")
    if not 0.0 < cfg.sparsity <= 1.0:
        raise OptionValueError(f"--sparsity {cfg.sparsity}: the fraction kept, in (0, 1]")
    source = Path(cfg.from_)
    meta = read_config(source)
    if not meta or meta.get("trainer") != "vgg":
        raise OptionValueError(f"--from {source}: not a run of this trainer (no vgg run.json)")
    same = ("data", "val_frac", "limit_train", "width_mult", "batch_size")
    differ = [k for k in same if meta["config"].get(k) != getattr(cfg, k)]
    if differ:
        was = ", ".join(f"--{k.replace('_', '-')} {meta['config'].get(k)!r}" for k in differ)
        raise OptionValueError(f"--from {source} was trained with {was}: give the same")
    per_epoch, total = _schedule(cfg, dataclasses.asdict(cfg))
    rewind = _epoch_end(cfg.rewind_epoch, per_epoch, total, "--rewind-epoch")
    ckpts = {c.step: c for c in discover(source).checkpoints}
    if rewind not in ckpts:
        have = ", ".join(str(s) for s in sorted(k for k in ckpts if k is not None)[:12])
        raise OptionValueError(f"--from {source}: no checkpoint at step {rewind}; it has {have}")
    final = max(k for k in ckpts if k is not None)
    model = build_model(dataclasses.asdict(cfg))
    params = [n for n, _ in model.named_parameters()]
    with CheckpointReader(ckpts[final]) as reader:
        weights = {k: reader.get(k) for k in params}
    masks = surgery.magnitude_masks(weights, cfg.sparsity)
    if cfg.ticket == "random":
        masks = surgery.random_masks(masks, generator=torch.Generator().manual_seed(cfg.seed))
    parent = {"run": str(source.resolve()), "step": rewind, "epoch": rewind / per_epoch,
              "mask_from": final, "ticket": cfg.ticket, "sparsity": cfg.sparsity}  # fmt: skip
    start = ckpts[rewind].files[0]
    if not optimizer_path(start).is_file():
        print(
            f"--from {source}: no optimizer state kept at step {rewind} (train it with "
            f"--keep-optimizer-epochs {cfg.rewind_epoch}); the ticket starts with fresh momentum"
        )
    train(dataclasses.replace(cfg, init_from=str(start)), parent=parent, masks=masks)


def train(
    cfg: Config,
    parent: dict[str, Any] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    keep_optimizer: Collection[int] = (),
) -> None:
    """One run: from scratch, or from ``cfg.init_from``'s weights, step and (where it was
    kept) optimizer state (a branch), perturbed by ``cfg.eta`` when it is >= 0; with `masks` (a
    lottery ticket) the masked weights are set to 0 at the start and after every step. The
    optimizer state at the steps in `keep_optimizer` is kept for branches (an LMC trunk)."""
    config = dataclasses.asdict(cfg)
    if parent is not None and cfg.init_from:
        parent = {**parent, "optimizer": optimizer_path(cfg.init_from).is_file()}
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
    keep_optimizer = {*keep_optimizer, *_kept_steps(cfg, per_epoch, total)}
    decays = [int(e) for e in cfg.lr_epochs.split(",") if e.strip()]
    model = build_model(config).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    writer = RunWriter(
        cfg.out, trainer="vgg", config=config, pairs=pairs(config),
        model={"family": "vgg", "width_mult": cfg.width_mult}, parent=parent,
    )  # fmt: skip
    saves = save_steps(total, every=cfg.save_every, log=cfg.save_log, at=cfg.save_at)
    if cfg.save_per_epoch:
        saves.update(range(0, total + 1, per_epoch))
    saves.update(keep_optimizer)  # a run started there reads the weights beside the state
    eval_every = cfg.eval_every or per_epoch
    if masks is not None:
        masks = {k: m.to(device) for k, m in masks.items()}
        writer.save_mask(masks, {k: v for k, v in (parent or {}).items() if k != "run"})
    start = writer.resume(model, opt)
    if start is None and cfg.init_from:  # a branch: the trunk's weights at the split, its step
        from safetensors import safe_open

        from specan.losses import reestimate_bn

        with safe_open(cfg.init_from, framework="pt") as f:
            start = int((f.metadata() or {})["step"])
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        edited = cfg.eta >= 0 or masks is not None
        if cfg.eta >= 0:  # the paper's generator: seeded with the branch's own seed
            surgery.perturb_(model, cfg.eta, generator=torch.Generator().manual_seed(cfg.seed))
        if masks is not None:
            surgery.apply_masks_(model, masks)
        if edited:  # the statistics no longer match the edited weights
            reestimate_bn(model, data["x_train"])
        lr = cfg.lr * cfg.lr_decay ** sum(start // per_epoch >= e for e in decays)
        metrics = {"step": start, "epoch": start / per_epoch, "lr": lr}
        writer.log({**metrics, **evaluate(model.eval(), data)})
        # the trunk's momentum buffers at the split; the lr is set from the step below
        load_optimizer(cfg.init_from, opt)
        writer.save(model, start, epoch=start / per_epoch, optimizer=opt)
    elif start is None:
        start = 0
        writer.log({"step": 0, "epoch": 0.0, "lr": cfg.lr, **evaluate(model.eval(), data)})
        writer.save(model, 0, epoch=0.0, optimizer=opt)
        if 0 in keep_optimizer:
            writer.save_optimizer(opt, 0)
    else:
        print(f"resuming {cfg.out} from step {start}")
    # -- training loop: epoch e shuffles with seed + e, so a resumed run draws the same batches;
    # the lr is a function of the epoch alone, set every step, so there is no scheduler state
    t0 = time.perf_counter()
    order = None
    for step in range(start + 1, total + 1):
        epoch, batch = divmod(step - 1, per_epoch)
        if order is None or batch == 0:
            gen = torch.Generator().manual_seed(cfg.seed + epoch)
            order = torch.randperm(n, generator=gen).to(device)
        lr = cfg.lr * cfg.lr_decay ** sum(epoch >= e for e in decays)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
        model.train()
        loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if masks is not None:
            surgery.apply_masks_(model, masks)
        if step % eval_every == 0 or step in saves:
            metrics = {"step": step, "epoch": step / per_epoch, "lr": lr}
            metrics.update(evaluate(model.eval(), data))
            writer.log(metrics)
            print(
                f"step {step:6d}  epoch {step / per_epoch:7.2f}  lr {lr:.0e}"
                f"  train {metrics['train_loss']:.4f} ({metrics['train_acc']:.3f})"
                f"  val {metrics['val_loss']:.4f} ({metrics['val_acc']:.3f})"
                f"  {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
        if step in saves:
            writer.save(model, step, epoch=step / per_epoch, optimizer=opt)
        if step in keep_optimizer:
            writer.save_optimizer(opt, step)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
