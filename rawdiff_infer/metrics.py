"""Quality metrics: PSNR, and PSNR per region of the input photo.

The regions say what the camera's ISP left of the RAW: where no channel of the sRGB input reaches
``CLIP_FRACTION`` of full scale (250 of 255 levels), the ISP's closed-form inverse fixes the RAW up to the input's
quantisation ("determined" pixels); where a channel does, the ISP clipped it and only a model can say how far above
the clip level the RAW was ("clipped" pixels). Every pixel is in exactly one of the two.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CLIP_FRACTION", "REGIONS", "psnr", "psnr_regions", "region_masks"]

#: a pixel counts as clipped when a channel of the input reaches this fraction of full scale (250 / 255: 250 in
#: 8-bit levels, 64250 in 16-bit levels)
CLIP_FRACTION = 250.0 / 255.0
#: the regions of :func:`region_masks`, in report order
REGIONS: tuple[str, ...] = ("all", "determined", "clipped")


def psnr(pred: np.ndarray, target: np.ndarray, *, peak: float = 1.0) -> float:
    """PSNR in dB (InvISP's definition on RAW: data in [0, peak], the prediction clamped to [0, peak]).

    Args:
        pred, target: arrays of one shape, e.g. H x W x 3 encoded RAW in [0, 1] (``peak=1``) or 8-bit images
            (``peak=255``).
    Returns:
        10 log10(peak^2 / MSE), capped at 120 dB (MSE floored at 1e-12 peak^2).
    """
    p = np.clip(np.asarray(pred, dtype=np.float64), 0.0, peak)
    mse = float(np.mean((p - np.asarray(target, dtype=np.float64)) ** 2))
    return 10.0 * math.log10(peak * peak / max(mse, 1e-12 * peak * peak))


def _full_scale(srgb: np.ndarray) -> float:
    """The white level of the input's sample type: 255 (uint8), 65535 (uint16), 1.0 (float in [0, 1])."""
    if srgb.dtype == np.uint8:
        return 255.0
    if srgb.dtype == np.uint16:
        return 65535.0
    if np.issubdtype(srgb.dtype, np.floating):
        return 1.0
    raise ValueError(f"the sRGB input must be uint8, uint16 or float in [0, 1], got {srgb.dtype}")


def region_masks(srgb: np.ndarray) -> dict[str, np.ndarray]:
    """The pixel regions of one sRGB input (module docstring).

    Args:
        srgb: H x W x 3 input as the ISP wrote it: uint8 (levels 0..255), uint16 (0..65535) or float in [0, 1].
    Returns:
        {"all", "determined", "clipped"} -> H x W bool masks; "clipped": some channel >= ``CLIP_FRACTION`` of full
        scale (>= 250 in 8-bit levels), "determined": its complement.
    Raises:
        ValueError: not an H x W x 3 array of one of those types.
    """
    a = np.asarray(srgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 sRGB image, got shape {a.shape}")
    full = _full_scale(a)
    # 8-bit: v >= 250 exactly; other depths: the same fraction of their full scale (tiny slack for float rounding)
    clipped = (a.astype(np.float64) >= CLIP_FRACTION * full * (1.0 - 1e-9)).any(axis=2)
    return {"all": np.ones(clipped.shape, dtype=bool), "determined": ~clipped, "clipped": clipped}


def psnr_regions(pred: np.ndarray, target: np.ndarray, srgb: np.ndarray, *,
                 peak: float = 1.0) -> dict[str, float | None]:
    """PSNR (dB, :func:`psnr`) over each region of the input ``srgb`` (:func:`region_masks`).

    Args:
        pred, target: H x W x C arrays (e.g. encoded RAW in [0, peak]); the MSE of a region is over its pixels and
            all their channels.
        srgb: the H x W x 3 input whose regions are used (uint8, uint16 or float in [0, 1]).
        peak: the data's full scale (1 for encoded RAW).
    Returns:
        {"all", "determined", "clipped"} -> dB, or None where the region has no pixel in this image.
    Raises:
        ValueError: shapes that do not match.
    """
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape or p.ndim != 3 or p.shape[:2] != np.shape(srgb)[:2]:
        raise ValueError(f"shapes do not match: prediction {p.shape}, target {t.shape}, input {np.shape(srgb)}")
    out: dict[str, float | None] = {}
    for name, mask in region_masks(srgb).items():
        out[name] = psnr(p[mask], t[mask], peak=peak) if mask.any() else None
    return out
