"""TorchBackend.describe() names what really runs (rawdiff-bench labels its variants with it)."""

from __future__ import annotations

import torch

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.model import UNet

from conftest import TINY_CONFIG


def _backend(**kw) -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), **kw)


def test_eager_backend_is_not_described_as_compiled() -> None:
    d = _backend().describe()
    assert "compiled" not in d, d
    assert "channels_last" in d and d.startswith("torch on cpu (float32)")
    assert "channels_last" not in _backend(channels_last=False).describe()


def test_compiled_backend_says_so_and_names_its_mode() -> None:
    # torch.compile is lazy: constructing the backend compiles nothing, so this is cheap
    assert "compiled" in _backend(compile=True).describe()
    assert "compiled(reduce-overhead)" in _backend(compile="reduce-overhead").describe()
