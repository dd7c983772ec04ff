"""NWS in the suite: frozen layer-wise pools shared once, each task stored as indices + BN.

Pools (option ``pools``):
- ``auto``: ``kmeans-pretrained`` when the run has pretrained weights, else ``kmeans-task0``;
- ``kmeans-pretrained``: k-means of the pretrained model's kernels (docs/reference.md §1 b), its
  kernels the task-0 temporary weights;
- ``kmeans-task0``: task 0 first trains the plain model (the harness's ``train`` phase), then
  pools are the k-means of its kernels and task 0 is learned again with NWS (phase ``nws``),
  starting from those kernels;
- a file path: ``python -m nws.pretrain`` output, or ``authors:PATH`` for ``KP_resume.pt``.
The pools are stored with task 0, in the shared scope; later tasks read them from the store.

Task t > 0 starts from task t-1 as stored (Algorithm 1 line 3: W_t = lookup(C_{t-1}), BN of
t-1, head rows kept or extended with kaiming rows). Stored per task: the indices (codec
``fixed``: 9-bit packing, the default, ``entropy``: per-layer rANS, or ``delta``: see below),
all BN layers (float32 affine + running stats) and conv biases if the architecture has any.
Evaluation builds the plain architecture from those; there is no search at inference.

Codec ``delta`` (the suite's extension, not the paper's method): task 0, and every task t
with t % ``keyframe_every`` == 0 when that option is set (key frames), is stored with the
``fixed`` codec; every other task as its changes against task t-1's indices
(:func:`nws.codec.encode_delta`, blob codec ``nws-delta``, meta ``base``). Reading task t
decodes the chain from its key frame; decoded tasks are kept in an in-process cache (up to
``DECODED_CACHE_BYTES``, keyed by the blobs' files), so reading tasks 0..t in order decodes
each task once. A chain with a task missing raises :class:`BrokenChainError` naming it.
Each blob says how it is coded, so readers need no run options.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import nws
from benchmarks.core.checks import Either, InputFile, OneOf, Range
from benchmarks.core.device_policy import DevicePolicy
from benchmarks.core.protocols import S
from benchmarks.core.seeding import generator
from benchmarks.core.store import ArtifactStore, StoreIntegrityError, Transaction
from benchmarks.methods.common import (
    FLOAT32,
    bn_bytes,
    bn_state,
    check_arch_stored,
    is_bn,
    load_inference_state,
    shape_model,
)
from benchmarks.methods.contract import Breakdown, Fit, Method, TaskInfo
from benchmarks.models import archs
from nws import codec
from nws.bitpack import bits_for, packed_nbytes

CODE = "authors' code"
POOLS, INDICES, BN, BIAS = "pools", "indices", "bn", "bias"
LINEAR = "last"  # the classifier is the only Linear converted (paper §4.3)
DELTA_BLOB = f"nws-{codec.DELTA}"
# Decoded tasks kept per process, compactly (int16 for pools up to 32768 entries: ResNet-18
# 2.7 MiB a task), least recently used dropped first beyond this many bytes.
DECODED_CACHE_BYTES = 256 * 2**20
_decoded: OrderedDict[tuple[str, tuple[str, ...]], list[np.ndarray]] = OrderedDict()


class BrokenChainError(ValueError):
    """A delta-coded task whose chain back to its key frame lacks a task's indices."""


def keyframe_interval(value: Any) -> int | None:
    """The ``keyframe_every`` option: None (also "none" or 0) = only task 0, else k >= 1."""
    if value is None or value == 0 or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option keyframe_every={value!r}: give a whole number >= 1 (a key "
                         "frame every k tasks) or none (only task 0)")
    return value


def _keeps(module: nn.Module) -> bool:
    """What NWS keeps besides the head: BN, and the convs it converts (nws.nwsify)."""
    return is_bn(module) or nws.convert.is_plain_conv(module)


