"""A synthetic camera: a small invertible ISP in torch that turns photos into (sRGB, RAW) training pairs.

RAW here is the project's RAW convention (DESIGN.md, ``rawdiff_infer.rawspace``): *linear* demosaiced camera
RGB, black-subtracted, white-balanced, in [0, 1]. White balance is therefore already applied in the RAW, so the
ISP starts with the colour matrix. The gamma 1/2.2 encoding that the model learns is applied later by
``rawspace.RawEncoding``; everything in this module is linear RAW.

Forward ISP, :meth:`SyntheticCamera.render`, per pixel on a batch ``[B, 3, H, W]``:

1. digital gain           ``x * exposure``                          (per image, > 0)
2. colour matrix          ``l = M_srgb_cam @ x``                    (camera RGB -> linear sRGB)
3. highlight clipping     ``l = clip(l, 0, 1)``
4. sRGB OETF              ``g = oetf(l)``                           (IEC 61966-2-1 piecewise curve)
5. global tone curve      ``y = (1 - k) g + k (3 g^2 - 2 g^3)``     (Brooks et al., "Unprocessing images")
6. 8-bit quantisation     ``y = round(255 y) / 255``
7. JPEG (optional)        :func:`jpeg_roundtrip`, Pillow, CPU only: JPEG cannot run on the GPU, so the batched
                          GPU path skips it unless asked (then it goes through the CPU and back).

The tone curve acts on the gamma-encoded value (after the OETF), as in Brooks et al. (their forward pipeline
is ... -> gamma compression -> smoothstep). Applied to linear light the smoothstep would crush the shadows
(``3 x^2`` near 0: linear 0.01 becomes 0.0003); on encoded values it is the usual mild S-curve that raises
mid-tone contrast. Strength ``k`` in [0, 1] blends identity (0) and the full smoothstep (1); the curve is
monotonic there and is inverted in closed form (the middle root of a cubic, :func:`inverse_tone_curve`).

The inverse, :meth:`SyntheticCamera.unprocess`, undoes steps 6-1 analytically (inverse tone curve, inverse OETF,
inverse colour matrix, division by the gain) and clips to [0, 1]. Pixels whose camera RGB falls outside [0, 1]
(saturated sRGB colours outside the camera's gamut give small negatives; whites scaled above the sensor range
give > 1) are clipped: the clipped RAW is then the target, and the sRGB input is *re-rendered from it*, so a
training pair is always exactly consistent (``input = ISP(target)`` up to quantisation and JPEG), even where
the original photo is not reproduced.

Making a pair from a photo (:meth:`SyntheticCamera.make_pair`): the camera has ONE fixed ISP -- digital gain
``exposure = 1 / raw_white`` (``raw_white`` in (0, 1]: where sRGB white lands in the sensor range; real RAW files
keep headroom) and tone strength ``k`` -- as a real camera model has (the paper trains one model per camera). The
scene varies: the photo is taken as a scene whose RAW is ``scene_gain * raw_white * M_cam_srgb @
oetf^-1(tone^-1(photo))``, clipped to the sensor range, and the sRGB input is rendered from that RAW with the
camera's fixed gain. ``scene_gain >= 1`` (``overexposure``) is chosen per image so that a random fraction (default
up to 5 %) of its pixels exceed 1 in linear sRGB before clipping: those highlights are clipped in the sRGB input
while the RAW target keeps their detail (up to the sensor's own saturation), the situation the paper singles out
as hardest.

Why the ISP must be fixed: if the gain or the tone curve were drawn per image, the RAW brightness and tone would
not be observable from the sRGB input, and the best a model can do is predict their average. Measured: a
paper-size model trained 3,610 steps with ``raw_white`` log-uniform in [0.25, 1] and tone strength uniform in
[0, 1] reached 12 dB on held-out photos, no better than the identity baseline. ``IspRandomization`` therefore
keeps those two ranges degenerate by default; widen them only to study that ambiguity.

Scene augmentation (``scene_aug.SceneAugmentation``, optional): before the photo's linear sRGB becomes camera
RGB, each image's scene can be changed by a random 3 x 3 linear map (exposure, illuminant, hue, saturation, a
small colour matrix). It acts on the scene, not on the ISP, so the pair stays consistent and well posed: the RAW
target is ``clip(scene_gain * raw_white * C @ T @ lin(photo))`` and the input is rendered from it as above. Off
(``None``, the default) draws nothing and gives exactly the unaugmented pairs.

All tensor functions run on whatever device their input lives on (CPU or CUDA), in float32, batched. Random
parameters are always drawn from a *CPU* ``torch.Generator`` (a handful of numbers per image), so a seed gives
the same parameters on every device.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from rawdiff_infer.camera import DEFAULT_CAMERA, SRGB_TO_XYZ, Camera
from rawdiff_infer.isp import IspCurve, IspModel, inverse_tone_curve, linear_to_srgb, srgb_to_linear, tone_curve

from .scene_aug import SceneAugmentation, SceneDraw

__all__ = [
    "SRGB_TO_XYZ",
    "IspRandomization",
    "IspParams",
    "SyntheticCamera",
    "linear_to_srgb",
    "srgb_to_linear",
    "tone_curve",
    "inverse_tone_curve",
    "quantize_8bit",
    "jpeg_roundtrip",
    "described_camera",
]



# --------------------------------------------------------------------------------------------------------------
# Pointwise curves: the OETF and tone curve live in rawdiff_infer.isp (the runtime's ISP); quantisation here
# --------------------------------------------------------------------------------------------------------------

def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] values to the 256 levels of 8-bit (result still float, multiples of 1/255)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def jpeg_roundtrip(srgb_uint8: np.ndarray, quality: int, *, subsampling: int = 2) -> np.ndarray:
    """Encode an H x W x 3 uint8 image as JPEG with Pillow and decode it again (CPU only).

    ``subsampling`` is Pillow's code: 0 = 4:4:4, 1 = 4:2:2 (InvISP's ground truth), 2 = 4:2:0 (Pillow's default
    and the most common choice of phones and web images).
    """
    if srgb_uint8.dtype != np.uint8 or srgb_uint8.ndim != 3 or srgb_uint8.shape[2] != 3:
        raise ValueError(f"need an H x W x 3 uint8 image, got {srgb_uint8.dtype} {srgb_uint8.shape}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    Image.fromarray(srgb_uint8, "RGB").save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IspRandomization:
    """How :meth:`SyntheticCamera.make_pair` draws its ISP parameters (one draw per image).

    Attributes:
        raw_white: (lo, hi), log-uniform: RAW level of sRGB white (the camera's ISP gain is 1 / raw_white). Real
            RAW files keep highlight headroom; the default 0.5 is one stop. A camera has one value: keep lo = hi
            (see the module docstring for what a range does). Must lie in (0, 1].
        highlight_probability: chance that an image is over-exposed in the ISP (clipped sRGB highlights with
            RAW detail); otherwise ``overexposure = 1`` (only what the photo already clipped stays clipped).
        clip_fraction: (lo, hi), uniform: fraction of pixels newly pushed above 1 in linear sRGB (in at least
            one channel) when over-exposed, on top of those the photo already has at 255. The gain is computed
            from the image itself (a quantile of its per-pixel channel maximum), so dark and bright photos both
            clip about that fraction.
        max_overexposure: cap on that gain (4 = two stops), so a dark photo is not blown up without limit.
        tone_strength: (lo, hi), uniform: strength k of the S-curve (0 = none, 1 = full smoothstep); one value
            per camera by default (0.5).
        jpeg_probability: chance that the sRGB input goes through JPEG (where JPEG is applied at all).
        jpeg_quality: (lo, hi) inclusive, uniform integer: JPEG quality.
        jpeg_subsampling: Pillow chroma subsampling code (2 = 4:2:0).
    """

    raw_white: tuple[float, float] = (0.5, 0.5)
    highlight_probability: float = 0.5
    clip_fraction: tuple[float, float] = (0.0, 0.05)
    max_overexposure: float = 4.0
    tone_strength: tuple[float, float] = (0.5, 0.5)
    jpeg_probability: float = 0.8
    jpeg_quality: tuple[int, int] = (70, 98)
    jpeg_subsampling: int = 2

    def __post_init__(self) -> None:
        lo, hi = self.raw_white
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("raw_white needs 0 < lo <= hi <= 1")
        lo, hi = self.clip_fraction
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError("clip_fraction needs 0 <= lo <= hi < 1")
        lo, hi = self.tone_strength
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("tone_strength needs 0 <= lo <= hi <= 1 (the curve is monotonic only there)")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError("jpeg_quality needs 1 <= lo <= hi <= 100")
        for name in ("highlight_probability", "jpeg_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.max_overexposure < 1.0:
            raise ValueError("max_overexposure must be >= 1")
        if self.jpeg_subsampling not in (0, 1, 2):
            raise ValueError("jpeg_subsampling must be 0 (4:4:4), 1 (4:2:2) or 2 (4:2:0)")


@dataclass(frozen=True, eq=False)
class IspParams:
    """One draw of ISP parameters for a batch of B images (CPU tensors of shape [B]).

    Attributes:
        exposure: the camera's ISP gain applied to the RAW in :meth:`SyntheticCamera.render` (= 1 / raw_white).
        raw_white: RAW level of sRGB white.
        tone: tone-curve strength k.
        jpeg_quality: per image, a JPEG quality or None (no JPEG).
        jpeg_subsampling: Pillow chroma subsampling code.
        scene_gain: brightness of the scene relative to the source photo (>= 1 pushes highlights to clip); the
            RAW target is ``scene_gain * raw_white * camera RGB(photo)``. None means 1.
        scene: the scene augmentation drawn for these images (``scene_aug.SceneDraw``), or None (no
            augmentation: the scene is the photo).
    """

    exposure: torch.Tensor
    raw_white: torch.Tensor
    tone: torch.Tensor
    jpeg_quality: tuple[int | None, ...]
    jpeg_subsampling: int = 2
    scene_gain: torch.Tensor | None = None
    scene: SceneDraw | None = None

    @property
    def overexposure(self) -> torch.Tensor:
        """Scene gain relative to the source photo (>= 1 where highlights are pushed to clip)."""
        return self.scene_gain if self.scene_gain is not None else torch.ones_like(self.exposure)

    @classmethod
    def fixed(cls, batch: int, *, exposure: float = 1.0, raw_white: float = 1.0, tone: float = 0.0,
              jpeg_quality: int | None = None, jpeg_subsampling: int = 2, scene_gain: float = 1.0) -> "IspParams":
        """The same parameters for every image of a batch (tests, ablations)."""
        full = lambda v: torch.full((batch,), float(v), dtype=torch.float32)  # noqa: E731
        return cls(full(exposure), full(raw_white), full(tone), (jpeg_quality,) * batch, jpeg_subsampling,
                   full(scene_gain))


# --------------------------------------------------------------------------------------------------------------
# The camera
# --------------------------------------------------------------------------------------------------------------

def _per_image(value: torch.Tensor | float | Sequence[float], batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a length-B sequence -> float32 tensor [B, 1, 1, 1] on ``like``'s device."""
    t = torch.as_tensor(value, dtype=torch.float32).to(like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-image parameter must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t.view(batch, 1, 1, 1)


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be a tensor [B, 3, H, W], got {getattr(x, 'shape', type(x))}")


def _apply_matrix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """3x3 matrix times every pixel of [B, 3, H, W]."""
    return torch.einsum("ij,bjhw->bihw", m, x)


def _apply_matrices(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 matrices [B, 3, 3] times every pixel of [B, 3, H, W] (float32 on x's device)."""
    if m.shape != (x.shape[0], 3, 3):
        raise ValueError(f"need one 3x3 matrix per image ([{x.shape[0]}, 3, 3]), got {tuple(m.shape)}")
    return torch.einsum("bij,bjhw->bihw", m.to(device=x.device, dtype=torch.float32), x)


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    return x.to(torch.float32).clamp(0.0, 1.0)


@dataclass(frozen=True)
class SyntheticCamera:
    """An invertible ISP for one camera (see the module docstring for the pipeline).

    Built from a :class:`rawdiff_infer.camera.Camera`: its ``color_matrix`` (XYZ(D65) -> camera RGB) gives
    ``C = XYZ2CAM @ SRGB2XYZ`` (linear sRGB -> camera RGB). Each row of C is normalised to sum to 1 (dcraw's
    convention), so sRGB white (1, 1, 1) maps to camera (1, 1, 1): white balance lives in the RAW, as in the RAW
    convention. ``srgb_from_cam = inv(C)`` is the ISP's colour matrix; its rows sum to 1 as well.

    Attributes (derived, row-major 3x3 tuples): ``cam_from_srgb`` (normalised C), ``srgb_from_cam``.
    """

    camera: Camera = DEFAULT_CAMERA
    cam_from_srgb: tuple[float, ...] = field(init=False, repr=False)
    srgb_from_cam: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        xyz2cam = np.asarray(self.camera.color_matrix, dtype=np.float64).reshape(3, 3)
        c = xyz2cam @ np.asarray(SRGB_TO_XYZ, dtype=np.float64)
        sums = c.sum(axis=1, keepdims=True)
        if np.any(np.abs(sums) < 1e-6):
            raise ValueError(f"colour matrix of {self.camera.unique_model} maps sRGB white to zero in a channel")
        c = c / sums
        m = np.linalg.inv(c)
        object.__setattr__(self, "cam_from_srgb", tuple(float(v) for v in c.ravel()))
        object.__setattr__(self, "srgb_from_cam", tuple(float(v) for v in m.ravel()))

    def matrix(self, which: str, device: torch.device | str | None = None) -> torch.Tensor:
        """``"srgb_from_cam"`` or ``"cam_from_srgb"`` as a float32 [3, 3] tensor on ``device``."""
        if which not in ("srgb_from_cam", "cam_from_srgb"):
            raise ValueError(f"unknown matrix {which!r}")
        return torch.tensor(getattr(self, which), dtype=torch.float32, device=device).view(3, 3)

    def isp_model(self, randomization: "IspRandomization | None" = None) -> IspModel | None:
        """This camera's ISP as a model description states it (``rawdiff_infer.isp.IspModel``), exactly: gain
        ``1 / raw_white``, ``srgb_from_cam``, the sRGB curve with the tone strength, clip 1, 8 bits. None when the
        randomization draws the gain or the tone per image (then no single ISP rendered the pairs)."""
        r = randomization or IspRandomization()
        if r.raw_white[0] != r.raw_white[1] or r.tone_strength[0] != r.tone_strength[1]:
            return None
        return IspModel(gain=1.0 / r.raw_white[0], srgb_from_cam=self.srgb_from_cam,
                        curve=IspCurve(kind="srgb", tone=r.tone_strength[0]), clip=1.0, bits=8)

    # -- the ISP and its inverse ------------------------------------------------------------------------------

    def render(self, linear_raw: torch.Tensor, *, exposure: torch.Tensor | float = 1.0,
               tone: torch.Tensor | float = 0.0, quantize: bool = True) -> torch.Tensor:
        """Forward ISP: linear RAW [B, 3, H, W] in [0, 1] -> sRGB [B, 3, H, W] in [0, 1] (8-bit levels).

        ``exposure`` (gain, > 0) and ``tone`` (k in [0, 1]) are scalars or per-image [B]. No JPEG here.
        """
        _check_batch(linear_raw, "linear_raw")
        b = linear_raw.shape[0]
        x = linear_raw.to(torch.float32).clamp(0.0, 1.0) * _per_image(exposure, b, linear_raw)
        lin = _apply_matrix(self.matrix("srgb_from_cam", x.device), x).clamp(0.0, 1.0)
        y = tone_curve(linear_to_srgb(lin), _per_image(tone, b, linear_raw))
        return quantize_8bit(y) if quantize else y.clamp(0.0, 1.0)

    def srgb_to_scene(self, srgb: torch.Tensor, *, tone: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Undo steps 6-3 of the ISP: sRGB [0, 1] -> linear sRGB [0, 1] (before the colour matrix)."""
        _check_batch(srgb, "srgb")
        y = _to_unit_float(srgb)
        return srgb_to_linear(inverse_tone_curve(y, _per_image(tone, y.shape[0], y)))

    def unprocess(self, srgb: torch.Tensor, *, exposure: torch.Tensor | float = 1.0,
                  tone: torch.Tensor | float = 0.0, clip: bool = True,
                  scene_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse ISP: sRGB [B, 3, H, W] in [0, 1] (or uint8) -> linear RAW [B, 3, H, W].

        Inverse tone curve, inverse OETF, inverse colour matrix, division by ``exposure``. With ``clip`` (the
        default) the result is clipped to [0, 1]: out-of-gamut negatives become 0 and values above the sensor
        range become 1 (saturation). ``clip=False`` returns the unclipped values (to find those pixels).

        ``scene_matrix`` [B, 3, 3] (``SceneDraw.matrix``): change the scene first, in linear sRGB, before the
        colour matrix; the product ``cam_from_srgb @ scene_matrix`` is formed in float64 on the CPU, then
        applied in float32 on the image's device. None (the default) leaves the photo's scene as it is.
        """
        lin = self.srgb_to_scene(srgb, tone=tone)
        if scene_matrix is None:
            cam = _apply_matrix(self.matrix("cam_from_srgb", lin.device), lin)
        else:
            c = torch.tensor(self.cam_from_srgb, dtype=torch.float64).view(3, 3)
            cam = _apply_matrices(c @ scene_matrix.to(device="cpu", dtype=torch.float64), lin)
        raw = cam / _per_image(exposure, lin.shape[0], lin)
        return raw.clamp(0.0, 1.0) if clip else raw

    # -- random parameters -------------------------------------------------------------------------------------

    def sample_params(self, srgb: torch.Tensor, generator: torch.Generator | None = None,
                      randomization: IspRandomization | None = None, *,
                      tone: torch.Tensor | None = None,
                      augmentation: SceneAugmentation | None = None) -> IspParams:
        """Draw per-image ISP parameters for the photos ``srgb`` [B, 3, H, W] (the over-exposure gain depends
        on each image's brightness). ``generator`` must be a CPU generator (or None for torch's default).

        ``augmentation``: also draw a scene change per image (after the ISP's own draws, from the same
        generator); the over-exposure gain is then set from the changed scene. None draws nothing more."""
        _check_batch(srgb, "srgb")
        r = randomization or IspRandomization()
        b = srgb.shape[0]
        u = torch.rand(b, 6, generator=generator, dtype=torch.float64)
        if tone is None:
            tone = r.tone_strength[0] + (r.tone_strength[1] - r.tone_strength[0]) * u[:, 0]
        tone = torch.as_tensor(tone, dtype=torch.float32).expand(b).clone()
        lo, hi = math.log(r.raw_white[0]), math.log(r.raw_white[1])
        raw_white = torch.exp(lo + (hi - lo) * u[:, 1]).to(torch.float32)
        over = u[:, 2] < r.highlight_probability
        frac = r.clip_fraction[0] + (r.clip_fraction[1] - r.clip_fraction[0]) * u[:, 3]
        use_jpeg = u[:, 4] < r.jpeg_probability
        q_lo, q_hi = r.jpeg_quality
        quality = (q_lo + torch.floor(u[:, 5] * (q_hi - q_lo + 1)).clamp_max(q_hi - q_lo)).to(torch.int64)
        scene = None
        if augmentation is not None:
            c64 = torch.tensor(self.cam_from_srgb, dtype=torch.float64)
            scene = augmentation.draw(b, generator, cam_from_srgb=c64)

        overexposure = torch.ones(b, dtype=torch.float32)
        if bool(over.any()):
            lin = self.srgb_to_scene(srgb, tone=tone)
            if scene is not None:
                lin = _apply_matrices(scene.matrix, lin)
            peak = lin.amax(dim=1).flatten(1)  # [B, H*W] linear sRGB max channel
            already = (peak >= 1.0 - 1e-6).to(torch.float32).mean(dim=1).cpu()  # clipped in the photo itself
            q = _upper_quantile(peak, (already + frac.to(torch.float32)).clamp_max(1.0)).cpu()
            gain = torch.where(q > 0, 1.0 / q.clamp_min(1e-12), torch.full_like(q, r.max_overexposure))
            gain = gain.clamp(1.0, r.max_overexposure)
            overexposure = torch.where(over, gain, overexposure)
        jpeg = tuple(int(qv) if j else None for qv, j in zip(quality.tolist(), use_jpeg.tolist()))
        return IspParams(exposure=1.0 / raw_white, raw_white=raw_white, tone=tone, jpeg_quality=jpeg,
                         jpeg_subsampling=r.jpeg_subsampling, scene_gain=overexposure, scene=scene)

    # -- pairs -------------------------------------------------------------------------------------------------

    def make_pair(self, photo: np.ndarray | torch.Tensor, generator: torch.Generator | int | None = None, *,
                  randomization: IspRandomization | None = None, params: IspParams | None = None,
                  jpeg: bool | None = None, return_params: bool = False,
                  augmentation: SceneAugmentation | None = None):
        """A consistent training pair from a photo: ``(srgb_input, raw_target)`` [, params].

        ``photo``: H x W x 3 uint8 (or float [0, 1]) numpy image -> returns two float32 H x W x 3 numpy arrays;
        or a tensor batch [B, 3, H, W] (uint8, or float in [0, 1], any device) -> two float32 tensors
        [B, 3, H, W] on that device.

        ``raw_target`` is linear RAW in [0, 1] (RAW convention, not gamma-encoded). ``srgb_input`` is
        ``render(raw_target)`` (8-bit levels, in [0, 1]) followed, per image, by a JPEG round trip when
        ``params.jpeg_quality`` says so and ``jpeg`` is on. ``jpeg`` defaults to True for a numpy photo and to
        False for a tensor batch: the batched path is meant for GPU crops and JPEG would force a round trip
        through the CPU (Pillow); pass ``jpeg=True`` to accept that cost.

        ``generator``: a CPU ``torch.Generator`` or an int seed; ``params`` overrides the random draw (its
        ``scene``, if any, is used; ``augmentation`` is then ignored). ``augmentation``: draw a scene change per
        image (see the module docstring); None (the default) gives exactly the unaugmented pairs.
        """
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if isinstance(photo, np.ndarray):
            if photo.ndim != 3 or photo.shape[2] != 3:
                raise ValueError(f"photo must be H x W x 3, got {photo.shape}")
            x = torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))[None]
            srgb, raw, p = self._make_pair_batch(x, generator, randomization, params,
                                                 True if jpeg is None else jpeg, augmentation)
            out = (srgb[0].permute(1, 2, 0).numpy(), raw[0].permute(1, 2, 0).numpy())
        else:
            _check_batch(photo, "photo")
            out_srgb, out_raw, p = self._make_pair_batch(photo, generator, randomization, params, bool(jpeg),
                                                         augmentation)
            out = (out_srgb, out_raw)
        return (*out, p) if return_params else out

    def _make_pair_batch(self, photo: torch.Tensor, generator: torch.Generator | None,
                         randomization: IspRandomization | None, params: IspParams | None, jpeg: bool,
                         augmentation: SceneAugmentation | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, IspParams]:
        x = _to_unit_float(photo)
        b = x.shape[0]
        if params is None:
            params = self.sample_params(x, generator, randomization, augmentation=augmentation)
        elif params.exposure.shape != (b,):
            raise ValueError(f"params are for {params.exposure.shape[0]} images, the batch has {b}")
        scene_matrix = params.scene.matrix if params.scene is not None else None
        raw = self.unprocess(x, exposure=1.0 / (params.raw_white * params.overexposure), tone=params.tone,
                             scene_matrix=scene_matrix)
        srgb = self.render(raw, exposure=params.exposure, tone=params.tone)
        if jpeg and any(q is not None for q in params.jpeg_quality):
            srgb = _jpeg_batch(srgb, params.jpeg_quality, params.jpeg_subsampling)
        return srgb, raw, params


def _upper_quantile(values: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` [B, N]: the value exceeded by about ``fraction`` [B] of the row (0 -> the max)."""
    b, n = values.shape
    idx = torch.round((1.0 - fraction.to(torch.float64)) * (n - 1)).to(torch.int64).clamp(0, n - 1)
    if values.numel() <= (1 << 24):
        srt = values.sort(dim=1).values
        return srt.gather(1, idx.to(values.device)[:, None])[:, 0]
    return torch.stack([values[i].kthvalue(int(idx[i]) + 1).values for i in range(b)])


def _jpeg_batch(srgb: torch.Tensor, qualities: Sequence[int | None], subsampling: int) -> torch.Tensor:
    """JPEG round trip of the images of [B, 3, H, W] with a quality, on the CPU; back to srgb's device."""
    u8 = torch.round(srgb.clamp(0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = srgb.clone()
    for i, q in enumerate(qualities):
        if q is None:
            continue
        dec = jpeg_roundtrip(np.ascontiguousarray(u8[i]), q, subsampling=subsampling)
        out[i] = torch.from_numpy(dec).to(srgb.device).permute(2, 0, 1).to(torch.float32) / 255.0
    return out


def described_camera(camera: Camera, randomization: IspRandomization | None = None) -> Camera:
    """The camera description to store with a model trained on this synthetic camera: the colour matrix, levels
    and CFA of ``camera`` plus its rendering gain as DNG BaselineExposure, log2(1 / raw_white) EV, so that raw
    converters that honour it render our DNGs as bright as the camera's own JPEGs. A randomised ``raw_white``
    range has no single gain: the geometric mean of the range is used."""
    r = randomization or IspRandomization()
    gain = 1.0 / math.sqrt(r.raw_white[0] * r.raw_white[1])
    return dataclasses.replace(camera, baseline_exposure=round(math.log2(gain), 6))
