"""pytest-benchmark: the harness's training step against a bare PyTorch loop, same model
and data, one run (ratio printed in the summary; no timed assertion)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.finetune import Finetune
from benchmarks.core.protocols import resolve_protocol
from benchmarks.engine.training import Trainer
from benchmarks.methods.contract import MethodContext, TaskInfo
from benchmarks.models import archs
from benchmarks.models.archs import Pretrained

BATCH, CLASSES = 32, 5


def _setup():
    torch.manual_seed(0)
    model = archs.build("resnet18", CLASSES)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, CLASSES, (BATCH,))
    return model, x, y


@pytest.mark.benchmark(group="harness-step")
def test_bare_pytorch_step(benchmark):
    model, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    benchmark.extra_info["role"] = "baseline"
    loss = benchmark.pedantic(step, rounds=8, warmup_rounds=2)
    assert torch.isfinite(loss)


@pytest.mark.benchmark(group="harness-step")
def test_harness_step(benchmark):
    model, x, y = _setup()
    protocol = resolve_protocol("paper", "split_cifar100")
    ctx = MethodContext("resnet18", "split_cifar100", (TaskInfo(0, "t", CLASSES),), protocol,
                        torch.device("cpu"), 0, Pretrained("resnet18", "none"))
    trainer = Trainer(model, Finetune(ctx), protocol, torch.device("cpu"))
    loss = benchmark.pedantic(lambda: trainer.step(x, y), rounds=8, warmup_rounds=2)
    assert torch.isfinite(loss)
