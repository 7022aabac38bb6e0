"""Diffusion samplers as plain functions over an eps-prediction callable.

Contract: ``eps_fn(x_t, t) -> eps`` with x_t a float32 tensor [B, 3, H, W] (float64 when ``x_T`` is float64, for
tests) and t a float32 tensor [B] in training units (0 .. T-1, fractional allowed). The samplers never see patches
or backends (see tiling.py for that).

Every sampler evaluates the model on a decreasing timestep grid t_0 > ... > t_{N-1} (N = ``steps`` model
evaluations) and ends with a clean sample: the last update goes from t_{N-1} to alphabar = 1 (sigma = 0), which is
the x0 prediction at t_{N-1}; the default grids end at t_{N-1} = 0. The x0 prediction is clamped to
[-clip_x0, clip_x0] (static thresholding, ``clip_x0=None`` disables it). All update arithmetic runs in fp32 (fp64
when x_T is fp64), whatever the model's dtype; coefficients are computed in fp64.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from .schedule import Schedule, Spacing

__all__ = ["sample", "SAMPLERS", "DEFAULT_STEPS", "EpsFn", "ddpm", "ddim", "dpm_multistep", "dpm_sde",
           "dpm_singlestep"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None]

#: method -> (default steps, default spacing)
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "dpm": 20, "dpm-sde": 20, "dpm-single": 20}
DEFAULT_SPACING: dict[str, str] = {"ddpm": "linspace", "ddim": "linspace", "dpm": "logSNR", "dpm-sde": "logSNR",
                                   "dpm-single": "logSNR"}


class Predictor:
    """Wraps eps_fn: evaluates at a continuous timestep and returns (x0, eps), x0 clamped, eps consistent with it."""

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, clip_x0: float | None, total: int,
                 callback: Callback | None) -> None:
        self.eps_fn, self.schedule, self.clip_x0 = eps_fn, schedule, clip_x0
        self.total, self.callback, self.calls = total, callback, 0

    def __call__(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        tt = torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        eps = self.eps_fn(x, tt).to(x.dtype)
        x0 = torch.sub(x, eps, alpha=sigma).div_(alpha)  # one temporary per result: canvases can be 100s of MB
        if self.clip_x0 is not None:
            x0.clamp_(-self.clip_x0, self.clip_x0)
            eps = torch.sub(x, x0, alpha=alpha).div_(sigma)
        self.calls += 1
        if self.callback is not None:
            self.callback(self.calls, self.total)
        return x0, eps


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` on the generator's own device."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)


def ddpm(pred: Predictor, x: torch.Tensor, ts: np.ndarray, schedule: Schedule,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, eq. 6-7) on any decreasing grid (respaced: beta_eff = 1 - ab_t / ab_s)."""
    for i, t in enumerate(ts):
        x0, _ = pred(x, float(t))
        if i == len(ts) - 1:
            return x0
        ab_t, ab_s = (float(np.exp(2 * schedule.log_alpha(v))) for v in (t, ts[i + 1]))
        beta = 1.0 - ab_t / ab_s
        c0 = math.sqrt(ab_s) * beta / (1.0 - ab_t)              # posterior mean coefficient of x0
        ct = math.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)  # ... and of x_t
        var = beta * (1.0 - ab_s) / (1.0 - ab_t)
        x = c0 * x0 + ct * x + math.sqrt(var) * _randn_like(x, generator)
    return x


