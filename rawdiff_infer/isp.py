"""A camera's forward ISP, as a model description states it: linear RAW -> sRGB, and its exact inverse.

The RAW convention is the project's (DESIGN.md): linear demosaiced camera RGB, black-subtracted, white-balanced,
in [0, 1]. The forward ISP, per pixel::

    l = clamp(gain * M @ clamp(raw, 0, 1) / clip, 0, 1)    M: camera RGB -> linear sRGB (3 x 3)
    y = curve(l)                                           monotone [0, 1] -> [0, 1]
    v = round((2^bits - 1) * y)                            the output levels

``curve`` is one of:

- ``srgb``: the sRGB OETF (IEC 61966-2-1) followed by the global tone curve ``(1 - k) g + k (3 g^2 - 2 g^3)``
  of strength k in [0, 1] (Brooks et al.; the synthetic camera of ``train/camera_isp.py``);
- ``gamma``: LibRaw's power curve with a linear toe, ``gamma (power, slope)`` as dcraw/LibRaw define it
  (LibRaw's default (2.222, 4.5) is the BT.709 curve): the render the InvISP/FiveK protocol uses;
- ``lut``: a strictly increasing table of n >= 2 values at l = i / (n - 1), interpolated linearly (a fitted
  or measured curve).

Everything here is pointwise and runs on any device in the input's float dtype. The set of RAWs consistent with
an input photo, and the projection onto it, are in ``consistency.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .validate import SchemaError, choice, known_keys, number, obj

__all__ = ["CURVES", "IspCurve", "IspModel", "linear_to_srgb", "srgb_to_linear", "tone_curve",
           "inverse_tone_curve", "MAX_LUT"]

CURVES: tuple[str, ...] = ("srgb", "gamma", "lut")
#: the longest curve table a description may hold
MAX_LUT = 65536
#: the largest ISP gain a description may state (16 stops)
MAX_GAIN = 65536.0


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """sRGB OETF: linear [0, 1] -> encoded [0, 1] (12.92 x below 0.0031308, else 1.055 x^(1/2.4) - 0.055)."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)


