"""Noise schedules and timestep grids (fp64 internally).

Notation (DDPM / DPM-Solver): alphabar_t = prod_{s<=t} (1 - beta_s); alpha_t = sqrt(alphabar_t);
sigma_t = sqrt(1 - alphabar_t); lambda_t = log(alpha_t / sigma_t) (half the log-SNR). Timesteps are in training
units, t = 0 .. T-1; fractional t (from the logSNR grid or singlestep intermediate points) interpolates
log(alphabar) linearly between integer steps, as DPM-Solver's discrete-time noise schedule does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .validate import SchemaError, choice, integer, known_keys, number, obj

__all__ = ["ScheduleConfig", "Schedule", "Spacing", "SPACINGS", "MAX_TIMESTEPS", "MAX_ABS_LAMBDA"]

#: the longest training schedule a description may declare (its tables are T float64 values each)
MAX_TIMESTEPS = 100_000
#: the largest |lambda_t| (half the log-SNR) a schedule may reach at either end: alpha_t and sigma_t stay above
#: e^-30 ~ 1e-13, so every table, grid and sampler coefficient is finite and fp32 keeps them normal numbers
MAX_ABS_LAMBDA = 30.0

Spacing = Literal["linspace", "leading", "trailing", "time-uniform", "logSNR", "karras"]
SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing", "time-uniform", "logSNR", "karras")


@dataclass(frozen=True)
class ScheduleConfig:
    """Beta schedule of the forward process.

    kind: "scaled_linear" (LDM: beta linear in sqrt(beta)) or "linear" (DDPM: beta linear).
    num_timesteps: T (1000). beta_start / beta_end: beta_1 and beta_T (paper: 0.0015 -> 0.0195).
    """

    kind: Literal["scaled_linear", "linear"] = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195

    def __post_init__(self) -> None:
        choice(self.kind, "kind", ("scaled_linear", "linear"))
        integer(self.num_timesteps, "num_timesteps", 2, MAX_TIMESTEPS)
        object.__setattr__(self, "beta_start", number(self.beta_start, "beta_start", 0.0, 1.0, lo_open=True,
                                                      hi_open=True))
        object.__setattr__(self, "beta_end", number(self.beta_end, "beta_end", 0.0, 1.0, lo_open=True,
                                                    hi_open=True))
        if not self.beta_start < self.beta_end:
            raise SchemaError(f"beta_end: must be above beta_start ({self.beta_start:g}), got {self.beta_end:g}")
        self._check_tables()

    def betas(self) -> np.ndarray:
        """beta_1 .. beta_T, float64."""
        if self.kind == "scaled_linear":
            return np.linspace(np.sqrt(self.beta_start), np.sqrt(self.beta_end), self.num_timesteps,
                               dtype=np.float64) ** 2
        return np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)

    def _check_tables(self) -> None:
        """Refuse a degenerate schedule: alphabar must fall strictly from below 1 to above 0 in float64, with the
        log-SNR lambda finite and within +-MAX_ABS_LAMBDA at both ends (no underflow to 0, no noiseless t = 0)."""
        ac = np.cumprod(1.0 - self.betas())
        with np.errstate(divide="ignore"):
            lam = 0.5 * (np.log(ac[[0, -1]]) - np.log(-np.expm1(np.log(ac[[0, -1]]))))
        if not (np.isfinite(lam[0]) and lam[0] <= MAX_ABS_LAMBDA):
            raise SchemaError(f"beta_start: {self.beta_start:g} leaves almost no noise at t = 0 (alphabar_0 = "
                              f"{float(ac[0]):.17g}); half the log-SNR must stay within +-{MAX_ABS_LAMBDA:g}")
        if not (np.isfinite(lam[1]) and lam[1] >= -MAX_ABS_LAMBDA):
            raise SchemaError(f"beta_end: alphabar_T = {ac[-1]:.3g} with num_timesteps={self.num_timesteps} "
                              f"(underflows towards 0); half the log-SNR must stay within +-{MAX_ABS_LAMBDA:g}, "
                              f"i.e. alphabar_T >= {np.exp(-2 * MAX_ABS_LAMBDA):.1g}")
        if np.any(np.diff(ac) >= 0):
            raise SchemaError(f"beta_start: {self.beta_start:g} is too small for float64 (alphabar_t does not "
                              "decrease at every step)")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_timesteps": self.num_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: Any) -> "ScheduleConfig":
        """From a description's ``schedule`` object (missing keys: defaults; unknown keys refused)."""
        d = obj(d, "schedule")
        known_keys(d, "schedule", ("kind", "num_timesteps", "beta_start", "beta_end"))
        try:
            return cls(**d)
        except SchemaError as e:
            raise SchemaError(f"schedule.{e}") from None


