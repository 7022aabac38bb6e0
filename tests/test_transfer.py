"""Host <-> device copies (transfer.py): one stream per direction, results copied out of page-locked memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rawdiff_infer.rawspace import host_srgb
from rawdiff_infer.transfer import DeviceTransfer, PendingHost


def test_on_the_cpu_the_copies_are_hand_overs_and_there_is_no_stream() -> None:
    tr = DeviceTransfer("cpu")
    assert tr.upload_stream is None and tr.download_stream is None
    px = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    staged = tr.stage(px)
    assert torch.equal(tr.upload(staged), host_srgb(px))
    out = torch.rand(4, 5, 3)
    pending = tr.download(out)
    assert np.array_equal(pending.result(), out.numpy())


def test_a_result_is_taken_once_and_its_buffer_released() -> None:
    pending = PendingHost(torch.ones(2, 2, 3))
    assert pending.result().sum() == 12
    assert pending.host is None
    with pytest.raises(RuntimeError, match="already taken"):
        pending.result()


@pytest.mark.gpu
def test_an_upload_does_not_queue_behind_a_download() -> None:
    """The download of pack k waits for pack k's compute; the upload of pack k+1 must not wait for it."""
    tr = DeviceTransfer("cuda")
    assert tr.upload_stream is not None and tr.download_stream is not None
    assert tr.upload_stream != tr.download_stream
    result = torch.rand(256, 256, 3, device="cuda")
    torch.cuda._sleep(2_000_000_000)  # about a second of compute on the current stream
    pending = tr.download(result)
    px = np.full((64, 64, 3), 7, np.uint8)
    dev = tr.upload(tr.stage(px))
    tr.upload_stream.synchronize()
    assert pending.event is not None and not pending.event.query()  # still behind the compute; the upload is done
    host = pending.result()
    assert host.base is None  # its own memory, not a view of the page-locked buffer
    assert np.array_equal(host, result.cpu().numpy())
    assert torch.equal(dev.cpu(), host_srgb(px))
