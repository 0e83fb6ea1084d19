"""nn.RNN, nn.LSTM, nn.GRU: the fused kernel replaced by the same recurrence unrolled step by
step, so that every projection is an ``F.linear`` call the linear rule accounts for.

The fused kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu``) exposes no gate
gradients. Unrolled, per layer and direction there is one input projection x W_ihᵀ + b_ih over
all positions [n, T, G·H] and one hidden projection h_{t-1} W_hhᵀ + b_hh per step [n, G·H]
(G = 4 gates for LSTM, 3 for GRU, 1 for RNN); the uses of W_hh at every step are merged into one
factor (positions concatenated). LSTM's ``proj_size`` adds a projection per step
(h = (o·tanh c) W_hrᵀ). The unrolled forward computes the same function as the kernel (PyTorch's
gate order and equations), so outputs agree up to rounding, and it is differentiable twice.
Configurations it does not reproduce run the kernel as usual (the module then gets the vmap
fallback): packed sequences, dropout between layers in training mode.

An LSTM layer without ``proj_size`` whose result need not be differentiable twice takes a faster
route with the same factors (``_lstm_layer``): the fused kernel computes the hidden states
without autograd, both projections are then one ``F.linear`` each over the whole sequence
(x W_ihᵀ + b_ih and [h_0, h_1 .. h_{T-1}] W_hhᵀ + b_hh, the states detached), and
:class:`LSTMCells` runs the cell updates from the summed pre-activations, forward and backward,
its backward carrying the recurrence through W_hh that the detached states leave out. The gate
gradients autograd delivers to the two projections are then every step's exact gate gradients,
and the Python work per step is a handful of kernel calls instead of a dozen autograd nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from impls._layouts import Layout
from impls.layers.replacements import REPLACEMENT_FUNCTIONS, register_replacement

_KERNELS = {
    torch.lstm: "LSTM",
    torch.gru: "GRU",
    torch.rnn_tanh: "RNN_TANH",
    torch.rnn_relu: "RNN_RELU",
}


def _step(mode, x_proj, h_proj, h, c):
    """One step from the two projections (each with its bias): (h', c')."""
    if mode == "LSTM":
        i, f, g, o = (x_proj + h_proj).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        x_r, x_z, x_n = x_proj.chunk(3, -1)
        h_r, h_z, h_n = h_proj.chunk(3, -1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(x_proj + h_proj), None


def _cell_updates(gates, c0):
    """From every step's gate pre-activations gates [n, T, 4H] and c_0 [n, H], without autograd:
    (states [T, n, H], acts [T, 4, n, H] (sigmoid i, f, o; tanh g), cells [T + 1, n, H] (c_0
    first), tanh_c [T, n, H]), time-major. Only the cell state's scan runs step by step.

    ``acts`` keeps each gate's [n, H] block of a step contiguous: on the CPUs measured, tanh
    costs about ten times a sigmoid, and three times that again on a strided view.
    """
    n, steps, four_h = gates.shape
    hidden = four_h // 4
    acts = gates.new_empty(steps, 4, n, hidden)  # a copy: changed in place
    acts.copy_(gates.transpose(0, 1).unflatten(2, (4, hidden)).transpose(1, 2))
    torch.sigmoid_(acts[:, :2])
    torch.sigmoid_(acts[:, 3])
    torch.tanh_(acts[:, 2])
    i, f, g, o = acts.unbind(1)
    cells = gates.new_empty(steps + 1, n, hidden)
    cells[0] = c0
    torch.mul(i, g, out=cells[1:])
    for t in range(steps):
        cells[t + 1].addcmul_(f[t], cells[t])
    tanh_c = torch.tanh(cells[1:])
    return o * tanh_c, acts, cells, tanh_c


class LSTMCells(torch.autograd.Function):
    """LSTM's cell updates over a sequence, as a function of every step's gate pre-activations.

    ``forward(gates [n, T, 4H], c0 [n, H], w_hh [4H, H]) -> (h [n, T, H], c_T [n, H])``, where
    ``gates[:, t]`` = x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh was computed by the caller from the
    values of h_{t-1}, detached for t >= 1. The backward is backpropagation through time: the
    gradient reaching h_{t-1} through gates_t (dgates_t W_hh, the path the detached states cut)
    is added here, so the gradient returned for ``gates`` is every step's exact gate gradient.
    ``w_hh`` is used by the backward only and gets no gradient (the caller's projection of the
    states accounts for it). Not differentiable twice.
    """

    @staticmethod
    def forward(ctx, gates, c0, w_hh):
        with torch._C.DisableTorchFunction():  # plain kernels, whatever mode is active
            states, acts, cells, tanh_c = _cell_updates(gates, c0)
        ctx.save_for_backward(acts, cells, tanh_c, w_hh)
        return states.transpose(0, 1), cells[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_c):
        acts, cells, tanh_c, w_hh = ctx.saved_tensors
        # the gates' dtype: under autocast the caller's hidden projection multiplied by W_hh cast
        # to it, and this backward runs outside autocast
        w_hh = w_hh.to(acts.dtype)
        steps, _, n, hidden = acts.shape
        with torch._C.DisableTorchFunction():  # plain kernels, whatever mode is active
            grad_gates, grad_c0 = _through_time(acts, cells, tanh_c, w_hh, grad_h, grad_c)
        return grad_gates.view(steps, n, 4 * hidden).transpose(0, 1), grad_c0, None


def _through_time(acts, cells, tanh_c, w_hh, grad_h, grad_c):
    """(gate gradients [T, n, 4, H], gradient of c_0) from ``acts`` [T, 4, n, H] and the
    gradients of the hidden states [n, T, H] and of c_T (either None: zero)."""
    steps, _, n, hidden = acts.shape
    i, f, g, o = acts.unbind(1)
    # what does not depend on the recurrence, for every step at once (x - x*y as one addcmul,
    # written where it is read: ten passes over [T, n, H] instead of nineteen)
    through_h = torch.addcmul(o, o, tanh_c * tanh_c, value=-1)  # dc_t += dh_t * through_h_t
    to_o = torch.addcmul(o, o, o, value=-1).mul_(tanh_c)  # dgate_o = dh_t * to_o_t
    to_ifg = acts.new_empty(steps, n, 3, hidden)  # dgate_{i,f,g} = dc_t * to_ifg_t
    torch.addcmul(i, i, i, value=-1, out=to_ifg[:, :, 0]).mul_(g)  # i(1 - i) g
    torch.addcmul(f, f, f, value=-1, out=to_ifg[:, :, 1]).mul_(cells[:-1])  # f(1 - f) c_{t-1}
    torch.addcmul(i, i, g * g, value=-1, out=to_ifg[:, :, 2])  # i(1 - g²)
    grad_gates = acts.new_empty(steps, n, 4, hidden)
    flat = grad_gates.view(steps, n, 4 * hidden)
    if grad_h is None:
        grad_h = acts.new_zeros(steps, n, hidden)
    else:
        # dh_t, then plus dgates_{t+1} W_hh: a copy (autograd's buffer is not ours to change)
        grad_h = grad_h.transpose(0, 1).clone(memory_format=torch.contiguous_format)
    dc = acts.new_zeros(n, hidden) if grad_c is None else grad_c.clone()
    for t in range(steps - 1, -1, -1):
        dh = grad_h[t]
        dc.addcmul_(dh, through_h[t])
        torch.mul(dh, to_o[t], out=grad_gates[t, :, 3])
        torch.mul(dc.unsqueeze(1), to_ifg[t], out=grad_gates[t, :, :3])
        if t:  # h_0 is not detached: its gradient comes through the caller's projection
            grad_h[t - 1].addmm_(flat[t], w_hh)
        dc.mul_(f[t])
    return grad_gates, dc


REPLACEMENT_FUNCTIONS.append(LSTMCells)


def _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, watch):
    """One LSTM layer and direction over x [n, T, F]: (h [n, T, H], h_T, c_T), see the module."""
    with torch.no_grad():  # the hidden states' values, from the fused kernel
        weights = [w.detach() for w in (w_ih, w_hh, b_ih, b_hh) if w is not None]
        states, _, _ = torch.lstm(x.detach(), (h0[None].detach(), c0[None].detach()), weights,
                                  b_ih is not None, 1, 0.0, False, False, True)  # fmt: skip
    previous = torch.cat((h0.unsqueeze(1), states[:, :-1]), 1)
    gates = F.linear(x, w_ih, b_ih) + F.linear(previous, w_hh, b_hh)
    h, c = LSTMCells.apply(gates, c0, w_hh.detach())
    watch.set_tag(h, Layout(0))  # a custom Function's outputs are not seen by the watch
    watch.set_tag(c, Layout(0))
    return h, h[:, -1], c


def unrolled(mode, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first, watch=None):  # fmt: skip
    """What the fused kernel returns, computed step by step; given the ``watch``, LSTM layers
    without projection by :func:`_lstm_layer` (not differentiable twice)."""
    x = input if batch_first else input.transpose(0, 1)  # [n, T, F]
    directions = 2 if bidirectional else 1
    per = (4 if has_biases else 2) + _projected(mode, params, has_biases, num_layers, directions)
    h0, c0 = hx if mode == "LSTM" else (hx, None)
    last_h, last_c = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, *rest = params[k * per : (k + 1) * per]
            b_ih, b_hh = rest[:2] if has_biases else (None, None)
            w_hr = rest[-1] if per % 2 else None  # LSTM with proj_size: h = (o·tanh c) W_hrᵀ
            sequence = x if direction == 0 else x.flip(1)
            if watch is not None and mode == "LSTM" and w_hr is None:
                out, h, c = _lstm_layer(sequence, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, watch)
                outputs.append(out if direction == 0 else out.flip(1))
                last_h.append(h)
                last_c.append(c)
                continue
            x_proj = F.linear(sequence, w_ih, b_ih)  # [n, T, G·H]
            h, c = h0[k], None if c0 is None else c0[k]
            steps = []
            for t in range(sequence.shape[1]):
                h, c = _step(mode, x_proj[:, t], F.linear(h, w_hh, b_hh), h, c)
                if w_hr is not None:
                    h = F.linear(h, w_hr)
                steps.append(h)
            out = torch.stack(steps, 1)
            outputs.append(out if direction == 0 else out.flip(1))
            last_h.append(h)
            last_c.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
    output = x if batch_first else x.transpose(0, 1)
    if mode == "LSTM":
        return output, torch.stack(last_h), torch.stack(last_c)
    return output, torch.stack(last_h)


def _projected(mode, params, has_biases, num_layers, directions) -> int:
    """1 if the flat weights include LSTM's projection weight_hr per layer and direction."""
    return int(len(params) == num_layers * directions * ((4 if has_biases else 2) + 1))


def _replacement_for(mode):
    def replacement(args, kwargs, watch, differentiable):
        if kwargs or len(args) != 9 or not isinstance(args[2], (list, tuple)):
            return NotImplemented  # packed sequences: the kernel, and the fallback decides
        input, hx, params, has_biases, num_layers, dropout, train, bidirectional = args[:8]
        directions = 2 if bidirectional else 1
        projected = _projected(mode, params, has_biases, num_layers, directions)
        per = (4 if has_biases else 2) + projected
        if len(params) != num_layers * directions * per:
            return NotImplemented  # weights this unrolling does not know
        if dropout and train and num_layers > 1:
            return NotImplemented  # the kernel's dropout masks cannot be reproduced
        # the kernel pairs the initial state's dimension 1 with the input's examples: a constant
        # state (nn.LSTM's zeros, built for the batch's size) carries them there
        states = hx if isinstance(hx, (list, tuple)) else [hx]
        for state in states:
            if watch.tag_of(state) is None and not state.requires_grad:
                watch.set_tag(state, Layout(1))
        return unrolled(mode, *args, watch=None if differentiable else watch)

    return replacement


for _kernel, _mode in _KERNELS.items():
    register_replacement(_kernel, _replacement_for(_mode))
