"""Damaged phase checkpoints start their phase over (a warning), never resume wrong weights:
torch's zip reader does not check CRCs, so a flipped byte inside a tensor loads silently."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from benchmarks.engine import checkpoints
from benchmarks.engine.training import FitStats
from tests.engine.test_resume_device import _checkpoint, _trainer


def _flip_weight_byte(path: Path, weight: torch.Tensor) -> None:
    """Change one byte inside the stored bytes of ``weight`` (a tensor record of the zip)."""
    data = bytearray(path.read_bytes())
    at = data.find(weight.detach().numpy().tobytes())
    assert at > 0, "the tensor's bytes are stored verbatim in the checkpoint"
    data[at + 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_tensor_byte_starts_the_phase_over(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    saved = torch.load(path, weights_only=False)["model"]["0.weight"]
    _flip_weight_byte(path, saved)
    # the premise: torch itself loads the damaged file, with a wrong weight
    damaged = torch.load(path, weights_only=False)["model"]["0.weight"]
    assert not torch.equal(damaged, saved)
    trainer = _trainer()
    before = trainer.model[0].weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.load_checkpoint(path, trainer, FitStats()) == (0, None)
    assert "checksum mismatch" in caplog.text and "starts over" in caplog.text
    assert torch.equal(trainer.model[0].weight, before)  # nothing of the damaged file loaded


def test_a_truncated_checkpoint_starts_the_phase_over(tmp_path, caplog):
    path = _checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert checkpoints.load_checkpoint(path, _trainer(), FitStats()) == (0, None)
    assert "unreadable" in caplog.text


def test_an_intact_checkpoint_and_one_without_checksum_resume(tmp_path):
    path = _checkpoint(tmp_path)
    assert checkpoints.digest_path(path).exists()
    assert checkpoints.load_checkpoint(path, _trainer(), FitStats())[0] == 1
    checkpoints.digest_path(path).unlink()  # a checkpoint written before checksums
    assert checkpoints.load_checkpoint(path, _trainer(), FitStats())[0] == 1
