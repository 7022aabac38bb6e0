"""The shifted grid and packed canvases: exact geometry, and several images at once equal each image alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, perturbed_tiny_model

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
from rawdiff_infer.samplers import sample
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import (CanvasPack, NonFiniteOutputError, ShiftedGrid, TileConfig, TiledDenoiser,
                                  grid_offset)

SCH = Schedule()


class BlurModel:
    """A batch-invariant eps model with spatial context: every patch is computed on its own (so the result for a
    patch never depends on which other patches share its batch), with a 5x5 blur and a per-patch mean."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        outs = []
        for i in range(x.shape[0]):
            xi, ci = x[i:i + 1], cond[i:i + 1].float()
            blur = torch.nn.functional.avg_pool2d(torch.cat([xi, ci], 1), 5, stride=1, padding=2)
            h = blur[:, :3] * 0.7 - blur[:, 3:] * 0.4 + xi.mean() * 0.1
            outs.append(torch.tanh(h) * (1 + t[i] / 2000))
        return torch.cat(outs)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 70), (64, 64), (100, 131), (129, 63)])
@pytest.mark.parametrize("offset", [(0, 0), (1, 63), (37, 5), (63, 63)])
def test_shifted_grid_tiles_every_pixel_once(h: int, w: int, offset: tuple[int, int]) -> None:
    g = ShiftedGrid(h, w, 64, offset)
    canvas = torch.randn(3, h, w)
    patches = g.gather_all(canvas)
    assert patches.shape == (g.num_patches, 3, 64, 64)
    torch.testing.assert_close(g.merge(patches.clone()), canvas, rtol=0, atol=0)  # gather then merge = identity
    ones = torch.ones(g.num_patches, 1, 64, 64)
    assert torch.equal(g.merge(ones), torch.ones(1, h, w))
    assert g.num_patches == -(-(h + offset[0]) // 64) * -(-(w + offset[1]) // 64)


def test_grid_offsets_spread_over_the_cell_and_depend_on_the_seed() -> None:
    offs = [grid_offset(k, 64) for k in range(20)]
    assert all(0 <= a < 64 and 0 <= b < 64 for a, b in offs)
    assert len(set(offs)) == 20  # a different offset at every evaluation
    for axis in (0, 1):  # low discrepancy: no gap of a quarter cell along either axis within 20 steps
        coords = sorted(o[axis] for o in offs)
        assert max(np.diff([0, *coords, 64])) < 16, coords
    assert [grid_offset(k, 64, seed=3) for k in range(5)] != offs[:5]
    assert [grid_offset(k, 64, seed=3) for k in range(5)] == [grid_offset(k, 64, seed=3) for k in range(5)]


def test_canvas_pack_round_trip() -> None:
    shapes = [(3, 5, 7), (3, 1, 1), (3, 64, 100)]
    pack = CanvasPack(shapes)
    canvases = [torch.randn(s) for s in shapes]
    x = pack.pack(canvases)
    assert x.shape == (1, sum(int(np.prod(s)) for s in shapes))
    for a, b in zip(pack.unpack(x), canvases):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        pack.pack(canvases[:2])


def _solo_and_packed(grid: str, method: str, batch: int) -> None:
    sizes = [(70, 60), (13, 100), (64, 64), (150, 31)]
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
    seeds = [3, 14, 15, 92]
    model = BlurModel()
    be = _Wrap(model)
    # calls of the full batch (the GPU's default; the CPU's is 2), so that sharing them shows
    tiles = TileConfig(stride=40, batch_size=batch, grid=grid, chunk=batch)  # type: ignore[arg-type]
    rec = RawReconstructor(be, sampler=SamplerConfig(method=method, steps=6), tiles=tiles)
    alone = [rec.reconstruct(img, seed=s).encoded for img, s in zip(images, seeds)]
    calls_alone = len(model.batches)
    model.batches.clear()
    together = rec.reconstruct_many(images, seeds=seeds)
    for a, b in zip(alone, together):
        assert np.array_equal(a, b.encoded)  # bit for bit: own state, own seed, own noise
    assert len(model.batches) < calls_alone  # ... with fewer, fuller backend calls
    assert set(model.batches) == {batch}  # one batch shape: the last call of each evaluation padded


class _Wrap:
    """The minimal backend surface RawReconstructor needs, around a patch function."""

    def __init__(self, fn) -> None:
        self.fn, self.meta, self.device = fn, ModelMeta(model=TINY_CONFIG), torch.device("cpu")
        self.patch_size, self.input_dtype, self.capturable = 64, torch.float32, False

    def __call__(self, x, c, t):
        return self.fn(x, c, t)


@pytest.mark.parametrize("grid", ["overlap", "shifted"])
@pytest.mark.parametrize("method", ["dpm-sde", "dpm", "ddpm"])
def test_images_packed_together_equal_each_image_alone(grid: str, method: str) -> None:
    _solo_and_packed(grid, method, batch=16)


@pytest.mark.parametrize("chunk", [None, 8])
def test_packed_with_the_tiny_unet_equals_each_image_alone_bit_for_bit(chunk: int | None) -> None:
    """The real U-Net is not batch-invariant on the CPU (oneDNN picks kernels per batch size: ~1e-6), but every
    backend call has one shape, so a pack matches the images alone bit for bit."""
    be = TorchBackend(perturbed_tiny_model(), ModelMeta(model=TINY_CONFIG))
    rng = np.random.default_rng(1)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((40, 90), (64, 64), (20, 20))]
    rec = RawReconstructor(be, sampler=SamplerConfig(method="dpm-sde", steps=4),
                           tiles=TileConfig(stride=48, batch_size=8, chunk=chunk))
    alone = [rec.reconstruct(img, seed=7).encoded for img in images]
    together = rec.reconstruct_many(images, seeds=[7, 7, 7])
    for a, b in zip(alone, together):
        assert np.array_equal(a, b.encoded)


