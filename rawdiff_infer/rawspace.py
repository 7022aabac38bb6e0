"""The RAW convention (InvISP protocol, DESIGN.md) and the model's value ranges.

Linear RAW: demosaiced camera RGB, black-subtracted, white-balanced, divided by (white - black), in [0, 1].
Encoded RAW: linear ** (1 / gamma), gamma = 2.2 by default: this is what the model learns and what PSNR is
measured on. Model space: encoded * 2 - 1, in [-1, 1]. The sRGB condition uses the same affine map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .validate import SchemaError, choice, known_keys, number, obj

__all__ = ["RawEncoding", "srgb_to_model", "host_srgb", "model_to_unit", "GAMMA_RANGE"]

#: encoding gammas a model may declare: 1 (linear) .. 3 (the paper's 2.2 and sRGB's ~2.4 inside)
GAMMA_RANGE = (1.0, 3.0)


@dataclass(frozen=True)
class RawEncoding:
    """Gamma encoding of linear RAW (1/2.2 in the paper's data); gamma within GAMMA_RANGE."""

    gamma: float = 2.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", number(self.gamma, "gamma", GAMMA_RANGE[0], GAMMA_RANGE[1]))

    def encode(self, linear: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Linear [0, 1] -> encoded [0, 1] (input clipped to [0, 1])."""
        if isinstance(linear, torch.Tensor):
            return linear.clamp(0.0, 1.0) ** (1.0 / self.gamma)
        return np.clip(linear, 0.0, 1.0) ** (1.0 / self.gamma)

    def decode(self, encoded: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Encoded [0, 1] -> linear [0, 1] (input clipped to [0, 1])."""
        if isinstance(encoded, torch.Tensor):
            return encoded.clamp(0.0, 1.0) ** self.gamma
        return np.clip(encoded, 0.0, 1.0) ** self.gamma

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gamma", "gamma": self.gamma}

    @classmethod
    def from_dict(cls, d: Any) -> "RawEncoding":
        """From a description's ``encoding`` object: kind "gamma" with gamma in GAMMA_RANGE."""
        d = obj(d, "encoding")
        known_keys(d, "encoding", ("kind", "gamma"))
        choice(d.get("kind", "gamma"), "encoding.kind", ("gamma",))
        try:
            return cls(gamma=d.get("gamma", 2.2))
        except SchemaError as e:
            raise SchemaError(f"encoding.{e}") from None


def srgb_to_model(image: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """sRGB H x W x 3 -> float32 tensor [1, 3, H, W] in [-1, 1] on ``device``.

    ``image``: a numpy array (uint8 0..255, uint16 0..65535, or float in [0, 1]), or a torch tensor already
    prepared by ``host_srgb`` (uint8, int32 holding 16-bit values, or float32; possibly pinned, possibly already on
    the device). The integer image travels to the device as it is (a quarter of the bytes of float32 for uint8)
    and is converted there."""
    t = host_srgb(image) if isinstance(image, np.ndarray) else image
    scale = {torch.uint8: 255.0, torch.int32: 65535.0}.get(t.dtype)
    t = t.to(device)
    unit = t.float().clamp(0.0, 1.0) if scale is None else t.float().div_(scale)
    return unit.permute(2, 0, 1)[None].mul(2.0).sub_(1.0).contiguous()


def host_srgb(image: np.ndarray, *, pin: bool = False) -> torch.Tensor:
    """A decoded sRGB array as the host tensor ``srgb_to_model`` uploads: uint8 stays uint8, uint16 becomes int32
    (torch has no uint16 arithmetic on every device), floats become float32. ``pin`` puts it in page-locked
    memory (for asynchronous copies to a GPU)."""
    if image.dtype == np.uint16:
        image = image.astype(np.int32)
    elif image.dtype != np.uint8:
        image = image.astype(np.float32, copy=False)
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # decoded images can be read-only; torch wants to own writable memory
        image = image.copy()
    t = torch.from_numpy(image)
    return t.pin_memory() if pin else t


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1] (clamped)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
