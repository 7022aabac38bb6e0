"""Validation during training: PSNR on RAW with the fast sampler through the runtime's own tiled denoiser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from rawdiff_infer.backends.torch import TorchBackend
from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.metrics import psnr, psnr_regions
from rawdiff_infer.model import UNet
from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
from rawdiff_infer.tiling import TileConfig

__all__ = ["ValidationSet", "center_crop"]


def center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return img
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top:top + size, left:left + size]


@dataclass
class ValidationSet:
    """Fixed validation pairs: sRGB uint8 H x W x 3 inputs and encoded RAW targets (float32 [0, 1]).

    ``__call__(model, step)`` runs the sampler (``method``/``steps``) over every pair with the model's current
    weights (with ISP consistency where the description has an ISP, as rawdiff-infer runs it) and returns
    {"val_psnr": mean PSNR in dB (image-level mean), "val_psnr_clipped": mean PSNR over the pixels with a clipped
    input channel, over the images that have some (``metrics.psnr_regions``; NaN if none has)}; the per-image PSNRs
    of that call (dB, in the order of ``inputs``) are kept in ``last_scores``, their regions in ``last_regions``.
    """

    inputs: Sequence[np.ndarray]
    targets: Sequence[np.ndarray]
    meta: ModelMeta
    device: str = "cpu"
    method: str = "dpm"
    steps: int = 10
    stride: int = 48
    batch_size: int = 256
    seed: int = 0
    last_scores: list[float] = field(default_factory=list, init=False, repr=False)
    last_regions: list[dict] = field(default_factory=list, init=False, repr=False)

    def __call__(self, model: UNet, step: int) -> dict[str, float]:
        copy = UNet(model.config)
        copy.load_state_dict(model.state_dict())
        dtype = "bf16" if torch.device(self.device).type == "cuda" else "fp32"
        backend = TorchBackend(copy, self.meta, device=self.device, dtype=dtype)
        rec = RawReconstructor(backend, sampler=SamplerConfig(method=self.method, steps=self.steps),
                               tiles=TileConfig(patch_size=model.config.patch_size, stride=self.stride,
                                                batch_size=self.batch_size))
        outs = [rec.reconstruct(x, seed=self.seed).encoded for x in self.inputs]
        backend.close()
        self.last_scores = [float(psnr(o, y)) for o, y in zip(outs, self.targets)]
        self.last_regions = [psnr_regions(o, y, x) for o, y, x in zip(outs, self.targets, self.inputs)]
        clipped = [r["clipped"] for r in self.last_regions if r["clipped"] is not None]
        return {"val_psnr": float(np.mean(self.last_scores)),
                "val_psnr_clipped": float(np.mean(clipped)) if clipped else float("nan")}
