"""Read the training loss back to the host without stalling the device.

``float(loss)`` waits for the device to finish every queued step: on a GPU whose step is
~1 ms of compute the host then idles while it launches the next step, so a read every 10
steps costs up to a tenth of the run. :class:`LossMonitor` instead copies the loss (and its
running mean) into a host buffer with a non-blocking copy, records an event after it, and
reads the values at a later step once the event says the copy is done: the host never waits
inside an epoch. On CPU the copy completes at once, so the values are read at the next report
(lagged by ``every`` steps); what is checked is the same. :meth:`settle` (end of an epoch)
waits for the last copy: one sync per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossReading:
    """The loss of one step and the running mean then, read back on the host."""

    step: int
    loss: float
    running: float
    nonfinite: int = 0  # the longest run of non-finite steps up to ``step`` (if offered)


class LossMonitor:
    """Non-blocking loss read-back every ``every`` steps (see the module docs).

    ``offer(step, loss, running)`` each step: starts a copy when it is a report step and no
    copy is in flight, and returns the reading of an earlier copy once it has landed (else
    None). ``loss``, ``running`` and ``nonfinite`` (a count kept by the trainer, read back
    with them) are 0-d tensors on the training device.
    """

    def __init__(self, device: torch.device, every: int = 10) -> None:
        self.device, self.every = device, every
        pinned = device.type == "cuda"
        self._host = torch.empty(3, dtype=torch.float32, pin_memory=pinned)
        self._event = torch.cuda.Event() if pinned else None
        self._pending: int | None = None  # the step whose values are being copied

    def offer(self, step: int, loss: torch.Tensor, running: torch.Tensor,
              report: bool = False, nonfinite: torch.Tensor | None = None
              ) -> LossReading | None:
        """``report`` forces a copy at this step (an epoch's last step), waiting for one still
        in flight first."""
        reading = self.settle() if report else self._landed()
        if report or (self._pending is None and step % self.every == 0):
            self._start(step, loss, running, nonfinite)
        return reading

    def settle(self) -> LossReading | None:
        """Wait for the copy in flight, if any, and return its reading."""
        if self._pending is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return self._take()

    def _start(self, step: int, loss: torch.Tensor, running: torch.Tensor,
               nonfinite: torch.Tensor | None) -> None:
        count = torch.zeros_like(loss, dtype=torch.float32) if nonfinite is None else nonfinite
        values = torch.stack([loss.detach().float(), running.detach().float(), count.float()])
        self._host.copy_(values, non_blocking=self._event is not None)
        if self._event is not None:
            # on the stream the copy went to: that of the values' device, which need not be
            # the current device (``--device cuda:1``); a bare ``record()`` would mark cuda:0's
            # stream and ``_landed`` could read the buffer before the copy arrived
            self._event.record(torch.cuda.current_stream(values.device))
        self._pending = step

    def _landed(self) -> LossReading | None:
        if self._pending is None or (self._event is not None and not self._event.query()):
            return None
        return self._take()

    def _take(self) -> LossReading:
        loss, running, count = self._host.numpy().tolist()  # a host buffer: no device read
        step, self._pending = self._pending, None
        return LossReading(step, loss, running, int(count))
