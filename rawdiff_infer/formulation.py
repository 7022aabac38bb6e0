"""What a model predicts and what its sampler diffuses: the model description's ``formulation``.

Two choices, both fixed when a model is trained and written into its description:

* ``prediction``: the U-Net's output is the noise ``eps`` (the paper's, and every model before 0.4) or the clean
  state ``x0`` (trained with pixel losses, as RAW-Diffusion does).
* ``space``: the sampler's state is the encoded RAW itself (``raw``, the paper's) or its **residual** over the
  closed-form inverse of the input: ``x = q + r``, with q the consistent point of the input under the model's ISP
  (``consistency.ConsistencySet.q``, the closed form wherever that is consistent). A residual model spends
  nothing on re-learning the fixed ISP: r is zero wherever the photo determines the RAW, and the network only adds
  what the ISP destroyed (highlights above white, JPEG and 8-bit steps). A residual model needs its ISP.

A description without the field is ``eps`` over ``raw``: every earlier model keeps its meaning. The U-Net's inputs
and output are the same tensors in every formulation (state [B, 3, P, P], sRGB condition [B, 3, P, P], t [B]), so
the exported graphs, the four backends and the FLOP count are the same; only the meaning of the state and the
output changes, and that lives here, in one wrapper (``FormulatedEps``) between the tiler and the sampler.

``FormulatedEps`` turns the tiler's fused output into an eps model over the sampler's state, the way k-diffusion
wraps models: x0 from the output (eps or x0), moved to the RAW (``+ q``), projected onto the consistent set
(or clamped), moved back, and eps recomputed. The samplers never know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .validate import choice, known_keys, obj

__all__ = ["DeviceSchedule", "Formulation", "FormulatedEps", "PREDICTIONS", "SPACES", "Transform"]

#: what the U-Net predicts
PREDICTIONS = ("eps", "x0")
#: what the sampler diffuses: the encoded RAW, or its residual over the closed-form inverse of the input
SPACES = ("raw", "residual")

#: a pointwise map of an x0 in model space (the layout of the sampler's state) onto the RAWs allowed for it
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Formulation:
    """A model's formulation (module docstring).

    Attributes:
        prediction: "eps" (the noise) or "x0" (the clean state).
        space: "raw" (the state is the encoded RAW in [-1, 1]) or "residual" (the state is the encoded RAW minus
            the input's closed-form inverse q, in [-2, 2]; needs the model's ISP).
    """

    prediction: str = "eps"
    space: str = "raw"

    def __post_init__(self) -> None:
        choice(self.prediction, "formulation.prediction", PREDICTIONS)
        choice(self.space, "formulation.space", SPACES)

    @property
    def is_default(self) -> bool:
        """eps over the RAW: the paper's, and every model's that does not name its formulation."""
        return self == Formulation()

    @property
    def residual(self) -> bool:
        return self.space == "residual"

    def label(self) -> str:
        """Short name for logs and tables, e.g. ``x0/residual``."""
        return f"{self.prediction}/{self.space}"

    def to_dict(self) -> dict[str, Any]:
        return {"prediction": self.prediction, "space": self.space}

    @classmethod
    def from_dict(cls, d: Any) -> "Formulation":
        """Validate the description's ``formulation`` object (SchemaError naming the field)."""
        d = obj(d, "formulation")
        known_keys(d, "formulation", ("prediction", "space"))
        return cls(prediction=d.get("prediction", "eps"), space=d.get("space", "raw"))


class DeviceSchedule:
    """alpha_t and sigma_t of a schedule as tensor functions of a tensor t (no host synchronisation; capturable).

    Matches ``schedule.Schedule.alpha_sigma`` (log alpha interpolated linearly between integer steps), in fp64 where
    the device has it."""

    def __init__(self, log_alphas: np.ndarray, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.table = torch.as_tensor(log_alphas, dtype=dtype, device=device)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.table.numel()
        tt = t.to(self.table.dtype).clamp(0.0, n - 1)
        i = tt.floor().clamp(max=n - 2).long()
        frac = tt - i.to(tt.dtype)
        la = self.table[i] * (1.0 - frac) + self.table[i + 1] * frac
        return la.exp(), (-torch.expm1(2.0 * la)).sqrt()


class FormulatedEps:
    """The tiler's fused model output as an eps model over the sampler's state (module docstring).

    Per evaluation, with a_t, s_t the schedule's alpha and sigma, W the tiler's coverage by evaluated patches (1
    everywhere unless patches were skipped) and o the state's offset (q for a residual model, else 0):

        x0 = (W x - s_t out) / a_t        (prediction eps)      x0 = out    (prediction x0)
        x0 = x0 + (1 - W) fill                                  (skipped pixels: the closed form)
        x0 = T(x0 + o) - o                                      (T: the projection, a clamp, or nothing)
        eps = (x - a_t x0) / s_t

    Args:
        eps_fn: the tiler, ``eps_fn(x, t[, step=k])``, x [B, 3, H, W] or packed [1, L]; returns the fused output.
        schedule: the model's ``schedule.Schedule``.
        prediction: "eps" or "x0" (what ``eps_fn`` returns).
        device: where the schedule table lives (the state's device).
        transform: T above, on x0 in model space (RAW, not residual), or None.
        offset: o above, in the layout of x, or None (0).
        fill: None, or (W, x0 of skipped pixels in the state's space), in the layout of x.
    """

    takes_step = True

    def __init__(self, eps_fn: Callable[..., torch.Tensor], schedule: Any, *, prediction: str,
                 device: torch.device, transform: Transform | None = None, offset: torch.Tensor | None = None,
                 fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        choice(prediction, "prediction", PREDICTIONS)
        self.eps_fn, self.prediction, self.transform = eps_fn, prediction, transform
        self.offset, self.fill = offset, fill
        self.alpha_sigma = DeviceSchedule(schedule.log_alphas, device)
        self._step = getattr(eps_fn, "takes_step", False)

    def __getattr__(self, name: str):  # the wrapped denoiser's attributes (pack, check_finite, ...)
        if name == "eps_fn":
            raise AttributeError(name)
        return getattr(self.eps_fn, name)

    def x0(self, x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The (transformed) x0 of the state x at t, fp32, in the state's space."""
        return self._x0(x, t, step, *self._alpha_sigma(t, x))

    def _x0(self, x: torch.Tensor, t: torch.Tensor, step: int, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = (self.eps_fn(x, t, step=step) if self._step else self.eps_fn(x, t)).float()
        xf = x.float()
        if self.prediction == "x0":
            x0 = out
        else:
            x0 = ((xf if self.fill is None else self.fill[0] * xf) - s * out) / a
        if self.fill is not None:
            x0 = x0 + (1.0 - self.fill[0]) * self.fill[1]
        if self.transform is not None:
            x0 = self.transform(x0) if self.offset is None else self.transform(x0 + self.offset) - self.offset
        return x0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        a, s = self._alpha_sigma(t, x)  # once per evaluation: x0 and eps share it
        return ((x.float() - a * self._x0(x, t, step, a, s)) / s).to(x.dtype)

    def _alpha_sigma(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.alpha_sigma(t.reshape(-1))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.to(torch.float32).view(shape), s.to(torch.float32).view(shape)
