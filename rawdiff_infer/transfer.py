"""Host <-> device copies that overlap compute: page-locked staging and one CUDA copy stream per direction.

On CUDA:
- ``stage`` (called from the decode thread) puts a decoded image in page-locked (pinned) memory, in the compact
  form the model space is made from (uint8, or int32 for 16-bit images);
- ``upload`` copies it to the GPU on the upload stream, without blocking the host, and makes the compute stream
  wait for that copy only;
- ``download`` starts the copy of a result back into pinned host memory on the download stream, after the compute
  stream has produced it, and returns at once; ``PendingHost.result()`` (called from the write thread) waits for
  that copy alone and copies the array out of the pinned buffer, which it releases.

The two directions have a stream each because a download must wait for the compute that produces its result: on
a shared stream, the next pack's upload would queue behind that download, and so behind the whole previous
compute, and the next compute behind both. With a stream per direction, pack k+1's upload runs while pack k is
still computing, and pack k's download runs beside pack k+1's compute. On the CPU all three are plain hand-overs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .rawspace import host_srgb

__all__ = ["DeviceTransfer", "PendingHost"]


@dataclass
class PendingHost:
    """A device-to-host copy in flight: ``result()`` waits for it and returns the numpy array, once.

    On CUDA the array is copied out of the page-locked buffer, which is released at once: a result kept by the
    caller (for as long as it likes) never holds page-locked memory, about 288 MB per 24 MP image.
    """

    host: torch.Tensor | None
    event: torch.cuda.Event | None = None

    def result(self) -> np.ndarray:
        """The H x W x 3 array (owning its memory on CUDA; on the CPU a view of the computed tensor)."""
        if self.host is None:
            raise RuntimeError("the result of this copy was already taken")
        host, event = self.host, self.event
        self.host = self.event = None  # the page-locked buffer goes back with this object's last reference
        if event is None:
            return host.numpy()
        event.synchronize()
        return host.numpy().copy()


class DeviceTransfer:
    """Copies for one device (see the module docstring).

    Args:
        device: the backend's device.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        #: host -> device copies (None on the CPU)
        self.upload_stream = torch.cuda.Stream(self.device) if self.cuda else None
        #: device -> host copies, each after the compute that produces its tensor (None on the CPU)
        self.download_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def stage(self, pixels: np.ndarray) -> torch.Tensor:
        """A decoded H x W x 3 image as a host tensor ready to upload (pinned on CUDA)."""
        return host_srgb(pixels, pin=self.cuda)

    def upload(self, staged: torch.Tensor) -> torch.Tensor:
        """The staged image on the device; the compute (current) stream waits for the copy."""
        if not self.cuda:
            return staged
        up = self.upload_stream
        assert up is not None
        with torch.cuda.stream(up):
            dev = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(up)
        torch.cuda.current_stream(self.device).wait_event(done)
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev

    def download(self, tensor: torch.Tensor) -> PendingHost:
        """Start copying ``tensor`` (produced on the current stream) to pinned host memory; returns at once."""
        if not self.cuda:
            return PendingHost(tensor.detach().cpu())
        down = self.download_stream
        assert down is not None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(down):
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(down)
        tensor.record_stream(down)  # the caching allocator must not reuse it before the copy ends
        return PendingHost(host, done)