def test_shifted_grid_sampling_moves_the_borders_and_needs_fewer_patches() -> None:
    model = BlurModel()
    cond = torch.rand(1, 3, 192, 256) * 2 - 1
    over = TiledDenoiser(model, cond, TileConfig(stride=48, grid="overlap"))
    shift = TiledDenoiser(model, cond, TileConfig(stride=48, grid="shifted"))
    assert shift.num_patches == 12 and over.num_patches == 4 * 5
    x = torch.randn(1, 3, 192, 256, generator=torch.Generator().manual_seed(0))
    out = sample(shift, x, SCH, "dpm-sde", 8, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all() and shift.calls == 8


def test_overlap_last_uses_the_overlap_grid_for_the_final_evaluations() -> None:
    model = BlurModel()
    cond = torch.rand(1, 3, 100, 100) * 2 - 1
    # one patch per call (calls are padded to one shape): the calls count the patches
    den = TiledDenoiser(model, cond, TileConfig(stride=16, grid="shifted", overlap_last=2, batch_size=1), steps=5)
    x = torch.randn(1, 3, 100, 100)
    sizes = []
    for _ in range(5):
        model.batches.clear()
        den(x, torch.tensor([500.0]))
        sizes.append(sum(model.batches))
    over_n = TiledDenoiser(model, cond, TileConfig(stride=16)).num_patches  # 4 x 4, more than any shifted grid
    assert sizes[-2:] == [over_n, over_n] and all(s != over_n for s in sizes[:3])


def test_non_finite_model_output_is_caught_on_the_cpu_at_once() -> None:
    calls = []

    def broken(x, c, t):
        calls.append(1)
        out = torch.zeros_like(x)
        if len(calls) == 3:
            out[0, 0, 0, 0] = float("inf")
        return out

    den = TiledDenoiser(broken, torch.zeros(1, 3, 64, 64), TileConfig())
    with pytest.raises(NonFiniteOutputError):
        sample(den, torch.randn(1, 3, 64, 64), SCH, "dpm", 10)
    assert len(calls) == 3  # stopped at the bad call, not after the whole image
