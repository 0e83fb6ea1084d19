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
route with the same factors (``_lstm_layer``): the input projections x W_ihᵀ + b_ih are one
``F.linear`` over the whole sequence, and a scan without autograd (:func:`_forward_scan`, a few
kernel calls per step) computes every step's h_{t-1} W_hhᵀ + b_hh, gates, cell and hidden state.
W_hh's use is recorded with the states [h_0 .. h_{T-1}] as activations and the gates' gradient
(the input projections' output gradient, the same tensor) without computing the hidden
projections a second time (``Capture.record_computed``). :class:`LSTMCells` hands the scan's
results to autograd; its backward is backpropagation through time, so the gradient autograd
delivers to the input projections is every step's exact gate gradient.

Speed, against the fused kernel the floor runs (``python -m bench floor lstm``): the scan's
forward is the gap (32 steps, H=128, 2 threads, least of 30 calls: 1.3-1.4 ms at n=16 against
0.6-0.7 for oneDNN's fused forward, 8.7-9.5 against 6.1-6.7 at n=256); its backward,
:func:`_through_time`, is faster than the fused one at n=16 (1.0 ms against 1.4: the fused
forward and backward 2.0 less its forward). Measured and dropped (n = 16, 64, 256; ms, the scan
here first): the four gates as one ``baddbmm`` into gate-major blocks, i, f, o under one
sigmoid (1.41 / 1.98, 2.84 / 3.49, 8.75 / 10.67); ``mm``, then adding the inputs' projections
with both biases summed beforehand (1.31 / 1.21, 2.79 / 2.94, 9.24 / 9.85: faster at n=16
only); MKL's packed GEMM (``torch.ops.mkl._mkl_linear``: 9.8 us against 17 alone at n=16, but
the add after it costs what it saves: 1.29 / 1.31, 2.79 / 3.01, 9.50 / 10.83); every step's
gates left in one [n, 4H] block, the elementwise calls on its column blocks (1.34 / 2.02,
2.73 / 4.52, 8.75 / 15.09); a feature-major scan; the fused forward, then the gates rebuilt (the
recurrent GEMMs twice); a scalar C++ step (2.5 against 1.4: glibc's ``expf``/``tanhf``
unvectorised). TorchScript saves 0.1-0.35 ms and is deprecated in this torch. What would close
the gap is a vectorised fused step (one kernel per step after the GEMM); no CPU kernel in torch
exposes the gate gradients (``_thnn_fused_lstm_cell`` is CUDA's).
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


def _forward_scan(gates_x, h0, c0, w_hh, b_hh):
    """One LSTM layer's steps from its input projections ``gates_x`` [n, T, 4H] (x W_ihᵀ + b_ih)
    and initial states [n, H], without autograd: (acts [T, 4, n, H] (sigmoid i, f, o; tanh g),
    cells [T + 1, n, H] (c_0 first), tanh_c [T, n, H], states [T + 1, n, H] (h_0 first)),
    time-major. In ``gates_x``'s dtype (autocast's, under it).

    ``acts`` keeps each gate's [n, H] block of a step contiguous: on the CPUs measured, tanh on
    a strided [n, H] column block of [n, 4H] costs four to eight times the contiguous one.
    """
    n, steps, four_h = gates_x.shape
    hidden = four_h // 4
    dtype = gates_x.dtype
    w_t = w_hh.to(dtype).t()
    bias = gates_x.new_zeros(4, 1, hidden) if b_hh is None else b_hh.to(dtype).view(4, 1, hidden)
    acts = gates_x.new_empty(steps, 4, n, hidden)
    cells = gates_x.new_empty(steps + 1, n, hidden)
    cells[0] = c0
    states = gates_x.new_empty(steps + 1, n, hidden)
    states[0] = h0
    tanh_c = gates_x.new_empty(steps, n, hidden)
    projected = gates_x.new_empty(n, four_h)
    gates_by_gate = projected.view(n, 4, hidden).transpose(0, 1)
    # every step's views, made once (indexing in the loop costs more than the math at small n)
    steps_x = gates_x.unbind(1)
    i, f, g, o = (gate.unbind(0) for gate in acts.unbind(1))
    acts_t, if_t, c, h, tanh_t = (x.unbind(0) for x in (acts, acts[:, :2], cells, states, tanh_c))
    for t in range(steps):
        torch.addmm(steps_x[t], h[t], w_t, out=projected)
        torch.add(gates_by_gate, bias, out=acts_t[t])
        torch.sigmoid_(if_t[t])
        torch.sigmoid_(o[t])
        torch.tanh_(g[t])
        torch.mul(i[t], g[t], out=c[t + 1]).addcmul_(f[t], c[t])
        torch.tanh(c[t + 1], out=tanh_t[t])
        torch.mul(o[t], tanh_t[t], out=h[t + 1])
    return acts, cells, tanh_c, states


class LSTMCells(torch.autograd.Function):
    """LSTM's cell updates over a sequence, as a function of every step's gate pre-activations.

    ``forward(gates [n, T, 4H], h0 [n, H], c0 [n, H], w_hh [4H, H], acts, cells, tanh_c,
    states) -> (h [n, T, H], c_T [n, H])`` returns what :func:`_forward_scan` computed (the
    last four arguments, computed beforehand without autograd), as a function of ``gates``
    (x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh at every step), ``h0`` and ``c0``. The backward
    is backpropagation through time: the gradient returned for ``gates`` is every step's exact
    gate gradient, for ``h0`` and ``c0`` theirs. ``w_hh`` is used by the backward only and gets
    no gradient (the caller records its use with the gates' gradient). Not differentiable twice.
    """

    @staticmethod
    def forward(ctx, gates, h0, c0, w_hh, acts, cells, tanh_c, states):
        ctx.save_for_backward(acts, cells, tanh_c, states, w_hh)
        ctx.dtypes = h0.dtype, c0.dtype
        return states[1:].transpose(0, 1), cells[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_c):
        acts, cells, tanh_c, states, w_hh = ctx.saved_tensors
        # the gates' dtype: under autocast the forward multiplied by W_hh cast to it, and this
        # backward runs outside autocast
        w_hh = w_hh.to(acts.dtype)
        with torch._C.DisableTorchFunction():  # plain kernels, whatever mode is active
            grad_gates, grad_c0 = _through_time(acts, cells, tanh_c, states, w_hh, grad_h,
                                                grad_c)  # fmt: skip
            # h_0's gradient through the first step's hidden product, when h_0 needs one
            grad_h0 = torch.mm(grad_gates[:, 0], w_hh) if ctx.needs_input_grad[1] else None
        dtype_h, dtype_c = ctx.dtypes
        grad_h0 = None if grad_h0 is None else grad_h0.to(dtype_h)
        return grad_gates, grad_h0, grad_c0.to(dtype_c), None, None, None, None, None


def _through_time(acts, cells, tanh_c, states, w_hh, grad_h, grad_c):
    """(gate gradients [n, T, 4H], gradient of c_0 [n, H]) from :func:`_forward_scan`'s ``acts``,
    ``cells``, ``tanh_c`` and ``states`` and the gradients of the hidden states [n, T, H] and of
    c_T [n, H] (either None: zero)."""
    steps, _, n, hidden = acts.shape
    i, f, g, o = acts.unbind(1)
    h = states[1:]  # h_t = o_t tanh c_t
    # what does not depend on the recurrence, for every step at once (x - x*y as one addcmul,
    # written where it is read, h_t standing for o_t tanh c_t: eight passes over [T, n, H])
    through_h = torch.addcmul(o, h, tanh_c, value=-1)  # o(1 - tanh² c): dc_t += dh_t * this
    to_o = torch.addcmul(h, o, h, value=-1)  # o(1 - o) tanh c: dgate_o = dh_t * this
    to_ifg = acts.new_empty(steps, n, 3, hidden)  # dgate_{i,f,g} = dc_t * to_ifg_t
    torch.addcmul(i, i, i, value=-1, out=to_ifg[:, :, 0]).mul_(g)  # i(1 - i) g
    torch.addcmul(f, f, f, value=-1, out=to_ifg[:, :, 1]).mul_(cells[:-1])  # f(1 - f) c_{t-1}
    torch.addcmul(i, i, g * g, value=-1, out=to_ifg[:, :, 2])  # i(1 - g²)
    grad_gates = acts.new_empty(steps, n, 4, hidden)
    flat = grad_gates.view(steps, n, 4 * hidden)
    if grad_h is None:
        grad_h = acts.new_zeros(steps, n, hidden)
    else:  # dh_t, then plus dgates_{t+1} W_hh: a copy (autograd's buffer is not ours to change)
        grad_h = grad_h.to(acts.dtype).transpose(0, 1).clone(memory_format=torch.contiguous_format)
    dc = acts.new_zeros(n, hidden) if grad_c is None else grad_c.to(acts.dtype).clone()
    dc_by_gate = dc.unsqueeze(1)
    # every step's views, made once (indexing in the loop costs more than the math at small n)
    dh, f, through_h, to_o, to_ifg, flat_t = (
        x.unbind(0) for x in (grad_h, f, through_h, to_o, to_ifg, flat)
    )
    grad_o, grad_ifg = grad_gates[:, :, 3].unbind(0), grad_gates[:, :, :3].unbind(0)
    for t in range(steps - 1, -1, -1):
        dc.addcmul_(dh[t], through_h[t])
        torch.mul(dh[t], to_o[t], out=grad_o[t])
        torch.mul(dc_by_gate, to_ifg[t], out=grad_ifg[t])
        if t:
            dh[t - 1].addmm_(flat_t[t], w_hh)
        dc.mul_(f[t])
    return flat.transpose(0, 1), dc


REPLACEMENT_FUNCTIONS.append(LSTMCells)


def _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, capture):
    """One LSTM layer and direction over x [n, T, F]: (h [n, T, H], h_T, c_T), see the module.

    W_ih's use is the ``F.linear`` call of the input projections; W_hh's (every step's
    h_{t-1} W_hhᵀ + b_hh) is computed inside the scan and recorded with the gates' gradient,
    which is the input projections' (``Capture.record_computed``), so it is not computed twice.
    """
    gates_x = F.linear(x, w_ih, b_ih)
    with torch.no_grad(), torch._C.DisableTorchFunction():
        acts, cells, tanh_c, states = _forward_scan(gates_x.detach(), h0.detach(), c0.detach(),
                                                    w_hh.detach(), b_hh)  # fmt: skip
        previous = states[:-1].transpose(0, 1).contiguous()  # h_0 .. h_{T-1}: [n, T, H]
    capture.watch.set_tag(previous, Layout(0))
    gates = capture.record_computed(F.linear, (previous, w_hh, b_hh), {}, gates_x)
    h, c = LSTMCells.apply(gates, h0, c0, w_hh.detach(), acts, cells, tanh_c, states)
    capture.watch.set_tag(h, Layout(0))  # a custom Function's outputs are not seen by the watch
    capture.watch.set_tag(c, Layout(0))
    return h, h[:, -1], c


def unrolled(mode, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
             batch_first, capture=None):  # fmt: skip
    """What the fused kernel returns, computed step by step; given the ``capture``, LSTM layers
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
            if capture is not None and mode == "LSTM" and w_hr is None:
                out, h, c = _lstm_layer(sequence, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, capture)
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
    def replacement(args, kwargs, capture):
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
            if capture.watch.tag_of(state) is None and not state.requires_grad:
                capture.watch.set_tag(state, Layout(1))
        return unrolled(mode, *args, capture=None if capture.create_graph else capture)

    return replacement


for _kernel, _mode in _KERNELS.items():
    register_replacement(_kernel, _replacement_for(_mode))
