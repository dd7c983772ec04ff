"""AQD-style quantiser: per task, quantisation-aware finetuning to low-bit weights and
activations (REFERENCE §4). Nothing is shared between tasks.

Every conv but the stem quantises its weights to 2^b symmetric levels {-1, -1/3, 1/3, 1}
(b = 2) times a learned per-output-channel scale, and its input activations to 2^b unsigned
levels {0, 1/3, 2/3, 1} times a learned per-layer scale. Rounding is straight-through and
the scales get LSQ-style gradient scaling 1/sqrt(N Q) (N values per scale, Q = 2^b - 1
steps). Stem, head and BN stay float32. The quantiser math runs in float32 outside autocast,
and fp16 AMP is replaced by bf16 (REFERENCE §6: fp16 gave NaN in quantisation).

Stored per task: the weight codes bit-packed at b bits, the scales (float32), and the float32
parts (stem, BN, head). The model rebuilt from the packed codes computes the same quantised
weights as the trained one, bit for bit (see :func:`baselines.common.ste`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import (
    FLOAT32,
    conv_modules,
    fresh_task_model,
    load_partial_state,
    set_submodule,
    shape_model,
    ste,
    task_state,
    task_state_bytes,
    with_quick_epochs,
)
from benchmarks import archs
from benchmarks.checks import Range
from benchmarks.method import Breakdown, Method, TaskInfo
from benchmarks.protocols import Protocol, S
from benchmarks.store import ArtifactStore, Transaction
from nws import bitpack

AQD = "REFERENCE §4 (AQD-style quantiser)"
EPS = 1e-8  # scales are clamped here so that a scale driven to 0 cannot divide by zero


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``x`` exactly, gradient multiplied by ``scale`` (LSQ)."""
    return ste(x, x * scale)