def _check_group_size(arch: str, group_size: int, classes: list[int]) -> None:
    """``ValueError`` before any work when ``group_size`` does not divide the kernel count of
    every converted layer (each task's head included); the suite's own archs always pass,
    some timm models do not."""
    if group_size == 1:
        return
    model = shape_model(arch, classes[0])
    head = archs.ARCHS.get(arch).head
    counts = {n: m.weight.numel() // nws.convert.group_dim(m) for n, m in
              nws.convertible_layers(model, LINEAR).items() if n != head}
    counts |= {f"{head} ({c} classes)": archs.get_head(model, arch).in_features * c
               for c in classes}
    bad = [f"{n} ({k})" for n, k in counts.items() if k % group_size]
    if bad:
        raise ValueError(f"option group_size={group_size} does not divide the kernel count of "
                         f"{len(bad)} layers of {arch}: {', '.join(bad[:5])}; use a group size "
                         "that divides them (1 always does)")


def _plain_model(arch: str, num_classes: int) -> nn.Module:
    """The architecture with a bias-free head: the head is a 1x1 NWS convolution."""
    model = archs.build(arch, num_classes)
    archs.set_head(model, arch, nn.Linear(archs.get_head(model, arch).in_features,
                                          num_classes, bias=False))
    return model


def _head_rows(weight: torch.Tensor, num_classes: int) -> nn.Linear:
    """A bias-free head of ``num_classes`` rows: the first rows of ``weight``, plus
    kaiming-normal rows when more are needed (docs/reference.md §1)."""
    head = nn.Linear(weight.shape[1], num_classes, bias=False)
    with torch.no_grad():
        keep = min(num_classes, weight.shape[0])
        head.weight[:keep] = weight[:keep]
        if num_classes > keep:
            nn.init.kaiming_normal_(head.weight[keep:])
    return head


# valid ranges of the options (benchmarks.core.checks)
BETA = Range(0, None, "the weight of Eq. 2's second term: negative rewards the distance")
POOL_SIZE = Range(2, 65536, "entries per pool: one entry leaves nothing to search; 16-bit "
                  "indices address 65,536, and k-means fits a pool to at most kmeans_points "
                  "sampled kernels", integer=True)
GROUP_SIZE = OneOf((1, 2, 4, 8, 16), "kernels per group: a group must divide every layer's "
                   "kernel count, and the suite's archs' counts are multiples of 16")
POOLS_ARG = InputFile(("auto", "kmeans-pretrained", "kmeans-task0"),
                      "k-means pools, a file of nws.save_pools, or the authors' checkpoint",
                      prefixes=("authors:",))
KEYFRAME = Either((OneOf((None, 0, "none"), "only task 0 is a key frame"),
                   Range(1, None, "a key frame every k tasks", integer=True)),
                  "keyframe_interval's rule")


