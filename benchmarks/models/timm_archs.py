"""Any timm model as an architecture: ``--arch timm:NAME`` (docs/data-and-weights.md).

The parts of the :class:`~benchmarks.models.archs.ArchSpec` of ``timm:NAME``, which
``benchmarks.models.archs`` assembles (importing this module, and timm, on the first
``timm:`` lookup):

- **build** (:func:`create`): ``timm.create_model(NAME, num_classes=C)``, randomly
  initialised as timm does; ``NAME`` may carry a pretrained tag (``resnet10t.c3_in1k``),
  which picks the weights;
- **head** (:func:`head_path`): the module ``model.get_classifier()`` returns (timm's own
  API), as a dotted path found by identity among the model's modules (``fc``,
  ``classifier``, ``head.fc``), so :func:`~benchmarks.models.archs.get_head` / ``set_head``
  / ``new_head`` and everything that keys state by the head's path work unchanged. A
  classifier that is not one ``nn.Linear`` (a 1x1 conv, a distilled pair, none) is refused:
  the methods give each task a Linear head;
- **ImageNet weights** (:func:`imagenet_state_dict`): timm's pretrained mechanism
  (``pretrained=True``: the Hugging Face hub, or the URL of the model's pretrained_cfg).
  Weights already in the Hugging Face cache load without the network; otherwise, when the
  hub cannot be reached, :class:`WeightsUnavailableError` (CLI exit 2) says at once how to
  supply them, instead of timm's retries (47 s on the dev machine, offline) and a traceback.

Errors: an unknown model or pretrained tag raises :class:`UnknownNameError` naming it and how
to list timm's models; an unusable classifier raises ``ValueError`` (both CLI exit 2).
"""

from __future__ import annotations

import difflib
import os
import socket
from typing import Any
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
from torch import nn

from benchmarks.core.registry import UnknownNameError
from benchmarks.models.weights_io import WeightsUnavailableError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from a hub repo
PROBE_TIMEOUT_S = 5.0


def check_name(name: str) -> None:
    """Raises :class:`UnknownNameError` unless timm knows model ``name`` (and its tag)."""
    import timm

    arch, dot, tag = name.partition(".")
    if dot and not tag:  # "timm:resnet10t." would be another run of the same model
        raise UnknownNameError(f"timm:{name}: an empty pretrained tag after the dot; give "
                               f"timm:{arch} or timm:{arch}.<tag>")
    if not arch:
        raise UnknownNameError(f"timm:{name}: give a timm model name after 'timm:', e.g. "
                               "timm:resnet10t (python -c \"import timm; "
                               "print(timm.list_models())\" lists them)")
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(arch + ".*")):
        return
    if timm.is_model(arch):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*")]
        raise UnknownNameError(f"timm model {arch} has no pretrained tag {tag!r} (timm "
                               f"{timm.__version__}); its tags: {', '.join(tags) or 'none'}")
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    raise UnknownNameError(
        f"unknown timm model {name!r} (timm {timm.__version__})"
        + (f"; close names: {', '.join(close)}" if close else "")
        + f". List them with: python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"")


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=num_classes, **kwargs)``."""
    import timm

    return timm.create_model(name, num_classes=num_classes, **kwargs)


def head_path(name: str, num_classes: int) -> str:
    """The dotted path of ``model.get_classifier()``, on a shapes-only model; ``ValueError``
    when that is not one ``nn.Linear`` of the model."""
    with torch.device("meta"):
        model = create(name, num_classes)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    path = next((n for n, m in model.named_modules() if n and m is head), None)
    if not isinstance(head, nn.Linear) or path is None:
        raise ValueError(
            f"timm:{name}: its classifier (model.get_classifier()) is "
            f"{type(head).__name__}, not one nn.Linear of the model; the suite's methods give "
            f"each task its own Linear head. Choose another timm model")
    return path


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained configuration of ``name`` (hub id, URL, classifier, input size)."""
    with torch.device("meta"):
        return dict(create(name, 2).pretrained_cfg)


def cached_hub_file(cfg: dict[str, Any]) -> str | None:
    """The weights file of ``cfg``'s hub repo if the Hugging Face cache holds it, else None
    (no network)."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else HUB_FILES
    for filename in files:
        found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _reachable(url: str) -> str | None:
    """None when ``url``'s host accepts a connection, else why not (one try, a short
    timeout): timm's hub download would retry for about a minute before failing. Behind a
    proxy (``$HTTPS_PROXY`` and the like) the host is not probed: the download may still
    work through it."""
    parsed = urlparse(url)
    if getproxies().get(parsed.scheme) or getproxies().get("all"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{parsed.hostname}:{port} unreachable ({err})"
    return None


def imagenet_state_dict(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``name`` with a ``num_classes`` head (ImageNet's 1000:
    the pretrained one; another count: timm leaves it random), in the model's own
    layout (timm adapts its checkpoints while loading). Raises
    :class:`WeightsUnavailableError` (no weights in timm, offline, download failed)."""
    import timm
    from huggingface_hub import constants

    cfg = pretrained_cfg(name)
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise WeightsUnavailableError(
            f"timm {timm.__version__} has no pretrained weights for {name}; run it with "
            f"--pretrained none or --weights PATH")
    where = (f"Hugging Face hub {cfg['hf_hub_id']}" if cfg.get("hf_hub_id")
             else cfg.get("url") or cfg.get("file"))
    overlay: dict[str, Any] = {}
    cached = cached_hub_file(cfg)
    if cached is not None:
        overlay = {"file": cached}  # timm's own override: load that file, no network
    elif cfg.get("hf_hub_id") and (why := _reachable(constants.ENDPOINT)) is not None:
        raise _unavailable(name, where, why)
    try:
        model = create(name, num_classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as err:  # offline, proxy, broken cache, bad file: all end the same way
        raise _unavailable(name, where, f"{type(err).__name__}: {err}") from err
    return {k: v.detach() for k, v in model.state_dict().items()}


def _unavailable(name: str, where: str, why: str) -> WeightsUnavailableError:
    from huggingface_hub import constants

    return WeightsUnavailableError(
        f"could not load timm's ImageNet weights for timm:{name} ({where}): {why}\n"
        f"Either fetch them on a machine with internet (python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\") and copy its Hugging Face cache "
        f"to {constants.HF_HUB_CACHE} here (or save that model's state_dict() with "
        f"torch.save and pass it with --weights PATH), or run without pretraining with "
        f"--pretrained none.")
