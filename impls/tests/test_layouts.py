"""The layout algebra: for every operation it follows, example n's part of the batched result
(read through the propagated layout) equals the operation run on example n alone; operations
that mix the examples lose the batch instead of guessing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from impls._layouts import Layout, Lost, canonical, from_canonical
from impls._watch import BatchWatch

B = 3


def _example(x: torch.Tensor, layout: Layout, n: int) -> torch.Tensor:
    """Example n alone, in the layout the batched tensor had (batch size 1)."""
    rows = canonical(x, layout, B)[n : n + 1]
    shape = list(x.shape)
    shape[layout.dim] = layout.outer * layout.inner
    return from_canonical(rows, layout, shape)


def _run(op, x, layout, batch_size):
    with BatchWatch(batch_size) as watch:
        watch.set_tag(x, layout)
        out = op(x, batch_size)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tags = [watch.tag_of(o) for o in outs]
    return outs, tags


def _check(op, shape, layout):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    outs, tags = _run(op, x, layout, B)
    for n in range(B):
        alone, alone_tags = _run(op, _example(x, layout, n), layout, 1)
        for out, tag, single, single_tag in zip(outs, tags, alone, alone_tags, strict=True):
            assert isinstance(tag, Layout), tag
            assert tag == single_tag
            torch.testing.assert_close(canonical(out, tag, B)[n], canonical(single, tag, 1)[0])


W = torch.randn(4, 5, dtype=torch.float64)

FOLLOWED = {
    "tanh": (lambda x, b: torch.tanh(x), (B, 4, 5), Layout(0)),
    "add_broadcast": (lambda x, b: x + torch.ones(5, dtype=x.dtype), (B, 4, 5), Layout(0)),
    "add_row": (lambda x, b: torch.ones(4, 1, 1, dtype=x.dtype) * x, (4, B, 5), Layout(1)),
    "where": (lambda x, b: torch.where(x > 0, x, 0.0), (B, 4), Layout(0)),
    "masked_fill": (lambda x, b: x.masked_fill(x > 0, 1.0), (B, 4), Layout(0)),
    "sum_last": (lambda x, b: x.sum(-1), (B, 4, 5), Layout(0)),
    "mean_keepdim": (lambda x, b: x.mean(1, keepdim=True), (B, 4, 5), Layout(0)),
    "sum_before": (lambda x, b: x.sum(0), (4, B, 5), Layout(1)),
    "amax_tuple": (lambda x, b: x.amax((1, 2)), (B, 4, 5), Layout(0)),
    "norm": (lambda x, b: torch.linalg.vector_norm(x, dim=-1), (B, 4, 5), Layout(0)),
    "max_dim": (lambda x, b: torch.max(x, -1), (B, 4, 5), Layout(0)),
    "softmax": (lambda x, b: F.softmax(x, dim=-1), (B, 4, 5), Layout(0)),
    "cumsum": (lambda x, b: x.cumsum(1), (B, 4, 5), Layout(0)),
    "sort": (lambda x, b: x.sort(dim=1), (B, 4, 5), Layout(0)),
    "fold_batch_major": (lambda x, b: x.reshape(b * 4, 5), (B, 4, 5), Layout(0)),
    "unfold_batch_major": (lambda x, b: x.view(b, 4, 5), (B * 4, 5), Layout(0, inner=4)),
    "fold_sequence_major": (lambda x, b: x.reshape(4 * b, 5), (4, B, 5), Layout(1)),
    "flatten": (lambda x, b: x.flatten(1), (B, 4, 5), Layout(0)),
    "flatten_all": (lambda x, b: x.flatten(), (B, 4, 5), Layout(0)),
    "view_heads": (lambda x, b: x.view(b, 4, 5, 1).transpose(1, 2), (B, 4, 5), Layout(0)),
    "unsqueeze": (lambda x, b: x.unsqueeze(0), (B, 4), Layout(0)),
    "transpose": (lambda x, b: x.transpose(0, 1), (B, 4, 5), Layout(0)),
    "permute": (lambda x, b: x.permute(2, 0, 1), (B, 4, 5), Layout(0)),
    "mT": (lambda x, b: x.mT, (4, 5, B), Layout(2)),
    "T": (lambda x, b: x.T, (B, 4), Layout(0)),
    "expand": (lambda x, b: x.unsqueeze(1).expand(b, 2, 4), (B, 4), Layout(0)),
    "getitem_last": (lambda x, b: x[:, -1], (B, 4, 5), Layout(0)),
    "getitem_none": (lambda x, b: x[:, None, 1:3], (B, 4, 5), Layout(0)),
    "getitem_ellipsis": (lambda x, b: x[..., 0], (B, 4, 5), Layout(0)),
    "getitem_index_tensor": (lambda x, b: x[:, torch.tensor([0, 2])], (B, 4, 5), Layout(0)),
    "split": (lambda x, b: x.split(2, dim=1), (B, 4, 5), Layout(0)),
    "chunk": (lambda x, b: x.chunk(2, dim=-1), (B, 4, 6), Layout(0)),
    "unbind": (lambda x, b: x.unbind(1), (B, 4, 5), Layout(0)),
    "cat": (lambda x, b: torch.cat([x, x * 2], dim=1), (B, 4, 5), Layout(0)),
    "stack": (lambda x, b: torch.stack([x, x], dim=0), (B, 4), Layout(0)),
    "matmul_left": (lambda x, b: x @ W[:, :3].T.T.T, (B, 2, 3), Layout(0)),
    "matmul_rows": (lambda x, b: x @ W, (B * 2, 4), Layout(0, inner=2)),
    "matmul_right": (lambda x, b: W @ x, (5, B), Layout(1)),
    "linear": (lambda x, b: F.linear(x, W), (B, 3, 5), Layout(0)),
    "einsum": (lambda x, b: torch.einsum("btf,of->bot", x, W), (B, 2, 5), Layout(0)),
    "layer_norm": (lambda x, b: F.layer_norm(x, (5,)), (B, 4, 5), Layout(0)),
    "conv1d": (lambda x, b: F.conv1d(x, torch.ones(2, 4, 3, dtype=x.dtype)), (B, 4, 6), Layout(0)),
    "conv1d_folded": (
        lambda x, b: F.conv1d(x, torch.ones(2, 4, 3, dtype=x.dtype)),
        (B * 2, 4, 6),
        Layout(0, inner=2),
    ),
    "group_norm": (lambda x, b: F.group_norm(x, 2), (B, 4, 6), Layout(0)),
    "pad": (lambda x, b: F.pad(x, (1, 2)), (B, 4, 5), Layout(0)),
    "cross_entropy": (
        lambda x, b: F.cross_entropy(x, x.new_zeros(x.shape[0]).long(), reduction="none"),
        (B, 5),
        Layout(0),
    ),
    "gather": (
        lambda x, b: torch.gather(x, 1, torch.zeros(x.shape[0], 2, dtype=torch.long)),
        (B, 5),
        Layout(0),
    ),
    "sdpa": (
        lambda x, b: F.scaled_dot_product_attention(x, x, x),
        (B, 2, 4, 5),
        Layout(0),
    ),
    "to_dtype": (lambda x, b: x.float(), (B, 4), Layout(0)),
    "zeros_like": (lambda x, b: torch.zeros_like(x) + x, (B, 4), Layout(0)),
    "inplace": (lambda x, b: x.clone().mul_(2).add_(1), (B, 4), Layout(0)),
    "setitem": (lambda x, b: _setitem(x), (B, 4, 5), Layout(0)),
}


def _setitem(x):
    y = x.clone()
    y[:, 0] = 0.0
    return y


@pytest.mark.parametrize("name", sorted(FOLLOWED))
def test_followed_operations_keep_each_example_apart(name):
    op, shape, layout = FOLLOWED[name]
    _check(op, shape, layout)


LOST = {
    "sum_all": (lambda x, b: x.sum(), (B, 4)),
    "sum_batch": (lambda x, b: x.sum(0), (B, 4)),
    "mean_batch_tuple": (lambda x, b: x.mean((0, 1)), (B, 4)),
    "softmax_batch": (lambda x, b: F.softmax(x, dim=0), (B, 4)),
    "reshape_split": (lambda x, b: x.reshape(2, -1), (4, 4)),
    "select_example": (lambda x, b: x[0], (B, 4)),
    "slice_examples": (lambda x, b: x[:2], (B, 4)),
    "cat_batch": (lambda x, b: torch.cat([x, x]), (B, 4)),
    "matmul_contract": (lambda x, b: x.T @ x, (B, 4)),
    "unknown_op": (lambda x, b: torch.fft.fft(x), (B, 4)),
    "batch_norm_train": (lambda x, b: F.batch_norm(x, None, None, training=True), (B, 4)),
    "cross_entropy_mean": (
        lambda x, b: F.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.long)),
        (B, 5),
    ),
    "transposed_layer_norm": (lambda x, b: F.layer_norm(x.T, (B,)), (B, 4)),
}


@pytest.mark.parametrize("name", sorted(LOST))
def test_operations_that_mix_or_hide_the_examples_lose_the_batch(name):
    op, shape = LOST[name]
    x = torch.randn(*shape, dtype=torch.float64)
    outs, tags = _run(op, x, Layout(0), B if shape[0] == B else 4)
    assert all(isinstance(t, Lost) and t.reason for t in tags), tags


def test_a_size_equal_to_the_batch_size_is_not_the_batch():
    """A tensor not computed from the inputs carries no examples, whatever its shape."""
    x = torch.randn(B, 4)
    with BatchWatch(B, [x]) as watch:
        positions = torch.arange(B)  # [B], as long as the batch, but shared by every example
        shared = torch.randn(B, 4) * positions[:, None]
        mixed = x + shared
    assert watch.tag_of(positions) is None and watch.tag_of(shared) is None
    assert watch.tag_of(mixed) == Layout(0)


def test_canonical_round_trip():
    x = torch.randn(4, 2 * B * 3, 5)
    layout = Layout(1, outer=2, inner=3)
    rows = canonical(x, layout, B)
    assert rows.shape == (B, 6, 4, 5)
    torch.testing.assert_close(from_canonical(rows, layout, x.shape), x)


def test_reads_of_shapes_types_and_flags_pass_through_and_nothing_else():
    from impls._layouts import reads_metadata_only

    x = torch.randn(2, 3)
    calls = []

    class Recording(BatchWatch):
        def follow(self, func, args, kwargs, result):
            calls.append(func)
            super().follow(func, args, kwargs, result)

    with Recording(2, [x]) as watch:
        assert (x.shape, x.dim(), x.dtype, x.stride(), x.is_contiguous()) is not None
        assert calls == []  # read without the watch's work
        view = x.view(3, 2)
        assert watch.tag_of(view) is not None  # a computation is still followed
        assert x.T._base is x
    assert len(calls) == 3  # view, the T property and _base (a tensor: followed)
    for func in (torch.Tensor.view, torch.Tensor.detach, torch.Tensor.new_zeros, F.linear):
        assert not reads_metadata_only(func)
