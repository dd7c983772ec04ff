"""Data on the device: whole-batch crop/flip/normalise equal in distribution to the per-image
transforms, seeded batches, the last partial batch (issue 15 item 8)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.seeding import generator
from benchmarks.data import BENCHMARKS
from benchmarks.data.batches import (
    BatchAugment,
    DeviceBatches,
    batch_sizes,
    batches_per_epoch,
    crop_flip,
    device_generator,
)
from benchmarks.data.split_cifar100 import NORMALISATION
from tests.fakes import write_cifar100_python

CHI2_80_P001 = 124.84  # chi-square critical value, 80 degrees of freedom, p = 0.001


def _position_images(n: int, size: int = 32) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = image index: every output
    pixel says where it came from (0 = padding)."""
    rows = torch.arange(1, size + 1, dtype=torch.uint8).view(size, 1).expand(size, size)
    x = torch.stack([rows, rows.t(), torch.zeros(size, size, dtype=torch.uint8)])
    x = x.expand(n, 3, size, size).clone()
    x[:, 2] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    return x


def test_crop_flip_equals_torchvisions_pad_crop_flip_image_by_image():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    offsets = torch.randint(0, 9, (16, 2))
    flips = torch.rand(16) < 0.5
    out = crop_flip(images, 4, offsets, flips)
    for i in range(16):
        ref = TF.crop(TF.pad(images[i], [4]), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        ref = TF.hflip(ref) if flips[i] else ref
        assert torch.equal(out[i], ref)


def test_the_batch_path_cuts_what_the_reference_crop_cuts_for_the_same_draws():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment((0.0,) * 3, (1.0,) * 3, pad=4, flip=True)
    out = aug(images, device_generator(9, torch.device("cpu")))
    offsets, flips = aug.draw(64, device_generator(9, torch.device("cpu")), images.device)
    ref = crop_flip(images, 4, offsets, flips)
    assert torch.equal((out * 255).round().to(torch.uint8), ref)


def _recover(out: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) and flips of augmented position images (normalised with mean 0, std 1)."""
    v = (out * 255).round().long()
    row, col, col_next = v[:, 0, 16, 16] - 1, v[:, 1, 16, 16] - 1, v[:, 1, 16, 17] - 1
    flipped = col_next < col
    dy = row - 16 + pad
    dx = torch.where(flipped, col - 15 + pad, col - 16 + pad)
    return torch.stack([dy, dx], 1), flipped


def test_crop_offsets_are_uniform_over_the_padded_range_and_flips_half():
    n = 81 * 250
    aug = BatchAugment((0.0,) * 3, (1.0,) * 3, pad=4, flip=True)
    out = aug(_position_images(n), device_generator(5, torch.device("cpu")))
    offsets, flipped = _recover(out, 4)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81).double()
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_80_P001, chi2
    assert abs(flipped.double().mean().item() - 0.5) < 0.015  # 4.3 sigma at n = 20,250


def test_digits_crop_only_never_flips():
    aug = BatchAugment((0.0,) * 3, (1.0,) * 3, pad=2, flip=False)
    out = aug(_position_images(2000), device_generator(1, torch.device("cpu")))
    offsets, flipped = _recover(out, 2)
    assert not flipped.any() and set(offsets.flatten().tolist()) == {0, 1, 2, 3, 4}


def test_normalisation_per_superclass_equals_the_table(tmp_path):
    write_cifar100_python(tmp_path)
    bench = BENCHMARKS.get("split_cifar100")(tmp_path, download=False, verify="none")
    for t, task in enumerate(bench.tasks):
        for data, random in ((task.train, True), (task.test, False)):
            aug = data.batch_augment
            assert (aug.mean, aug.std) == NORMALISATION[t] and aug.random == random
    test = bench.tasks[3].test
    x = test.batch_augment(test.images)
    ref = torch.stack([test[i][0] for i in range(len(test))])  # the per-image path
    assert torch.allclose(x, ref, atol=1e-6)


def test_batches_cover_every_image_once_in_a_seeded_order():
    images = _position_images(100)
    labels = torch.arange(100)
    data = DeviceBatches(images, labels, BatchAugment((0.0,) * 3, (1.0,) * 3),
                         torch.device("cpu"))

    def epoch(seed: int) -> list[torch.Tensor]:
        return [y for _, y in data.epoch(32, generator(seed, 0, "train", 0, "order"), None,
                                         drop_last=False)]

    ys = epoch(1)
    assert [len(y) for y in ys] == [32, 32, 32, 4]
    assert sorted(torch.cat(ys).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip(ys, epoch(1), strict=True))
    assert not torch.equal(torch.cat(ys), torch.cat(epoch(2)))
    for x, y in data.epoch(32, generator(1, "o"), None, drop_last=False):  # labels follow
        assert torch.equal((x[:, 2, 0, 0] * 255).round().long(), y)


def test_the_last_partial_batch_is_kept_as_the_authors_do_except_a_batch_of_one():
    proto = resolve_protocol("paper", "split_cifar100")
    assert proto.drop_last is False and "authors' code" in proto.provenance["drop_last"]
    assert batches_per_epoch(2500, 32, proto.drop_last) == 79  # the authors' 79 steps
    assert batch_sizes(2500, 32, False)[-1] == 4
    assert batches_per_epoch(2500, 32, True) == 78
    assert batch_sizes(33, 32, False) == [32]  # a last batch of 1 breaks BatchNorm
    assert batch_sizes(34, 32, False) == [32, 2]
    assert batch_sizes(20, 32, True) == [20]  # a task smaller than one batch


class _Plain:
    optimizer_weight_decay = True

    def parameters(self, model):
        return model.parameters()

    def extra_loss(self, model):
        return None

    def after_backward(self, model):
        pass

    def after_step(self, model):
        pass


def _train(seed: int, data_on_device: bool = True) -> list[torch.Tensor]:
    from benchmarks.core.device_policy import DevicePolicy
    from benchmarks.engine.training import PhaseSpec, fit

    bench = BENCHMARKS.get("split_digits")(None, size=16)
    proto = resolve_protocol("quick", "split_digits").with_overrides(epochs=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 2))
    policy = DevicePolicy.for_device("cpu", data_on_device=data_on_device)
    fit(model, _Plain(), proto, bench.tasks[0].train,
        PhaseSpec(device=torch.device("cpu"), seed=seed, task=0, phase="train", progress=False,
                  policy=policy))
    return [p.detach().clone() for p in model.parameters()]


def test_training_on_device_batches_is_deterministic_per_seed():
    a, b, c = _train(3), _train(3), _train(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_the_dataloader_path_still_trains_when_data_on_device_is_off():
    a, b = _train(3, data_on_device=False), _train(3, data_on_device=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, _train(3), strict=True))


@pytest.mark.parametrize("pad", [0, 3])
def test_augment_keeps_shape_and_dtype(pad):
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, pad=pad, flip=True)
    out = aug(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), device_generator(0, torch.device("cpu")))
    assert out.shape == (5, 3, 8, 8) and out.dtype == torch.float32


def test_an_epoch_of_device_batches_has_no_sync_prone_op():
    """No nonzero, boolean-mask indexing or .item() while batches are drawn (the op
    counter, on CPU, of the code CUDA runs); the normalisation constants are cached per
    device (a copy per batch would synchronise a GPU)."""
    from benchmarks.data.batches import ResizedCropAugment, _affine
    from benchmarks.perf.opcount import OpCounter

    images, labels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40)
    for aug in (BatchAugment((0.5,) * 3, (0.25,) * 3, pad=4, flip=True, cutout=8),
                ResizedCropAugment((0.5,) * 3, (0.25,) * 3, size=24, cutout=8)):
        data = DeviceBatches(images, labels, aug, torch.device("cpu"))
        gen = device_generator(0, torch.device("cpu"))
        with OpCounter() as ops:
            shapes = [x.shape for x, _ in data.epoch(16, generator(1, "o"), gen, False)]
        assert ops.syncs == 0, ops.sync_counts
        assert shapes[0][1:] == shapes[-1][1:] and len(shapes) == 3
    assert _affine((0.5,), (0.25,), torch.device("cpu"))[0] is _affine(
        (0.5,), (0.25,), torch.device("cpu"))[0]
