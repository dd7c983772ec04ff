"""AQD-style quantiser: per task, quantisation-aware finetuning to low-bit weights and
activations. Nothing is shared between tasks.

Every conv but the stem quantises its weights to 2^b symmetric levels {-1, -1/3, 1/3, 1}
(b = 2) times a learned scale, and its input activations to 2^b unsigned levels
{0, 1/3, 2/3, 1} times a learned per-layer scale; rounding is straight-through. Stem, head
and BN stay float32. The quantiser math runs in float32 outside autocast, and fp16 AMP is
replaced by bf16 (fp16 gave NaN in quantisation; docs/reference.md, pitfalls).

Two recipes (option ``recipe``, :data:`RECIPES`):

- ``qtool`` (default): the AQD authors' toolbox, aim-uofa/model-quantization (QTool), with
  the settings of its 2-bit LSQ configs (``config/config.lsq.eval.imagenet.2bit.
  torch-resnet18``, ``config/config.ldq.lsq.finetune.cifar100.2bit.resnet20.cbsa.base``:
  ``--wt_quant_group 1 --fm_quant_group 1 --wt_adaptive var-mean``, keywords
  ``dorefa,lsq``) and ``task_cls.py``'s defaults for the rest (``--*_grad_scale none``,
  ``--*_boundary None``; ``--stable 0`` in its utils' ``config.py``):

  * one weight scale per layer (``--wt_quant_group 1``; QTool's code default without it is
    per output channel, ``models/quant.py`` line 73);
  * weights standardised per layer before quantising, ``(w - mean) / std`` with the
    unbiased std, both held constant in the backward pass (``--wt_adaptive var-mean``,
    ``models/quant.py`` lines 535-537: statistics of ``x.data``); the quantised weight is
    *not* mapped back (``adaptive_restore`` is False, line 572);
  * every scale starts at 1.0 (``boundary`` None -> 1.0, lines 180-181, filled at 195/240;
    ``stable`` 0 means no data-based warm-up, lines 419-421);
  * scale-gradient factor 1 (``grad_scale`` 'none' -> 1, lines 183-189, applied by
    ``models/dorefa.py`` ``GradientScale``), not LSQ's 1/sqrt(N Q);
  * the input is divided by the scale and clamped *before* rounding (lines 473-479 for
    activations, 538-548 for weights), so the input gradient passes where
    0 <= x / alpha <= 1 (weights: -1 <= w / alpha <= 1) and is 0 outside, including
    x / s in (Q, Q + 1/2) (s = alpha / Q, the step); the scale gets
    d out / d alpha = level / Q - (x / alpha) * inside (the clamp's and the rounding's
    straight-through gradients: 1 above the range, 0 below);
  * the scale enters as |alpha| (``clip_val.abs()``, lines 474 and 539).

  The band's bounds themselves (x = 0 or x = alpha exactly) pass the gradient here: the
  subgradient 1 that onnxruntime's clip gradient states, which we believe PyTorch's
  ``clamp`` gave in QTool's time (not checked against a PyTorch of 2020); PyTorch 2.14's
  ``clamp`` gives 0 there. QTool's own
  ``quantization`` module, run on PyTorch 2.14 beside this one on the same weights, input
  and upstream gradient (2-bit, per-layer, var-mean, a 3x3 conv), agrees in forward values,
  input, weight and both scale gradients within 8e-6, except the input gradient at inputs
  exactly 0 (post-ReLU zeros, which ReLU's own gradient zeroes anyway).

- ``lsq``: the suite's earlier variant: per-output-channel weight scales initialised at
  2 mean|w| (near the MSE-optimal 4-level scale of Gaussian weights, ours), activation
  scales initialised from the first batch as LSQ (2 mean|x| sqrt(Q)), LSQ's gradient
  factor 1/sqrt(N Q) (Esser et al. 2020, N values per scale), no standardisation, the
  scale as max(alpha, EPS), and PyTorch's fake-quant classification of the input gradient
  (it passes where the *rounded* level lies in 0..Q, i.e. x / s in [-1/2, Q + 1/2)).

Both clamp the scale's magnitude at EPS (QTool has no floor: ``__EPS__ = 0``) so a scale
driven to 0 cannot divide by zero.

Stored per task: the weight codes bit-packed at b bits, the scales (float32), and the float32
parts (stem, BN, head). The model rebuilt from the packed codes computes the same quantised
weights as the trained one, bit for bit (see :func:`benchmarks.methods.common.ste`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.core.checks import OneOf, Range
from benchmarks.core.protocols import Protocol, S
from benchmarks.core.store import ArtifactStore, Transaction
from benchmarks.methods.common import (
    FLOAT32,
    MASKED_BACKBONE,
    check_arch_stored,
    conv_modules,
    fresh_task_model,
    keeps_masked_backbone,
    load_partial_state,
    set_submodule,
    shape_model,
    ste,
    task_state,
    task_state_bytes,
    with_quick_epochs,
)
from benchmarks.methods.contract import Breakdown, Method, MethodContext, TaskInfo
from benchmarks.models import archs
from nws import bitpack

QTOOL = "aim-uofa/model-quantization (QTool, the AQD authors' toolbox)"
EPS = 1e-8  # scales' magnitudes are clamped here so that a scale at 0 cannot divide by zero


@dataclass(frozen=True)
class Recipe:
    """How a :class:`QuantConv`'s scales are laid out, initialised and trained (module doc)."""

    name: str
    layer_scale: bool  # one weight scale per layer (else one per output channel)
    standardise: bool  # weights standardised per scale group before quantising
    lsq_gradient: bool  # scale gradients x 1/sqrt(N Q) (LSQ); else x 1
    clip_band: bool  # dx passes where 0 <= x/alpha <= 1 (else: rounded level in 0..Q)
    abs_scale: bool  # the scale enters as |alpha| (else max(alpha, EPS) only)
    data_init: bool  # scales initialised from weights / the first batch (else 1.0)
    source: str


