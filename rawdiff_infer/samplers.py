"""Diffusion samplers as plain functions over an eps-prediction model.

Contract of the model: ``eps_fn(x_t, t) -> eps`` with x_t a float32 tensor (float64 when ``x_T`` is float64, for
tests) of any shape whose first axis is the batch, and t a float32 tensor [B] in training units (0 .. T-1,
fractional allowed). The samplers never see patches or backends (tiling.py does that); their arithmetic is
elementwise with scalar coefficients, so x may also be several canvases packed into one tensor.

Every sampler has one signature, in the style of k-diffusion::

    sample_xxx(model: Denoiser, x: Tensor, ts: ndarray, *, noise: NoiseSampler | None = None, **options) -> x0

- ``model`` is a :class:`Denoiser`: it holds the eps function and the schedule, and returns (x0, eps) at a
  continuous timestep, x0 clamped to [-clip_x0, clip_x0] (static thresholding; None disables it).
- ``ts`` is the decreasing grid t_0 > ... > t_{N-1} at which the model is evaluated (N = model evaluations).
- ``noise`` draws standard normal noise shaped like its argument (stochastic samplers only). The default,
  :func:`gaussian_noise`, draws from one ``torch.Generator``; passing another one (a list of prepared tensors, one
  generator per packed canvas, ...) changes nothing else.
- History (multistep solvers) lives in loop locals; nothing is stored between calls.

Every sampler ends with a clean sample: the last update goes from t_{N-1} to alphabar = 1 (sigma = 0), which is
the x0 prediction at t_{N-1}; the default grids end at t_{N-1} = 0. All update arithmetic runs in fp32 (fp64 when
x_T is fp64), whatever the model's dtype; coefficients are computed in fp64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .schedule import SPACINGS, Schedule, Spacing

__all__ = ["DEFAULT_METHOD", "DEFAULT_STEPS", "SAMPLERS", "SPECS", "Denoiser", "check_options", "dpmpp_weights",
           "keyed_noise", "EpsFn", "NoiseSampler", "SamplerSpec",
           "gaussian_noise", "sample", "sample_ddim", "sample_ddpm", "sample_dpm_single", "sample_dpmpp",
           "singlestep_orders"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, int], None]


class Denoiser:
    """An eps model seen as a denoiser: ``model(x, t) -> (x0, eps)`` at a continuous timestep t.

    x0 = (x - sigma_t eps) / alpha_t, clamped to [-clip_x0, clip_x0] when ``clip_x0`` is set (then eps is made
    consistent with the clamped x0). Counts its evaluations and reports them to ``callback(done, total)``. An
    ``eps_fn`` with a true ``takes_step`` attribute is called as ``eps_fn(x, t, step=k)``, k the 0-based evaluation
    index (the tiler moves its shifted grid by it); plain functions are called as ``eps_fn(x, t)``.

    Args:
        eps_fn: the eps model (see the module docstring).
        schedule: the schedule the model was trained with (alpha_t, sigma_t, lambda_t of continuous t).
        clip_x0: static clamp of the x0 prediction in model space (1.0: the data range [-1, 1]), or None.
        callback: called after every evaluation as callback(evaluations_done, total).
        total: the number of evaluations the sampler will make (for the callback).
    """

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, *, clip_x0: float | None = 1.0,
                 callback: Callback | None = None, total: int = 0) -> None:
        self.eps_fn, self.schedule, self.clip_x0 = eps_fn, schedule, clip_x0
        self.callback, self.total, self.calls = callback, total, 0
        self._step = bool(getattr(eps_fn, "takes_step", False))

    def __call__(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        tt = torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        eps = (self.eps_fn(x, tt, step=self.calls) if self._step else self.eps_fn(x, tt)).to(x.dtype)
        x0 = torch.sub(x, eps, alpha=sigma).div_(alpha)  # one temporary per result: canvases can be 100s of MB
        if self.clip_x0 is not None:
            x0.clamp_(-self.clip_x0, self.clip_x0)
            eps = torch.sub(x, x0, alpha=alpha).div_(sigma)
        self.calls += 1
        if self.callback is not None:
            self.callback(self.calls, self.total)
        return x0, eps


_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values (avalanche: every output bit depends
    on every input bit)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def keyed_noise(x_T: torch.Tensor) -> NoiseSampler:
    """Standard normal noise that is a fixed function of the starting noise ``x_T``: draw k, at element i, is a
    counter-based hash of (the float32 bits of x_T[i], k) turned Gaussian (Box-Muller on two 24-bit uniforms).

    A sampler that re-injects this noise is deterministic: the same x_T gives the same output, with no generator.
    Each draw is independent of x_T's values and of the other draws as far as any statistic of interest goes (the
    hash mixes every input bit), elementwise, so canvases packed into one tensor each get their own noise, the same
    as alone, on any device. Draw shapes must match x_T's.
    """
    bits = x_T.detach().float().contiguous().view(torch.int32).to(torch.int64) & _MASK32
    base = _fmix32(bits ^ 0x9E3779B9)
    count = 0

    def draw(x: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if x.shape != x_T.shape:
            raise ValueError(f"keyed noise draws the shape of x_T {tuple(x_T.shape)}, not {tuple(x.shape)}")
        count += 1
        key = (count * 0x27D4EB2F) & _MASK32
        h1 = _fmix32(base ^ key)
        h2 = _fmix32(h1 ^ 0x165667B1)
        u1 = ((h1 >> 8).to(torch.float64) + 0.5) / (1 << 24)  # (0, 1), never 0
        u2 = (h2 >> 8).to(torch.float64) / (1 << 24)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(device=x.device, dtype=x.dtype)

    return draw


def gaussian_noise(generator: torch.Generator | None) -> NoiseSampler:
    """Standard normal noise shaped like its argument, drawn (in fp32) from ``generator`` on the generator's own
    device, then moved to the argument's device and dtype."""

    def draw(x: torch.Tensor) -> torch.Tensor:
        dev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)

    return draw


