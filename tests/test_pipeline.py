"""RawReconstructor: sRGB array in, RAW out (tiny random-weight U-Net on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.model import UNet
from rawdiff_infer.pipeline import RawReconstructor, Reconstruction, SamplerConfig
from rawdiff_infer.tiling import TileConfig


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    torch.manual_seed(0)
    return TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), device="cpu")


def _srgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / max(w, 1), y / max(h, 1), 0.5 + 0.0 * x], axis=-1) * 200
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _rec(backend: TorchBackend, steps: int = 2, **tiles: object) -> RawReconstructor:
    return RawReconstructor(backend, sampler=SamplerConfig(method="dpm", steps=steps),
                            tiles=TileConfig(patch_size=64, **tiles))  # type: ignore[arg-type]


def test_maps_srgb_to_encoded_and_linear_raw(backend: TorchBackend) -> None:
    calls: list[tuple[int, int]] = []
    out = _rec(backend, steps=3).reconstruct(_srgb(40, 90), seed=1, progress=lambda d, t: calls.append((d, t)))
    assert isinstance(out, Reconstruction)
    for a in (out.encoded, out.linear):
        assert a.shape == (40, 90, 3) and a.dtype == np.float32
        assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    assert out.gamma == pytest.approx(2.2)
    np.testing.assert_allclose(out.linear, out.encoded.astype(np.float64) ** 2.2, rtol=1e-5, atol=1e-7)
    assert out.encoded.std() > 0  # not a constant image
    assert out.steps == 3 and out.patches >= 2 and out.seconds > 0
    # progress: (done, total), increasing, ending at total
    assert calls[-1] == (3, 3)
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))
    assert all(t == 3 for _, t in calls)


@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (70, 5), (64, 64)])
def test_any_image_size(backend: TorchBackend, shape: tuple[int, int]) -> None:
    out = _rec(backend).reconstruct(_srgb(*shape), seed=0)
    assert out.encoded.shape == (*shape, 3) and out.linear.shape == (*shape, 3)
    assert np.isfinite(out.encoded).all() and 0.0 <= out.encoded.min() and out.encoded.max() <= 1.0


def test_seed_determinism(backend: TorchBackend) -> None:
    rec, img = _rec(backend), _srgb(50, 70)
    a, b, c = (rec.reconstruct(img, seed=s).encoded for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_input_dtypes_agree(backend: TorchBackend) -> None:
    """uint8, uint16 and float [0, 1] inputs are the same picture."""
    img8 = _srgb(30, 40)
    rec = _rec(backend)
    a = rec.reconstruct(img8, seed=3).encoded
    b = rec.reconstruct(img8.astype(np.uint16) * 257, seed=3).encoded
    c = rec.reconstruct(img8.astype(np.float32) / 255.0, seed=3).encoded
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_merge_end_progress_counts_every_chunk(backend: TorchBackend) -> None:
    """The paper's protocol runs the sampler once per chunk of patches: progress still runs 1..total once."""
    calls: list[tuple[int, int]] = []
    rec = _rec(backend, steps=2, stride=64, batch_size=2, merge="end")
    out = rec.reconstruct(_srgb(64, 200), seed=0, progress=lambda d, t: calls.append((d, t)))  # 4 patches, 2 chunks
    assert out.patches == 4
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert out.encoded.shape == (64, 200, 3)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((0, 10, 3), np.uint8)])
def test_rejects_non_rgb_arrays(backend: TorchBackend, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="H x W x 3"):
        _rec(backend).reconstruct(bad)


def test_sampler_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerConfig(method="euler")
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    assert SamplerConfig(method="ddpm").num_steps == 1000


def test_step_graph_is_off_by_default_and_refused_where_it_cannot_run(backend: TorchBackend) -> None:
    assert not backend.capturable
    rec = _rec(backend)
    assert rec.step_graph is False
    assert rec.reconstruct(_srgb(40, 50), seed=0).extra["step_graph"] is False
    with pytest.raises(ValueError, match="capturable backend on CUDA"):
        RawReconstructor(backend, tiles=TileConfig(patch_size=64), step_graph=True)


@pytest.mark.gpu
def test_step_graph_matches_the_eager_step_and_is_reused_for_same_sized_images() -> None:
    torch.manual_seed(0)
    be = TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), device="cuda", dtype="fp32")
    assert be.capturable
    tiles = TileConfig(patch_size=64, stride=48, batch_size=7)  # several batches per step, a ragged last one
    sampler = SamplerConfig(method="dpm", steps=4)
    eager = RawReconstructor(be, sampler=sampler, tiles=tiles, step_graph=False)
    graphed = RawReconstructor(be, sampler=sampler, tiles=tiles, step_graph=True)
    a, b = _srgb(100, 130, seed=1), _srgb(100, 130, seed=2)
    ra = graphed.reconstruct(a, seed=5)
    first = graphed._graphed
    rb = graphed.reconstruct(b, seed=5)
    assert graphed._graphed is first  # same size: the recorded graph is reused with the new condition
    assert ra.extra["step_graph"] and rb.extra["step_graph"]
    np.testing.assert_allclose(ra.encoded, eager.reconstruct(a, seed=5).encoded, atol=1e-4)
    np.testing.assert_allclose(rb.encoded, eager.reconstruct(b, seed=5).encoded, atol=1e-4)
    assert np.abs(ra.encoded - rb.encoded).max() > 1e-3
    graphed.reconstruct(_srgb(70, 64), seed=0)  # a new size records a new graph
    assert graphed._graphed is not first
    graphed.close()
    # a backend with its own per-batch graph: the step graph records the plain forward instead (graphs do not nest)
    torch.manual_seed(0)
    own = TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), device="cuda", dtype="fp32",
                       cuda_graph=True, max_batch_size=7)
    both = RawReconstructor(own, sampler=sampler, tiles=tiles, step_graph=True)
    np.testing.assert_allclose(both.reconstruct(a, seed=5).encoded, ra.encoded, atol=1e-4)
