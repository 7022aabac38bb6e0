"""Schedules and timestep grids."""

from __future__ import annotations

import numpy as np
import pytest

from rawdiff_infer.schedule import SPACINGS, Schedule, ScheduleConfig


def test_scaled_linear_is_linear_in_sqrt_beta() -> None:
    s = Schedule()
    sb = np.sqrt(s.betas)
    assert np.allclose(np.diff(sb), np.diff(sb)[0])
    assert s.betas[0] == pytest.approx(0.0015) and s.betas[-1] == pytest.approx(0.0195)
    lin = Schedule(ScheduleConfig(kind="linear"))
    assert np.allclose(np.diff(lin.betas), np.diff(lin.betas)[0])
    assert s.betas.dtype == np.float64


def test_alphabar_and_lambda() -> None:
    s = Schedule()
    assert s.alphas_cumprod[0] == pytest.approx(1 - 0.0015)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    a, sg = s.alpha_sigma(np.arange(1000))
    assert np.allclose(a**2 + sg**2, 1.0)
    lam = s.lambda_(np.arange(1000))
    assert np.all(np.diff(lam) < 0)
    # inverse of lambda, at fractional points too
    t = np.array([0.0, 0.25, 17.5, 500.0, 998.9, 999.0])
    assert np.allclose(s.t_of_lambda(s.lambda_(t)), t, atol=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50, 1000])
def test_grids_decrease_within_range(spacing: str, steps: int) -> None:
    s = Schedule()
    ts = s.timesteps(steps, spacing)
    assert len(ts) == steps and ts.dtype == np.float64
    assert np.all(np.diff(ts) < 0)
    assert ts.min() >= 0 and ts.max() <= 999


def test_known_grids() -> None:
    s = Schedule()
    assert list(s.timesteps(5, "linspace")) == [999, 749, 500, 250, 0]
    assert list(s.timesteps(4, "leading")) == [750, 500, 250, 0]
    assert list(s.timesteps(4, "trailing")) == [999, 749, 499, 249]
    ls = s.timesteps(6, "logSNR")
    assert ls[0] == 999 and ls[-1] == 0
    assert np.allclose(np.diff(s.lambda_(ls)), np.diff(s.lambda_(ls))[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ScheduleConfig(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError):
        Schedule().timesteps(0)
    with pytest.raises(ValueError):
        Schedule().timesteps(10, "bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(kind="linear", num_timesteps=100_000, beta_start=0.5, beta_end=0.9), "beta_end", "underflows"),
    (dict(kind="linear", num_timesteps=2000, beta_start=0.01, beta_end=0.06), "beta_end", "alphabar_T"),
    (dict(beta_start=1e-300, beta_end=0.02), "beta_start", "no noise"),
    (dict(kind="linear", num_timesteps=2, beta_start=1e-17, beta_end=1e-16), "beta_start", "no noise"),
])
def test_degenerate_schedules_are_refused(kwargs, field, words) -> None:
    """alphabar underflowing to 0 (log-SNR -inf: NaN grids and sampler coefficients) or staying at 1 (no noise)."""
    with pytest.raises(ValueError) as e:
        ScheduleConfig(**kwargs)
    assert str(e.value).startswith(f"{field}: ") and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [dict(), dict(kind="linear", beta_start=1e-4, beta_end=0.02),
                                    dict(kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=4000),
                                    dict(num_timesteps=2, beta_start=1e-6, beta_end=0.999)])
def test_accepted_schedules_give_finite_grids(kwargs) -> None:
    s = Schedule(ScheduleConfig(**kwargs))
    assert np.all(np.diff(s.alphas_cumprod) < 0) and s.alphas_cumprod[-1] > 0
    for spacing in SPACINGS:
        ts = s.timesteps(2, spacing)
        a, sg = s.alpha_sigma(ts)
        assert np.all(np.isfinite(ts)) and np.all(np.isfinite(s.lambda_(ts))) and np.all(a > 0) and np.all(sg > 0)
