"""Write a Pythia-shaped run of random checkpoints, laid out as the Hugging Face hub serves them.

    python benchmarks/pythia_like.py --size 160m --steps 0,1000 --out /tmp/pythia-160m

gives ``/tmp/pythia-160m/step0/`` and ``step1000/``, each a ``model.safetensors`` (fp16; bf16 for
1b, as published) with GPT-NeoX's parameter names and buffers, beside the ``config.json`` that
specan reads the head count from. Weights are N(0, 0.02²) with a seed per step: the shapes, names
and dtypes are real, the spectra are those of random init. Used by the benchmarks that time
`specan ingest` against the notebook loop (`notebook_loop.py`) on the shapes users have, and by
the tests (loaded from this file) for every layout below.

    python benchmarks/pythia_like.py --size 70m --steps 0,1,2 --same 1=0 --cache --bin 3 --out X

writes what ``huggingface_hub.snapshot_download(..., revision="stepN")`` leaves in its cache:
``X/models--EleutherAI--pythia-70m/{blobs,refs,snapshots}`` with ``refs/stepN`` naming a commit and
the snapshot's files symlinked into ``blobs/`` (identical files share one blob); ``--bin 3`` writes
``pytorch_model-0000{1..3}-of-00003.bin`` plus ``pytorch_model.bin.index.json`` as pythia-12b's
revisions do; ``--same 1=0`` gives step 1 the weights of step 0 (pythia's step0 == step1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# hidden size, layers, heads, dtype: the published GPT-NeoX configs (vocab 50304, MLP 4x)
SIZES = {
    "14m": (128, 6, 4, torch.float16),
    "31m": (256, 6, 8, torch.float16),
    "70m": (512, 6, 8, torch.float16),
    "160m": (768, 12, 12, torch.float16),
    "410m": (1024, 24, 16, torch.float16),
    "1b": (2048, 16, 8, torch.bfloat16),
    "1.4b": (2048, 24, 16, torch.float16),
    "2.8b": (2560, 32, 32, torch.float16),
    "12b": (5120, 36, 40, torch.float16),
}
VOCAB = 50304
VOCABS = {"12b": 50688}  # the sizes whose vocabulary is padded otherwise


def config(
    size: str, layers: int | None = None, vocab: int | None = None, positions: int = 2048
) -> dict:
    """GPT-NeoX's config.json for a size; tests shrink the vocabulary and the context."""
    d, n, heads, dtype = SIZES[size]
    vocab = vocab or VOCABS.get(size, VOCAB)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": d,
        "intermediate_size": 4 * d,
        "num_attention_heads": heads,
        "num_hidden_layers": layers or n,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "rotary_pct": 0.25,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """GPT-NeoX's state dict: weights, biases, norms and the older revisions' attention buffers."""
    gen = torch.Generator().manual_seed(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = getattr(torch, cfg["torch_dtype"])
    rotary = int(d // cfg["num_attention_heads"] * cfg["rotary_pct"])
    ctx = cfg["max_position_embeddings"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    vocab = cfg["vocab_size"]
    sd = {"gpt_neox.embed_in.weight": w(vocab, d)}
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
            p + "attention.bias": torch.ones(1, 1, ctx, ctx, dtype=torch.bool).tril(),
            p + "attention.masked_bias": torch.tensor(-1e9),
            p + "mlp.dense_h_to_4h.weight": w(f, d),
            p + "mlp.dense_h_to_4h.bias": w(f),
            p + "mlp.dense_4h_to_h.weight": w(d, f),
            p + "mlp.dense_4h_to_h.bias": w(d),
        })  # fmt: skip
    sd["gpt_neox.final_layer_norm.weight"] = torch.ones(d, dtype=dtype)
    sd["gpt_neox.final_layer_norm.bias"] = torch.zeros(d, dtype=dtype)
    sd["embed_out.weight"] = w(vocab, d)
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    """One weights file, written under a temporary name and renamed: safetensors or torch."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".bin":
        torch.save(sd, tmp)
    else:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def model_files(folder: Path, sd: dict[str, torch.Tensor], bin_shards: int = 0) -> list[Path]:
    """Write one model into ``folder``: ``model.safetensors``, or ``bin_shards`` torch shards with
    ``pytorch_model.bin.index.json`` (as the hub serves pythia-12b). Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    if not bin_shards:
        _save(sd, folder / "model.safetensors")
        return [folder / "model.safetensors"]
    names = list(sd)
    per = -(-len(names) // bin_shards)
    files, weight_map = [], {}
    for i in range(bin_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{bin_shards:05d}.bin"
        part = names[i * per : (i + 1) * per]
        _save({n: sd[n] for n in part}, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
        files.append(folder / fname)
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return [*files, index]


def write_hf_cache(
    out: Path,
    cfg: dict,
    steps: list[int],
    *,
    name: str = "pythia",
    bin_shards: int = 0,
    same: dict[int, int] | None = None,
) -> Path:
    """Write ``out/models--EleutherAI--<name>/`` as the Hugging Face cache holds it after a
    ``snapshot_download`` of each ``stepN`` revision; returns that folder. ``same`` maps a step to
    the step whose weights it repeats."""
    repo = out / f"models--EleutherAI--{name}"
    for step in steps:
        commit = hashlib.sha1(f"{name}/step{step}".encode()).hexdigest()  # a branch's commit
        snap = repo / "snapshots" / commit
        staging = repo / ".staging" / commit
        files = model_files(staging, state_dict(cfg, seed=(same or {}).get(step, step)), bin_shards)
        (staging / "config.json").write_text(json.dumps(cfg, indent=2))
        snap.mkdir(parents=True, exist_ok=True)
        for f in [*files, staging / "config.json"]:  # content-addressed blobs, as the hub's
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if blob.exists():
                f.unlink()
            else:
                os.replace(f, blob)
            link = snap / f.name
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(blob, snap))
        staging.rmdir()
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
    (repo / ".staging").rmdir()
    return repo


def write(
    out: Path,
    cfg: dict,
    steps: list[int],
    *,
    bin_shards: int = 0,
    same: dict[int, int] | None = None,
) -> Path:
    """Write ``out/step<N>/{model.safetensors, config.json}`` for each step; existing ones stay."""
    for step in steps:
        folder = out / f"step{step}"
        if (folder / "config.json").exists():
            continue
        model_files(folder, state_dict(cfg, seed=(same or {}).get(step, step)), bin_shards)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # last: marks it complete
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="160m")
    ap.add_argument("--steps", default="0,1000", help="comma-separated steps, one folder each")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", action="store_true", help="the Hugging Face cache layout")
    ap.add_argument("--bin", type=int, default=0, help="N torch .bin shards, not safetensors")
    ap.add_argument("--same", default="", help="STEP=OTHER,...: STEP repeats OTHER's weights")
    ap.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary for tests")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    same = dict(tuple(map(int, kv.split("="))) for kv in args.same.split(",") if kv.strip())
    cfg = config(args.size, args.layers, args.vocab)
    if args.cache:
        out = write_hf_cache(args.out, cfg, steps, name=f"pythia-{args.size}", bin_shards=args.bin,
                             same=same)  # fmt: skip
    else:
        out = write(args.out, cfg, steps, bin_shards=args.bin, same=same)
    print(out)


if __name__ == "__main__":
    main()
