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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from impls._layouts import Layout
from impls.layers.replacements import register_replacement

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


def unrolled(mode, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first):  # fmt: skip
    """What the fused kernel returns, computed step by step."""
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
    def replacement(args, kwargs, watch):
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
        return unrolled(mode, *args)

    return replacement


for _kernel, _mode in _KERNELS.items():
    register_replacement(_kernel, _replacement_for(_mode))
