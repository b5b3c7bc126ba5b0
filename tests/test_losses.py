"""Tests for specan.losses: batch-norm re-estimation against NumPy, rebuilding a trainer's run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from specan.errors import ModelError
from specan.losses import load, reestimate_bn


def test_reestimate_bn_is_the_mean_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.momentum = 0.3
    x = torch.randn(10, 3, dtype=torch.float64)
    model.double().eval()
    assert reestimate_bn(model, x, batch=4)
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    h = x.numpy() @ w.T + b  # the batch-norm layer's input, by hand
    batches = [h[0:4], h[4:8], h[8:10]]
    mean = np.mean([z.mean(axis=0) for z in batches], axis=0)
    var = np.mean([z.var(axis=0, ddof=1) for z in batches], axis=0)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-12)
    assert bn.momentum == 0.3 and not model.training  # restored


def test_reestimate_bn_without_batch_norm_does_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not reestimate_bn(model, torch.randn(5, 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_without_a_trainer_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="run.json: no trainer named"):
        load(tmp_path)