def _alphabars(model: Denoiser, t: float, s: float) -> tuple[float, float]:
    """(alphabar_t, alphabar_s) of a step from t to s."""
    ab = np.exp(2.0 * model.schedule.log_alpha(np.array([t, s], dtype=np.float64)))
    return float(ab[0]), float(ab[1])


# ---- samplers ----------------------------------------------------------------------------------------------------

def sample_ddim(model: Denoiser, x: torch.Tensor, ts: np.ndarray, *, noise: NoiseSampler | None = None,
                eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z; eta = 0 is
    deterministic, eta = 1 is DDPM's posterior variance."""
    noise = noise or gaussian_noise(None)
    for i, t in enumerate(ts):
        x0, eps = model(x, float(t))
        if i == len(ts) - 1:
            return x0
        ab_t, ab_s = _alphabars(model, float(t), float(ts[i + 1]))
        c = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * noise(x)
    return x


def sample_ddpm(model: Denoiser, x: torch.Tensor, ts: np.ndarray, *, noise: NoiseSampler | None = None
                ) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, eq. 6-7) on any decreasing grid (respaced: beta = 1 - ab_t / ab_s).

    The ancestral step samples the posterior q(x_s | x_t, x0) with x0 predicted; written with the eps consistent
    with that x0, its mean alpha_s x0 + sqrt(1 - ab_s - c^2) eps and variance c^2 are DDIM's at eta = 1 (Song et
    al. 2021, sec. 4.1), so it is that update."""
    return sample_ddim(model, x, ts, noise=noise, eta=1.0)


def _eta_at(eta: float | Sequence[float], i: int) -> float:
    return float(eta[i]) if isinstance(eta, (list, tuple, np.ndarray)) else float(eta)


def dpmpp_weights(h: float, eta: float = 0.0) -> tuple[float, float, float]:
    """Weights of the x0 terms in one DPM-Solver++ step of log-SNR length h (> 0) with stochasticity eta >= 0.

    The step integrates x0(lambda) against the kernel (1 + eta) e^{-(1 + eta)(h - tau)} over tau in [0, h] (the
    data-prediction form of the probability-flow ODE at eta = 0, of the reverse SDE at eta = 1). With x0 expanded
    as D0 + tau D1 / h + tau^2 D2 / h^2 (D1, D2 the scaled differences of the multistep history), the exact
    integrals are (he = (1 + eta) h)::

        w0 = 1 - e^{-he}
        w1 = 1 - w0 / he                                       (phi_2)
        w2 = 1/2 - (he - 1 + e^{-he}) / he^2 = -(w1 / he - 1/2)   (-phi_3)

    Returns (w0, w1, w2); the update adds alpha_t (w0 D0 + w1 D1 + w2 D2). (diffusers' third-order
    ``sde-dpmsolver++`` step, added in its PR #9104, writes the constant of w2 as -1/2: its D2 weight does not
    vanish as h -> 0; k-diffusion's ``dpmpp_3m_sde`` agrees with these.)
    """
    he = h * (1.0 + eta)
    w0 = -math.expm1(-he)
    w1 = 1.0 - w0 / he
    return w0, w1, -(w1 / he - 0.5)


def sample_dpmpp(model: Denoiser, x: torch.Tensor, ts: np.ndarray, *, noise: NoiseSampler | None = None,
                 order: int = 2, eta: float | Sequence[float] = 0.0) -> torch.Tensor:
    """DPM-Solver++ multistep, data prediction, with stochasticity eta (Lu et al. 2022b, Alg. 2 and sec. 5;
    the eta form is k-diffusion's ``dpmpp_2m_sde`` / ``dpmpp_3m_sde``, written here in variance-preserving form).

    One step from lambda_s to lambda_t = lambda_s + h, with D0 the newest x0 prediction and he = (1 + eta) h::

        x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-he}) D0 + [2M / 3M corrections]
              + sigma_t sqrt(1 - e^{-2 eta h}) z

    eta = 0 is the probability-flow ODE solver (DPM-Solver++ 2M / 3M); eta = 1 is SDE-DPM-Solver++, which
    re-injects noise like DDPM. 2M uses the midpoint correction alpha_t (1 - e^{-he}) (D0 - D1) / (2 r); 3M the
    exact weights of ``dpmpp_weights``. Lower order at warm-up and at the end (the last update returns x0; 3M takes 2nd
    order just before when N < 15).

    Args:
        order: 1, 2 or 3.
        eta: 0..1, a number or one value per step (e.g. stochastic at high noise, deterministic after).
    """
    if order not in (1, 2, 3):
        raise ValueError("DPM-Solver++ order must be 1, 2 or 3")
    noise = noise or gaussian_noise(None)
    n = len(ts)
    lam = model.schedule.lambda_(ts)
    alpha, sigma = model.schedule.alpha_sigma(ts)
    prev1: torch.Tensor | None = None   # x0 predictions of the two previous steps
    prev2: torch.Tensor | None = None
    for i, t in enumerate(ts):
        x0, _ = model(x, float(t))
        if i == n - 1:
            return x0
        e = _eta_at(eta, i)
        h = lam[i + 1] - lam[i]
        w0, w1, w2 = dpmpp_weights(h, e)
        a_t, s_t = alpha[i + 1], sigma[i + 1]
        k = min(order, i + 1)
        if order == 3 and i == n - 2 and n < 15:
            k = min(k, 2)
        x = torch.mul(x, s_t / sigma[i] * math.exp(-e * h)).add_(x0, alpha=a_t * w0)
        if k == 2:  # midpoint: x += 0.5 a_t w0 (D0 - D1) / r0, without temporaries
            c = 0.5 * a_t * w0 * h / (lam[i] - lam[i - 1])
            x.add_(x0, alpha=c).add_(prev1, alpha=-c)
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            g0 = (x0 - prev1) / r0
            g1 = (prev1 - prev2) / r1
            x.add_(g0 + (r0 / (r0 + r1)) * (g0 - g1), alpha=a_t * w1).add_(g0 - g1, alpha=a_t * w2 / (r0 + r1))
        if e > 0:
            x.add_(noise(x), alpha=s_t * math.sqrt(-math.expm1(-2.0 * e * h)))
        prev1, prev2 = x0, prev1
    return x


def _singlestep_update(model: Denoiser, x: torch.Tensor, t_s: float, t_t: float, k: int, algorithm: str
                       ) -> torch.Tensor:
    """One singlestep DPM-Solver(-++) update of order k from t_s to t_t (Lu et al. 2022a Alg. 1/2, 2022b Alg. 1).

    In both algorithms the first-order map from t_s to an intermediate point, with the model output m (x0 for
    DPM-Solver++, eps for DPM-Solver), is ``first(tt, r h, m)``; the corrections use differences of m."""
    sch = model.schedule
    r1, r2 = (0.5, None) if k == 2 else (1.0 / 3.0, 2.0 / 3.0)
    lam_s, lam_t = (float(v) for v in sch.lambda_([t_s, t_t]))
    h = lam_t - lam_s
    mids = [float(v) for v in sch.t_of_lambda([lam_s + r1 * h] + ([lam_s + r2 * h] if k == 3 else []))]
    a = lambda tt: float(sch.alpha_sigma(tt)[0])  # noqa: E731
    s = lambda tt: float(sch.alpha_sigma(tt)[1])  # noqa: E731
    plus = algorithm == "dpmsolver++"
    which = 0 if plus else 1  # index of the model output the algorithm works with: x0 (++) or eps

    def first(tt: float, rh: float, m: torch.Tensor) -> torch.Tensor:
        if plus:
            return (s(tt) / s(t_s)) * x - a(tt) * math.expm1(-rh) * m
        return (a(tt) / a(t_s)) * x - s(tt) * math.expm1(rh) * m

    # ++ works in e^{-h} with alpha, the noise form in e^{h} with sigma: sign and scale of the corrections
    sign, sc = (-1.0, a) if plus else (1.0, s)
    m_s = model(x, t_s)[which]
    if k == 1:
        return first(t_t, h, m_s)
    u1 = first(mids[0], r1 * h, m_s)
    g1 = model(u1, mids[0])[which] - m_s
    if k == 2:
        return first(t_t, h, m_s) - sc(t_t) / (2 * r1) * math.expm1(sign * h) * g1
    phi = lambda rh: math.expm1(sign * rh) / rh - sign  # noqa: E731  (e^{-+rh} - 1) / rh -+ 1
    u2 = first(mids[1], r2 * h, m_s) - sign * sc(mids[1]) * (r2 / r1) * phi(r2 * h) * g1
    g2 = model(u2, mids[1])[which] - m_s
    return first(t_t, h, m_s) - sign * (sc(t_t) / r2) * phi(h) * g2


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Split ``steps`` model evaluations into singlestep segments: [remainder] + [order]*q + [1 (final x0)].

    The lower-order remainder goes first, at high noise, where its error is damped most by the rest of the
    trajectory (measured on the Gaussian oracle: putting it last made the error non-monotone in steps)."""
    q, r = divmod(steps - 1, order)
    return ([r] if r else []) + [order] * q + [1]


