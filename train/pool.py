"""PairPool: training pairs held in memory (GPU when they fit) and cut into random patches on the device.

A pool is filled from any pair source (``PhotoPairSource``: synthetic camera over photos, ``V`` ISP draws per photo
-- exposure, tone curve, JPEG quality -- rendered once on the CPU, JPEG included; ``RawPairSource``: the InvISP
protocol over RAW files). Images of any size are stored back to back in two flat buffers (sRGB uint8 and
gamma-encoded RAW uint16, H x W x 3 each), so one gather cuts a whole batch: random image, random position, and a
random one of the 8 flips / 90-degree rotations, identical for both halves of a pair. The training loop therefore
never waits on decoding or on the CPU.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch

from rawdiff_infer.rawspace import RawEncoding

__all__ = ["PairPool"]

log = logging.getLogger(__name__)


class PairPool:
    """Aligned (sRGB, RAW) images in memory; ``batch(n, generator)`` gives model-space patches.

    Args:
        pairs: iterable of objects with ``srgb`` (H x W x 3, float [0, 1] or uint8) and ``raw`` (H x W x 3 linear
            float [0, 1]) numpy arrays, e.g. the items of PhotoPairSource / RawPairSource.
        patch: patch size in pixels (every image must be at least this large).
        device: training device (where batches are returned).
        storage: where the pool lives: "auto" (the training device if the pool needs < 40% of its free memory,
            else the CPU), "cpu" or a device.
        augment: random flips and 90-degree rotations.
        encoding: the RAW encoding (gamma 1/2.2).
        clipped_fraction: the share of every batch, in [0, 1], cut around a pixel with a clipped sRGB channel
            (255): where the ISP lost the RAW, and what a model beyond the closed form is for. The rest is drawn
            uniformly. 0 (the default) draws every patch uniformly, with exactly the draws of earlier versions.
    """

    #: clipped anchor pixels kept per image at most (a regular subsample of them beyond that)
    MAX_ANCHORS = 4096

    def __init__(self, pairs: Iterable, *, patch: int = 64, device: str | torch.device = "cpu",
                 storage: str | torch.device = "auto", augment: bool = True,
                 encoding: RawEncoding | None = None, clipped_fraction: float = 0.0) -> None:
        if not 0.0 <= clipped_fraction <= 1.0:
            raise ValueError(f"clipped_fraction must be in [0, 1], got {clipped_fraction}")
        self.patch, self.augment, self.clipped_fraction = patch, augment, clipped_fraction
        anchors: list[np.ndarray] = []
        self.device = torch.device(device)
        self.encoding = encoding or RawEncoding()
        srgb_parts, raw_parts, sizes = [], [], []
        for pair in pairs:
            s, r = np.asarray(pair.srgb), np.asarray(pair.raw)
            if s.shape != r.shape or s.ndim != 3 or s.shape[2] != 3:
                raise ValueError(f"pair shapes differ or are not H x W x 3: {s.shape} vs {r.shape}")
            if min(s.shape[:2]) < patch:
                log.warning("skipping a %dx%d image: smaller than the %d px patch", s.shape[1], s.shape[0], patch)
                continue
            s8 = s if s.dtype == np.uint8 else np.round(np.clip(s, 0, 1) * 255).astype(np.uint8)
            r16 = np.round(self.encoding.encode(r.astype(np.float32)) * 65535).astype(np.uint16)
            anchors.append(self._anchors(s8, patch, len(sizes)))
            srgb_parts.append(s8.reshape(-1))
            raw_parts.append(r16.reshape(-1))
            sizes.append(s.shape[:2])
        if not sizes:
            raise ValueError("no training image is large enough for the patch size")
        nbytes = sum(p.nbytes for p in srgb_parts) + sum(p.nbytes for p in raw_parts)
        self.storage = self._pick_storage(storage, nbytes)
        self.srgb = torch.from_numpy(np.concatenate(srgb_parts)).to(self.storage)
        self.raw = torch.from_numpy(np.concatenate(raw_parts).view(np.int16)).to(self.storage)  # uint16 bits
        hw = torch.tensor(sizes, dtype=torch.int64)
        self.heights, self.widths = hw[:, 0], hw[:, 1]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(hw[:, 0] * hw[:, 1] * 3, 0)[:-1]])
        self.nbytes = nbytes
        #: [A, 3] int64 (image, y, x) of clipped pixels, at most MAX_ANCHORS per image
        self.anchors = torch.from_numpy(np.concatenate(anchors)) if anchors else torch.zeros((0, 3), dtype=torch.int64)
        if clipped_fraction > 0 and not len(self.anchors):
            log.warning("no training image has a clipped pixel: every patch is drawn uniformly")
        log.info("pair pool: %d images, %.1f MB on %s", len(sizes), nbytes / 1e6, self.storage)

    @classmethod
    def _anchors(cls, s8: np.ndarray, patch: int, index: int) -> np.ndarray:
        """[A, 3] (index, y, x) of the pixels of ``s8`` with a channel at 255, regularly subsampled to at most
        MAX_ANCHORS."""
        ys, xs = np.nonzero((s8 == 255).any(axis=2))
        if len(ys) > cls.MAX_ANCHORS:
            keep = np.linspace(0, len(ys) - 1, cls.MAX_ANCHORS).round().astype(np.int64)
            ys, xs = ys[keep], xs[keep]
        return np.stack([np.full(len(ys), index), ys, xs], axis=1).astype(np.int64)

    def _pick_storage(self, storage: str | torch.device, nbytes: int) -> torch.device:
        if storage != "auto":
            return torch.device(storage)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes < 0.4 * free:
                return self.device
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self.heights)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n random patches: (sRGB, encoded RAW), float32 [n, 3, P, P] in [-1, 1] on ``device``.

        ``generator`` (CPU) draws the image, position and transform of every patch.
        """
        P = self.patch
        k = torch.randint(0, len(self), (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        y0 = (u[:, 0] * (self.heights[k] - P + 1)).long()
        x0 = (u[:, 1] * (self.widths[k] - P + 1)).long()
        tf = torch.randint(0, 8, (n,), generator=generator) if self.augment else torch.zeros(n, dtype=torch.int64)
        m = round(n * self.clipped_fraction) if len(self.anchors) else 0
        if m:  # the last m patches: around a random clipped pixel, at a random place inside the patch
            a = self.anchors[torch.randint(0, len(self.anchors), (m,), generator=generator)]
            off = torch.randint(0, P, (m, 2), generator=generator)
            k[n - m:] = a[:, 0]
            y0[n - m:] = torch.minimum((a[:, 1] - off[:, 0]).clamp_min(0), self.heights[a[:, 0]] - P)
            x0[n - m:] = torch.minimum((a[:, 2] - off[:, 1]).clamp_min(0), self.widths[a[:, 0]] - P)
        ar = torch.arange(P)
        # output pixel (i, j) reads source (a, b) of the crop: transpose, then flips
        i, j = ar.view(1, P, 1), ar.view(1, 1, P)
        transpose, flip_y, flip_x = ((tf >> 2) & 1).view(n, 1, 1), ((tf >> 1) & 1).view(n, 1, 1), (tf & 1).view(n, 1, 1)
        a = torch.where(transpose.bool(), j, i)
        b = torch.where(transpose.bool(), i, j)
        a = torch.where(flip_y.bool(), P - 1 - a, a)
        b = torch.where(flip_x.bool(), P - 1 - b, b)
        pix = (self.offsets[k].view(n, 1, 1) + ((y0.view(n, 1, 1) + a) * self.widths[k].view(n, 1, 1)
                                               + (x0.view(n, 1, 1) + b)) * 3)  # [n, P, P]
        idx = (pix[..., None] + torch.arange(3)).to(self.storage)  # [n, P, P, 3]
        s = self.srgb[idx].to(self.device, non_blocking=True)
        r = self.raw[idx].to(self.device, non_blocking=True)
        s = s.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
        r = (r.int() & 0xFFFF).permute(0, 3, 1, 2).float() * (2.0 / 65535.0) - 1.0
        return s.contiguous(), r.contiguous()
