"""Camera descriptions: what a DNG writer and a synthetic camera need to know about a sensor.

Colour matrices are XYZ(D65) -> camera-native RGB, as in the DNG ``ColorMatrix1`` tag with
``CalibrationIlluminant1 = 21`` (D65); the numbers are the published ones from dcraw's ``adobe_coeff`` table
(which copies Adobe DNG Converter), divided by 10000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Camera", "CAMERAS", "DEFAULT_CAMERA", "get_camera", "CFA_PATTERNS", "SRGB_TO_XYZ"]

#: Linear sRGB (D65) -> CIE XYZ (D65), IEC 61966-2-1 (the numbers of dcraw's ``xyz_rgb``).
SRGB_TO_XYZ: tuple[tuple[float, float, float], ...] = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)

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
        illuminant: EXIF LightSource code of ``color_matrix`` (21 = D65).
        black_level: sensor black level in DN (>= 0).
        white_level: sensor saturation in DN (> black_level).
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
        object.__setattr__(self, "color_matrix", tuple(float(v) for v in self.color_matrix))
        if len(self.color_matrix) != 9:
            raise ValueError("color_matrix must have 9 entries (3x3, row-major)")
        if self.cfa_pattern not in CFA_PATTERNS:
            raise ValueError(f"unknown CFA pattern {self.cfa_pattern!r}; choose from {sorted(CFA_PATTERNS)}")
        if not 0 <= self.black_level < self.white_level <= 65535:
            raise ValueError("need 0 <= black_level < white_level <= 65535")
        object.__setattr__(self, "baseline_exposure", float(self.baseline_exposure))
        if not -8.0 <= self.baseline_exposure <= 8.0:
            raise ValueError("baseline_exposure must be within +-8 EV")

    @property
    def unique_model(self) -> str:
        """DNG UniqueCameraModel."""
        return f"{self.make} {self.model}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["color_matrix"] = list(self.color_matrix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Camera":
        return cls(**d)


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
