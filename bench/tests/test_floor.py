"""The floor (bench/floor.py): what its activation step differentiates, the reductions' forms,
and that measuring it leaves the model as it was."""

from __future__ import annotations

import torch
from torch import nn

from bench import floor
from correctness import losses
from impls.factors import GradientSums, Outer


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(n=5, shape=(6,)):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _recorded(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    with floor._ParameterUses(params) as uses:
        losses_ = losses.cross_entropy(model(batch[0]), batch[1])
    return uses, losses_


def test_the_activation_step_asks_each_use_and_no_parameter_gradient():
    model, batch = _mlp(), _batch()
    uses, per_example = _recorded(model, batch)
    assert len(uses.edges) == 2  # the two Linear calls' outputs
    grads = torch.autograd.grad(per_example.sum(), uses.edges)
    assert [g.shape for g in grads] == [torch.Size([5, 8]), torch.Size([5, 3])]
    floor.activation_step(model, losses.cross_entropy, batch)()
    assert all(p.grad is None for p in model.parameters())


def test_the_activation_step_runs_through_an_opaque_kernel_fed_data():
    """The LSTM's input is data (no gradient): its copy gets one, so the backward runs through
    the fused kernel, whose per-step gate gradients any per-layer method needs."""
    torch.manual_seed(0)
    model, batch = Recurrent(), _batch(shape=(7, 4))
    uses, per_example = _recorded(model, batch)
    through = [e for e in uses.edges if e.node.name() == "torch::autograd::AccumulateGrad"]
    assert len(through) == 1, "the kernel's data input was not given a gradient"
    (grad,) = torch.autograd.grad(per_example.sum(), through)
    assert grad.shape == batch[0].shape and grad.abs().sum() > 0


def test_uncached_copies_drop_caches_and_keep_sharing():
    gen = torch.Generator().manual_seed(2)
    outer = Outer(torch.randn(3, 1, 4, 5, generator=gen), torch.randn(3, 1, 4, 2, generator=gen),
                  (5, 2))  # fmt: skip
    bias = GradientSums(outer, torch.Size([5]))
    bias.sums()  # cached
    memo = {}
    group = {name: floor.uncached(f, memo) for name, f in {"w": outer, "b": bias}.items()}
    assert group["b"]._sums is None and bias._sums is not None
    assert group["b"].outer is group["w"] and group["w"] is not outer
    torch.testing.assert_close(group["b"].sums(), bias.sums())


def test_uncached_copies_rebuild_a_convolutions_patches_from_its_input():
    from impls.layers.conv import Patches

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 3, 6, 6, generator=gen)  # [n, rows, C, H, W]
    patches = Patches(x, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    outer = Outer(torch.randn(2, 1, 36, 4, generator=gen), patches, (4, 3, 3, 3))
    built = patches.build()
    copy = floor.uncached(outer)
    assert copy.source is not patches and copy.source.built is None
    assert copy.source.input is x  # the captured input is shared, not copied
    torch.testing.assert_close(copy.activations, built)


def test_hopeless_forms_are_those_every_decision_prices_far_above_the_other():
    assert floor.hopeless([(100.0, 1.0)], "factored")
    assert not floor.hopeless([(100.0, 1.0), (1.0, 100.0)], "factored")
    assert floor.hopeless([(1.0, 10.0)], "materialised")
    assert not floor.hopeless([], "materialised")


def test_every_group_gets_its_fastest_form_and_the_model_is_untouched():
    model, batch = _mlp(), _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for quantity in ("norms", "gram"):
        groups = floor.captured_groups(model, losses.cross_entropy, batch)
        timings = floor.fastest_forms(groups, quantity, repeats=1)
        assert [t.names for t in timings] == [tuple(g) for g in groups]
        for t in timings:
            assert t.form in floor.FORMS and t.seconds == t.by_form[t.form] > 0
            assert None in t.by_form
        floor.floor_step(model, losses.cross_entropy, batch, quantity)()
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_ghosts_parts_leave_the_model_as_it_was():
    model, batch = _mlp(), _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for quantity in ("norms", "gram"):
        parts = floor.ghost_parts(model, losses.cross_entropy, batch, quantity, 1, 0.001)
        assert min(parts.plain_forward, parts.floor, parts.activation_step, parts.total) > 0
        assert parts.captured_forward > 0
        text = "\n".join(floor.ghost_lines(parts))
        assert f"{parts.total / parts.floor:.3f}x the floor" in text
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_the_floor_command_prints_ghost_beside_the_floor(capsys):
    from bench.__main__ import main

    assert main(["floor", "mlp_mnist", "--batch-size", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "activation step" in out and "x the floor" in out
    assert "ghost's captured forward" in out and "outside the capture" in out


def test_the_floor_report_names_ghosts_refusal_instead_of_failing(monkeypatch):
    from impls import Unsupported

    def refuse(*args, **kwargs):
        raise Unsupported("a refusal for the test")

    monkeypatch.setattr(floor, "ghost_parts", refuse)
    text = floor.floor_report(_mlp(), losses.cross_entropy, _batch(), "norms", rounds=1)
    assert text.splitlines()[-1] == "ghost: unsupported on this model (a refusal for the test)"