RECIPES: dict[str, Recipe] = {
    "qtool": Recipe("qtool", layer_scale=True, standardise=True, lsq_gradient=False,
                    clip_band=True, abs_scale=True, data_init=False,
                    source=f"{QTOOL}: models/quant.py lines 73, 180-189, 473-479, 535-548; "
                           "the 2-bit LSQ configs (--wt_quant_group 1 --wt_adaptive "
                           "var-mean); task_cls.py defaults"),
    "lsq": Recipe("lsq", layer_scale=False, standardise=False, lsq_gradient=True,
                  clip_band=False, abs_scale=False, data_init=True,
                  source="ours: LSQ (Esser et al. 2020) per-channel, torch.ao fake-quant band"),
}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; ``ValueError`` (CLI exit 2) naming the valid ones."""
    if name not in RECIPES:
        raise ValueError(f"aqd recipe={name!r} is unknown; valid: {', '.join(RECIPES)} "
                         f"(--opt recipe=qtool is the reference's)")
    return RECIPES[name]


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``x`` exactly, gradient multiplied by ``scale`` (LSQ)."""
    return ste(x, x * scale)


def magnitude(raw: torch.Tensor, abs_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scale's magnitude, its derivative in ``raw``): max(|raw|, EPS) and
    sign(raw) * [|raw| >= EPS] (QTool), or max(raw, EPS) and [raw >= EPS] (LSQ)."""
    if abs_scale:
        mag = raw.abs()
        return mag.clamp_min(EPS), raw.sign().mul_(mag >= EPS)
    return raw.clamp_min(EPS), (raw >= EPS).to(raw.dtype)


def _magnitude(raw: torch.Tensor, abs_scale: bool) -> torch.Tensor:
    """:func:`magnitude` in plain autograd (the per-layer path)."""
    return (raw.abs() if abs_scale else raw).clamp_min(EPS)


def group_stats(flat: torch.Tensor, lengths: torch.Tensor,
                group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, its group's mean and unbiased std (two passes, ``segment_reduce``),
    as QTool's ``var-mean`` standardisation (``torch.std_mean``, unbiased) up to rounding.
    ``flat``: (N,) grouped contiguously; ``lengths``: elements per group; ``group``: the
    group id per element (int32). Shared by the per-layer and the batched path, so both
    standardise bit for bit alike."""
    n = lengths.to(flat.dtype)
    mean = torch.segment_reduce(flat, "sum", lengths=lengths, unsafe=True).div_(n)
    mean_el = mean.index_select(0, group)
    d = flat - mean_el
    var = torch.segment_reduce(d * d, "sum", lengths=lengths, unsafe=True).div_(n - 1)
    return mean_el, var.sqrt_().index_select(0, group)


def fake_quantize(x: torch.Tensor, s: torch.Tensor, q: int, zero_point: torch.Tensor,
                  enabled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``clamp(round(x * (1 / s)), 0, Q) * s``, whether the rounded level lies in 0..Q):
    PyTorch's fake-quantise op (zero point 0), one kernel that reads ``s`` on the device.

    Inside ``torch.compile`` the same values from plain ops, which dynamo can trace (the
    fake-quant op has no fake-tensor kernel: it would break the graph): the reciprocal
    ``1 / s`` in float32 times ``x`` (the kernel multiplies by the reciprocal, it does not
    divide), rounded half to even (the kernel's ``nearbyint``), clamped and scaled back.
    Bit for bit the kernel's values (``tests/baselines/test_aqd.py``)."""
    if not torch.compiler.is_compiling():
        return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, s, zero_point, enabled, 0, q)
    level = torch.round(x * s.reciprocal())
    return level.clamp(0, q) * s, (level >= 0) & (level <= q)


class _ActQuant(torch.autograd.Function):
    """``x`` on the levels ``0, s, ..., Q s`` (``s = alpha / Q``, the step): PyTorch's own
    fake-quantise op, ``clamp(round(x * (1 / s)), 0, Q) * s`` in one kernel that reads
    ``s`` on the device (no host sync; :func:`fake_quantize`), with the gradients written
    out:

    - dx = dy where ``inside``, else 0. ``clip_band`` (QTool): inside = 0 <= x <= alpha
      (clamp before rounding); else inside = the rounded level lies in 0..Q (PyTorch's
      fake-quant convention, x / s in [-1/2, Q + 1/2)).
    - ds = gf * sum(dy * (level - (x / s) * inside)) = gf / s * sum(dy * (out - x * inside))
      (LSQ's form, gradient factor ``gf``: 1 in QTool).

    2 ops forward (4 with ``clip_band``: a clamp and a compare for the band), 4-5 backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor | None, q: int,
                gf: float, zero_point: torch.Tensor, enabled: torch.Tensor,
                zero: torch.Tensor) -> torch.Tensor:
        out, inside = fake_quantize(x, s, q, zero_point, enabled)
        if alpha is not None:  # QTool's band: the clamp of x / alpha to [0, 1]
            inside = torch.clamp(x, zero, alpha) == x
        e = torch.addcmul(out, x, inside, value=-1)  # s * d out / d s
        ctx.save_for_backward(e, inside, s)
        ctx.gf = gf
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        e, inside, s = ctx.saved_tensors
        ds = (g * e).sum()
        if ctx.gf != 1:
            ds = ds * ctx.gf
        return g * inside, ds / s, None, None, None, None, None, None


class _ActSteps(torch.autograd.Function):
    """Every layer's activation step ``m / Q`` from its own 0-d scale (``m``: the scale's
    magnitude, :func:`magnitude`), in one stacked pass. Outputs the L steps, then, with
    ``with_scales`` (QTool's band), the L magnitudes (no gradient: the band only). Written
    out because autograd's own backward of ``stack`` + ``clamp_min`` + ``unbind`` runs one
    op per layer."""

    @staticmethod
    def forward(ctx, q: int, abs_scale: bool, with_scales: bool,
                *alphas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mag, dmag = magnitude(torch.stack(alphas).float(), abs_scale)
        ctx.save_for_backward(dmag)
        ctx.q, ctx.n = q, len(alphas)
        if not with_scales:
            return (mag / q).unbind()
        mags = mag.unbind()
        ctx.mark_non_differentiable(*mags)
        return *(mag / q).unbind(), *mags

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (dmag,) = ctx.saved_tensors
        steps = torch.stack(grads[:ctx.n])
        return None, None, None, *steps.mul_(dmag).div_(ctx.q).unbind()


class _WeightQuant(torch.autograd.Function):
    """Every layer's quantised weight in one pass over all weights (flat), bit for bit the
    values of :meth:`QuantConv.quantized_weight` (same ops per element), with the gradients
    written out. Per element, with its group's scale magnitude ``a`` (a group: a layer or
    an output channel) and, when standardising, its group's mean and std (constants):
    ``t = (w - mean) / std / a``, ``v = clamp(t, -1, 1)``, ``inside = (v == t)``;
    dw = dy * inside / std (straight-through); per group,
    dalpha = g * sum(dy * (level - v * inside)) * d|alpha| (``g``: LSQ's 1/sqrt(N Q), or 1).

    Inputs: per-element group ids (int32), elements per group, per-group factor ``g`` (None:
    1), Q, whether to standardise, whether the scale enters as |alpha|, the number of layers
    L, then L weights and L scales. Outputs: L quantised weights."""

    @staticmethod
    def forward(ctx, group: torch.Tensor, lengths: torch.Tensor, g_c: torch.Tensor | None,
                q: int, standardise: bool, abs_scale: bool, n: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights, alphas = tensors[:n], tensors[n:]
        w = torch.cat([x.reshape(-1) for x in weights])
        mag, dmag = magnitude(torch.cat(alphas), abs_scale)
        std = None
        if standardise:
            mean, std = group_stats(w, lengths, group)
            w = w.sub_(mean).div_(std)
        a = mag.index_select(0, group)
        # In place where a buffer is free again: a step touches every weight, and on CPU a
        # fresh buffer of all weights costs more (page faults) than the arithmetic.
        t = w.div_(a)
        v = t.clamp(-1, 1)
        inside = v == t
        level = torch.add(v, 1, out=t).mul_(q / 2).round_().mul_(2 / q).sub_(1)
        out = a.mul_(level)
        e = level.addcmul_(v, inside, value=-1)  # d out / d alpha per weight
        ctx.save_for_backward(e, inside, dmag, lengths, g_c, std)
        ctx.shapes = [x.shape for x in weights]
        ctx.sizes = [x.numel() for x in weights]
        ctx.groups = [x.numel() for x in alphas]
        return tuple(p.view(shape) for p, shape in
                     zip(out.split(ctx.sizes), ctx.shapes, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        e, inside, dmag, lengths, g_c, std = ctx.saved_tensors
        g = torch.cat([(gi if gi is not None else e.new_zeros(shape)).reshape(-1)
                       for gi, shape in zip(grads, ctx.shapes, strict=True)])
        da = torch.segment_reduce(g * e, "sum", lengths=lengths, unsafe=True).mul_(dmag)
        if g_c is not None:
            da = da.mul_(g_c)
        dw = g.mul_(inside)
        if std is not None:
            dw = dw.div_(std)
        return (None, None, None, None, None, None, None,
                *(d.view(shape) for d, shape in zip(dw.split(ctx.sizes), ctx.shapes,
                                                     strict=True)),
                *da.split(ctx.groups))


class QuantConv(nn.Module):
    """A conv with b-bit weights and b-bit unsigned inputs (one scale), after ``recipe``.

    Inside a model forward, :class:`QuantBank` hands each layer its quantised weight, its
    activation step and scale (``pending``), computed for all layers at once; a layer
    called on its own computes them itself, with the same values."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int, act_bits: int,
                 recipe: Recipe = RECIPES["qtool"]) -> None:
        super().__init__()
        if conv.bias is not None:
            raise ValueError("QuantConv quantises bias-free convs only")
        self.recipe = recipe
        self.weight: nn.Parameter | None = nn.Parameter(conv.weight.detach().clone())
        self.register_buffer("codes", None)  # set by load_codes when rebuilt from the store
        # the fake-quant op's zero point (int32) and "enabled" flag, on the layer's device
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        self.register_buffer("fq_enabled", torch.ones((), dtype=torch.long), persistent=False)
        self.register_buffer("zero", torch.zeros(()), persistent=False)  # the band's floor
        w = self.weight.detach()
        self.groups = 1 if recipe.layer_scale else w.shape[0]
        self.per_group = w.numel() // self.groups
        if recipe.data_init:  # ours: 2 mean|w| per group, near the 4-level MSE optimum
            init = 2 * w.reshape(self.groups, -1).abs().mean(dim=1).clamp_min(1e-4)
        else:  # QTool: boundary None -> 1.0 (models/quant.py lines 180-181, 240)
            init = torch.ones(self.groups)
        self.alpha_w = nn.Parameter(init)
        self.alpha_a = nn.Parameter(torch.tensor(1.0))  # QTool: 1.0 (lines 180-181, 195)
        self.act_initialised = not recipe.data_init
        # the same flag on the device, read by a compiled step (see _init_act_scale)
        self.register_buffer("act_ready", torch.tensor(self.act_initialised),
                             persistent=False)
        self.qw, self.qa = 2**weight_bits - 1, 2**act_bits - 1
        self.weight_bits = weight_bits
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups_conv = conv.dilation, conv.groups
        # (quantised weight or None, (activation step, scale) or None), set by QuantBank
        self.pending: tuple[torch.Tensor | None, tuple[torch.Tensor, Any] | None] = (
            None, None)

    def _group_ids(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.full((self.groups,), self.per_group, device=device)
        group = torch.arange(self.groups, device=device, dtype=torch.int32)
        return group.repeat_interleave(self.per_group), lengths

    def _alpha_w(self) -> torch.Tensor:
        mag = _magnitude(self.alpha_w.float(), self.recipe.abs_scale)
        if self.recipe.lsq_gradient:
            mag = grad_scale(mag, 1 / math.sqrt(self.per_group * self.qw))
        return mag

    def weight_codes(self) -> torch.Tensor:
        """Codes in 0..Q as floats with a straight-through gradient to the latent weight."""
        if self.weight is None:
            raise RuntimeError("a QuantConv rebuilt from codes has no latent weight")
        w = self.weight.float().reshape(-1)
        a = self._alpha_w()
        group, lengths = self._group_ids(w.device)
        if self.recipe.standardise:  # statistics held constant (QTool: x.data)
            mean, std = group_stats(w.detach(), lengths, group)
            w = (w - mean) / std
        v = (w / a.index_select(0, group)).clamp(-1, 1)
        u = (v + 1) * (self.qw / 2)
        return ste(u.round(), u).view_as(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        codes = self.codes if self.codes is not None else self.weight_codes()
        a = self._alpha_w()
        if self.groups == 1:
            return (codes * (2 / self.qw) - 1) * a
        return (codes * (2 / self.qw) - 1) * a[:, None, None, None]

    def _init_act_scale(self, x: torch.Tensor) -> None:
        """LSQ's init from the first training batch: step 2 mean|x| / sqrt(Q), the scale Q
        steps, kept only while the device flag ``act_ready`` is off:
        ``alpha_a = where(act_ready, alpha_a, init)``, on the device (no host read).

        Eager, the Python flag ``act_initialised`` decides whether this runs (no op once
        initialised). A compiled step must trace the same code every step (a Python flag
        flipping after the first would recompile it), so there it runs every step and the
        device flag alone decides; the same values as eager."""
        with torch.no_grad():
            init = 2 * x.detach().abs().mean() * math.sqrt(self.qa)
            self.alpha_a.copy_(torch.where(self.act_ready, self.alpha_a, init))
            self.act_ready.fill_(True)
        if not torch.compiler.is_compiling():
            self.act_initialised = True

    def quantize_input(self, x: torch.Tensor,
                       step: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` on Q + 1 levels; ``step``: (alpha / Q, alpha or None), when precomputed
        (:class:`QuantBank`; alpha only for QTool's band)."""
        if self.training and ((self.recipe.data_init and torch.compiler.is_compiling())
                              or not self.act_initialised):
            self._init_act_scale(x)
            step = None  # computed before the init
        if step is None:
            mag = _magnitude(self.alpha_a.float(), self.recipe.abs_scale)
            step = (mag / self.qa, mag.detach())
        gf = (1 / math.sqrt(x.numel() // x.shape[0] * self.qa) if self.recipe.lsq_gradient
              else 1.0)
        alpha = step[1] if self.recipe.clip_band else None  # None: torch.ao's band
        return _ActQuant.apply(x.float(), step[0], alpha, self.qa, gf, self.zero_point,
                               self.fq_enabled, self.zero)

    def get_extra_state(self) -> dict[str, bool]:
        """The LSQ init flag travels with the state dict: a training phase resumed from a
        checkpoint keeps its learned ``alpha_a`` instead of re-initialising it from data."""
        return {"act_initialised": self.act_initialised or bool(self.act_ready)}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.act_initialised = bool(state["act_initialised"])
        self.act_ready.fill_(self.act_initialised)

    def load_codes(self, codes: torch.Tensor) -> None:
        """Become the inference layer of stored codes (drops the latent weight)."""
        self.weight = None
        self.codes = codes.to(torch.float32)
        self.act_initialised = True
        self.act_ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (wq, step), self.pending = self.pending, (None, None)
        with torch.autocast(x.device.type, enabled=False):
            xq = self.quantize_input(x, step)
            wq = self.quantized_weight() if wq is None else wq
        return F.conv2d(xq, wq, None, self.stride, self.padding, self.dilation,
                        self.groups_conv)


class QuantBank:
    """Every :class:`QuantConv`'s quantised weight and activation scale of a model at once.

    A forward pre-hook of the model (installed by :meth:`AQD._quantize`): before each
    forward, the weights of all layers are quantised in one flat pass (:class:`_WeightQuant`,
    layers with latent weights only; rebuilt layers use their codes) and the activation
    steps of all layers come from one stacked pass (:class:`_ActSteps`), so no per-layer
    loop of small ops runs per step and nothing reads a value on the host. The activations
    themselves are quantised per layer (each depends on its own input), in PyTorch's
    fake-quant kernel (:class:`_ActQuant`). Values equal the per-layer path's bit for bit.
    """

    def __init__(self, layers: list[QuantConv]) -> None:
        if len({(m.qw, m.qa, m.recipe) for m in layers}) != 1:
            raise ValueError("AQD layers of one model differ in bit widths or recipe")
        self.layers = layers
        self.qw, self.qa, self.recipe = layers[0].qw, layers[0].qa, layers[0].recipe
        self.per = [m.per_group for m in layers for _ in range(m.groups)]  # weights per group
        self._index: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _groups(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(group id per weight, int32; weights per group; LSQ factor per group) on
        ``device``: shapes only, cached; made afresh in a compiled forward (constants of the
        graph; filling the cache there would change a guarded dict and recompile the step),
        as KSM's bank does."""
        if torch.compiler.is_compiling():
            return self._make_groups(device)
        if device not in self._index:
            self._index[device] = self._make_groups(device)
        return self._index[device]

    def _make_groups(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        per = torch.tensor(self.per, device=device)
        group = torch.arange(len(self.per), device=device, dtype=torch.int32)
        return (group.repeat_interleave(per, output_size=sum(self.per)), per,
                1 / torch.sqrt(per.double() * self.qw).float())

    def __call__(self, module: nn.Module, args: tuple) -> None:
        layers, r = self.layers, self.recipe
        out = _ActSteps.apply(self.qa, r.abs_scale, r.clip_band, *(m.alpha_a for m in layers))
        n = len(layers)
        steps = list(zip(out[:n], out[n:] if r.clip_band else [None] * n, strict=True))
        weights: list[torch.Tensor | None] = [None] * len(layers)
        if all(m.weight is not None and m.codes is None for m in layers):
            group, lengths, g_c = self._groups(layers[0].weight.device)
            weights = list(_WeightQuant.apply(
                group, lengths, g_c if r.lsq_gradient else None, self.qw, r.standardise,
                r.abs_scale, len(layers),
                *(m.weight.float() for m in layers), *(m.alpha_w.float() for m in layers)))
        for m, wq, step in zip(layers, weights, steps, strict=True):
            m.pending = (wq, step)


def quantized_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every conv but the stem (the first conv), which stays float32."""
    return conv_modules(model)[1:]


# valid range of the bit widths (benchmarks.core.checks)
BITS = Range(1, 8, "2**bits - 1 levels: torch's fake-quant ops take 8-bit ranges at most",
             integer=True)


class AQD(Method):
    name = "aqd"
    # 2: QTool's recipe by default (docs/reproducibility.md's log)
    rule_version = 2
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {
        "default": {
            "weight_bits": S(2, f"{QTOOL}: --wt_bit 2 in its 2-bit configs", BITS),
            "act_bits": S(2, f"{QTOOL}: --fm_bit 2 in its 2-bit configs", BITS),
            "recipe": S("qtool", f"{QTOOL}, models/quant.py and the 2-bit LSQ configs "
                                 f"(baselines/aqd.py docstring); 'lsq': the suite's earlier "
                                 f"per-channel LSQ variant",
                        OneOf(tuple(RECIPES), "the quantiser recipes")),
            "quick_epochs": S(4, "ours: AQD's own epochs under the quick protocol; 4 (as "
                                 "quick); split_digits, seed 1993: recipe=lsq 99.2% on "
                                 "digits_01; qtool mean 92.9%, lowest 82.2% (digits_89): "
                                 "raise it for harder mini tasks",
                              Range(1, None, "at least one epoch", integer=True)),
        }
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        check_arch_stored(self.name, ctx.arch, keeps_masked_backbone, MASKED_BACKBONE)

    def adjust_protocol(self, protocol: Protocol) -> Protocol:
        prov = dict(protocol.provenance)
        changes: dict[str, Any] = {}
        if protocol.amp == "fp16":
            changes["amp"], prov["amp"] = "bf16", "AQD: bf16 instead of fp16 (fp16 gave NaN)"
        protocol = replace(protocol, provenance=prov, **changes) if changes else protocol
        return with_quick_epochs(protocol, self.opt["quick_epochs"], "AQD")

    def _quantize(self, model: nn.Module) -> nn.Module:
        """Every conv but the stem becomes a :class:`QuantConv`; a :class:`QuantBank` hook
        quantises all their weights at once per forward."""
        layers = []
        for name, conv in quantized_convs(model):
            layers.append(QuantConv(conv, self.opt["weight_bits"], self.opt["act_bits"],
                                    recipe(self.opt["recipe"])))
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
        flat = torch.from_numpy(self.task_codes(store, task.index)["codes"])
        offset = 0
        for _, m in model.named_modules():
            if isinstance(m, QuantConv):
                n = m.weight.numel()
                m.load_codes(flat[offset: offset + n].view_as(m.weight))
                offset += n
        if offset != flat.numel():
            raise ValueError(f"stored codes ({flat.numel()}) do not fit the model ({offset})")
        return model.eval()

    @staticmethod
    def task_codes(store: ArtifactStore, task: int) -> dict[str, Any]:
        """{"codes": every quantised layer's weight codes of ``task``, in 0..2^b - 1, flat
        in module order (int64)}: the paper convention's stream (analysis.memory)."""
        info = store.info("codes", task)
        return {"codes": bitpack.unpack(store.get_bytes("codes", task), info.meta["bits"],
                                        info.meta["count"])}

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        model = shape_model(arch)
        quantized = [c.weight for _, c in quantized_convs(model)]
        n_codes = sum(w.numel() for w in quantized)
        per_layer = recipe(options["recipe"]).layer_scale
        weight_scales = len(quantized) if per_layer else sum(w.shape[0] for w in quantized)
        scales = (weight_scales + len(quantized)) * FLOAT32
        stem = conv_modules(model)[0][1].weight.numel() * FLOAT32
        codes = bitpack.packed_nbytes(n_codes, options["weight_bits"])
        return Breakdown(shared={}, per_task=[
            {"codes": codes, "scales": scales, "float": stem + task_state_bytes(arch, c)}
            for c in num_classes])
