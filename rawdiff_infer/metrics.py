"""Quality metrics."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr"]


def psnr(pred: np.ndarray, target: np.ndarray, *, peak: float = 1.0) -> float:
    """PSNR in dB (InvISP's definition on RAW: data in [0, peak], the prediction clamped to [0, peak]).

    Args:
        pred, target: arrays of one shape, e.g. H x W x 3 encoded RAW in [0, 1] (``peak=1``) or 8-bit images
            (``peak=255``).
    """
    p = np.clip(np.asarray(pred, dtype=np.float64), 0.0, peak)
    mse = float(np.mean((p - np.asarray(target, dtype=np.float64)) ** 2))
    return 10.0 * math.log10(peak * peak / max(mse, 1e-12 * peak * peak))
