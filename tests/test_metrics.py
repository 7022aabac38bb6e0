"""rawdiff_infer.metrics: PSNR, the determined / clipped regions of an input and the PSNR per region."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rawdiff_infer.metrics import CLIP_FRACTION, REGIONS, psnr, psnr_regions, region_masks


def test_psnr_of_a_known_error() -> None:
    target = np.full((4, 5, 3), 0.5)
    assert psnr(target + 0.01, target) == pytest.approx(40.0)
    assert psnr(target, target) == pytest.approx(120.0)  # capped
    assert psnr(np.full((4, 5, 3), 2.0), np.ones((4, 5, 3))) == pytest.approx(120.0)  # prediction clamped to peak


def test_region_masks_uint8_threshold_is_250_on_any_channel() -> None:
    srgb = np.full((2, 4, 3), 100, dtype=np.uint8)
    srgb[0, 0] = (249, 249, 249)  # determined: just below
    srgb[0, 1] = (250, 0, 0)  # clipped: one channel at 250
    srgb[0, 2] = (0, 0, 255)
    srgb[1, 3] = (255, 255, 255)
    m = region_masks(srgb)
    assert tuple(m) == REGIONS
    expected = np.zeros((2, 4), dtype=bool)
    expected[0, 1] = expected[0, 2] = expected[1, 3] = True
    np.testing.assert_array_equal(m["clipped"], expected)
    np.testing.assert_array_equal(m["determined"], ~expected)
    assert m["all"].all() and m["all"].shape == (2, 4)


@pytest.mark.parametrize("dtype, at, below", [(np.uint16, 64250, 64249), (np.float32, 250 / 255, 249 / 255),
                                               (np.float64, 250 / 255, 249.9 / 255)])
def test_region_masks_other_depths_use_the_same_fraction_of_full_scale(dtype, at: float, below: float) -> None:
    assert at == pytest.approx(CLIP_FRACTION * (65535 if dtype == np.uint16 else 1.0))
    m = region_masks(np.array([[[at, 0, 0], [below, below, below]]]).astype(dtype))
    np.testing.assert_array_equal(m["clipped"], [[True, False]])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.int32)])
def test_region_masks_refuse_what_is_not_an_rgb_image(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        region_masks(bad)


def test_psnr_regions_measure_each_region_on_its_own_pixels() -> None:
    srgb = np.full((10, 10, 3), 120, dtype=np.uint8)
    srgb[:, :3, 1] = 255  # 30 clipped pixels
    target = np.full((10, 10, 3), 0.5)
    pred = target + 0.01  # 40 dB where determined
    pred[:, :3] = 0.6  # 20 dB where clipped
    p = psnr_regions(pred, target, srgb)
    assert p["determined"] == pytest.approx(40.0)
    assert p["clipped"] == pytest.approx(20.0)
    mse = 0.7 * 1e-4 + 0.3 * 1e-2
    assert p["all"] == pytest.approx(-10 * math.log10(mse))


def test_psnr_regions_none_where_a_region_is_empty() -> None:
    target = np.zeros((3, 3, 3))
    p = psnr_regions(target + 0.1, target, np.zeros((3, 3, 3), dtype=np.uint8))
    assert p["clipped"] is None and p["determined"] == pytest.approx(20.0) == p["all"]
    p = psnr_regions(target + 0.1, target, np.full((3, 3, 3), 255, dtype=np.uint8))
    assert p["determined"] is None and p["clipped"] == pytest.approx(20.0)


def test_psnr_regions_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        psnr_regions(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="shapes"):
        psnr_regions(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), np.zeros((5, 4, 3), np.uint8))