class NWSMethod(Method):
    name = "nws"
    # The two search paths agree except on near ties within float32 rounding (the full path
    # settles them in float64, the certificates take the float32 argmin; measured:
    # docs/performance.md, NWS search internals), after which training diverges: a run keeps
    # the path it started with.
    policy_fields = ("search",)
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {
        "default": {
            "beta": S(0.5, CODE + " (Split-CIFAR-100 value; paper Eq. 2 is unweighted: beta=1)",
                      BETA),
            "pool_size": S(512, "paper §4.3", POOL_SIZE),
            "group_size": S(1, "paper §4.1: one group = one k x k kernel", GROUP_SIZE),
            "pools": S("auto", "ours: k-means of the pretrained model, or of the task-0 model "
                       "without pretraining; a pools file or authors:PATH also work", POOLS_ARG),
            "codec": S("fixed", "ours: 9-bit packing (exact analytic size); 'entropy' = rANS; "
                       "'delta' = changes against the previous task (the suite's extension)",
                       OneOf(codec.TASK_CODECS, "the task codecs of nws.codec")),
            "keyframe_every": S(None, "ours: with codec=delta, store every k-th task whole "
                                "(none: only task 0)", KEYFRAME),
            "kmeans_iters": S(20, "ours", Range(1, None, "Lloyd iterations: at least one",
                                                integer=True)),
            "kmeans_points": S(65536, "ours: kernels sampled per layer to fit k-means",
                               Range(2, None, "k-means needs points (at least pool_size)",
                                     integer=True)),
        },
        "split_cifar100": {"beta": S(0.5, CODE, BETA)},
        "cub_to_sketches": {"beta": S(0.1, CODE, BETA)},
    }

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """What a range cannot say: k-means needs at least ``pool_size`` points, and a
        pools file must be one (read once here, before any work)."""
        if options["kmeans_points"] < options["pool_size"]:
            raise ValueError(f"option kmeans_points={options['kmeans_points']} is below "
                             f"pool_size={options['pool_size']}: k-means needs at least as "
                             f"many points as pool entries")
        found = POOLS_ARG.path(options["pools"])
        if found is not None and not found[0]:  # authors:PATH needs the model: read later
            nws.load_pools(found[1])

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        check_arch_stored(self.name, ctx.arch, _keeps, "BatchNorm and plain nn.Conv2d layers "
                          "(weights as indices, biases) and the head")
        _check_group_size(ctx.arch, int(self.opt["group_size"]),
                          sorted({t.num_classes for t in ctx.tasks}))
        if self.opt["codec"] not in codec.TASK_CODECS:
            raise ValueError(f"option codec={self.opt['codec']!r}: valid {codec.TASK_CODECS}")
        self.keyframe_every = keyframe_interval(self.opt.get("keyframe_every"))
        if self.keyframe_every is not None and self.opt["codec"] != codec.DELTA:
            # a no-op otherwise, yet part of the run identity: a silently different run id
            raise ValueError(f"option keyframe_every={self.opt['keyframe_every']!r} applies "
                             f"only to codec=delta (codec is {self.opt['codec']!r}): add "
                             f"--opt codec=delta or drop keyframe_every")

    # -- pools -------------------------------------------------------------------------------
    def _pools_source(self) -> str:
        src = str(self.opt["pools"])
        if src == "auto":
            return "kmeans-task0" if self.ctx.pretrained.source == "none" else "kmeans-pretrained"
        return src

    def _kmeans(self, model: nn.Module, task: int) -> nws.Pools:
        return nws.kmeans_pools(
            model, int(self.opt["pool_size"]), int(self.opt["group_size"]), linear=LINEAR,
            iters=int(self.opt["kmeans_iters"]), max_points=int(self.opt["kmeans_points"]),
            generator=generator(self.ctx.seed, task, "nws-pools"))

    def _search(self) -> str:
        """The NWS search path of the run's device policy (full on GPUs, certificates on CPU;
        ``$NWS_SEARCH`` forces either): the harness's policy when it passes one."""
        policy = self.ctx.policy or DevicePolicy.for_device(self.ctx.device)
        return policy.search

    def _nwsify(self, model: nn.Module, pools: nws.Pools) -> nn.Module:
        return nws.nwsify(model, pools=pools, group_size=int(self.opt["group_size"]),
                          linear=LINEAR, search=self._search())

    def _first_model(self, task: TaskInfo) -> nn.Module:
        """Task 0: the pretrained model (or a pools file's), head = its first C rows."""
        arch, src = self.ctx.arch, self._pools_source()
        model = self.ctx.pretrained.model()
        pools_file = None
        if src not in ("kmeans-pretrained", "kmeans-task0"):
            path = src.removeprefix("authors:")
            pools_file = (nws.import_authors_pools(path, model, LINEAR, int(self.opt["group_size"]))
                          if src.startswith("authors:") else nws.load_pools(path))
            if pools_file.group_size != int(self.opt["group_size"]):
                raise ValueError(f"{path} has group size {pools_file.group_size}, the run "
                                 f"{self.opt['group_size']}")
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in pools_file.state.items()
                                   if k in own and own[k].shape == v.shape}, strict=False)
            head = archs.ARCHS.get(arch).head
            with torch.no_grad():
                for name, w in pools_file.weights.items():
                    target = model.get_submodule(name).weight
                    if name == head and w.numel() != target.numel():  # another class count
                        archs.set_head(model, arch, _head_rows(w.reshape(w.shape[0], -1),
                                                               w.shape[0]))
                    else:
                        target.copy_(w.reshape(target.shape))
        pools = self._kmeans(model, task.index) if src == "kmeans-pretrained" else None
        pools = pools_file.pools if pools_file is not None else pools
        archs.set_head(model, arch, _head_rows(archs.get_head(model, arch).weight.detach(),
                                               task.num_classes))
        return model if pools is None else self._nwsify(model, pools)

    # -- training ----------------------------------------------------------------------------
    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        if task.index == 0:
            return self._first_model(task)
        prev = self.ctx.tasks[task.index - 1]
        pools = self.stored_pools(store)
        indices = {n: torch.from_numpy(a) for n, a in self.task_indices(store, prev.index).items()}
        model = self._restore(prev, store, pools, indices)
        archs.set_head(model, self.ctx.arch, _head_rows(archs.get_head(model, self.ctx.arch)
                                                        .weight.detach(), task.num_classes))
        model = self._nwsify(model, pools)
        layers = nws.nws_layers(model)
        for name, layer in layers.items():  # certify W = lookup(C_{t-1}) without a search
            hint = indices[name]
            if hint.numel() != layer.num_groups:  # a resized head: new rows get searched
                hint = torch.cat([hint, torch.zeros(layer.num_groups, dtype=torch.long)]
                                 )[: layer.num_groups]
            layer.search(hint=hint)
        return model

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not nws.nws_layers(model):  # the plain phase of kmeans-task0
            return None
        return nws.similarity_loss(model, float(self.opt["beta"]))

    EPOCH_FIGURES = ("kernels_changed",)

    def epoch_state(self, model: nn.Module) -> list[torch.Tensor] | None:
        """Each NWS layer's pool indices of the epoch's first forward (None in a plain
        phase)."""
        layers = nws.nws_layers(model)
        return [layer.last_index().clone() for layer in layers.values()] if layers else None

    def epoch_figures(self, model: nn.Module, state: list[torch.Tensor] | None
                      ) -> dict[str, torch.Tensor]:
        """``kernels_changed``: the fraction of kernels (index entries) whose pool entry in
        the epoch's last forward differs from the one in its first (device ops, read by the
        caller; a kernel that changed and changed back within the epoch counts as
        unchanged; both are the indices the forwards used: no search is added)."""
        layers = nws.nws_layers(model)
        if state is None or len(state) != len(layers):
            return {}
        now = [layer.last_index() for layer in layers.values()]
        changed = torch.stack([(a != b).sum() for a, b in zip(now, state, strict=True)]).sum()
        return {"kernels_changed": changed / sum(a.numel() for a in now)}

    def finish_task(self, task: TaskInfo, model: nn.Module, fit: Fit) -> None:
        if nws.nws_layers(model):
            return
        # kmeans-task0: pools from the model just trained on task 0, then learn task 0 with NWS.
        self._nwsify(model, self._kmeans(model, task.index))
        fit(model, self.ctx.protocol, "nws")

    # -- storage -----------------------------------------------------------------------------
    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        layers = nws.nws_layers(model)
        if not layers:
            raise RuntimeError("save_task got a model without NWS layers")
        n = int(self.opt["pool_size"])
        indices = [layer.indices().cpu().numpy() for layer in layers.values()]
        meta = {"pool_size": n, "layers": [[k, len(a)] for k, a in
                                           zip(layers, indices, strict=True)]}
        name = self.opt["codec"]
        if name == codec.DELTA and self._is_keyframe(task.index):
            name = "fixed"
        if name == codec.DELTA:
            base = task.index - 1
            prev = self.task_indices(tx.store, base)
            if list(prev) != list(layers):
                raise ValueError(f"task {task.index} has layers {list(layers)}, task {base} "
                                 f"{list(prev)}: a delta needs the same layers")
            data = codec.encode_delta(indices, list(prev.values()), n)
            meta["base"] = base
        else:
            data = codec.encode(indices, n, name)
        tx.put(INDICES, data, task=task.index, codec=f"nws-{name}", meta=meta)
        tx.put_tensors(BN, bn_state(model), task=task.index)
        biases = {f"{k}.bias": m.bias.detach() for k, m in layers.items() if m.bias is not None}
        if biases:
            tx.put_tensors(BIAS, biases, task=task.index)
        if task.index == 0:
            tx.put_tensors(POOLS, nws.get_pools(model), task=None)

    def _restore(self, task: TaskInfo, store: ArtifactStore, pools: nws.Pools,
                 indices: nws.Indices) -> nn.Module:
        """The plain model of a stored task: kernels looked up from indices, BN, biases."""
        model = _plain_model(self.ctx.arch, task.num_classes)
        nws.decode_into(model, pools, indices)
        state = store.get_tensors(BN, task.index)
        if BIAS in store.names(task.index):
            state |= store.get_tensors(BIAS, task.index)
        full = model.state_dict()
        full.update(state)
        return load_inference_state(model, full)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        indices = {n: torch.from_numpy(a) for n, a in self.task_indices(store, task.index).items()}
        return self._restore(task, store, self.stored_pools(store), indices)

    @staticmethod
    def stored_pools(store: ArtifactStore) -> nws.Pools:
        return store.get_tensors(POOLS, None)

    def _is_keyframe(self, task: int) -> bool:
        return task == 0 or (self.keyframe_every is not None and task % self.keyframe_every == 0)

    @staticmethod
    def task_indices(store: ArtifactStore, task: int) -> dict[str, np.ndarray]:
        """Layer name -> the task's indices (int64, out-major then input channel). A
        delta-coded task is decoded from its key frame on (see the module docstring);
        raises :class:`BrokenChainError` when a task of that chain is missing."""
        chain = _chain(store, task)
        layers, start = None, 0
        for i in range(len(chain), 0, -1):  # the longest decoded prefix of the chain
            key = _cache_key(store, chain[:i])
            if key in _decoded:
                _decoded.move_to_end(key)
                layers, start = _decoded[key], i
                break
        for i in range(start, len(chain)):
            t, info = chain[i]
            try:
                data = store.get_bytes(INDICES, t)
            except StoreIntegrityError as err:  # missing, truncated or changed
                raise _broken(store, task, t, f"its file {err.path} {err.why}") from None
            counts, n = [c for _, c in info.meta["layers"]], int(info.meta["pool_size"])
            if info.codec == DELTA_BLOB:
                layers = codec.decode_delta(data, counts, layers, n)
            else:
                layers = codec.decode(data, counts, n, info.codec.removeprefix("nws-"))
            small = np.int16 if n <= 2**15 else np.int32
            layers = [a.astype(small) for a in layers]
            _decoded[_cache_key(store, chain[: i + 1])] = layers
            while sum(a.nbytes for v in _decoded.values() for a in v) > DECODED_CACHE_BYTES:
                _decoded.popitem(last=False)
        names = [k for k, _ in chain[-1][1].meta["layers"]]
        return {k: a.astype(np.int64) for k, a in zip(names, layers, strict=True)}

    @staticmethod
    def pool_size(store: ArtifactStore) -> int:
        return int(store.info(INDICES, store.tasks()[0]).meta["pool_size"])

    @classmethod
    def analysis_hooks(cls) -> dict[str, Callable[..., Any] | int]:
        return {"task_indices": cls.task_indices, "pool_size": cls.pool_size}

    def task_metrics(self, task: TaskInfo, store: ArtifactStore) -> dict[str, float]:
        """Bits per index as stored and under each codec, the empirical entropy (the limit
        of a per-layer frequency model); for t > 0 also the share of indices changed from
        task t-1 and the conditional entropy bound of the delta codec (its limit, see
        :func:`nws.codec.delta_entropy_bits`), whatever codec the run stores with."""
        arrays = list(self.task_indices(store, task.index).values())
        n, count = self.pool_size(store), sum(len(a) for a in arrays)
        out = {
            "bits_per_index": 8 * store.info(INDICES, task.index).nbytes / count,
            "bits_per_index_fixed": 8 * len(codec.encode_fixed(arrays, n)) / count,
            "bits_per_index_entropy": 8 * len(codec.encode_entropy(arrays, n)) / count,
            "index_entropy_bits": codec.empirical_entropy_bits(arrays, n),
            "indices_per_task": float(count),
        }
        if task.index > 0 and store.has_task(task.index - 1):  # against the task before
            prev = list(self.task_indices(store, task.index - 1).values())
            out |= {
                "changed_fraction": codec.changed_fraction(arrays, prev),
                "bits_per_index_delta": 8 * len(codec.encode_delta(arrays, prev, n)) / count,
                "delta_entropy_bits": codec.delta_entropy_bits(arrays, prev, n),
            }
        return out

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        """Exact for the fixed-width codec. The entropy and delta codecs' sizes depend on the
        learned indices: read them from the store (this raises for them)."""
        if options.get("codec", "fixed") != "fixed":
            raise ValueError(f"memory_formula is exact only for codec=fixed; with codec="
                             f"{options['codec']} the size depends on the learned indices: "
                             "use store bytes")
        n, gs = int(options.get("pool_size", 512)), int(options.get("group_size", 1))
        per_task, shared = [], {}
        for c in num_classes:
            model = _plain_model(arch, c)
            layers = nws.convertible_layers(model, LINEAR)
            dims = {k: nws.convert.group_dim(m, gs) for k, m in layers.items()}
            count = sum(m.weight.numel() // dims[k] for k, m in layers.items())
            biases = sum(m.bias.numel() for m in layers.values() if m.bias is not None)
            entry = {"indices": packed_nbytes(count, bits_for(n)), "bn": bn_bytes(model)}
            if biases:
                entry["bias"] = biases * FLOAT32
            per_task.append(entry)
            shared = {"pools": sum(n * d for d in dims.values()) * FLOAT32}
        return Breakdown(shared=shared, per_task=per_task)



def _chain(store: ArtifactStore, task: int) -> list[tuple[int, Any]]:
    """(task, index blob info) from ``task``'s key frame up to ``task``."""
    chain = [(task, store.info(INDICES, task))]
    while chain[-1][1].codec == DELTA_BLOB:
        base = int(chain[-1][1].meta["base"])
        if not store.has_task(base) or INDICES not in store.names(base):
            raise _broken(store, task, base, "the store has no indices for it")
        chain.append((base, store.info(INDICES, base)))
    return chain[::-1]


def _cache_key(store: ArtifactStore, chain: list[tuple[int, Any]]) -> tuple[str, tuple[str, ...]]:
    return str(store.root), tuple(info.file for _, info in chain)


def _broken(store: ArtifactStore, task: int, missing: int, why: str) -> BrokenChainError:
    if missing == task:
        return BrokenChainError(f"artifact store {store.root}: task {task}'s indices are "
                                f"listed, but {why}; restore it from a copy of the store, or "
                                "delete the run folder and run again.")
    return BrokenChainError(
        f"artifact store {store.root}: task {task}'s indices are delta-coded, and decoding "
        f"them needs task {missing}'s indices, but {why} (the store is damaged mid-chain). "
        f"Restore task {missing} from a copy of the store, or delete the run folder and run "
        "again.")
