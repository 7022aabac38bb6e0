"""Scene augmentation: random colour and exposure changes of the *scene*, applied before the synthetic ISP.

The synthetic camera (``camera_isp``) turns a photo into a scene (linear sRGB, then camera RGB), clips it to the
sensor range as the RAW target and re-renders the sRGB input from that RAW with the camera's fixed ISP. This
module widens the scenes the model sees without touching the ISP: each image gets one 3 x 3 linear map ``T`` in
linear sRGB, applied to the photo's linear sRGB *before* it becomes camera RGB, so the RAW target is
``clip(k * C @ T @ lin(photo))`` and the input is still exactly ``ISP(target)`` (``C`` = cam_from_srgb, ``k`` the
camera's RAW level times the over-exposure gain). A random ISP would make the task ill-posed (see the
``camera_isp`` module docstring); a random scene does not: the RAW stays recoverable from the sRGB.

``T`` is the product, right to left (the first factor acts first):

1. random colour matrix ``I + E``, E with N(0, sigma^2) entries and rows re-centred to sum to 0, so greys
   stay grey (a small change of the scene's colours, not a colour cast);
2. saturation ``S = s I + (1 - s) 1 y^T`` about the BT.709 luminance y (luminance and greys kept);
3. hue rotation by ``theta`` about the grey axis (1, 1, 1) (Rodrigues' formula; greys kept);
4. illuminant: per-channel gains on *camera RGB*, ``C^-1 diag(g) C``, with
   ``log2 g = (i/2 - t/3, 2t/3, -i/2 - t/3)``: ``i`` stops along the blue-amber axis (R/B ratio times 2^i,
   positive = warmer; the Planckian direction, to first order), ``t`` stops of green (positive) or magenta
   (negative) tint; the gains' geometric mean is 1, so brightness stays about the same;
5. exposure ``2^ev``.

An image is augmented with probability ``probability``; the others get ``T = I`` (the photo's own colours stay
in the mix). Every draw comes from the caller's CPU ``torch.Generator``: a fixed count of numbers per image
(6 uniforms and 9 normals), whatever the ranges, so a seed gives the same scenes on every device, and switching
the augmentation off (``None``: no draw at all) reproduces the unaugmented pairs bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["SceneAugmentation", "SceneDraw", "LUMA_709", "hue_rotation", "saturation_matrix",
           "illuminant_gains"]

#: BT.709 / sRGB luminance weights of linear sRGB (they sum to 1)
LUMA_709 = (0.2126, 0.7152, 0.0722)


def _range(name: str, value: tuple[float, float], lo: float = -math.inf, hi: float = math.inf) -> None:
    a, b = value
    if not (math.isfinite(a) and math.isfinite(b)) or not lo <= a <= b <= hi:
        raise ValueError(f"{name} needs finite {lo} <= lo <= hi <= {hi}, got {value}")


@dataclass(frozen=True)
class SceneAugmentation:
    """Ranges of the scene augmentation (one draw per image; see the module docstring for the maths).

    Attributes:
        probability: chance in [0, 1] that an image is augmented at all (otherwise T = I).
        exposure_ev: (lo, hi) stops, uniform: scene brightness 2^ev, in [-4, 2]. Brighter scenes clip more in
            RAW and sRGB; the ISP's own over-exposure draw (``IspRandomization``) still pushes highlights.
        illuminant_ev: (lo, hi) stops, uniform, in [-3, 3]: blue-amber shift (R/B ratio times 2^i; > 0 warmer).
        tint_ev: (lo, hi) stops, uniform, in [-1, 1]: green (> 0) / magenta (< 0) shift.
        hue_degrees: (lo, hi) degrees, uniform, in [-180, 180]: rotation of hues about the grey axis.
        saturation: (lo, hi) factor, log-uniform, in (0, 4]: 0 would be greyscale, 1 unchanged.
        matrix_sigma: standard deviation in [0, 0.5) of the random colour matrix's entries (0 = identity).
    """

    probability: float = 0.8
    exposure_ev: tuple[float, float] = (-1.0, 0.0)
    illuminant_ev: tuple[float, float] = (-0.75, 0.75)
    tint_ev: tuple[float, float] = (-0.2, 0.2)
    hue_degrees: tuple[float, float] = (-10.0, 10.0)
    saturation: tuple[float, float] = (0.7, 1.3)
    matrix_sigma: float = 0.03

    def __post_init__(self) -> None:
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        _range("exposure_ev", self.exposure_ev, -4.0, 2.0)
        _range("illuminant_ev", self.illuminant_ev, -3.0, 3.0)
        _range("tint_ev", self.tint_ev, -1.0, 1.0)
        _range("hue_degrees", self.hue_degrees, -180.0, 180.0)
        _range("saturation", self.saturation, 0.0, 4.0)
        if self.saturation[0] <= 0.0:
            raise ValueError(f"saturation needs lo > 0 (it is drawn log-uniformly), got {self.saturation}")
        if not (math.isfinite(self.matrix_sigma) and 0.0 <= self.matrix_sigma < 0.5):
            raise ValueError(f"matrix_sigma must be in [0, 0.5), got {self.matrix_sigma}")

    def to_dict(self) -> dict[str, Any]:
        """The ranges as plain JSON-able values (for a checkpoint's provenance)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def draw(self, batch: int, generator: torch.Generator | None, *, cam_from_srgb: torch.Tensor) -> "SceneDraw":
        """Draw the scene changes of ``batch`` images.

        Args:
            batch: number of images (>= 1).
            generator: a CPU ``torch.Generator`` (None: torch's default CPU generator). Exactly ``batch`` x 6
                uniforms, then ``batch`` x 9 normals are drawn from it, in that order.
            cam_from_srgb: the camera's [3, 3] linear-sRGB -> camera-RGB matrix (rows sum to 1), any dtype.

        Returns:
            a :class:`SceneDraw` whose ``matrix`` [batch, 3, 3] (float64, CPU) maps the photo's linear sRGB to
            the augmented scene's linear sRGB.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("scene parameters are drawn from a CPU generator (the same scenes on every device)")
        u = torch.rand(batch, 6, generator=generator, dtype=torch.float64)
        e = torch.randn(batch, 3, 3, generator=generator, dtype=torch.float64)

        def lerp(col: int, r: tuple[float, float]) -> torch.Tensor:
            return r[0] + (r[1] - r[0]) * u[:, col]

        applied = u[:, 0] < self.probability
        ev = lerp(1, self.exposure_ev)
        illum = lerp(2, self.illuminant_ev)
        tint = lerp(3, self.tint_ev)
        hue = lerp(4, self.hue_degrees)
        sat = torch.exp(lerp(5, (math.log(self.saturation[0]), math.log(self.saturation[1]))))
        e = self.matrix_sigma * (e - e.mean(dim=2, keepdim=True))  # rows sum to 0: greys stay grey
        zero = torch.zeros(batch, dtype=torch.float64)
        ev, illum, tint, hue = (torch.where(applied, v, zero) for v in (ev, illum, tint, hue))
        sat = torch.where(applied, sat, torch.ones_like(sat))
        e = torch.where(applied.view(batch, 1, 1), e, torch.zeros_like(e))
        c = cam_from_srgb.to(torch.float64).cpu().view(3, 3)
        wb = torch.linalg.inv(c) @ torch.diag_embed(illuminant_gains(illum, tint)) @ c
        t = (2.0 ** ev).view(batch, 1, 1) * wb @ hue_rotation(hue) @ saturation_matrix(sat) \
            @ (torch.eye(3, dtype=torch.float64) + e)
        t = torch.where(applied.view(batch, 1, 1), t, torch.eye(3, dtype=torch.float64).expand(batch, 3, 3))
        return SceneDraw(matrix=t, applied=applied, exposure_ev=ev, illuminant_ev=illum, tint_ev=tint,
                         hue_degrees=hue, saturation=sat)


@dataclass(frozen=True, eq=False)
class SceneDraw:
    """One draw of :class:`SceneAugmentation` for B images (CPU tensors).

    Attributes:
        matrix: [B, 3, 3] float64, linear sRGB of the photo -> linear sRGB of the scene (identity where not
            applied).
        applied: [B] bool.
        exposure_ev, illuminant_ev, tint_ev, hue_degrees, saturation: [B] float64, the drawn values (0, or 1 for
            saturation, where not applied).
    """

    matrix: torch.Tensor
    applied: torch.Tensor
    exposure_ev: torch.Tensor
    illuminant_ev: torch.Tensor
    tint_ev: torch.Tensor
    hue_degrees: torch.Tensor
    saturation: torch.Tensor

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def record(self, index: int) -> dict[str, Any]:
        """Image ``index``'s parameters as plain floats (for a pair's ``meta``)."""
        return {"applied": bool(self.applied[index]), "exposure_ev": float(self.exposure_ev[index]),
                "illuminant_ev": float(self.illuminant_ev[index]), "tint_ev": float(self.tint_ev[index]),
                "hue_degrees": float(self.hue_degrees[index]), "saturation": float(self.saturation[index]),
                "matrix": [round(float(v), 6) for v in self.matrix[index].flatten()]}

    def select(self, index: int) -> "SceneDraw":
        """The draw of image ``index`` alone (batch of 1)."""
        sl = slice(index, index + 1)
        return SceneDraw(self.matrix[sl], self.applied[sl], self.exposure_ev[sl], self.illuminant_ev[sl],
                         self.tint_ev[sl], self.hue_degrees[sl], self.saturation[sl])


# --------------------------------------------------------------------------------------------------------------
# The factors (batched, float64)
# --------------------------------------------------------------------------------------------------------------

def illuminant_gains(illuminant_ev: torch.Tensor, tint_ev: torch.Tensor) -> torch.Tensor:
    """Camera-RGB gains [B, 3] for a blue-amber shift of ``illuminant_ev`` stops (R/B ratio times 2^i) and a
    green-magenta shift of ``tint_ev`` stops (G relative to R and B times 2^t); geometric mean 1."""
    i, t = illuminant_ev.to(torch.float64), tint_ev.to(torch.float64)
    return torch.stack([2.0 ** (i / 2 - t / 3), 2.0 ** (2 * t / 3), 2.0 ** (-i / 2 - t / 3)], dim=-1)


def hue_rotation(degrees: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] rotations by ``degrees`` [B] about the grey axis (1, 1, 1) / sqrt(3) (Rodrigues' formula)."""
    th = torch.deg2rad(degrees.to(torch.float64)).view(-1, 1, 1)
    n = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=torch.float64)
    k = torch.tensor([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    return torch.cos(th) * eye + torch.sin(th) * k + (1.0 - torch.cos(th)) * torch.outer(n, n)


def saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] ``s I + (1 - s) 1 y^T`` for factors ``s`` [B] (y = BT.709 luminance): keeps luminance and greys."""
    s = factor.to(torch.float64).view(-1, 1, 1)
    y = torch.tensor(LUMA_709, dtype=torch.float64)
    grey = torch.ones(3, 1, dtype=torch.float64) @ y.view(1, 3)
    return s * torch.eye(3, dtype=torch.float64) + (1.0 - s) * grey