def srgb_to_linear(y: torch.Tensor) -> torch.Tensor:
    """Inverse sRGB OETF: encoded [0, 1] -> linear [0, 1]."""
    y = y.clamp(0.0, 1.0)
    return torch.where(y <= 0.04045, y / 12.92, ((y.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def tone_curve(x: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """Global S-curve ``(1 - k) x + k (3 x^2 - 2 x^3)`` on [0, 1]; ``strength`` k in [0, 1] broadcasts with x."""
    x = x.clamp(0.0, 1.0)
    return (1.0 - strength) * x + strength * (x * x * (3.0 - 2.0 * x))


def inverse_tone_curve(y: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """Exact inverse of :func:`tone_curve` for k in [0, 1].

    With u = x - 1/2, v = y - 1/2, a = 1 + k/2 the curve is v = a u - 2 k u^3. Its middle root is
    ``u = 2 sqrt(a / (6k)) sin(asin(z) / 3)`` with ``z = (3 v / (2 a)) sqrt(6 k / a)`` (|z| <= 1 on [0, 1]);
    for k = 1 this is Brooks et al.'s ``0.5 - sin(asin(1 - 2y) / 3)``. This form has no cancellation as k -> 0
    (then u -> v / a), and k below 1e-6 is treated as the identity.
    """
    y = y.clamp(0.0, 1.0)
    k = torch.as_tensor(strength, dtype=y.dtype, device=y.device)
    k_safe = k.clamp_min(1e-6)
    a = 1.0 + 0.5 * k_safe
    v = y - 0.5
    z = ((1.5 * v / a) * torch.sqrt(6.0 * k_safe / a)).clamp(-1.0, 1.0)
    u = 2.0 * torch.sqrt(a / (6.0 * k_safe)) * torch.sin(torch.asin(z) / 3.0)
    x = torch.where(k < 1e-6, y, u + 0.5)
    return x.clamp(0.0, 1.0)


def _gamma_toe(power: float, slope: float) -> tuple[float, float]:
    """(break point x_b, offset a) of the curve ``y = slope x`` below x_b, ``(1 + a) x^(1/power) - a`` above, with
    value and derivative continuous at x_b (how dcraw's ``gamma_curve`` builds LibRaw's output curve)."""
    p = 1.0 / power
    if slope <= 1.0:  # a pure power curve (no toe)
        return 0.0, 0.0

    def mismatch(xb: float) -> float:  # value mismatch at xb once the derivative matches
        a = slope * xb ** (1.0 - p) / p - 1.0
        return (1.0 + a) * xb ** p - a - slope * xb

    lo, hi = 1e-12, 1.0 / slope
    for _ in range(200):  # bisection: mismatch changes sign once on (0, 1/slope]
        mid = math.sqrt(lo * hi)
        if (mismatch(mid) > 0) == (mismatch(hi) > 0):
            hi = mid
        else:
            lo = mid
    xb = hi
    return xb, slope * xb ** (1.0 - p) / p - 1.0


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for increasing ``xp`` on tensors (any device; x clamped to [xp[0], xp[-1]])."""
    x = x.clamp(float(xp[0]), float(xp[-1]))
    i = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    span = x1 - x0  # a strictly increasing table can still hold equal neighbours once rounded to fp32
    frac = torch.where(span > 0, (x - x0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))
    return f0 + (f1 - f0) * frac


@dataclass(frozen=True)
class IspCurve:
    """The ISP's tone: linear sRGB [0, 1] -> output [0, 1], strictly increasing (see the module docstring).

    Attributes:
        kind: "srgb", "gamma" or "lut".
        tone: srgb only: tone-curve strength k in [0, 1].
        power, slope: gamma only: LibRaw's gamma (power in [1, 10], toe slope in [0, 1000]; (2.222, 4.5) = BT.709).
        lut: lut only: 2..65536 strictly increasing values in [0, 1] at l = i / (n - 1).
    """

    kind: Literal["srgb", "gamma", "lut"] = "srgb"
    tone: float = 0.0
    power: float = 2.222
    slope: float = 4.5
    lut: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        choice(self.kind, "kind", CURVES)
        object.__setattr__(self, "tone", number(self.tone, "tone", 0.0, 1.0))
        object.__setattr__(self, "power", number(self.power, "power", 1.0, 10.0))
        object.__setattr__(self, "slope", number(self.slope, "slope", 0.0, 1000.0))
        if self.kind == "lut":
            v = self.lut
            if not isinstance(v, (list, tuple)) or not 2 <= len(v) <= MAX_LUT:
                raise SchemaError(f"lut: must be 2..{MAX_LUT} numbers")
            v = tuple(number(x, f"lut[{i}]", 0.0, 1.0) for i, x in enumerate(v))
            if any(b <= a for a, b in zip(v, v[1:])):
                raise SchemaError("lut: must be strictly increasing (the ISP's curve has to be invertible)")
            object.__setattr__(self, "lut", v)
        elif self.lut:
            raise SchemaError(f"lut: only a 'lut' curve has a table (this one is {self.kind!r})")

    def _tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fp = torch.tensor(self.lut, dtype=like.dtype, device=like.device)
        return torch.linspace(0.0, 1.0, len(self.lut), dtype=like.dtype, device=like.device), fp

    def forward(self, lin: torch.Tensor) -> torch.Tensor:
        """Linear sRGB (clamped to [0, 1]) -> curve output in [0, 1]."""
        lin = lin.clamp(0.0, 1.0)
        if self.kind == "srgb":
            return tone_curve(linear_to_srgb(lin), self.tone)
        if self.kind == "gamma":
            xb, a = _gamma_toe(self.power, self.slope)
            return torch.where(lin < xb, self.slope * lin, (1.0 + a) * lin.clamp_min(xb) ** (1.0 / self.power) - a)
        xp, fp = self._tables(lin)
        return _interp(lin, xp, fp)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Curve output (clamped to the curve's range) -> linear sRGB in [0, 1]; exact inverse of ``forward``."""
        y = y.clamp(0.0, 1.0)
        if self.kind == "srgb":
            return srgb_to_linear(inverse_tone_curve(y, self.tone))
        if self.kind == "gamma":
            xb, a = _gamma_toe(self.power, self.slope)
            yb = self.slope * xb
            lin = torch.where(y < yb, y / max(self.slope, 1e-12), ((y.clamp_min(yb) + a) / (1.0 + a)) ** self.power)
            return lin.clamp(0.0, 1.0)
        xp, fp = self._tables(y)
        return _interp(y, fp, xp)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "srgb":
            return {"kind": "srgb", "tone": self.tone}
        if self.kind == "gamma":
            return {"kind": "gamma", "power": self.power, "slope": self.slope}
        return {"kind": "lut", "lut": list(self.lut)}

    @classmethod
    def from_dict(cls, d: Any) -> "IspCurve":
        d = obj(d, "curve")
        allowed = {"srgb": ("kind", "tone"), "gamma": ("kind", "power", "slope"), "lut": ("kind", "lut")}
        kind = choice(d.get("kind"), "curve.kind", CURVES)
        known_keys(d, "curve", allowed[kind])
        try:
            return cls(**d)
        except SchemaError as e:
            raise SchemaError(f"curve.{e}") from None


@dataclass(frozen=True)
class IspModel:
    """How a camera renders its linear RAW to sRGB (the module docstring gives the pipeline).

    Attributes:
        gain: digital gain applied to the RAW, in (0, 65536] (the synthetic camera's 1 / raw_white; 1 for LibRaw).
        srgb_from_cam: 9 floats, row-major 3 x 3 camera RGB -> linear sRGB matrix (invertible, entries within
            +-100).
        curve: IspCurve.
        clip: the linear-sRGB level that renders as white, in (0, 1] (1: the curve's own white).
        bits: output bit depth, 8 or 16 (the levels the camera writes).
    """

    gain: float
    srgb_from_cam: tuple[float, ...]
    curve: IspCurve = IspCurve()
    clip: float = 1.0
    bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", number(self.gain, "gain", 0.0, MAX_GAIN, lo_open=True))
        m = self.srgb_from_cam
        if not isinstance(m, (list, tuple)) or len(m) != 9:
            raise SchemaError(f"srgb_from_cam: must be 9 numbers (3x3, row-major), got {str(m)[:40]}")
        m = tuple(number(v, f"srgb_from_cam[{i}]", -100.0, 100.0) for i, v in enumerate(m))
        mat = np.asarray(m, dtype=np.float64).reshape(3, 3)
        if np.linalg.cond(mat) > 1e6:
            raise SchemaError("srgb_from_cam: is singular or nearly so (condition number > 1e6)")
        object.__setattr__(self, "srgb_from_cam", m)
        if not isinstance(self.curve, IspCurve):
            raise SchemaError("curve: must be an IspCurve")
        object.__setattr__(self, "clip", number(self.clip, "clip", 0.0, 1.0, lo_open=True))
        choice(self.bits, "bits", (8, 16))

    @property
    def levels(self) -> int:
        """The largest output level, 2^bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "srgb_from_cam": list(self.srgb_from_cam), "curve": self.curve.to_dict(),
                "clip": self.clip, "bits": self.bits}

    @classmethod
    def from_dict(cls, d: Any) -> "IspModel":
        """From a description's ``isp`` object (gain and srgb_from_cam required; unknown keys refused)."""
        d = obj(d, "isp")
        known_keys(d, "isp", ("gain", "srgb_from_cam", "curve", "clip", "bits"))
        missing = [k for k in ("gain", "srgb_from_cam") if k not in d]
        if missing:
            raise SchemaError(f"isp: missing {', '.join(missing)}")
        try:
            curve = IspCurve.from_dict(d["curve"]) if "curve" in d else IspCurve()
            return cls(**{**d, "curve": curve})
        except SchemaError as e:
            raise SchemaError(f"isp.{e}") from None

    def _matrix(self) -> np.ndarray:
        """A = gain / clip * M in fp64, [3, 3]."""
        return np.asarray(self.srgb_from_cam, dtype=np.float64).reshape(3, 3) * (self.gain / self.clip)

    def forward_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """A = gain / clip * M as a [3, 3] tensor (dtype and device of ``like``): raw -> curve input."""
        return torch.as_tensor(self._matrix(), dtype=like.dtype, device=like.device)

    def inverse_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """A^-1 as a [3, 3] tensor (computed in fp64)."""
        return torch.as_tensor(np.linalg.inv(self._matrix()), dtype=like.dtype, device=like.device)

    def render(self, raw: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        """Linear RAW [..., 3, H, W] -> sRGB in [0, 1] (on the output levels when ``quantize``)."""
        lin = _mix(self.forward_matrix(raw), raw.clamp(0.0, 1.0))
        y = self.curve.forward(lin)
        return torch.round(y * self.levels) / self.levels if quantize else y

    def closed_form(self, srgb: torch.Tensor) -> torch.Tensor:
        """The exact inverse where nothing was clipped: sRGB [..., 3, H, W] in [0, 1] -> linear RAW, clipped to
        [0, 1] (a clipped channel comes back at the clip level)."""
        return _mix(self.inverse_matrix(srgb), self.curve.inverse(srgb)).clamp(0.0, 1.0)


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """3 x 3 matrix times every pixel of [..., 3, H, W]."""
    return torch.einsum("ij,...jhw->...ihw", m, x)