def sample_dpm_single(model: Denoiser, x: torch.Tensor, ts: np.ndarray, *, noise: NoiseSampler | None = None,
                      orders: Sequence[int], algorithm: Literal["dpmsolver", "dpmsolver++"] = "dpmsolver++"
                      ) -> torch.Tensor:
    """Singlestep DPM-Solver of order 1-3 per segment between grid points (Lu et al. 2022a/b); the last segment
    returns x0 at ts[-1]. Deterministic (``noise`` is unused)."""
    if algorithm not in ("dpmsolver", "dpmsolver++"):
        raise ValueError("algorithm must be 'dpmsolver' or 'dpmsolver++'")
    if len(orders) != len(ts) or orders[-1] != 1 or any(k not in (1, 2, 3) for k in orders):
        raise ValueError("need one order (1-3) per grid point, the last one 1")
    for i in range(len(ts) - 1):
        x = _singlestep_update(model, x, float(ts[i]), float(ts[i + 1]), orders[i], algorithm)
    return model(x, float(ts[-1]))[0]


# ---- registry and the one entry point ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """What a method is: its defaults, where its noise comes from, the options it takes.

    Attributes:
        noise: "generator" (fresh noise from the caller's generator: a seed gives the output), "keyed" (noise that
            is a hash of x_T: the output is a function of x_T alone, no generator) or "none" (never draws).
        default_eta: the stochasticity used when none is given (None: the method takes no eta).
        top_order_min_steps: fewest steps at which ``default_order`` is the default; below, one order lower.
    """

    name: str
    default_steps: int
    default_spacing: str
    noise: Literal["generator", "keyed", "none"]
    orders: tuple[int, ...] = ()
    default_order: int | None = None
    default_eta: float | None = None
    summary: str = ""
    top_order_min_steps: int = 1

    @property
    def stochastic(self) -> bool:
        """True when the output depends on a generator besides x_T."""
        return self.noise == "generator"

    def order_for(self, steps: int) -> int | None:
        """The default order at ``steps`` model evaluations: ``default_order``, one lower below
        ``top_order_min_steps``."""
        if self.default_order is not None and steps < self.top_order_min_steps:
            return self.default_order - 1
        return self.default_order


#: Fewest steps at which dpm and dpm-sde default to the third order. With few, long steps the third-order
#: multistep correction extrapolates from the first, poorest x0 predictions (at t = 999 the shipped model's are off
#: by 0.4x to 4.6x in brightness): on held-out crops 3M SDE gave 14.0 dB at 5 steps against 18.8 dB for 2M; from
#: 7 steps on 3M wins (22.4 against 21.6 dB at 7, 25.2 against 23.7 at 10; benchmarks/RESULTS.md, session 3).
THIRD_ORDER_MIN_STEPS = 7

SPECS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("ddpm", 1000, "linspace", "generator", summary="ancestral DDPM (Ho et al. 2020), the paper's sampler"),
    SamplerSpec("ddim", 50, "linspace", "generator", default_eta=0.0,
                summary="DDIM (Song et al. 2021); --eta > 0 makes it stochastic"),
    SamplerSpec("dpm", 10, "logSNR", "keyed", (1, 2, 3), 3, 1.0,
                "DPM-Solver++ multistep (Lu et al. 2022b), 3rd order; deterministic: the noise it re-injects (eta "
                "1) is a hash of the starting noise, so the output is a function of x_T alone (eta 0: the ODE)",
                THIRD_ORDER_MIN_STEPS),
    SamplerSpec("dpm-sde", 10, "logSNR", "generator", (1, 2, 3), 3, 1.0,
                "SDE-DPM-Solver++ multistep, 3rd order: re-injects fresh noise like DDPM", THIRD_ORDER_MIN_STEPS),
    SamplerSpec("dpm-single", 20, "logSNR", "none", (1, 2, 3), 3,
                summary="singlestep DPM-Solver (Lu et al. 2022a), the paper's fast sampler: deterministic"),
)}
SAMPLERS: tuple[str, ...] = tuple(SPECS)
#: the sampler every entry point (library, CLI, benchmark) uses unless told otherwise
DEFAULT_METHOD = "dpm-sde"
DEFAULT_STEPS: dict[str, int] = {k: s.default_steps for k, s in SPECS.items()}


def check_options(method: str, *, steps: int | None = None, eta: float | None = None, order: int | None = None,
                  spacing: str | None = None, clip_x0: float | None = 1.0) -> SamplerSpec:
    """Validate a sampler configuration before any compute; returns the method's spec. Raises ValueError naming
    the option. (The grid itself is checked against the model's schedule when sampling.)"""
    spec = SPECS.get(method)
    if spec is None:
        raise ValueError(f"unknown sampler {method!r}; choose from {', '.join(SAMPLERS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if eta is not None:
        if spec.default_eta is None:
            raise ValueError(f"{method} takes no eta (only {', '.join(k for k, v in SPECS.items() if v.default_eta is not None)} do)")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if order is not None and order not in spec.orders:
        raise ValueError(f"{method} takes no order" if not spec.orders else
                         f"{method} takes order {', '.join(map(str, spec.orders))}, not {order}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and math.isfinite(clip_x0) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be a positive number or None, got {clip_x0!r}")
    return spec


def _grid(schedule: Schedule, steps: int, spacing: str, timesteps: Sequence[float] | np.ndarray | None
          ) -> np.ndarray:
    if timesteps is None:
        return schedule.timesteps(steps, spacing)  # type: ignore[arg-type]
    ts = np.asarray(timesteps, dtype=np.float64)
    if ts.ndim != 1 or len(ts) == 0 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) >= 0):
        raise ValueError("timesteps must be a non-empty strictly decreasing sequence of finite numbers")
    if ts[0] > schedule.num_timesteps - 1 or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}]")
    return ts


def sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: Schedule, method: str = DEFAULT_METHOD,
           steps: int | None = None, eta: float | None = None, generator: torch.Generator | None = None, *,
           noise: NoiseSampler | None = None, timesteps: Sequence[float] | np.ndarray | None = None,
           spacing: Spacing | None = None, order: int | None = None,
           algorithm: Literal["dpmsolver", "dpmsolver++"] = "dpmsolver++", clip_x0: float | None = 1.0,
           callback: Callback | None = None) -> torch.Tensor:
    """Draw x0 from the reverse process starting at x_T.

    Args:
        eps_fn: noise predictor, see the module docstring.
        x_T: starting noise (standard normal), float32 (or float64 for tests); [B, C, H, W] or any shape with the
            batch first.
        schedule: the schedule the model was trained with.
        method: one of ``SAMPLERS`` (default ``DEFAULT_METHOD``); see ``SPECS`` for each one's summary.
        steps: model evaluations (default per method: ``DEFAULT_STEPS``).
        eta: stochasticity in [0, 1] of ddim, dpm and dpm-sde (0: the deterministic ODE step; defaults in SPECS);
            other methods refuse it.
        generator: source of the noise drawn during sampling by the generator-noise methods (``SPECS[m].noise``),
            unless ``noise`` is given.
        noise: a NoiseSampler (overrides ``generator``). ``dpm`` always draws keyed noise (``keyed_noise(x_T)``):
            its output is a function of x_T alone.
        timesteps: explicit decreasing grid (training units) overriding ``steps``/``spacing``.
        spacing: grid spacing, see Schedule.timesteps (default per method).
        order: solver order, 1-3 (default: ``SPECS[method].order_for(steps)``).
        algorithm: dpm-single only: "dpmsolver++" (data prediction, default) or "dpmsolver" (noise prediction).
        clip_x0: static clamp of the x0 prediction, or None.
        callback: called as callback(evaluations_done, evaluations_total) after every model evaluation.
    Returns:
        x0 with the shape and dtype (fp32 / fp64) of x_T.
    """
    spec = check_options(method, steps=steps, eta=eta, order=order, spacing=spacing, clip_x0=clip_x0)
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32))
    noise = keyed_noise(x) if spec.noise == "keyed" else (noise or gaussian_noise(generator))
    eta = spec.default_eta if eta is None else eta
    k = order or spec.order_for(len(timesteps) if timesteps is not None else steps or spec.default_steps)
    if method == "dpm-single" and timesteps is None:
        orders = singlestep_orders(steps or spec.default_steps, int(k))  # type: ignore[arg-type]
        ts = _grid(schedule, len(orders), spacing or spec.default_spacing, None)
    else:
        ts = _grid(schedule, steps or spec.default_steps, spacing or spec.default_spacing, timesteps)
        orders = [int(k)] * (len(ts) - 1) + [1] if method == "dpm-single" else []  # type: ignore[arg-type]
    total = sum(orders) if method == "dpm-single" else len(ts)
    model = Denoiser(eps_fn, schedule, clip_x0=clip_x0, callback=callback, total=total)
    if method == "ddpm":
        return sample_ddpm(model, x, ts, noise=noise)
    if method == "ddim":
        return sample_ddim(model, x, ts, noise=noise, eta=float(eta or 0.0))
    if method == "dpm-single":
        return sample_dpm_single(model, x, ts, noise=noise, orders=orders, algorithm=algorithm)
    return sample_dpmpp(model, x, ts, noise=noise, order=int(k), eta=float(eta or 0.0))  # type: ignore[arg-type]
