"""Round trip through an independent raw converter: our DNG rendered by LibRaw (rawpy) vs the input photo."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from rawdiff_infer.camera import Camera
from rawdiff_infer.io import write_dng
from rawdiff_infer.metrics import psnr

__all__ = ["render_with_libraw", "roundtrip_psnr"]


def render_with_libraw(dng: str | Path, *, baseline_exposure: float = 0.0) -> np.ndarray:
    """LibRaw render of a DNG: camera matrix, as-shot white balance, no auto-brightness, sRGB primaries and curve,
    8 bit, H x W x 3 uint8. ``adjust_maximum_thr=0`` keeps the file's WhiteLevel (LibRaw otherwise rescales to the
    data's own maximum once it exceeds 75 % of it). LibRaw does not apply the DNG BaselineExposure by itself:
    pass it here (EV, within -2..+3) to apply it as LibRaw's linear ``exp_shift``."""
    import rawpy

    with rawpy.imread(str(dng)) as r:
        return r.postprocess(use_camera_wb=True, no_auto_bright=True, output_color=rawpy.ColorSpace.sRGB,
                             gamma=(2.4, 12.92), output_bps=8, adjust_maximum_thr=0.0,
                             exp_shift=2.0 ** baseline_exposure, exp_preserve_highlights=0.0)


def roundtrip_psnr(linear: np.ndarray, photo: np.ndarray, camera: Camera) -> float:
    """Write ``linear`` (H x W x 3 in [0, 1]) as a DNG, render it with LibRaw, PSNR (dB, 8-bit peak) vs ``photo``."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.dng"
        write_dng(p, linear, camera=camera)
        img = render_with_libraw(p, baseline_exposure=camera.baseline_exposure)
    return psnr(img, photo, peak=255.0)
