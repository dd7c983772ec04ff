"""Architectures by name, ImageNet weights with offline rules, and head access.

Every model is built with its 1000-class ImageNet head (the "source head"); methods swap
heads per task with :func:`set_head`. All convolutions are bias-free and followed by BN.

- ``resnet18`` / ``resnet34`` (docs/reference.md §2, authors' code): torchvision's ResNets with the
  max-pool removed (7x7/2 stem straight into layer1, also on 32x32 input: 16x16 after the
  stem, 2x2 before pooling). ImageNet weights load unchanged (max-pool has no parameters).
- ``resnet18-maxpool``: torchvision's ResNet-18 unchanged, max-pool kept (3x3/2 after the
  stem: 8x8 after it on 32x32 input, 1x1 before pooling). Not the paper's network: the NWS
  authors' only baseline trainer (JianJiangKCL/NeuralWeightSearch ``models/BaselineTrainer.py``)
  finetuned this one, so ``--method finetune --arch resnet18-maxpool`` reproduces the setting
  of their Finetune row (docs/reference.md, Finetune). Same parameters and weights as
  ``resnet18``; any method runs on it.
- ``mobilenetv2``: torchvision's MobileNetV2, width 1.0, unchanged (docs/reference.md §2 names no
  change; stride 32, so 32x32 input ends at 1x1 before pooling). Head ``classifier.1``.
- ``vgg16``: VGG16-BN's 13 3x3 convs and 5 max-pools, then global average pooling and one
  512 -> C Linear, the "1x1 head" of docs/reference.md §2 (on 32x32 input the features are
  already 1x1x512). torchvision's three-FC ImageNet classifier has no counterpart and is
  dropped, so the source head stays randomly initialised; the conv biases of the ImageNet
  weights are folded into BN's running mean (exact, see :func:`_fold_conv_bias_into_bn`).
  Table 3's Finetune-VGG16 (1124.0 MiB / 20 tasks = 56.2 per task) fits this model with a
  task-sized head; torchvision's classifier alone would be ~10x that. The authors' code
  used 256-entry VGG16 pools (paper: 512): run NWS with ``--opt pool_size=256``.
- ``timm:NAME``: any timm model, unchanged, head found by timm's ``get_classifier()``,
  ImageNet weights by timm's own mechanism (:mod:`benchmarks.models.timm_archs`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks.core.registry import Registry
from benchmarks.core.seeding import derive_seed
from benchmarks.models.weights_io import WeightsUnavailableError, load_state_dict

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised model
    head: str  # dotted attribute path of the classifier (an nn.Linear)
    torchvision_weights: str | None  # "resnet18:IMAGENET1K_V1", looked up in torchvision
    # Maps a foreign state dict (torchvision's layout) onto this architecture's keys; must
    # leave the architecture's own state dicts unchanged.
    adapt_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # ImageNet weights from elsewhere than torchvision (timm's own mechanism): () -> state dict
    # in this architecture's layout, or WeightsUnavailableError saying how to supply them.
    imagenet: Callable[[], dict[str, torch.Tensor]] | None = None


def _check_arch(obj: object) -> None:
    """A plugin architecture is an :class:`ArchSpec` (TypeError otherwise)."""
    if not isinstance(obj, ArchSpec):
        raise TypeError(f"{type(obj).__name__} is not a benchmarks.models.archs.ArchSpec")


ARCHS: Registry[ArchSpec] = Registry("architecture", group="nws_bench.archs",
                                     validate=_check_arch)


def _resnet_no_maxpool(builder: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        model = builder(weights=None, num_classes=num_classes)
        model.maxpool = nn.Identity()  # docs/reference.md §2: no max-pool, even on 32x32 input
        return model

    return build


ARCHS.register(
    "resnet18",
    ArchSpec(
        "resnet18",
        _resnet_no_maxpool(torchvision.models.resnet18),
        "fc",
        "resnet18:IMAGENET1K_V1",
    ),
    "ResNet-18, 7x7/2 stem, no max-pool, BasicBlocks [2,2,2,2] (docs/reference.md §2)",
)


def _resnet18_with_maxpool(num_classes: int) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


ARCHS.register(
    "resnet18-maxpool",
    ArchSpec("resnet18-maxpool", _resnet18_with_maxpool, "fc", "resnet18:IMAGENET1K_V1"),
    "torchvision's ResNet-18 with its max-pool, as the NWS authors' Finetune trainer "
    "(models/BaselineTrainer.py); not the paper's shared network",
)
ARCHS.register(
    "resnet34",
    ArchSpec(
        "resnet34",
        _resnet_no_maxpool(torchvision.models.resnet34),
        "fc",
        "resnet34:IMAGENET1K_V1",
    ),
    "ResNet-34, ResNet-18's stem (7x7/2, no max-pool), BasicBlocks [3,4,6,3] "
    "(docs/reference.md §2)",
)


def _mobilenet_v2(num_classes: int) -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=1.0)


ARCHS.register(
    "mobilenetv2",
    ArchSpec("mobilenetv2", _mobilenet_v2, "classifier.1", "mobilenet_v2:IMAGENET1K_V1"),
    "MobileNetV2 width 1.0, torchvision, unchanged (stride 32; docs/reference.md §2, Table 3)",
)

# torchvision's configuration "D" (VGG16): output channels, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                     512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG16-BN features (torchvision's module indices), global average pool, 1x1 head.

    Convs are bias-free (a bias before BN is redundant); init follows torchvision's VGG.
    """

    def __init__(self, num_classes: int = IMAGENET_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _fold_conv_bias_into_bn(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16-BN -> :class:`VGG16BN`: fold each conv bias b into the next BN.

    BN(conv(x) + b) with running mean m equals BN(conv(x)) with running mean m - b, in
    eval mode and in training mode (the batch mean absorbs b). The three-FC classifier
    (``classifier.0/3/6``) has no counterpart and is dropped.
    """
    out = {k: v for k, v in sd.items() if not re.fullmatch(r"classifier\.[036]\..*", k)}
    for key in [k for k in out if re.fullmatch(r"features\.\d+\.bias", k)]:
        idx = int(key.split(".")[1])
        if f"features.{idx}.weight" in out and out[f"features.{idx}.weight"].dim() == 4:
            mean = f"features.{idx + 1}.running_mean"
            out[mean] = out[mean] - out.pop(key)
    return out


ARCHS.register(
    "vgg16",
    ArchSpec("vgg16", VGG16BN, "classifier", "vgg16_bn:IMAGENET1K_V1", _fold_conv_bias_into_bn),
    "VGG16-BN, 13 bias-free 3x3 convs, global average pool, 512->C 1x1 head (docs/reference.md §2)",
)


@functools.cache  # looked up on every head access
def _timm_arch(name: str) -> ArchSpec:
    """``timm:name`` (:mod:`benchmarks.models.timm_archs`, imported with timm on first use).
    Raises UnknownNameError (unknown model or tag), ValueError (classifier not a Linear)."""
    from benchmarks.models import timm_archs

    timm_archs.check_name(name)
    return ArchSpec(f"timm:{name}", functools.partial(timm_archs.create, name),
                    timm_archs.head_path(name, IMAGENET_CLASSES), None,
                    imagenet=functools.partial(timm_archs.imagenet_state_dict, name,
                                               IMAGENET_CLASSES))


ARCHS.add_prefix("timm", _timm_arch, "any timm model, e.g. timm:resnet10t (timm.create_model; "
                 "docs/data-and-weights.md, Any timm model)")


def get_head(model: nn.Module, arch: str) -> nn.Linear:
    return model.get_submodule(ARCHS.get(arch).head)


def set_head(model: nn.Module, arch: str, head: nn.Module) -> None:
    parent_name, _, attr = ARCHS.get(arch).head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)


def new_head(model: nn.Module, arch: str, num_classes: int) -> nn.Linear:
    """A freshly initialised Linear head of the right input width (torch default init)."""
    return nn.Linear(get_head(model, arch).in_features, num_classes)


_NO_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("no_init", default=False)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Inside this block :func:`build` skips the random init, for models whose every tensor
    is loaded next (a stored model rebuilt for evaluation): the model is constructed on the
    ``meta`` device and then allocated, float tensors filled with NaN and integer ones with 0,
    so a tensor the load left unset shows (see :func:`unset_tensors`) instead of passing for
    a trained one. The random init was a large share of a rebuild's time (measured:
    docs/performance.md, The quick start); ``python -m benchmarks.perf.rebuild_speed``
    times the whole rebuild with and without it."""
    token = _NO_INIT.set(True)
    try:
        yield
    finally:
        _NO_INIT.reset(token)


def build(arch: str, num_classes: int = IMAGENET_CLASSES) -> nn.Module:
    """A randomly initialised model (no weights loaded); inside :func:`no_init`, an
    uninitialised one (NaN floats). Under ``with torch.device("meta")``: a shapes-only model."""
    make = ARCHS.get(arch).build
    if not _NO_INIT.get() or torch.empty(0).device.type == "meta":
        return make(num_classes)
    with torch.device("meta"):
        model = make(num_classes)
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        # non-persistent buffers (some timm models' constant filters) are set by the
        # constructor and no load restores them: build for real
        return make(num_classes)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.fill_(float("nan") if tensor.is_floating_point() else 0)
    return model


def unset_tensors(model: nn.Module) -> list[str]:
    """Names of the float parameters and buffers of ``model`` holding NaN (left unset after
    a :func:`no_init` build, or broken). One sum per tensor (NaN propagates); only a
    non-finite sum is looked at element by element."""
    with torch.no_grad():
        tensors = [(n, t) for n, t in itertools.chain(model.named_parameters(),
                                                      model.named_buffers())
                   if t.is_floating_point() and t.numel()]
        if not tensors:
            return []
        sums = torch.stack([t.sum(dtype=torch.float64) for _, t in tensors])
        suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
        return [tensors[i][0] for i in suspects if bool(torch.isnan(tensors[i][1]).any())]


class InputTooSmallError(ValueError):
    """The benchmark's images are smaller than the architecture can take (CLI exit 2)."""


_MAX_SIZE = 4096  # the search for the smallest working size stops here
# How torch's shape checks say an input is too small (pooling; a kernel wider than the input).
_TOO_SMALL = ("Output size is too small", "greater than actual input size")


@functools.cache
def _fits(arch: str, size: int) -> bool:
    """Whether one ``size`` x ``size`` RGB image passes through ``arch`` (eval mode, on the
    meta device: shapes only, no memory, no compute). A model that refuses the size for
    another reason (a timm ViT built for 224x224 asserts its input size) raises
    :class:`InputTooSmallError` quoting it."""
    with torch.device("meta"):
        model = build(arch, 2).eval()
        try:
            model(torch.empty(1, 3, size, size))
        except RuntimeError as err:
            if any(m in str(err) for m in _TOO_SMALL):
                return False
            raise
        except (AssertionError, ValueError) as err:
            raise InputTooSmallError(
                f"{arch} does not take {size}x{size} inputs: "
                f"{str(err).rstrip('.') or type(err).__name__}. "
                f"Use another --arch (or a benchmark of the size it was built for)") from err
    return True


def min_input_size(arch: str, start: int = 1) -> int:
    """The smallest square input side (pixels) ``arch`` takes, searched from ``start``
    (doubling, then bisection; the archs' feasibility is monotone in the size)."""
    if _fits(arch, start):
        lo = start
        while lo > 1 and _fits(arch, lo // 2):
            lo //= 2
        bad, good = 0, lo
    else:
        bad, good = start, start * 2
        while not _fits(arch, good):
            bad, good = good, good * 2
            if good > _MAX_SIZE:
                raise InputTooSmallError(f"{arch} takes no input up to {_MAX_SIZE} pixels")
    while good - bad > 1:
        mid = (bad + good) // 2
        bad, good = (bad, mid) if _fits(arch, mid) else (mid, good)
    return good


def check_input_size(arch: str, size: int, benchmark: str = "the benchmark") -> None:
    """Stop before training when ``benchmark``'s ``size`` x ``size`` images are too small
    for ``arch``; the message names the smallest size that works.

    Raises :class:`InputTooSmallError`. One meta-device forward when the size fits.
    """
    if _fits(arch, size):
        return
    need = min_input_size(arch, size)
    raise InputTooSmallError(
        f"{arch} needs inputs of at least {need}x{need} pixels; {benchmark} gives "
        f"{size}x{size}. Use a larger input size (for split_digits: --bench-opt size={need} or "
        f"more, a multiple of 8) or another --arch."
    )


def _torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    spec = ARCHS.get(arch)
    if spec.torchvision_weights is None:
        raise WeightsUnavailableError(f"{arch} has no torchvision ImageNet weights")
    model_name, _, weights_name = spec.torchvision_weights.partition(":")
    weights = torchvision.models.get_model_weights(model_name)[weights_name]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # no network, proxy, broken cache: all end the same way
        raise WeightsUnavailableError(
            f"could not load the ImageNet weights for {arch} ({weights.url}): {err}\n"
            f"Either download that file on a machine with internet and pass it with "
            f"--weights PATH (or put it in torch's hub cache, {torch.hub.get_dir()}/checkpoints),"
            f" or run without pretraining with --pretrained none."
        ) from err


class Pretrained:
    """Where a run's starting weights come from: 'imagenet', 'none', or a weights file (the
    forms :mod:`benchmarks.models.weights_io` accepts: state dicts as saved, safetensors)."""

    def __init__(self, arch: str, source: str = "imagenet", seed: int = 0) -> None:
        ARCHS.get(arch)  # fail early on an unknown architecture
        self.arch = arch
        self.source = source
        self.seed = seed  # fixes the random init of 'none' (and of a file's missing head)
        if source not in ("imagenet", "none") and not Path(source).is_file():
            what = "is a folder, not a file" if Path(source).is_dir() else "not found"
            raise WeightsUnavailableError(
                f"weights file {source!r} {what}; pass an existing state-dict file, "
                f"'imagenet' (torchvision download) or 'none' (random init)"
            )
        if source not in ("imagenet", "none"):
            # read and fit a file now: a bad one stops before any run folder (also in
            # benchmarks.prefetch, and before a sweep's jobs all fail on it)
            self._template  # noqa: B018

    @functools.cached_property
    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The weights in this architecture's own layout (see ``ArchSpec.adapt_weights``)."""
        if self.source == "none":
            return None
        if self.source == "imagenet":
            imagenet = ARCHS.get(self.arch).imagenet
            sd = imagenet() if imagenet is not None else _torchvision_state_dict(self.arch)
        else:
            sd = load_state_dict(self.source)
        adapt = ARCHS.get(self.arch).adapt_weights
        return adapt(sd) if adapt else sd

    @functools.cached_property
    def _template(self) -> nn.Module:
        # Built under its own seed, so it is the same whichever task first asks for it
        # (a resumed run must see the same "pretrained" model as an uninterrupted one).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "pretrained-init"))
            model = build(self.arch, IMAGENET_CLASSES)
        sd = self.state_dict
        if sd is not None:
            head = ARCHS.get(self.arch).head
            own = model.state_dict()
            mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
            body = [f"{k} {tuple(sd[k].shape)} (the model's {tuple(own[k].shape)})"
                    for k in mismatched if not k.startswith(head + ".")]
            if body:
                raise WeightsUnavailableError(
                    f"weights {self.source} do not fit {self.arch}: shape mismatch in "
                    f"{', '.join(body[:5])}")
            if mismatched:  # a file with another head size: keep the random 1000-class head
                sd = {k: v for k, v in sd.items() if k not in mismatched}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            body_missing = [k for k in missing if not k.startswith(head + ".")]
            if body_missing or unexpected:
                raise WeightsUnavailableError(
                    f"weights {self.source} do not fit {self.arch}: missing {body_missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        return model

    def model(self) -> nn.Module:
        """A fresh copy of the pretrained model, with its 1000-class source head."""
        return copy.deepcopy(self._template)

    def describe(self) -> str:
        return self.source
