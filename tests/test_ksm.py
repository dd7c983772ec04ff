"""KSM: the frozen backbone stays frozen, multipliers are 1 or in [0, 0.5], masks at init
reproduce the backbone, stored bytes equal the formula, and it learns split_digits."""

from __future__ import annotations

import pytest
import torch

from baselines.ksm import KSM, KernelMaskedConv
from benchmarks import archs
from benchmarks.archs import Pretrained
from benchmarks.data import BENCHMARKS
from benchmarks.method import MethodContext, TaskInfo
from benchmarks.protocols import resolve_protocol
from benchmarks.results import load_rows
from benchmarks.store import ArtifactStore
from benchmarks.training import fit
from tests.fakes import assert_learned, learn_split_digits

# KSM's own quick setting (option quick_epochs=8) applies: with quick's 4 epochs on a random
# frozen backbone, digits_89 measured 75.4%.
DIGITS_TASKS = 5  # every split_digits task, as the issue asks


def _ksm() -> KSM:
    tasks = (TaskInfo(0, "a", 2), TaskInfo(1, "b", 3))
    return KSM(MethodContext("resnet18", "synthetic", tasks, resolve_protocol("smoke", "x"),
                             torch.device("cpu"), 0, Pretrained("resnet18", "none"),
                             KSM.resolve_options("synthetic", {})))


def _layers(model: torch.nn.Module) -> list[KernelMaskedConv]:
    return [m for m in model.modules() if isinstance(m, KernelMaskedConv)]


def test_masks_at_init_reproduce_the_backbone_exactly(tmp_path):
    method = _ksm()
    model = method.model_for_task(method.ctx.tasks[0], ArtifactStore(tmp_path)).eval()
    assert len(_layers(model)) == 20  # stem, 16 3x3 convs, 3 shortcuts: every conv
    plain = method.ctx.pretrained.model()
    archs.set_head(plain, "resnet18", archs.get_head(model, "resnet18"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))


def test_multiplier_is_one_or_at_most_half():
    conv = KernelMaskedConv(torch.nn.Conv2d(8, 6, 3, bias=False), 1e-2, 5e-3, 1200, 100, 0.5)
    with torch.no_grad():
        conv.mask.copy_(torch.linspace(-0.02, 0.02, 48).view(6, 8))
    for training in (True, False):
        s = conv.train(training).multiplier().detach()
        hard = conv.mask.detach() >= 5e-3
        assert torch.equal(s[hard], torch.ones(int(hard.sum())))
        assert s[~hard].min() == 0 and s[~hard].max() == 0.5  # min-max normalised soft part
    conv.train().multiplier().sum().backward()  # the hard part trains through the surrogate
    assert conv.mask.grad.abs().sum() > 0


def test_backbone_is_bit_identical_after_training_a_task(tmp_path):
    method = _ksm()
    store = ArtifactStore(tmp_path)
    model = method.model_for_task(method.ctx.tasks[0], store)
    before = {id(m): m.weight.clone() for m in _layers(model)}
    masks = {id(m): m.mask.detach().clone() for m in _layers(model)}
    task = BENCHMARKS.get("synthetic")(None).tasks[0]
    fit(model, method, method.ctx.protocol.with_overrides(lr=0.5), task.train,
        device=torch.device("cpu"), seed=0, task=0, phase="train", progress=False)
    assert all(torch.equal(m.weight, before[id(m)]) for m in _layers(model))
    assert any(not torch.equal(m.mask, masks[id(m)]) for m in _layers(model))  # masks trained
    with store.transaction() as tx:
        method.save_task(method.ctx.tasks[0], model.eval(), tx)
    stored = store.get_tensors("backbone")
    assert all(torch.equal(stored[f"{n}.weight"], m.weight) for n, m in model.named_modules()
               if isinstance(m, KernelMaskedConv))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return learn_split_digits("ksm", tmp_path_factory.mktemp("ksm"), DIGITS_TASKS)


@pytest.mark.slow
def test_learns_split_digits_from_the_store(digits_run):
    """Bars: tests/fakes.py ``assert_learned`` (each task >= 65%, mean >= 85%). Measured
    2026-12-03, per run the lowest task / the mean (seed / ATEN_CPU_CAPABILITY / threads):
    97.5/99.2% (1993/avx2/1), 97.5/99.3% (1994/default/1)."""
    df = load_rows(digits_run)
    final = df[(df.metric == "accuracy") & (df.after_task == DIGITS_TASKS - 1)]
    assert len(final) == DIGITS_TASKS
    assert_learned(final.set_index("task_name").value)


@pytest.mark.slow
def test_stored_bytes_equal_the_formula_by_blob(digits_run):
    store = ArtifactStore(digits_run / "artifacts")
    formula = KSM.memory_formula("resnet18", [2] * DIGITS_TASKS,
                                 KSM.resolve_options("split_digits", {}))
    assert store.breakdown() == formula  # every blob, shared and per task
    assert store.total_bytes() == formula.total()


@pytest.mark.slow
def test_stored_multipliers_are_one_or_at_most_half(digits_run):
    method = KSM(MethodContext("resnet18", "split_digits", (), None, torch.device("cpu"), 0,
                               None, KSM.resolve_options("split_digits", {})))
    model = method.load_task(TaskInfo(DIGITS_TASKS - 1, "last", 2),
                             ArtifactStore(digits_run / "artifacts"))
    s = torch.cat([m.multiplier().flatten() for m in _layers(model)])
    assert bool(((s == 1) | ((s >= 0) & (s <= 0.5))).all())
    assert bool((s < 1).any())  # some kernels went soft
