"""The tiler: grid, windows, step-wise fusion equals whole-canvas sampling for a pixelwise model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rawdiff_infer.samplers import sample
from rawdiff_infer.schedule import Schedule
from rawdiff_infer.tiling import (CPU_CHUNK, WINDOWS, PatchGrid, TileConfig, TiledDenoiser, call_size, grid_starts,
                                  sample_independent, window_1d)

SCH = Schedule()


class PixelwiseModel:
    """A 1x1-convolution eps-model: eps at a pixel depends only on that pixel (and t)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 6, generator=g) * 0.5
        self.calls = 0
        self.largest = 0

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.largest = max(self.largest, x.shape[0])
        h = torch.einsum("oc,nchw->nohw", self.w, torch.cat([x, cond.float()], 1))
        return torch.tanh(h) * (1 + t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("length,patch,stride", [(64, 64, 48), (65, 64, 48), (200, 64, 64), (131, 64, 17),
                                                  (1000, 64, 48), (64, 64, 1)])
def test_grid_covers_exactly(length: int, patch: int, stride: int) -> None:
    s = grid_starts(length, patch, stride)
    assert s[0] == 0 and s[-1] == length - patch
    assert np.all(np.diff(s) > 0) and np.all(np.diff(s) <= stride)
    covered = np.zeros(length, bool)
    for v in s:
        covered[v:v + patch] = True
    assert covered.all()


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("h,w,stride", [(64, 64, 48), (100, 131, 48), (37, 200, 17), (1, 1, 64), (300, 70, 64)])
def test_window_weights_sum_to_one(window: str, h: int, w: int, stride: int) -> None:
    g = PatchGrid(h, w, TileConfig(stride=stride, window=window))
    ones = torch.ones(g.num_patches, 1, 64, 64)
    acc = torch.zeros(1, g.padded_height, g.padded_width)
    g.scatter(acc, ones, 0)
    torch.testing.assert_close(acc, torch.ones_like(acc), rtol=0, atol=2e-6)
    assert (window_1d(window, 64) > 0).all()


def test_gather_scatter_in_uneven_batches_equals_one_batch() -> None:
    g = PatchGrid(150, 190, TileConfig(stride=40))
    canvas = torch.randn(3, 150, 190)
    full = g.gather(canvas, 0, g.num_patches)
    a = torch.zeros(3, 150, 190)
    g.scatter(a, full, 0)
    b = torch.zeros(3, 150, 190)
    for k0 in range(0, g.num_patches, 5):
        k1 = min(k0 + 5, g.num_patches)
        torch.testing.assert_close(g.gather(canvas, k0, k1), full[k0:k1])
        g.scatter(b, full[k0:k1], k0)
    torch.testing.assert_close(a, canvas, rtol=0, atol=1e-5)  # unfold + fuse of an image is the image
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(64, 64), (100, 131), (37, 200), (257, 130), (20, 9), (1, 1), (5, 70)])
@pytest.mark.parametrize("stride", [64, 48, 17])
@pytest.mark.parametrize("method", ["dpm", "ddim"])
def test_stepwise_fusion_equals_whole_canvas(h: int, w: int, stride: int, method: str) -> None:
    model = PixelwiseModel()
    cond = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    tiled = TiledDenoiser(model, cond, TileConfig(stride=stride, batch_size=7))
    a = sample(tiled, x_T, SCH, method, 8)
    b = sample(lambda x, t: model(x, cond, t), x_T, SCH, method, 8)
    # The windows sum to one within ~2e-6 (fp32); at t = 999 the x0 prediction multiplies eps by sigma / alpha = 84,
    # and dpm's default third-order extrapolation carries that on: up to ~2e-4 at the end, against values of ~1.
    assert (a - b).abs().max() < 5e-4
    assert model.largest <= 7 or h * w == 1 and model.largest <= 7


def test_two_canvases_at_once() -> None:
    model = PixelwiseModel()
    cond = torch.rand(2, 3, 70, 90) * 2 - 1
    x = torch.randn(2, 3, 70, 90)
    t = torch.tensor([500.0, 20.0])
    eps = TiledDenoiser(model, cond, TileConfig(stride=48))(x, t)
    torch.testing.assert_close(eps, model(x, cond, t), rtol=1e-5, atol=1e-5)


