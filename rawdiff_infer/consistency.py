"""ISP consistency: the RAWs that a model's ISP renders to the input photo, and the projection onto them.

Where the input is not clipped, the ISP (``isp.IspModel``) fixes the RAW to within the input's quantisation band;
where a channel is clipped, it only says the RAW is at or above the clip level. For each pixel the set is

    C = { raw in [0, 1]^3 :  lo <= A raw <= hi }        A = gain / clip * M (3 x 3), per channel of l = A raw

with ``lo = f^-1(max(v - w, 0) / L)`` and ``hi = f^-1(min(v + w, L) / L)`` for the input level v (0..L), the band
half-width w (input levels) and the ISP curve f; ``hi = +inf`` where the input is at white (v = L: clipped) and
``lo = -inf`` where it is at black. C is convex (a box intersected with a parallelepiped).

The projection ``P`` used after every model evaluation, per pixel:

1. clamp l = A raw into [lo, hi] and move raw by A^-1 of the change (exact in l; raw may leave the cube);
2. if it left [0, 1]^3, walk back along the segment towards ``q``, a point of C found once per image (alternating
   projections from the closed-form inverse), to the last point inside the cube. Both sets are convex and q lies
   in both, so the result is in C.

P is the identity on C (pixels already consistent keep their value bit for bit), so it is idempotent (up to the
fp32 rounding of the encoding, about 1e-7). It is pointwise: it commutes with the tiler's fusion and runs on any
device, in fp32, with no host synchronisation (it can live inside a CUDA graph).

``formulation.FormulatedEps`` applies the projection to every x0 prediction the way k-diffusion wraps models: x0
from the model's output, projected, eps recomputed; the samplers never know. Pixels of patches the tiler skipped
(every pixel determined) take q as their x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .isp import IspModel

__all__ = ["Band", "ConsistencyConfig", "ConsistencySet", "LOSSLESS_BAND", "batch_closed_form", "MODES", "Projector", "QUANTISATION_BAND",
           "jpeg_band", "pack_projector"]

#: half the quantisation step, in input levels: every RAW within it renders to a lossless input's own level
QUANTISATION_BAND = 0.5
#: the band used for a lossless input by default, in its levels: 0, the band's centre (the closed form) for every
#: determined channel. Measured on held-out crops (benchmarks/RESULTS.md, "ISP consistency"): letting the bundled
#: model move inside the half-level step cost 5.6 dB on lossless determined pixels (60.2 against 65.8 dB); it has
#: no information there that the closed form lacks. ``--band 0.5`` gives the whole step.
LOSSLESS_BAND = 0.0
#: the bounds sit this far (input levels) inside the band, so a RAW on them renders to the input's own level
EDGE_MARGIN = 0.01
#: alternating projections used to find a consistent point where the closed form is not one
FEASIBLE_ITERATIONS = 60
#: a pixel whose l lies farther than this outside its band after those iterations counts as inconsistent
FEASIBLE_TOLERANCE = 1e-4
#: the closed form counts as consistent where its l lies at most this far outside the band: fp32 rounding of
#: A (A^-1 y) is about 1e-7, and a lossless input's band has zero width (lo = hi), so an exact test would send
#: nearly every pixel through the alternating projections (95 % of a photo's, measured: 2 s for 0.05 MP on 2 cores)
ROUNDING_SLACK = 1e-6


#: (JPEG quality, band half-width in 8-bit levels), interpolated linearly in between, held flat outside. Measured
#: on 8 held-out photos (benchmarks/band_study.py; benchmarks/results/2026-12-07-band-study.md, and RESULTS.md):
#: wider bands only lose with the bundled model, which removes no JPEG error: at 75 / 90 / 98, band 1 lost 0.06 /
#: 0.33 / 0.85 dB on determined pixels against band 0.5, and band 2 lost 1.3 dB; band 0 (the closed form on every
#: determined channel) beat 0.5 by 0.04 dB overall and 0.1 dB on determined pixels over the camera's own JPEG draws
#: (qualities 75-96). At 50, band 1 measured best, by 0.03 dB over 0.5 and 0.09 over 0 (noise level).
JPEG_BANDS: tuple[tuple[int, float], ...] = ((50, 1.0), (75, 0.0), (100, 0.0))


def jpeg_band(quality: int) -> float:
    """Band half-width (8-bit levels) for a JPEG of estimated quality 1..100 (``JPEG_BANDS``)."""
    q = [a for a, _ in JPEG_BANDS]
    w = [b for _, b in JPEG_BANDS]
    return float(np.interp(float(quality), q, w))


@dataclass(frozen=True)
class Band:
    """The quantisation band of one input image.

    Attributes:
        width: half-width in the input's levels, >= 0 (0.5: the whole quantisation step; the default is
            ``LOSSLESS_BAND`` for lossless input, ``jpeg_band`` of a JPEG's quality).
        levels: the input's white level, 1..65535 (255 for 8-bit, 65535 for 16-bit and float inputs).
    """

    width: float = LOSSLESS_BAND
    levels: int = 255

    def __post_init__(self) -> None:
        if not (math.isfinite(self.width) and 0.0 <= self.width <= 64.0 * self.levels / 255.0):
            raise ValueError(f"band width must be in [0, {64.0 * self.levels / 255.0:g}] levels, got {self.width}")
        if not 1 <= self.levels <= 65535:
            raise ValueError(f"levels must be in 1..65535, got {self.levels}")

    @classmethod
    def for_input(cls, levels: int, *, jpeg_quality: int | None = None, width_8bit: float | None = None) -> "Band":
        """The band of an input with white level ``levels`` (255: 8-bit, 65535: 16-bit or float).

        ``width_8bit`` (the user's override, in 8-bit levels) wins; else a JPEG's estimated quality (1..100) gives
        ``jpeg_band(quality)``; else ``LOSSLESS_BAND``."""
        scale = levels / 255.0
        if width_8bit is not None:
            return cls(width=float(width_8bit) * scale, levels=levels)
        if jpeg_quality is not None:
            return cls(width=jpeg_band(jpeg_quality) * scale, levels=levels)
        return cls(width=LOSSLESS_BAND, levels=levels)


#: --consistency modes: auto (on when the model describes its ISP), on (the model must have one), off
MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class ConsistencyConfig:
    """How a reconstruction uses the model's ISP (``isp.IspModel``).

    Attributes:
        mode: "auto" (project when the model has an ISP; the default), "on" (the model must have one) or "off"
            (never project: the model's own output, as before 0.3).
        band: the half-width of every input's band in 8-bit levels (scaled to a 16-bit input's levels), >= 0;
            None (the default): from each input (``LOSSLESS_BAND`` when lossless, from the quantisation tables
            for JPEG, ``Band.for_input``).
        skip: skip the model on patches without a clipped pixel: their answer is the closed form (exactly so
            with the default bands of width 0). Overlap grid with step fusion only.
    """

    mode: str = "auto"
    band: float | None = None
    skip: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"consistency mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.band is not None and not (math.isfinite(self.band) and 0.0 <= self.band <= 64.0):
            raise ValueError(f"--band must be in [0, 64] 8-bit levels, got {self.band}")


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[3, 3] matrix times every pixel of [3, H, W] (three fused multiply-adds per row, no einsum workspace)."""
    return torch.stack([m[i, 0] * x[0] + m[i, 1] * x[1] + m[i, 2] * x[2] for i in range(3)])


class ConsistencySet:
    """The consistent set of one image (module docstring) with its bounds, a consistent point and the projection.

    Args:
        isp: the model's ISP.
        srgb: the input as float [3, H, W] in [0, 1] on the device the projection runs on.
        band: the input's band.
    Attributes:
        lo, hi: [3, H, W] fp32 bounds on l = A raw (-inf / +inf where open).
        clipped: [H, W] bool, a channel at white (the ISP lost the RAW's value there).
        q: [3, H, W] fp32 linear RAW inside the set (the closed form where that is consistent).
        inconsistent: pixels where no consistent RAW was found (an input this ISP cannot have rendered).
    """

    def __init__(self, isp: IspModel, srgb: torch.Tensor, band: Band) -> None:
        if srgb.dim() != 3 or srgb.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image, got {tuple(srgb.shape)}")
        self.isp, self.band = isp, band
        x = srgb.float()
        self.A, self.A_inv = isp.forward_matrix(x), isp.inverse_matrix(x)
        L, w = float(band.levels), max(float(band.width) - EDGE_MARGIN, 0.0)
        v = torch.round(x.clamp(0.0, 1.0) * L)
        y_lo, y_hi = (v - w) / L, (v + w) / L
        inf = torch.tensor(math.inf, device=x.device)
        # open ends only at the ends of the scale themselves: a channel below white was not clipped, whatever the
        # band's width (a wide JPEG band reaching white must not free a near-white channel upwards)
        self.lo = torch.where(v <= 0.0, -inf, isp.curve.inverse(y_lo.clamp_min(0.0)))
        self.hi = torch.where(v >= L, inf, isp.curve.inverse(y_hi.clamp_max(1.0)))
        self.clipped = torch.isinf(self.hi).any(dim=0)
        self.q, self.inconsistent = self._consistent_point(isp.closed_form(v / L))

    def load_(self, other: "ConsistencySet") -> None:
        """Take ``other``'s bounds and consistent point in place (same image size): a recorded CUDA graph keeps
        reading these tensors, so a new image of the same size reuses the graph."""
        for name in ("A", "A_inv", "lo", "hi", "q", "clipped"):
            getattr(self, name).copy_(getattr(other, name))
        self.isp, self.band, self.inconsistent = other.isp, other.band, other.inconsistent

    def _clamp_l(self, raw: torch.Tensor) -> torch.Tensor:
        """Step 1 of the projection: raw moved so that A raw lies in [lo, hi]."""
        l = _mix(self.A, raw)
        return raw + _mix(self.A_inv, torch.clamp(l, self.lo, self.hi) - l)

    def violation(self, raw: torch.Tensor) -> torch.Tensor:
        """[H, W]: how far A raw lies outside [lo, hi] (max over channels, in l units; 0 inside)."""
        l = _mix(self.A, raw)
        return torch.maximum(self.lo - l, l - self.hi).clamp_min(0.0).amax(dim=0)

    def _consistent_point(self, cf: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The closed form where it is consistent; elsewhere alternating projections onto the cube and the band
        (on those pixels only). Returns (q, pixels still outside the set)."""
        q = cf.float().contiguous()
        bad = (self.violation(q) > ROUNDING_SLACK).reshape(-1).nonzero()[:, 0]  # one host sync, once per image
        if bad.numel():
            flat = q.reshape(3, -1)
            sub = _Subset(self, bad)
            r = flat[:, bad][:, :, None]  # [3, n, 1]: a 1-pixel-wide image of the bad pixels
            for _ in range(FEASIBLE_ITERATIONS):
                r = sub.clamp_l(r).clamp_(0.0, 1.0)
            flat[:, bad] = r[:, :, 0]
            left = int((sub.violation(r) > FEASIBLE_TOLERANCE).sum())
        else:
            left = 0
        return q, left

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """Linear RAW [3, H, W] -> the projected RAW (module docstring); the identity on the set."""
        l = _mix(self.A, raw)  # once: both the clamp and the "already consistent" test need it
        lc = torch.clamp(l, self.lo, self.hi)
        rc = raw + _mix(self.A_inv, lc - l)
        d = rc - self.q
        # the largest s in [0, 1] with q + s d inside [0, 1]^3, per pixel
        room = torch.where(d > 0, (1.0 - self.q) / d, torch.where(d < 0, -self.q / d, torch.ones_like(d)))
        s = room.amin(dim=0, keepdim=True).clamp(0.0, 1.0)
        out = torch.where(s < 1.0, self.q + s * d, rc).clamp_(0.0, 1.0)
        changed = (lc != l).any(dim=0) | (raw < 0).any(dim=0) | (raw > 1).any(dim=0)
        return torch.where(changed, out, raw)

    def project_model(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        """The projection in model space: x [3, H, W] in [-1, 1] (gamma-encoded RAW, 2 enc - 1) -> x'."""
        raw = ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0) ** gamma
        proj = self.project(raw)
        moved = (proj != raw).any(dim=0)
        return torch.where(moved, proj ** (1.0 / gamma) * 2.0 - 1.0, x.float())

    def q_model(self, gamma: float) -> torch.Tensor:
        """q in model space [3, H, W]."""
        return self.q ** (1.0 / gamma) * 2.0 - 1.0

    def needs_model(self) -> torch.Tensor:
        """[H, W] bool: pixels the model must see: a clipped channel, or no consistent RAW. (Inside a wide JPEG
        band the model may still remove artefacts; whether that is worth a model evaluation is the caller's
        choice, ``ConsistencyConfig.skip``.)"""
        return self.clipped | (self.violation(self.q) > FEASIBLE_TOLERANCE)


def batch_closed_form(isp: IspModel, cond: torch.Tensor, gamma: float, band: "Band | None" = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The consistent point q and the clipped mask of a batch of patches, as the runtime finds them per image.

    Args:
        isp: the model's ISP.
        cond: sRGB patches [B, 3, H, W] in model space [-1, 1] (the U-Net's condition).
        gamma: the model's RAW encoding gamma.
        band: the inputs' band (default: lossless 8-bit, ``Band()``).
    Returns (q in model space [B, 3, H, W] fp32, clipped [B, 1, H, W] bool). The set is pointwise, so the batch is
    laid out as one [3, B*H, W] image: the same q, bit for bit, as ``ConsistencySet`` of each whole image (what a
    residual model is trained against is what it is sampled against).
    """
    B, C, H, W = cond.shape
    srgb = ((cond.float() + 1.0) * 0.5).permute(1, 0, 2, 3).reshape(C, B * H, W)
    cs = ConsistencySet(isp, srgb, band if band is not None else Band())
    q = cs.q_model(gamma).reshape(C, B, H, W).permute(1, 0, 2, 3).contiguous()
    return q, cs.clipped.reshape(B, 1, H, W)


class _Subset:
    """The bounds of a subset of pixels of a ConsistencySet, shaped [3, n, 1] (for the feasibility iterations)."""

    def __init__(self, cs: ConsistencySet, idx: torch.Tensor) -> None:
        self.A, self.A_inv = cs.A, cs.A_inv
        self.lo = cs.lo.reshape(3, -1)[:, idx][:, :, None]
        self.hi = cs.hi.reshape(3, -1)[:, idx][:, :, None]

    clamp_l = ConsistencySet._clamp_l
    violation = ConsistencySet.violation


Projector = Callable[[torch.Tensor], torch.Tensor]


def pack_projector(sets: Sequence[ConsistencySet], gamma: float, unpack: Callable[[torch.Tensor], list],
                   pack: Callable[[list], torch.Tensor]) -> Projector:
    """A projector over several canvases laid out by ``unpack`` / ``pack`` (a CanvasPack, or unbind / stack)."""

    def project(x0: torch.Tensor) -> torch.Tensor:
        return pack([cs.project_model(c, gamma) for cs, c in zip(sets, unpack(x0))])

    return project