class Schedule:
    """A discrete VP schedule with fp64 tables and continuous interpolation.

    Attributes (numpy float64, length T): betas, alphas_cumprod, log_alphas (log alpha_t = 0.5 log alphabar_t).
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        self.betas = self.config.betas()
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.log_alphas = 0.5 * np.log(self.alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    # ---- continuous-time views (t may be fractional, 0 <= t <= T-1) -------------------------------------------
    def log_alpha(self, t: np.ndarray | float) -> np.ndarray:
        """log alpha_t, linear interpolation between integer timesteps."""
        return np.interp(np.asarray(t, dtype=np.float64), np.arange(self.num_timesteps), self.log_alphas)

    def alpha_sigma(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(alpha_t, sigma_t) in fp64."""
        la = self.log_alpha(t)
        return np.exp(la), np.sqrt(-np.expm1(2.0 * la))

    def lambda_(self, t: np.ndarray | float) -> np.ndarray:
        """lambda_t = log(alpha_t / sigma_t), decreasing in t."""
        la = self.log_alpha(t)
        return la - 0.5 * np.log(-np.expm1(2.0 * la))

    def t_of_lambda(self, lam: np.ndarray | float) -> np.ndarray:
        """Inverse of ``lambda_`` (fractional timesteps), exact on the piecewise-linear log alpha."""
        lam = np.asarray(lam, dtype=np.float64)
        # log alpha as a function of lambda: log alpha = -0.5 log(1 + exp(-2 lambda))
        la = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        # log_alphas is decreasing in t: interpolate t over the reversed table
        return np.interp(la, self.log_alphas[::-1], np.arange(self.num_timesteps, dtype=np.float64)[::-1])

    # ---- training-time helpers -----------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps for integer t [B] (forward process, eq. 3)."""
        ac = torch.as_tensor(self.alphas_cumprod, device=x0.device)[t.long()]
        a = ac.sqrt().to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        s = (1.0 - ac).sqrt().to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * noise

    # ---- sampling grids -----------------------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: Spacing = "linspace", *, start: float | None = None,
                  end: float = 0.0) -> np.ndarray:
        """A decreasing grid of ``steps`` timesteps (fp64, training units) at which the model is evaluated.

        Every grid is followed by the clean endpoint (alphabar = 1, sigma = 0) in the samplers. The continuous
        grids run from ``start`` (default T-1) down to ``end`` (default 0), 0 <= end < start <= T-1:
        - time-uniform: linspace(start, end, steps) (fractional);
        - logSNR: uniform in lambda between lambda(start) and lambda(end) (fractional);
        - karras: the EDM grid (Karras et al. 2022, eq. 5, rho = 7) in sigma_VE = sigma / alpha = e^-lambda: more
          steps at low noise.
        The integer grids of the DDPM / DDIM literature cover the whole schedule (start / end not allowed):
        - linspace: round(linspace(T-1, 0, steps)); includes T-1 and 0.
        - leading: (arange(steps) * (T // steps))[::-1] (DDIM paper, Stable Diffusion); ends at 0.
        - trailing: round(arange(T, 0, -T/steps)) - 1; starts at T-1, ends at T/steps - 1.
        """
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        t0 = float(T - 1 if start is None else start)
        if not 0.0 <= end < t0 <= T - 1 and not (steps == 1 and 0.0 <= t0 <= T - 1):
            raise ValueError(f"the grid must run from start down to end within [0, {T - 1}], got {t0:g} -> {end:g}")
        if spacing in ("linspace", "leading", "trailing") and (start is not None or end != 0.0):
            raise ValueError(f"spacing {spacing!r} covers the whole schedule; use logSNR, time-uniform or karras "
                             "for another start or end")
        if spacing == "linspace":
            ts = np.round(np.linspace(T - 1, 0, steps))
        elif spacing == "leading":
            ts = (np.arange(steps) * (T // steps))[::-1].astype(np.float64)
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)) - 1.0
        elif spacing == "time-uniform":
            ts = np.linspace(t0, end, steps)
        elif spacing in ("logSNR", "karras"):
            lo, hi = float(self.lambda_(t0)), float(self.lambda_(end))
            if spacing == "logSNR":
                lam = np.linspace(lo, hi, steps)
            else:
                rho = 7.0
                s_max, s_min = np.exp(-lo) ** (1 / rho), np.exp(-hi) ** (1 / rho)
                lam = -rho * np.log(s_max + np.linspace(0.0, 1.0, steps) * (s_min - s_max))
            ts = self.t_of_lambda(lam)
            ts[0] = t0
            if steps > 1:
                ts[-1] = end
        else:
            raise ValueError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
        ts = np.asarray(ts, dtype=np.float64)
        if steps > 1 and np.any(np.diff(ts) >= 0):
            raise ValueError(f"{steps} steps with spacing {spacing!r} give repeated timesteps")
        return ts