def test_independent_patches_protocol() -> None:
    """Merge-at-the-end: every patch gets its own noise, so a pixelwise model gives a different result from the
    global-noise canvas, but for a point-mass model both return the data exactly."""
    model = PixelwiseModel()
    cond = torch.rand(1, 3, 100, 140) * 2 - 1
    cfg = TileConfig(stride=64, batch_size=4)
    out = sample_independent(model, cond, SCH, cfg, generator=torch.Generator().manual_seed(0), method="dpm",
                             steps=6)
    assert out.shape == (1, 3, 100, 140) and torch.isfinite(out).all()
    again = sample_independent(model, cond, SCH, cfg, generator=torch.Generator().manual_seed(0), method="dpm",
                               steps=6)
    assert torch.equal(out, again)

    def point_mass(x, c, t):  # x0 prediction = cond everywhere (eps consistent with x0 = cond)
        a, s = (torch.as_tensor(v, dtype=torch.float32).view(-1, 1, 1, 1) for v in SCH.alpha_sigma(t.double().numpy()))
        return (x - a * c.float()) / s

    out = sample_independent(point_mass, cond, SCH, TileConfig(stride=48, batch_size=5),
                             generator=torch.Generator().manual_seed(0), method="ddim", steps=5)
    torch.testing.assert_close(out, cond, rtol=0, atol=1e-5)


def test_condition_unfolded_once_in_backend_dtype() -> None:
    class Half(PixelwiseModel):
        input_dtype = torch.float16

    cond = torch.rand(1, 3, 80, 80)
    td = TiledDenoiser(Half(), cond, TileConfig(stride=32))
    assert td.cond_patches[0].dtype == torch.float16
    assert td.cond_patches[0].shape == (td.num_patches, 3, 64, 64)


def test_config_validation() -> None:
    for bad in (dict(stride=0), dict(stride=65), dict(window="gauss"), dict(batch_size=0), dict(patch_size=60),
                dict(merge="middle")):
        with pytest.raises(ValueError):
            TileConfig(**bad)


def test_set_condition_swaps_in_a_new_image_of_the_same_size() -> None:
    g = torch.Generator().manual_seed(3)
    c1, c2 = (torch.rand(1, 3, 90, 110, generator=g) * 2 - 1 for _ in range(2))
    x = torch.randn(1, 3, 90, 110, generator=g)
    t = torch.full((1,), 500.0)
    model = PixelwiseModel()
    reused = TiledDenoiser(model, c1, TileConfig(stride=48, batch_size=5))
    buffers = [p.data_ptr() for p in reused.cond_patches]
    reused.set_condition(c2)
    assert [p.data_ptr() for p in reused.cond_patches] == buffers  # in place: a recorded graph would see it
    fresh = TiledDenoiser(model, c2, TileConfig(stride=48, batch_size=5))
    torch.testing.assert_close(reused(x, t), fresh(x, t), rtol=0, atol=0)
    assert not torch.equal(reused(x, t), TiledDenoiser(model, c1, TileConfig(stride=48, batch_size=5))(x, t))
    with pytest.raises(ValueError, match="does not match"):
        reused.set_condition(torch.zeros(1, 3, 90, 111))


def test_graphed_denoiser_needs_a_capturable_cuda_backend() -> None:
    from rawdiff_infer.tiling import GraphedDenoiser

    with pytest.raises(ValueError, match="capturable"):
        GraphedDenoiser(TiledDenoiser(PixelwiseModel(), torch.zeros(1, 3, 64, 64)))


class BatchSensitiveModel(PixelwiseModel):
    """PixelwiseModel plus 1e-4 times the batch size: what real CPU and GPU kernels do, in the small (their
    rounding depends on the batch shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return super().__call__(x, cond, t) + 1e-4 * x.shape[0]


def test_a_canvas_gets_the_same_eps_alone_and_packed_with_others() -> None:
    """Issue 23: every backend call has one shape (the last one padded), so a canvas's eps does not depend on the
    canvases that share its calls."""
    g = torch.Generator().manual_seed(1)
    conds = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in ((40, 40), (100, 70), (64, 130))]
    xs = [torch.randn(3, *c.shape[1:], generator=g) for c in conds]
    t = torch.tensor([500.0])
    cfg = TileConfig(stride=48, batch_size=8, chunk=4)
    model = BatchSensitiveModel()
    packed = TiledDenoiser(model, conds, cfg)
    eps = packed.pack.unpack(packed(packed.pack.pack(xs), t, step=0))
    assert set(model.sizes) == {4}
    for c, x, e in zip(conds, xs, eps):
        alone = TiledDenoiser(model, [c], cfg)
        assert torch.equal(alone.pack.unpack(alone(alone.pack.pack([x]), t, step=0))[0], e)
    assert set(model.sizes) == {4}


def test_call_size_rule() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert call_size(TileConfig(batch_size=256), cpu) == CPU_CHUNK
    assert call_size(TileConfig(batch_size=256), cuda) == 256
    assert call_size(TileConfig(batch_size=256), cuda, max_batch=64) == 64
    assert call_size(TileConfig(batch_size=1), cpu) == 1
    assert call_size(TileConfig(batch_size=16, chunk=8), cpu) == 8
    with pytest.raises(ValueError, match="chunk"):
        TileConfig(batch_size=4, chunk=8)
    with pytest.raises(ValueError, match="chunk"):
        TileConfig(chunk=0)
