"""`specan demo`: grokking trained twice, ingested and reported; and a synthetic run for tests.

The synthetic run has every layer kind specan reads, for tests and benchmarks.

The weights are random, but not static: checkpoint t blends each matrix's random start with a
rank-4 matrix of the same norm, ``W(t) = (1 - a) W0 + a L`` with ``a = t / (T - 1)``, so its
effective rank falls over the run the way trained weights' does. The run directory follows
Contract 1 (run.json, metrics.jsonl, checkpoints/step-XXXXXXXX.safetensors with step metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def build_model(width: int = 128, heads: int = 4) -> torch.nn.Module:
    """Embedding, attention, MLP, conv, transposed conv and a bidirectional 2-layer LSTM."""
    from torch import nn

    class Synthetic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, width)
            self.attn = nn.MultiheadAttention(width, heads)
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)
            )
            self.conv = nn.Sequential(
                nn.Conv2d(3, width // 4, 3), nn.ReLU(), nn.Conv2d(width // 4, width // 2, 3)
            )
            self.deconv = nn.ConvTranspose2d(width // 2, width // 4, 4)
            self.lstm = nn.LSTM(width // 2, width, num_layers=2, bidirectional=True)
            self.head = nn.Linear(2 * width, 10)

    return Synthetic()


def write_synthetic_run(
    out: Path | str, *, checkpoints: int = 20, width: int = 128, heads: int = 4, seed: int = 0
) -> Path:
    """Write the run to ``out`` (created); a run already there with the same settings is kept.

    Keeping it matters: rewriting would change the files' mtimes and force a re-ingest. Written
    through the trainers' run writer, so it has exactly the layout a trainer writes, the end
    marker included (`specan ingest --watch` on it stops); a run without it was cut short and is
    written again.
    """
    import torch

    from specan.runfile import read_config
    from specan_trainers.checkpoint import FINISHED, SCHEMA_VERSION, RunWriter

    out = Path(out)
    config = {"width": width, "n_heads": heads, "seed": seed, "checkpoints": checkpoints}
    model_config = {"width": width, "n_heads": heads}
    view_rules = {"deconv.weight": "conv_transpose"}
    expected = {"schema_version": SCHEMA_VERSION, "trainer": "synthetic", "config": config,
                "model": model_config, "pairs": [], "view_rules": view_rules}  # fmt: skip
    if read_config(out) == expected and (out / FINISHED).is_file():
        if len(list((out / "checkpoints").glob("step-*.safetensors"))) == checkpoints:
            return out
    (out / "metrics.jsonl").unlink(missing_ok=True)  # an interrupted write starts over
    writer = RunWriter(
        out, trainer="synthetic", config=config, model=model_config, view_rules=view_rules
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(width, heads)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = {}
    for name, w in start.items():
        if w.dim() < 2:
            continue
        m = w.reshape(w.shape[0], -1)
        low = torch.randn(m.shape[0], 4, generator=gen) @ torch.randn(4, m.shape[1], generator=gen)
        target[name] = (low * (m.norm() / low.norm())).reshape(w.shape)
    for t in range(checkpoints):
        a = t / max(checkpoints - 1, 1)
        state = {k: ((1 - a) * v + a * target[k]) if k in target else v for k, v in start.items()}
        model.load_state_dict(state)
        writer.save(model, 100 * t, epoch=t)
        writer.log({"step": 100 * t, "epoch": t, "blend": a})
    writer.finish()
    return out


# The grokking demo: the smallest CPU settings that still show the effect (SPEC §4, measured on
# a 2-core machine and stated in the README): p = 97, half the pairs for training, lr 3e-3.
GROKKING_DEMO = ["--p", "97", "--train-frac", "0.5", "--lr", "3e-3", "--steps", "1500"]
DEMO_RUNS = {"grok-wd1": ["--wd", "1.0"], "grok-wd0": ["--wd", "0"]}


def run_grokking_demo(out: Path | str, progress_for: Any = None) -> dict[str, Any]:
    """Train grokking with weight decay 1.0 and 0, ingest both, write the comparison report.

    Returns the run folders, the report path and the numbers the demo claims (final validation
    accuracy, mean normalised effective rank first and last) so the caller can print them.
    A run already trained (or half-trained) under ``out`` is reused or resumed.
    """
    from specan.api import Run
    from specan.pipeline import ingest
    from specan.report import write_comparison, write_report
    from specan_trainers import grokking

    out = Path(out)
    runs, numbers = [], {}
    for name, extra in DEMO_RUNS.items():
        run = out / name
        grokking.main([*GROKKING_DEMO, *extra, "--out", str(run)])
        ingest(run, progress=progress_for(name) if progress_for else None)
        opened = Run(run)
        mean = opened.rank().model_mean.values  # over the weight matrices, one per parameter
        numbers[name] = {
            "val_acc": float(opened.metrics["val_acc"].sel(step=opened.steps[-1])),
            "erank_first": float(mean[0]),
            "erank_last": float(mean[-1]),
        }
        write_report(run)
        runs.append(run)
    report = write_comparison(runs, out / "report.html")
    return {"runs": runs, "report": report, "numbers": numbers}
