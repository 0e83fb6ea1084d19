"""nn.RNN, nn.LSTM, nn.GRU: per-example gradients from the gate pre-activations.

The fused kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu``) exposes no gate
gradients. The capture offers this rule that call, and the rule computes the same recurrence
unrolled from ``F.linear`` calls that it records (:class:`LinearUse`): per layer and direction,
one input projection x W_ihᵀ + b_ih over all positions [n, T, G·H], and one hidden projection
h_{t-1} W_hhᵀ + b_hh per step [n, G·H] (G = 4 gates for LSTM, 3 for GRU, 1 for RNN). The
weights' per-example gradients are then Linear ones, kept factored (``Outer``: rows = gate
gradients, cols = x_t or h_{t-1}, all steps concatenated), biases reuse them (``RowSums``).

The unrolled forward computes the same function as the kernel (PyTorch's gate order and
equations), so outputs agree up to rounding, and it is differentiable twice (``create_graph``).
LSTM's ``proj_size`` adds a projection per step (h = (o·tanh c) W_hrᵀ), recorded too.
Configurations it does not reproduce run the kernel as usual and use the vmap fallback: packed
sequences, dropout between layers in training mode.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from impls.layers.base import record_linear, recording, register_rule
from impls.layers.factored import Dense, Outer, RowSums
from impls.layers.fallback import VmapFallback
from impls.layers.linear import flatten_positions

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
    """What the fused kernel returns, computed step by step with recorded projections."""
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
            x_proj = record_linear(sequence, w_ih, b_ih)  # [n, T, G·H]
            h, c = h0[k], None if c0 is None else c0[k]
            steps = []
            for t in range(sequence.shape[1]):
                h, c = _step(mode, x_proj[:, t], record_linear(h, w_hh, b_hh), h, c)
                if w_hr is not None:
                    h = record_linear(h, w_hr)
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


class RecurrentRule(VmapFallback):
    types = (nn.RNN, nn.LSTM, nn.GRU)
    intercepts = True

    def __init__(self):
        super().__init__(recursive=False)

    def intercept(self, func, args, kwargs, uses, create_graph):
        mode = _KERNELS.get(func)
        if mode is None or kwargs or len(args) != 9 or not isinstance(args[2], (list, tuple)):
            return NotImplemented  # packed sequences: the kernel, and the fallback decides
        input, hx, params, has_biases, num_layers, dropout, train, bidirectional = args[:8]
        directions = 2 if bidirectional else 1
        projected = _projected(mode, params, has_biases, num_layers, directions)
        per = (4 if has_biases else 2) + projected
        if len(params) != num_layers * directions * per:
            return NotImplemented  # weights this unrolling does not know
        if dropout and train and num_layers > 1:
            return NotImplemented  # the kernel's dropout masks cannot be reproduced
        with recording(uses):
            return unrolled(mode, *args)

    def factors(self, call):
        factors = self._projection_factors(call)
        if factors is None:
            return {n: Dense(g) for n, g in super().grad_samples(call).items()}
        return factors

    def grad_samples(self, call):
        return {n: f.materialize() for n, f in self.factors(call).items()}

    def _projection_factors(self, call):
        """Local name -> factors, from the recorded projections; None: use the fallback."""
        if not call.uses:
            return None
        n = call.batch_size
        names = {id(p): name for name, p in call.module.named_parameters()}
        inputs, grads, bias_of = defaultdict(list), defaultdict(list), {}
        for use in call.uses:
            weight = names.get(id(use.weight))
            if weight is None or (use.bias is not None and id(use.bias) not in names):
                return None
            x = use.input if call.create_graph else use.input.detach()
            if x.shape[0] != n:
                return None
            inputs[weight].append(flatten_positions(x, n))
            grads[weight].append(flatten_positions(use.grad_output, n))
            if use.bias is not None:
                bias_of[names[id(use.bias)]] = weight
        out = {}
        outers = {}
        for weight in inputs:
            a, g = torch.cat(inputs[weight], 1), torch.cat(grads[weight], 1)
            shape = call.module.get_parameter(weight).shape
            outers[weight] = Outer(g.unsqueeze(1), a.unsqueeze(1), shape)
            if weight in call.wanted:
                out[weight] = outers[weight]
        for bias, weight in bias_of.items():
            if bias in call.wanted:
                out[bias] = RowSums(outers[weight], call.wanted[bias].shape)
        if set(out) != set(call.wanted):
            return None  # a parameter the projections do not account for
        return out


register_rule(RecurrentRule())
