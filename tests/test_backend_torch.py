"""Torch backend: contract, dtypes, determinism through the whole tiled sampler."""

from __future__ import annotations

import math

import pytest
import torch

from rawdiff_infer.backends import BackendError
from rawdiff_infer.backends.torch import TorchBackend, parse_dtype
from rawdiff_infer.checkpoint import ModelMeta, save_checkpoint
from rawdiff_infer.model import UNet
from rawdiff_infer.samplers import sample
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import TileConfig, TiledDenoiser

from conftest import TINY_CONFIG


def _backend(dtype="fp32", **kw) -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), dtype=dtype, **kw)


def _run(backend: TorchBackend, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(1, 3, 90, 110, generator=g) * 2 - 1
    x_T = torch.randn(1, 3, 90, 110, generator=g)
    eps_fn = TiledDenoiser(backend, cond, TileConfig(stride=48, batch_size=4))
    return sample(eps_fn, x_T, Schedule(), "dpm", 6)


def test_contract_and_ownership() -> None:
    b = _backend()
    x, c, t = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.full((3,), 10.0)
    out = b(x, c, t)
    assert out.dtype == torch.float32 and out.shape == x.shape
    out2 = b(x, c, t)
    assert out is not out2 and out.data_ptr() != out2.data_ptr()
    with b:
        pass  # context manager closes


def test_same_seed_same_output() -> None:
    b = _backend()
    assert torch.equal(_run(b, 0), _run(b, 0))
    assert not torch.equal(_run(b, 0), _run(b, 1))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR on the [0, 1] scale (model space [-1, 1] mapped to [0, 1])."""
    mse = (((a - b) / 2) ** 2).mean().item()
    return 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_low_precision_agrees_with_fp32(low: str) -> None:
    ref = _run(_backend("fp32"))
    try:
        out = _run(_backend(low))
    except RuntimeError as e:  # pragma: no cover - an op without a CPU kernel for this dtype
        pytest.skip(f"{low} not supported on this CPU build: {e}")
    psnr = _psnr(out, ref)
    print(f"{low} vs fp32 through the tiled dpm sampler: PSNR {psnr:.1f} dB")
    assert torch.isfinite(out).all()
    assert psnr > (35 if low == "bf16" else 45)


def test_from_checkpoint(tmp_path) -> None:
    model = UNet(TINY_CONFIG)
    save_checkpoint(model, tmp_path / "m.safetensors")
    b = TorchBackend.from_checkpoint(tmp_path / "m.safetensors")
    x, c, t = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.full((2,), 10.0)
    with torch.no_grad():
        torch.testing.assert_close(b(x, c, t), model.eval()(x, c, t))


def test_errors() -> None:
    with pytest.raises(BackendError):
        parse_dtype("int8")
    with pytest.raises(BackendError):
        _backend(cuda_graph=True)  # needs CUDA
    b = _backend(max_batch_size=2)
    with pytest.raises(BackendError):
        b(torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.zeros(3))


@pytest.mark.gpu
def test_cuda_graph_matches_eager() -> None:
    eager = _backend("fp16", device="cuda")
    graphed = _backend("fp16", device="cuda", cuda_graph=True, max_batch_size=8)
    x, c, t = (torch.randn(5, 3, 64, 64, device="cuda"), torch.randn(5, 3, 64, 64, device="cuda"),
               torch.full((5,), 10.0, device="cuda"))
    torch.testing.assert_close(graphed(x, c, t), eager(x, c, t), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_cuda_graph_on_a_gpu_that_is_not_the_current_one() -> None:
    """Issue 23, bug 3: captured for cuda:1 while cuda:0 is current, the graph must compute on cuda:1 (replay of a
    graph that captured nothing returns the same stale eps whatever the input)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    assert torch.cuda.current_device() == 0
    eager = _backend("fp16", device="cuda:1")
    graphed = _backend("fp16", device="cuda:1", cuda_graph=True, max_batch_size=8)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x, c = torch.randn(5, 3, 64, 64, generator=g).to("cuda:1"), torch.randn(5, 3, 64, 64, generator=g).to("cuda:1")
        t = torch.full((5,), 10.0 + seed, device="cuda:1")
        torch.testing.assert_close(graphed(x, c, t), eager(x, c, t), rtol=2e-3, atol=2e-3)
