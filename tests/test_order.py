"""Tests for specan.order: each family's names, given alphabetically, come back in model order."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from specan.order import model_index, model_order


def shuffled(names: list[str], seed: int) -> list[str]:
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


LSTM = [
    f"model.lstm.{w}_{g}_l{k}{s}"
    for k in range(2)
    for s in ("", "_reverse")
    for w in ("weight", "bias")
    for g in ("ih", "hh")
] + ["model.linear.weight", "model.linear.bias"]

MODELS = {
    "mlp layers.N": [f"layers.{i}.weight" for i in range(12)],
    "mlp Sequential": ["0.weight", "2.weight", "4.weight", "10.weight"],
    "mlp fcN": ["fc1.weight", "fc2.weight", "fc3.weight", "fc10.weight"],
    "mlp fcN + out": ["fc1.weight", "fc2.weight", "out.weight"],
    "vgg flat": [f"features.{i}.weight" for i in (0, 3, 7, 10, 14, 17, 20, 24, 40)]
    + ["classifier.weight"],
    "resnet": ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight",
               "layer2.0.conv1.weight", "fc.weight"],
    "paper lstm": LSTM,
    "paper lm": ["model.encoder.weight"]
    + [f"model.transformer_encoder.layers.{i}.{n}" for i in (0, 1, 2, 10, 11)
       for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                 "linear2.weight")]
    + ["model.decoder.weight"],
    "neox": ["gpt_neox.embed_in.weight"]
    + [f"gpt_neox.layers.{i}.{n}.weight" for i in (0, 1, 11)
       for n in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h")]
    + ["embed_out.weight"],
    "llama": ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.{n}.weight" for i in (0, 1, 10)
       for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    + ["lm_head.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"]
    + [f"transformer.h.{i}.{n}.weight" for i in (0, 1, 10)
       for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    + ["lm_head.weight"],
    "bert": ["bert.embeddings.word_embeddings.weight",
             "bert.embeddings.position_embeddings.weight",
             "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.0.attention.self.key.weight",
             "bert.encoder.layer.0.attention.self.value.weight",
             "bert.encoder.layer.0.attention.output.dense.weight",
             "bert.encoder.layer.0.intermediate.dense.weight",
             "bert.encoder.layer.0.output.dense.weight",
             "bert.pooler.dense.weight", "classifier.weight"],
    "autoencoder": ["encoder.0.weight", "encoder.2.weight", "decoder.0.weight",
                    "decoder.2.weight"],
}  # fmt: skip


@pytest.mark.parametrize("family", MODELS)
def test_alphabetical_names_come_back_in_model_order(family: str) -> None:
    names = MODELS[family]
    assert model_order(sorted(names)) == names
    if family != "resnet":  # conv1 and layer1 are unknown names: their given order is kept
        assert model_order(shuffled(names, 1)) == names


def test_the_issue_examples() -> None:
    mlp = model_order(sorted(f"{i}" for i in range(1, 13)))
    assert mlp[:4] == ["1", "2", "3", "4"] and mlp[-3:] == ["10", "11", "12"]
    neox = model_order(sorted(MODELS["neox"]))
    assert neox[0] == "gpt_neox.embed_in.weight" and neox[-1] == "embed_out.weight"
    lstm = model_order(sorted(LSTM))
    assert lstm[-2:] == ["model.linear.weight", "model.linear.bias"]
    vgg = model_order(sorted(MODELS["vgg flat"]))
    assert vgg[0] == "features.0.weight" and vgg[-1] == "classifier.weight"


def test_unknown_names_keep_their_given_order_and_numbers_sort() -> None:
    names = ["stage_b.weight", "stage_a.weight", "blk10.weight", "blk2.weight"]
    assert model_order(names) == ["stage_b.weight", "stage_a.weight", "blk2.weight",
                                  "blk10.weight"]  # fmt: skip
    # idempotent: model order of model order is itself
    for names in MODELS.values():
        assert model_order(model_order(names)) == names


def test_duplicates_once_and_index() -> None:
    assert model_order(["b.2", "b.10", "b.2"]) == ["b.2", "b.10"]
    idx = model_index(["layers.10.weight", "layers.9.weight"])
    assert idx == {"layers.9.weight": 0, "layers.10.weight": 1}
    assert model_order([]) == []


def test_import_is_standard_library_only() -> None:
    code = "import sys, specan.order; assert not {'torch', 'numpy'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