def ddim(pred: Predictor, x: torch.Tensor, ts: np.ndarray, schedule: Schedule, eta: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z; eta = 0 is deterministic."""
    for i, t in enumerate(ts):
        x0, eps = pred(x, float(t))
        if i == len(ts) - 1:
            return x0
        ab_t, ab_s = (float(np.exp(2 * schedule.log_alpha(v))) for v in (t, ts[i + 1]))
        c = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * _randn_like(x, generator)
    return x


def dpm_multistep(pred: Predictor, x: torch.Tensor, ts: np.ndarray, schedule: Schedule,
                  order: int = 2) -> torch.Tensor:
    """DPM-Solver++(2M / 3M) multistep, data prediction (Lu et al. 2022b, Alg. 2); lower order at warm-up and at the
    end (the last update to sigma = 0 is first order: it returns x0; 3M uses 2nd order just before when N < 15)."""
    if order not in (1, 2, 3):
        raise ValueError("dpm multistep order must be 1, 2 or 3")
    n = len(ts)
    lam = schedule.lambda_(ts)
    alpha, sigma = schedule.alpha_sigma(ts)
    hist: list[torch.Tensor] = []  # x0 predictions, newest last
    for i, t in enumerate(ts):
        x0, _ = pred(x, float(t))
        hist = (hist + [x0])[-3:]
        if i == n - 1:
            return x0
        k = min(order, i + 1)
        if order == 3 and i == n - 2 and n < 15:
            k = min(k, 2)
        h = lam[i + 1] - lam[i]
        a_t, s_t = alpha[i + 1], sigma[i + 1]
        phi = math.expm1(-h)  # e^{-h} - 1
        x = torch.mul(x, s_t / sigma[i]).add_(hist[-1], alpha=-a_t * phi)
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            if k == 2:  # x -= 0.5 a_t phi (m0 - m1) / r0, without temporaries
                c = 0.5 * a_t * phi / r0
                x.add_(hist[-1], alpha=-c).add_(hist[-2], alpha=c)
            else:
                d1_0 = (hist[-1] - hist[-2]) / r0
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (hist[-2] - hist[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + a_t * (phi / h + 1.0) * d1 - a_t * ((phi + h) / h**2 - 0.5) * d2
    return x


def dpm_sde(pred: Predictor, x: torch.Tensor, ts: np.ndarray, schedule: Schedule, order: int = 2,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """SDE-DPM-Solver++ (1S / 2M), data prediction (Lu et al. 2022b, sec. 5 and app. B; diffusers'
    ``sde-dpmsolver++`` with the midpoint 2M correction):

        x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + D1 / 2) + sigma_t sqrt(1 - e^{-2h}) z

    with D0 the newest x0 prediction, D1 = (D0 - previous) / r0 (order 2, from the second step), z ~ N(0, I).
    Like DDPM it re-injects noise at every step, which corrects the model's errors instead of carrying them along
    the trajectory, at the cost of needing more steps than the ODE solvers for the same discretisation error.
    The last update (to sigma = 0) returns x0."""
    if order not in (1, 2):
        raise ValueError("dpm-sde order must be 1 or 2")
    n = len(ts)
    lam = schedule.lambda_(ts)
    alpha, sigma = schedule.alpha_sigma(ts)
    prev: torch.Tensor | None = None
    for i, t in enumerate(ts):
        x0, _ = pred(x, float(t))
        if i == n - 1:
            return x0
        h = lam[i + 1] - lam[i]
        a_t, s_t = alpha[i + 1], sigma[i + 1]
        one_minus = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        x = torch.mul(x, s_t / sigma[i] * math.exp(-h)).add_(x0, alpha=a_t * one_minus)
        if order == 2 and prev is not None:
            c = 0.5 * a_t * one_minus * h / (lam[i] - lam[i - 1])  # 0.5 alpha_t (1 - e^{-2h}) / r0
            x.add_(x0, alpha=c).add_(prev, alpha=-c)
        x.add_(_randn_like(x, generator), alpha=s_t * math.sqrt(one_minus))
        prev = x0
    return x


def _singlestep_update(pred: Predictor, x: torch.Tensor, t_s: float, t_t: float, k: int, schedule: Schedule,
                       algorithm: str) -> torch.Tensor:
    """One singlestep DPM-Solver(-++) update of order k from t_s to t_t (Lu et al. 2022a Alg. 1/2, 2022b Alg. 1)."""
    r1, r2 = (0.5, None) if k == 2 else (1.0 / 3.0, 2.0 / 3.0)
    lam_s, lam_t = (float(v) for v in schedule.lambda_([t_s, t_t]))
    h = lam_t - lam_s
    ls = [lam_s + r1 * h] + ([lam_s + r2 * h] if k == 3 else [])
    t_mid = [float(v) for v in schedule.t_of_lambda(ls)]
    a = lambda tt: float(schedule.alpha_sigma(tt)[0])  # noqa: E731
    s = lambda tt: float(schedule.alpha_sigma(tt)[1])  # noqa: E731
    x0_s, eps_s = pred(x, t_s)
    if algorithm == "dpmsolver++":
        def first(tt: float, rh: float, m: torch.Tensor) -> torch.Tensor:
            return (s(tt) / s(t_s)) * x - a(tt) * math.expm1(-rh) * m

        if k == 1:
            return first(t_t, h, x0_s)
        u1 = first(t_mid[0], r1 * h, x0_s)
        d1 = pred(u1, t_mid[0])[0] - x0_s
        if k == 2:
            return first(t_t, h, x0_s) - a(t_t) / (2 * r1) * math.expm1(-h) * d1
        u2 = first(t_mid[1], r2 * h, x0_s) + a(t_mid[1]) * (r2 / r1) * (math.expm1(-r2 * h) / (r2 * h) + 1.0) * d1
        d2 = pred(u2, t_mid[1])[0] - x0_s
        return first(t_t, h, x0_s) + (a(t_t) / r2) * (math.expm1(-h) / h + 1.0) * d2
    # "dpmsolver": noise prediction
    def first_e(tt: float, rh: float, e: torch.Tensor) -> torch.Tensor:
        return (a(tt) / a(t_s)) * x - s(tt) * math.expm1(rh) * e

    if k == 1:
        return first_e(t_t, h, eps_s)
    u1 = first_e(t_mid[0], r1 * h, eps_s)
    d1 = pred(u1, t_mid[0])[1] - eps_s
    if k == 2:
        return first_e(t_t, h, eps_s) - s(t_t) / (2 * r1) * math.expm1(h) * d1
    u2 = first_e(t_mid[1], r2 * h, eps_s) - s(t_mid[1]) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * d1
    d2 = pred(u2, t_mid[1])[1] - eps_s
    return first_e(t_t, h, eps_s) - (s(t_t) / r2) * (math.expm1(h) / h - 1.0) * d2


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Split ``steps`` model evaluations into singlestep segments: [remainder] + [order]*q + [1 (final x0)].

    The lower-order remainder goes first, at high noise, where its error is damped most by the rest of the
    trajectory (measured on the Gaussian oracle: putting it last made the error non-monotone in steps)."""
    q, r = divmod(steps - 1, order)
    return ([r] if r else []) + [order] * q + [1]


