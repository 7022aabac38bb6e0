"""Bayer colour filter arrays: sample an RGB image into a mosaic and demosaic it back (bilinear)."""

from __future__ import annotations

import numpy as np

from .camera import CFA_PATTERNS

__all__ = ["CFAPattern", "pattern_indices", "mosaic", "demosaic_bilinear"]

CFAPattern = str | tuple[int, int, int, int]


def pattern_indices(pattern: CFAPattern) -> np.ndarray:
    """'RGGB' / (0, 1, 1, 2) -> 2 x 2 int array of colour indices (0 = R, 1 = G, 2 = B)."""
    if isinstance(pattern, str):
        try:
            cells = CFA_PATTERNS[pattern.upper()]
        except KeyError:
            raise ValueError(f"unknown CFA pattern {pattern!r}; choose from {sorted(CFA_PATTERNS)}") from None
    else:
        cells = tuple(int(c) for c in pattern)
        if len(cells) != 4 or sorted(set(cells)) != [0, 1, 2]:
            raise ValueError(f"CFA pattern must be 4 colour indices covering 0, 1, 2; got {pattern!r}")
    return np.array(cells, dtype=np.intp).reshape(2, 2)


def mosaic(image: np.ndarray, pattern: CFAPattern) -> np.ndarray:
    """Bayer-sample an H x W x 3 image: H x W array, same dtype, pixel (y, x) = image[y, x, cfa[y % 2, x % 2]].

    Args:
        image: H x W x 3, any dtype (channels R, G, B of the camera).
        pattern: a name from ``camera.CFA_PATTERNS`` ("RGGB", "BGGR", "GRBG", "GBRG") describing the top-left
            2 x 2 cell, or its 4 colour indices row-major (0 = R, 1 = G, 2 = B).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    cfa = pattern_indices(pattern)
    out = np.empty(image.shape[:2], dtype=image.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            out[dy::2, dx::2] = image[dy::2, dx::2, cfa[dy, dx]]
    return out


def demosaic_bilinear(mosaic_: np.ndarray, pattern: CFAPattern | np.ndarray) -> np.ndarray:
    """Bilinear demosaic: H x W Bayer mosaic -> H x W x 3 float32, in the mosaic's units.

    ``pattern``: the 2 x 2 cell (a name or 4 colour indices, as for ``mosaic``), or a full H x W array of colour
    indices (0 = R, 1 = G, 2 = B), e.g. LibRaw's ``raw_colors_visible`` with its second green mapped to 1.

    Each missing sample is the mean of its nearest same-colour neighbours (the 3 x 3 kernel
    [[1, 2, 1], [2, 4, 2], [1, 2, 1]] applied as a normalised convolution, so borders use only the
    neighbours that exist); measured samples are kept exactly. Needs H, W >= 2.
    """
    m = np.asarray(mosaic_)
    if m.ndim != 2 or m.shape[0] < 2 or m.shape[1] < 2:
        raise ValueError(f"expected an H x W mosaic with H, W >= 2, got shape {m.shape}")
    h, w = m.shape
    if isinstance(pattern, np.ndarray) and pattern.ndim == 2:
        if pattern.shape != m.shape or not np.isin(pattern, (0, 1, 2)).all():
            raise ValueError("a colour-index array must match the mosaic's shape and hold only 0, 1, 2")
        colour = pattern
    else:
        cfa = pattern_indices(pattern)
        colour = cfa[np.arange(h)[:, None] % 2, np.arange(w)[None, :] % 2]  # H x W colour index per site
    values = m.astype(np.float32)
    kernel = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))
    out = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        mask = (colour == c).astype(np.float32)
        num = _conv3x3(values * mask, kernel)
        den = _conv3x3(mask, kernel)
        if (den <= 0).any():
            raise ValueError("a colour has no sample within 1 pixel somewhere: not a Bayer-like layout")
        plane = num / den
        out[..., c] = np.where(mask > 0, values, plane)
    return out


def _conv3x3(a: np.ndarray, kernel: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """'Same' 3 x 3 correlation with zero padding (float32)."""
    p = np.pad(a, 1)
    h, w = a.shape
    out = np.zeros((h, w), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += np.float32(kernel[dy][dx]) * p[dy:dy + h, dx:dx + w]
    return out
