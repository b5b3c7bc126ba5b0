"""Write a Pythia-shaped run of random checkpoints, laid out as the Hugging Face hub serves them.

    python benchmarks/pythia_like.py --size 160m --steps 0,1000 --out /tmp/pythia-160m

gives ``/tmp/pythia-160m/step0/`` and ``step1000/``, each a ``model.safetensors`` (fp16; bf16 for
1b, as published) with GPT-NeoX's parameter names and buffers, beside the ``config.json`` that
specan reads the head count from. Weights are N(0, 0.02²) with a seed per step: the shapes, names
and dtypes are real, the spectra are those of random init. Used by the benchmarks that time
`specan ingest` against the notebook loop (`notebook_loop.py`) on the shapes users have.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# hidden size, layers, heads, dtype: the published GPT-NeoX configs (vocab 50304, MLP 4x)
SIZES = {
    "70m": (512, 6, 8, torch.float16),
    "160m": (768, 12, 12, torch.float16),
    "410m": (1024, 24, 16, torch.float16),
    "1b": (2048, 16, 8, torch.bfloat16),
    "1.4b": (2048, 24, 16, torch.float16),
    "2.8b": (2560, 32, 32, torch.float16),
}
VOCAB = 50304


def config(size: str, layers: int | None = None) -> dict:
    d, n, heads, dtype = SIZES[size]
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": d,
        "intermediate_size": 4 * d,
        "num_attention_heads": heads,
        "num_hidden_layers": layers or n,
        "vocab_size": VOCAB,
        "rotary_pct": 0.25,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """GPT-NeoX's state dict: weights, biases, norms and the older revisions' attention buffers."""
    gen = torch.Generator().manual_seed(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = getattr(torch, cfg["torch_dtype"])
    rotary = int(d // cfg["num_attention_heads"] * cfg["rotary_pct"])

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    sd = {"gpt_neox.embed_in.weight": w(VOCAB, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "input_layernorm.bias": torch.zeros(d, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "post_attention_layernorm.bias": torch.zeros(d, dtype=dtype),
            p + "attention.query_key_value.weight": w(3 * d, d),
            p + "attention.query_key_value.bias": w(3 * d),
            p + "attention.dense.weight": w(d, d),
            p + "attention.dense.bias": w(d),
            p + "attention.rotary_emb.inv_freq": torch.rand(rotary // 2, generator=gen),
            p + "attention.bias": torch.ones(1, 1, 2048, 2048, dtype=torch.bool).tril(),
            p + "attention.masked_bias": torch.tensor(-1e9),
            p + "mlp.dense_h_to_4h.weight": w(f, d),
            p + "mlp.dense_h_to_4h.bias": w(f),
            p + "mlp.dense_4h_to_h.weight": w(d, f),
            p + "mlp.dense_4h_to_h.bias": w(d),
        })  # fmt: skip
    sd["gpt_neox.final_layer_norm.weight"] = torch.ones(d, dtype=dtype)
    sd["gpt_neox.final_layer_norm.bias"] = torch.zeros(d, dtype=dtype)
    sd["embed_out.weight"] = w(VOCAB, d)
    return sd


def write(out: Path, size: str, steps: list[int], layers: int | None = None) -> Path:
    """Write ``out/step<N>/{model.safetensors, config.json}`` for each step; existing ones stay."""
    cfg = config(size, layers)
    for step in steps:
        folder = out / f"step{step}"
        target = folder / "model.safetensors"
        if target.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        tmp = folder / "model.safetensors.tmp"
        save_file(state_dict(cfg, seed=step), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="160m")
    ap.add_argument("--steps", default="0,1000", help="comma-separated steps, one folder each")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    print(write(args.out, args.size, steps, args.layers))


if __name__ == "__main__":
    main()