class _ActQuant(torch.autograd.Function):
    """``x`` on the levels ``0, s, ..., Q s`` (``s = a / Q``, the step): PyTorch's own
    fake-quantise op, ``clamp(round(x * (1 / s)), 0, Q) * s`` in one kernel that reads ``s``
    on the device (no host sync), with the LSQ gradients written out: dx = dy where the
    rounded level lies in 0..Q (straight-through, PyTorch's fake-quant convention), else 0;
    ds = gf * sum(dy * (level - (x / s) * inside)) = gf / s * sum(dy * (out - x * inside))
    (LSQ, gradient scale ``gf``), the classification torch.ao's learnable fake-quant uses:
    x / s within half a step beyond 0 or Q rounds inside, so it passes dx and gives ds the
    residual Q - x / s there, where the LSQ paper's clip on x / s gives 0 and Q. 2 ops
    forward, 5 backward (11 in the earlier clamp-then-round form, which also ran one
    ``select`` per layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, q: int, gf: float,
                zero_point: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
        out, inside = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, s, zero_point, enabled, 0, q)
        e = torch.addcmul(out, x, inside, value=-1)  # s * d out / d s
        ctx.save_for_backward(e, inside, s)
        ctx.gf = gf
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        e, inside, s = ctx.saved_tensors
        return g * inside, (g * e).sum() * ctx.gf / s, None, None, None, None


class _ActSteps(torch.autograd.Function):
    """Every layer's activation step ``s = max(alpha_a, EPS) / Q`` from its own 0-d scale,
    in one stacked pass; ds/dalpha = 1/Q where alpha >= EPS, else 0 (the clamp). Written
    out because autograd's own backward of ``stack`` + ``clamp_min`` + ``unbind`` runs one
    op per layer (23 ops for ResNet-18 against 4 here)."""

    @staticmethod
    def forward(ctx, q: int, *alphas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = torch.stack(alphas).float()
        ctx.save_for_backward(raw >= EPS)
        ctx.q = q
        return raw.clamp_min(EPS).div_(q).unbind()

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (live,) = ctx.saved_tensors
        return None, *(torch.stack(grads).mul_(live).div_(ctx.q)).unbind()


class _WeightQuant(torch.autograd.Function):
    """Every layer's quantised weight in one pass over all weights (flat), bit for bit the
    values of :meth:`QuantConv.quantized_weight` (same ops per element), with the gradients
    written out: dw = dy inside the clamp range (straight-through); per output channel,
    dalpha = g_c * sum(dy * (level - clamp(w / alpha, -1, 1) * inside)) where alpha >= EPS
    (LSQ, ``g_c`` = 1 / sqrt(per-channel count * Q); the clamp at EPS passes no gradient).

    Inputs: per-element channel ids (int32), elements per channel, ``g_c``, Q, the number of
    layers L, then L weights and L per-channel scales. Outputs: L quantised weights."""

    @staticmethod
    def forward(ctx, channel: torch.Tensor, lengths: torch.Tensor, g_c: torch.Tensor,
                q: int, n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, alphas = tensors[:n], tensors[n:]
        w = torch.cat([x.reshape(-1) for x in weights])
        raw = torch.cat(alphas)
        a = raw.clamp_min(EPS).index_select(0, channel)
        # In place where a buffer is free again: a step touches every weight, and on CPU a
        # fresh buffer of all weights costs more (page faults) than the arithmetic.
        t = w.div_(a)
        v = t.clamp(-1, 1)
        inside = v == t
        level = torch.add(v, 1, out=t).mul_(q / 2).round_().mul_(2 / q).sub_(1)
        out = a.mul_(level)
        e = level.addcmul_(v, inside, value=-1)  # d out / d alpha per weight
        ctx.save_for_backward(e, inside, raw, lengths, g_c)
        ctx.shapes = [x.shape for x in weights]
        ctx.sizes = [x.numel() for x in weights]
        ctx.channels = [x.numel() for x in alphas]
        return tuple(p.view(shape) for p, shape in
                     zip(out.split(ctx.sizes), ctx.shapes, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        e, inside, raw, lengths, g_c = ctx.saved_tensors
        g = torch.cat([(gi if gi is not None else e.new_zeros(shape)).reshape(-1)
                       for gi, shape in zip(grads, ctx.shapes, strict=True)])
        da = torch.segment_reduce(g * e, "sum", lengths=lengths, unsafe=True)
        da = da * g_c * (raw >= EPS)
        dw = g.mul_(inside).split(ctx.sizes)
        return (None, None, None, None, None,
                *(d.view(shape) for d, shape in zip(dw, ctx.shapes, strict=True)),
                *da.split(ctx.channels))


class QuantConv(nn.Module):
    """A conv with b-bit weights (per-channel scale) and b-bit unsigned inputs (one scale).

    Inside a model forward, :class:`QuantBank` hands each layer its quantised weight and
    its activation scale (``pending``), computed for all layers at once; a layer called on
    its own computes them itself, with the same values."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        if conv.bias is not None:
            raise ValueError("QuantConv quantises bias-free convs only")
        self.weight: nn.Parameter | None = nn.Parameter(conv.weight.detach().clone())
        self.register_buffer("codes", None)  # set by load_codes when rebuilt from the store
        # the fake-quant op's zero point (int32) and "enabled" flag, on the layer's device
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        self.register_buffer("fq_enabled", torch.ones((), dtype=torch.long), persistent=False)
        w = self.weight.detach()
        # ours: 2 mean|w| per channel, near the MSE-optimal 4-level scale of Gaussian weights
        self.alpha_w = nn.Parameter(2 * w.abs().mean(dim=(1, 2, 3)).clamp_min(1e-4))
        self.alpha_a = nn.Parameter(torch.tensor(1.0))
        self.act_initialised = False
        self.qw, self.qa = 2**weight_bits - 1, 2**act_bits - 1
        self.weight_bits = weight_bits
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.per_channel = w[0].numel()
        # (quantised weight or None, activation step a / Q or None), set by QuantBank
        self.pending: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _alpha_w(self) -> torch.Tensor:
        g = 1 / math.sqrt(self.per_channel * self.qw)
        return grad_scale(self.alpha_w.float().clamp_min(EPS), g)[:, None, None, None]

    def weight_codes(self) -> torch.Tensor:
        """Codes in 0..Q as floats with a straight-through gradient to the latent weight."""
        if self.weight is None:
            raise RuntimeError("a QuantConv rebuilt from codes has no latent weight")
        v = (self.weight.float() / self._alpha_w()).clamp(-1, 1)
        u = (v + 1) * (self.qw / 2)
        return ste(u.round(), u)

    def quantized_weight(self) -> torch.Tensor:
        codes = self.codes if self.codes is not None else self.weight_codes()
        return (codes * (2 / self.qw) - 1) * self._alpha_w()

    def _init_act_scale(self, x: torch.Tensor) -> None:
        if self.training and not self.act_initialised:
            with torch.no_grad():  # LSQ init: step 2 mean|x| / sqrt(Q), scale = Q steps
                self.alpha_a.fill_(float(2 * x.detach().abs().mean() * math.sqrt(self.qa)))
            self.act_initialised = True

    def quantize_input(self, x: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` on Q + 1 levels; ``step``: a / Q, when precomputed (:class:`QuantBank`)."""
        if self.training and not self.act_initialised:
            self._init_act_scale(x)
            step = None  # computed before the init
        if step is None:
            step = self.alpha_a.float().clamp_min(EPS) / self.qa
        g = 1 / math.sqrt(x.numel() // x.shape[0] * self.qa)
        return _ActQuant.apply(x.float(), step, self.qa, g, self.zero_point, self.fq_enabled)

    def get_extra_state(self) -> dict[str, bool]:
        """The LSQ init flag travels with the state dict: a training phase resumed from a
        checkpoint keeps its learned ``alpha_a`` instead of re-initialising it from data."""
        return {"act_initialised": self.act_initialised}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.act_initialised = bool(state["act_initialised"])

    def load_codes(self, codes: torch.Tensor) -> None:
        """Become the inference layer of stored codes (drops the latent weight)."""
        self.weight = None
        self.codes = codes.to(torch.float32)
        self.act_initialised = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (wq, step), self.pending = self.pending, (None, None)
        with torch.autocast(x.device.type, enabled=False):
            xq = self.quantize_input(x, step)
            wq = self.quantized_weight() if wq is None else wq
        return F.conv2d(xq, wq, None, self.stride, self.padding, self.dilation, self.groups)


class QuantBank:
    """Every :class:`QuantConv`'s quantised weight and activation scale of a model at once.

    A forward pre-hook of the model (installed by :meth:`AQD._quantize`): before each
    forward, the weights of all layers are quantised in one flat pass (:class:`_WeightQuant`,
    layers with latent weights only; rebuilt layers use their codes) and the activation
    steps max(alpha_a, EPS) / Q of all layers come from one stacked pass (:class:`_ActSteps`),
    so no per-layer loop of small ops runs per step and nothing reads a value on the host.
    The activations themselves are quantised per layer (each depends on its own input), in
    PyTorch's fake-quant kernel (:class:`_ActQuant`). Values equal the per-layer path's bit
    for bit.
    """

    def __init__(self, layers: list[QuantConv]) -> None:
        if len({(m.qw, m.qa) for m in layers}) != 1:
            raise ValueError("AQD layers of one model differ in bit widths")
        self.layers = layers
        self.qw, self.qa = layers[0].qw, layers[0].qa
        self._index: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _channels(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(channel id per weight, int32; weights per channel; LSQ factor per channel) on
        ``device``: shapes only, cached."""
        if device not in self._index:
            per = torch.tensor([m.per_channel for m in self.layers for _ in range(len(m.alpha_w))],
                               device=device)
            channel = torch.arange(len(per), device=device, dtype=torch.int32)
            self._index[device] = (
                channel.repeat_interleave(per, output_size=int(per.sum())), per,
                1 / torch.sqrt(per.double() * self.qw).float())
        return self._index[device]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        layers = self.layers
        steps = _ActSteps.apply(self.qa, *(m.alpha_a for m in layers))
        weights: list[torch.Tensor | None] = [None] * len(layers)
        if all(m.weight is not None and m.codes is None for m in layers):
            channel, lengths, g_c = self._channels(layers[0].weight.device)
            weights = list(_WeightQuant.apply(
                channel, lengths, g_c, self.qw, len(layers),
                *(m.weight.float() for m in layers), *(m.alpha_w.float() for m in layers)))
        for m, wq, step in zip(layers, weights, steps, strict=True):
            m.pending = (wq, step)


def quantized_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every conv but the stem (the first conv), which stays float32."""
    return conv_modules(model)[1:]


# valid range of the bit widths (benchmarks.checks)
BITS = Range(1, 8, "2**bits - 1 levels: torch's fake-quant ops take 8-bit ranges at most",
             integer=True)


class AQD(Method):
    name = "aqd"
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {
        "default": {
            "weight_bits": S(2, AQD, BITS),
            "act_bits": S(2, AQD, BITS),
            "quick_epochs": S(4, "ours: AQD's own epochs under the quick protocol; 4 (as "
                                 "quick) measured enough for 2-bit QAT on split_digits "
                                 "(99.2% on digits_01), raise it for harder mini tasks",
                                 Range(1, None, "at least one epoch", integer=True)),
        }
    }

    def adjust_protocol(self, protocol: Protocol) -> Protocol:
        prov = dict(protocol.provenance)
        changes: dict[str, Any] = {}
        if protocol.amp == "fp16":
            changes["amp"], prov["amp"] = "bf16", "AQD: bf16 instead of fp16 (REFERENCE §6 NaN)"
        protocol = replace(protocol, provenance=prov, **changes) if changes else protocol
        return with_quick_epochs(protocol, self.opt["quick_epochs"], "AQD")

    def _quantize(self, model: nn.Module) -> nn.Module:
        """Every conv but the stem becomes a :class:`QuantConv`; a :class:`QuantBank` hook
        quantises all their weights at once per forward."""
        layers = []
        for name, conv in quantized_convs(model):
            layers.append(QuantConv(conv, self.opt["weight_bits"], self.opt["act_bits"]))
            set_submodule(model, name, layers[-1])
        if layers:
            model.register_forward_pre_hook(QuantBank(layers))
        return model

    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        return self._quantize(fresh_task_model(self.ctx, task.num_classes, None))

    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv)]
        with torch.no_grad():
            codes = torch.cat([m.weight_codes().flatten() for _, m in layers]).cpu()
        bits = self.opt["weight_bits"]
        tx.put("codes", bitpack.pack(codes.to(torch.int64).numpy(), bits), task=task.index,
               codec="bitpack", meta={"bits": bits, "count": int(codes.numel())})
        scales = {}
        for n, m in layers:
            scales[f"{n}.alpha_w"], scales[f"{n}.alpha_a"] = m.alpha_w, m.alpha_a
        tx.put_tensors("scales", scales, task=task.index)
        stem = conv_modules(model)[0][0]
        floats = {f"{stem}.weight": model.get_submodule(stem).weight}
        tx.put_tensors("float", floats | task_state(model, self.ctx.arch), task=task.index)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = archs.build(self.ctx.arch, task.num_classes)
        load_partial_state(model, store.get_tensors("float", task.index))
        model = self._quantize(model)
        load_partial_state(model, store.get_tensors("scales", task.index))
        info = store.info("codes", task.index)
        flat = torch.from_numpy(bitpack.unpack(store.get_bytes("codes", task.index),
                                               info.meta["bits"], info.meta["count"]))
        offset = 0
        for _, m in model.named_modules():
            if isinstance(m, QuantConv):
                n = m.weight.numel()
                m.load_codes(flat[offset: offset + n].view_as(m.weight))
                offset += n
        if offset != flat.numel():
            raise ValueError(f"stored codes ({flat.numel()}) do not fit the model ({offset})")
        return model.eval()

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        model = shape_model(arch)
        quantized = [c.weight for _, c in quantized_convs(model)]
        n_codes = sum(w.numel() for w in quantized)
        scales = (sum(w.shape[0] for w in quantized) + len(quantized)) * FLOAT32
        stem = conv_modules(model)[0][1].weight.numel() * FLOAT32
        codes = bitpack.packed_nbytes(n_codes, options["weight_bits"])
        return Breakdown(shared={}, per_task=[
            {"codes": codes, "scales": scales, "float": stem + task_state_bytes(arch, c)}
            for c in num_classes])
