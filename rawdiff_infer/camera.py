"""Camera descriptions: what a DNG writer and a synthetic camera need to know about a sensor.

Colour matrices are XYZ(D65) -> camera-native RGB, as in the DNG ``ColorMatrix1`` tag with
``CalibrationIlluminant1 = 21`` (D65); the numbers are the published ones from dcraw's ``adobe_coeff`` table
(which copies Adobe DNG Converter), divided by 10000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .validate import SchemaError, choice, integer, known_keys, number, obj, string

__all__ = ["Camera", "CAMERAS", "DEFAULT_CAMERA", "get_camera", "CFA_PATTERNS", "SRGB_TO_XYZ"]

#: Linear sRGB (D65) -> CIE XYZ (D65), IEC 61966-2-1 (the numbers of dcraw's ``xyz_rgb``).
SRGB_TO_XYZ: tuple[tuple[float, float, float], ...] = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)

#: EXIF LightSource codes (EXIF 2.3, tag 0x9208), the values DNG's CalibrationIlluminant may take
EXIF_LIGHT_SOURCES: tuple[int, ...] = (0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 24, 255)
#: colour-matrix entries beyond this magnitude are not a camera's (published matrices stay within about +-3)
MATRIX_BOUND = 100.0

#: 2x2 Bayer layouts by name -> colour index per cell (0 = R, 1 = G, 2 = B), row-major.
CFA_PATTERNS: dict[str, tuple[int, int, int, int]] = {
    "RGGB": (0, 1, 1, 2),
    "BGGR": (2, 1, 1, 0),
    "GRBG": (1, 0, 2, 1),
    "GBRG": (1, 2, 0, 1),
}


@dataclass(frozen=True)
class Camera:
    """A camera model as far as RAW output is concerned.

    Attributes:
        make, model: EXIF Make / Model.
        color_matrix: 9 floats, row-major 3x3 XYZ(D65) -> camera RGB (DNG ColorMatrix1).
        illuminant: EXIF LightSource code of ``color_matrix`` (21 = D65), one of ``EXIF_LIGHT_SOURCES``.
        black_level: sensor black level in DN (0..65534).
        white_level: sensor saturation in DN (black_level < white_level <= 65535).
        cfa_pattern: one of ``CFA_PATTERNS`` (Bayer layout of the top-left 2x2 cell).
        baseline_exposure: the camera's rendering gain in EV (DNG BaselineExposure): how much a raw converter
            should brighten the RAW to match the camera's JPEGs (a synthetic camera with RAW headroom
            ``raw_white`` renders with gain 1 / raw_white, i.e. log2(1 / raw_white) EV). 0 for the InvISP protocol.
    """

    make: str
    model: str
    color_matrix: tuple[float, ...]
    illuminant: int = 21
    black_level: int = 0
    white_level: int = 16383
    cfa_pattern: str = "RGGB"
    baseline_exposure: float = 0.0

    def __post_init__(self) -> None:
        string(self.make, "make", min_len=1)
        string(self.model, "model", min_len=1)
        m = self.color_matrix
        if not isinstance(m, (list, tuple)) or len(m) != 9:
            raise SchemaError(f"color_matrix: must be 9 numbers (3x3, row-major), got {str(m)[:40]}")
        m = tuple(number(v, f"color_matrix[{i}]", -MATRIX_BOUND, MATRIX_BOUND) for i, v in enumerate(m))
        object.__setattr__(self, "color_matrix", m)
        if abs(float(np.linalg.det(np.asarray(m).reshape(3, 3)))) < 1e-6:
            raise SchemaError("color_matrix: is singular (it must map XYZ to camera RGB invertibly)")
        choice(self.illuminant, "illuminant", EXIF_LIGHT_SOURCES)
        integer(self.black_level, "black_level", 0, 65534)
        integer(self.white_level, "white_level", 1, 65535)
        if not self.black_level < self.white_level:
            raise SchemaError(f"white_level: must be above black_level ({self.black_level}), got {self.white_level}")
        choice(self.cfa_pattern, "cfa_pattern", sorted(CFA_PATTERNS))
        object.__setattr__(self, "baseline_exposure", number(self.baseline_exposure, "baseline_exposure",
                                                             -8.0, 8.0))

    @property
    def unique_model(self) -> str:
        """DNG UniqueCameraModel."""
        return f"{self.make} {self.model}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["color_matrix"] = list(self.color_matrix)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Camera":
        """From a description's ``camera`` object (make, model and color_matrix required; unknown keys refused)."""
        d = obj(d, "camera")
        known_keys(d, "camera", (f.name for f in fields(cls)))
        missing = [k for k in ("make", "model", "color_matrix") if k not in d]
        if missing:
            raise SchemaError(f"camera: missing {', '.join(missing)}")
        try:
            return cls(**d)
        except SchemaError as e:
            raise SchemaError(f"camera.{e}") from None


def _m(*v: int) -> tuple[float, ...]:
    return tuple(x / 10000.0 for x in v)


#: The paper's two FiveK cameras (dcraw adobe_coeff; levels as LibRaw reports them for their RAW files).
CAMERAS: dict[str, Camera] = {
    "nikon-d700": Camera("NIKON CORPORATION", "NIKON D700",
                         _m(8139, -2171, -663, -8747, 16541, 2295, -1925, 2008, 8093),
                         black_level=0, white_level=15892, cfa_pattern="RGGB"),
    "canon-eos-5d": Camera("Canon", "Canon EOS 5D",
                           _m(6347, -479, -972, -8297, 15954, 2480, -1968, 2131, 7649),
                           black_level=128, white_level=3692, cfa_pattern="RGGB"),
}

DEFAULT_CAMERA = CAMERAS["nikon-d700"]


def get_camera(name: str) -> Camera:
    """Look a camera up by its short name (see ``CAMERAS``)."""
    try:
        return CAMERAS[name]
    except KeyError:
        raise ValueError(f"unknown camera {name!r}; known: {', '.join(sorted(CAMERAS))}") from None