def dpm_singlestep(pred: Predictor, x: torch.Tensor, ts: np.ndarray, schedule: Schedule,
                   orders: Sequence[int], algorithm: str = "dpmsolver++") -> torch.Tensor:
    """Singlestep DPM-Solver of order 1-3 per segment between grid points; the last segment returns x0 at ts[-1]."""
    if algorithm not in ("dpmsolver", "dpmsolver++"):
        raise ValueError("algorithm must be 'dpmsolver' or 'dpmsolver++'")
    if len(orders) != len(ts) or orders[-1] != 1:
        raise ValueError("need one order per grid point, the last one 1")
    for i in range(len(ts) - 1):
        x = _singlestep_update(pred, x, float(ts[i]), float(ts[i + 1]), orders[i], schedule, algorithm)
    return pred(x, float(ts[-1]))[0]


SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm", "dpm-sde", "dpm-single")


def sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: Schedule, method: str = "dpm", steps: int | None = None,
           eta: float = 0.0, generator: torch.Generator | None = None, *,
           timesteps: Sequence[float] | np.ndarray | None = None, spacing: Spacing | None = None,
           order: int | None = None, algorithm: Literal["dpmsolver", "dpmsolver++"] = "dpmsolver++",
           clip_x0: float | None = 1.0, callback: Callback | None = None) -> torch.Tensor:
    """Draw x0 from the reverse process starting at x_T.

    Args:
        eps_fn: noise predictor, see module docstring.
        x_T: [B, C, H, W] starting noise (standard normal), float32 (or float64 for tests).
        schedule: the schedule the model was trained with.
        method: "ddpm" | "ddim" | "dpm" (DPM-Solver++ multistep, ODE) | "dpm-sde" (SDE-DPM-Solver++ multistep,
            stochastic) | "dpm-single" (singlestep DPM-Solver).
        steps: model evaluations (default per method: ddpm 1000, ddim 50, dpm 20, dpm-sde 20, dpm-single 20).
        eta: DDIM stochasticity in [0, 1] (0 = deterministic).
        generator: source of all noise drawn during sampling (ddpm, dpm-sde, ddim with eta > 0).
        timesteps: explicit decreasing grid (training units) overriding ``steps``/``spacing``.
        spacing: grid spacing, see Schedule.timesteps (default: linspace for ddpm/ddim, logSNR for dpm solvers).
        order: solver order (dpm: 1-3, default 2; dpm-sde: 1-2, default 2; dpm-single: 1-3, default 3).
        algorithm: dpm-single only: "dpmsolver++" (data prediction, default) or "dpmsolver" (noise prediction).
        clip_x0: static clamp of the x0 prediction, or None.
        callback: called as callback(evaluations_done, evaluations_total) after every model evaluation.
    Returns:
        x0 with the shape and dtype (fp32 / fp64) of x_T.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose from {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError("eta must be in [0, 1]")
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32))
    sp = spacing or DEFAULT_SPACING[method]
    if method == "dpm-single":
        k = order or 3
        if k not in (1, 2, 3):
            raise ValueError("dpm-single order must be 1, 2 or 3")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.float64)
            orders = [k] * (len(ts) - 1) + [1]
        else:
            n = steps or DEFAULT_STEPS[method]
            orders = singlestep_orders(n, k)
            ts = schedule.timesteps(len(orders), sp)
        pred = Predictor(eps_fn, schedule, clip_x0, sum(orders), callback)
        return dpm_singlestep(pred, x, ts, schedule, orders, algorithm)
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64)
        if ts.ndim != 1 or len(ts) == 0 or np.any(np.diff(ts) >= 0):
            raise ValueError("timesteps must be a non-empty strictly decreasing sequence")
        if ts[0] > schedule.num_timesteps - 1 or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}]")
    else:
        ts = schedule.timesteps(steps or DEFAULT_STEPS[method], sp)
    pred = Predictor(eps_fn, schedule, clip_x0, len(ts), callback)
    if method == "ddpm":
        return ddpm(pred, x, ts, schedule, generator)
    if method == "ddim":
        return ddim(pred, x, ts, schedule, eta, generator)
    if method == "dpm-sde":
        return dpm_sde(pred, x, ts, schedule, order or 2, generator)
    return dpm_multistep(pred, x, ts, schedule, order or 2)
