"""The oracle itself, against gradients written out by hand."""

from __future__ import annotations

import torch

from correctness import oracle
from correctness.losses import squared_error


def test_linear_regression_gradient_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    grads = oracle.per_example_gradients(model, squared_error, (x, y))
    residual = (model(x) - y).detach().double()  # d(0.5 r²)/dW = r xᵀ, d/db = r
    torch.testing.assert_close(grads["weight"], residual.unsqueeze(-1) * x.double().unsqueeze(1))
    torch.testing.assert_close(grads["bias"], residual)
    assert grads["weight"].dtype == torch.float64


def test_oracle_leaves_model_alone():
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oracle.per_example_gradients(model, squared_error, (torch.randn(2, 3), torch.randn(2, 2)))
    assert model.weight.dtype == torch.float32 and model.weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
