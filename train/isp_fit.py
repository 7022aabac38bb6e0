"""Fit a camera's global ISP (``rawdiff_infer.isp.IspModel``) to (sRGB, linear RAW) pairs whose renderer is unknown.

The model fitted is the runtime's (``isp.py``): per pixel ``v = round(L * f(clamp(A @ raw, 0, 1)))`` with one 3 x 3
matrix ``A = gain * M`` and one strictly increasing curve ``f`` shared by the three channels (a "lut" IspCurve).
:func:`fit_isp` alternates two steps, starting from the sRGB OETF as the curve:

1. the matrix, by weighted least squares in the linear domain, ``mean f^-1(srgb) ~ A @ mean raw`` over 8 x 8
   blocks (the relation is linear, so it holds for block means wherever nothing is clipped; averaging removes
   most of the RAW's noise and of the demosaicing differences, which per pixel bias the fit towards a less
   saturated matrix: on the Canon 550D file 0.59 off in an entry per pixel, 0.02 with 8 x 8 blocks), on the
   blocks clipped neither in the RAW (sensor saturation) nor in the sRGB (near black or white in a channel,
   judged by the previous fit's prediction so that output noise does not choose), each residual weighted by the
   curve's slope there, so that what is minimised is (to first order) the error in output levels;
2. the curve, by isotonic regression (pool-adjacent-violators) of the sRGB values on ``l = A @ raw`` (three
   channels pooled) over bins that are the output levels (edges where the current curve crosses the half
   levels, so each bin's means sit mid-step and the fit does not trace the quantisation staircase), then
   rescaled so that ``l = 1`` is where the curve reaches 1 (``A`` is divided by that level: the pair (A, f) is
   only defined up to that scale otherwise): half a level past the white onset, the l at which half the outputs
   are white (isotonic regression of that indicator, so noise on the output does not move it), or, where
   nothing is white, extrapolated along the slope of the curve's top. White pixels only say that the curve has
   reached 1 and are left out of the curve itself.

The table is made strictly increasing by blending in a ramp of weight 1e-6 (at most 3e-4 output levels at 8 bits),
as the runtime needs an invertible curve. ``gain`` is the mean row sum of ``A`` (the matrix of a white-balanced RAW
keeps white, so its rows sum to about 1), ``M = A / gain``.

The residual that goes into a model's provenance (:func:`isp_residual`): RMS of ``render(raw) - srgb`` in output
levels over (a seeded sample of) all pixels, and the PSNR ``20 log10(L / rms)`` on that scale.

Also here: :func:`isp_close` / :func:`common_isp` (do several ISPs agree, e.g. per RAW file of one camera) and
:func:`isp_summary` (one line naming an ISP, for messages).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rawdiff_infer.isp import IspCurve, IspModel
from rawdiff_infer.validate import SchemaError

__all__ = ["fit_isp", "isp_residual", "isotonic", "isp_close", "common_isp", "isp_summary", "DEFAULT_LUT_SIZE"]

#: entries of a fitted curve table (linear interpolation between them: < 0.1 output levels at 8 bits on sRGB)
DEFAULT_LUT_SIZE = 1024
#: blend weight of the ramp that makes a fitted table strictly increasing
_RAMP = 1e-6
#: RAW values at or above this count as saturated (the RAW convention clips at 1)
_RAW_SATURATED = 1.0 - 1e-6
#: the matrix step uses pixels whose sRGB channels all lie this far (of the range; in levels at 8 bits) from
#: black and white, first in the output itself, then in the output the previous fit predicts (see _fit_matrix)
_MARGIN_FIRST = 8.0 / 255.0
_MARGIN = 2.0 / 255.0


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

def _as_list(images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
    """One H x W x 3 image or a sequence of them -> a list of numpy arrays (torch tensors moved to the CPU)."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    out = []
    for im in images:
        a = im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"images must be H x W x 3, got shape {a.shape}")
        out.append(a)
    return out


def _unit(a: np.ndarray) -> np.ndarray:
    """uint8 -> /255, uint16 -> /65535, floats as they are (expected in [0, 1]); float64."""
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"images must be uint8, uint16 or float, got {a.dtype}")
    return a.astype(np.float64)


def _sample(srgb: Sequence[np.ndarray], raw: Sequence[np.ndarray], max_pixels: int,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x): [N, 3] float64 sRGB in [0, 1] and linear RAW in [0, 1] from aligned pairs, at most ``max_pixels``
    pixels drawn (seeded, with replacement) in proportion to each pair's size; every pixel when they fit."""
    if len(srgb) != len(raw) or not srgb:
        raise ValueError(f"need as many sRGB images as RAWs, at least one (got {len(srgb)} and {len(raw)})")
    sizes = []
    for s, r in zip(srgb, raw):
        if s.shape != r.shape:
            raise ValueError(f"sRGB {s.shape} and RAW {r.shape} are not aligned")
        sizes.append(s.shape[0] * s.shape[1])
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    ys, xs = [], []
    for s, r, n in zip(srgb, raw, sizes):
        s2, r2 = s.reshape(-1, 3), r.reshape(-1, 3)
        if total > max_pixels:
            idx = rng.integers(0, n, size=max(1, int(round(max_pixels * n / total))))
            s2, r2 = s2[idx], r2[idx]
        ys.append(_unit(s2))
        xs.append(np.clip(_unit(r2), 0.0, 1.0))
    y, x = np.concatenate(ys), np.concatenate(xs)
    if not (np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError("the images hold NaN or infinite values")
    return np.clip(y, 0.0, 1.0), x


def _blocks(srgb: Sequence[np.ndarray], raw: Sequence[np.ndarray], block: int, max_blocks: int,
            seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(yb, xm, xmax, b): non-overlapping b x b blocks of aligned pairs, at most ``max_blocks`` (seeded, in
    proportion to each pair's blocks): yb [N, b*b, 3] float32 sRGB in [0, 1], xm [N, 3] float64 the RAW's mean
    per block, xmax [N] its largest value. ``b`` is ``block``, halved until the pairs hold 256 blocks (1 at
    worst: pixels)."""
    b = max(1, int(block))
    while b > 1 and sum((s.shape[0] // b) * (s.shape[1] // b) for s in srgb) < 256:
        b //= 2
    counts = [(s.shape[0] // b) * (s.shape[1] // b) for s in srgb]
    total = sum(counts)
    rng = np.random.default_rng(seed + 1)
    ys, xms, xmx = [], [], []
    for s, r, n in zip(srgb, raw, counts):
        if n == 0:
            continue
        take = rng.choice(n, size=max(1, int(round(max_blocks * n / total))), replace=False) if total > max_blocks \
            else np.arange(n)
        by, bx = np.divmod(take, s.shape[1] // b)  # gather the chosen blocks only (no copy of the whole image)
        rows = (by[:, None] * b + np.arange(b))[:, :, None]
        cols = (bx[:, None] * b + np.arange(b))[:, None, :]
        yy = s[rows, cols].reshape(take.size, b * b, 3)
        xx = np.clip(_unit(r[rows, cols].reshape(take.size, b * b, 3)), 0.0, 1.0)
        ys.append(np.clip(_unit(yy), 0.0, 1.0).astype(np.float32))
        xms.append(xx.mean(axis=1))
        xmx.append(xx.max(axis=(1, 2)))
    return np.concatenate(ys), np.concatenate(xms), np.concatenate(xmx), b


# --------------------------------------------------------------------------------------------------------------
# Isotonic regression and the curve
# --------------------------------------------------------------------------------------------------------------

def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of the sequence ``y`` (pool adjacent violators), O(n).

    Args:
        y: 1-D values in any units.
        w: positive weights (None: all 1).
    Returns the fitted values, same length and units as ``y``.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if w.shape != y.shape or np.any(w <= 0):
        raise ValueError("isotonic: weights must be positive, one per value")
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, n2 = vals.pop(), wts.pop(), sizes.pop()
            v1, w1, n1 = vals.pop(), wts.pop(), sizes.pop()
            vals.append((v1 * w1 + v2 * w2) / (w1 + w2))
            wts.append(w1 + w2)
            sizes.append(n1 + n2)
    return np.repeat(np.asarray(vals), sizes)


def _level_isotonic(lin: np.ndarray, y: np.ndarray, curve: IspCurve,
                    levels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(l, f, white): the isotonic fit of y on lin (1-D, lin >= 0) at the mean l of each output level's bin, and
    how many pixels are white (left out of the fit: their l says only that the curve has reached 1).

    The bins are the output levels (grouped into at most 4096), their edges where ``curve`` (the current estimate)
    crosses the half levels: the mean l and mean y of a bin then sit in the middle of a quantisation step, so
    the fit passes through the steps' midpoints instead of tracing the staircase of the quantised output.
    """
    nb = min(levels, 4096)
    edges = _inverse(curve, (np.arange(nb) + 0.5) / nb)
    idx = np.searchsorted(edges, lin, side="right")
    white = idx == nb
    idx, lin, y = idx[~white], lin[~white], y[~white]
    if idx.size < 16:
        raise ValueError("cannot fit an ISP: (nearly) every pixel is white in the sRGB")
    count = np.bincount(idx, minlength=nb).astype(np.float64)
    sum_l = np.bincount(idx, weights=lin, minlength=nb)
    sum_y = np.bincount(idx, weights=y, minlength=nb)
    keep = count > 0
    return sum_l[keep] / count[keep], isotonic(sum_y[keep] / count[keep], count[keep]), int(white.sum())


def _white_onset(lin: np.ndarray, y: np.ndarray, levels: int) -> float | None:
    """The l at which half the outputs are white (within half a level of 1): isotonic regression of that
    indicator on l, finely binned; where the curve crosses L - 1/2 levels even with noise on the output. None
    when fewer than 16 values are white."""
    white = y >= 1.0 - 0.5 / levels
    if white.sum() < 16:
        return None
    hi = float(lin.max())
    idx = np.minimum((lin / hi * 4096).astype(np.int64), 4095)
    count = np.bincount(idx, minlength=4096).astype(np.float64)
    keep = count > 0
    centres = np.bincount(idx, weights=lin, minlength=4096)[keep] / count[keep]
    frac = isotonic(np.bincount(idx, weights=white.astype(np.float64), minlength=4096)[keep] / count[keep],
                    count[keep])
    k = int(np.argmax(frac >= 0.5)) if np.any(frac >= 0.5) else -1
    if k < 0:
        return None
    if k == 0:
        return float(centres[0])
    t = (0.5 - frac[k - 1]) / (frac[k] - frac[k - 1])
    return float(centres[k - 1] + t * (centres[k] - centres[k - 1]))


def _white_level(centres: np.ndarray, fitted: np.ndarray, onset: float | None, levels: int) -> float:
    """The linear level at which the fitted curve reaches 1, > 0: half a level (along the curve's top slope) past
    the white onset where there is one; else extrapolated from the top of the curve (the last four points, at
    least the top 5 % of its range) along its slope."""
    below = centres < onset if onset is not None else np.ones(centres.size, dtype=bool)
    c, f = (centres[below], fitted[below]) if below.sum() >= 2 else (centres, fitted)
    top = np.zeros(c.size, dtype=bool)
    top[-4:] = True
    top |= c >= c[-1] * 0.95
    slope = 0.0
    if top.sum() >= 2 and np.ptp(c[top]) > 0:
        slope = float(np.polyfit(c[top], f[top], 1)[0])
    if not slope > 0:
        slope = float(f[-1] / max(c[-1], 1e-12))
    if onset is not None:
        return float(max(onset + (0.5 / levels) / slope if slope > 0 else onset, 1e-12))
    if not slope > 0:
        return float(max(c[-1], 1e-12))
    return float(max(c[-1] + max(1.0 - f[-1], 0.0) / slope, 1e-12))


def _curve_table(centres: np.ndarray, fitted: np.ndarray, scale: float, n: int) -> np.ndarray:
    """Strictly increasing table of n values in [0, 1] at u = i / (n - 1) from the fit at l = u * scale, through
    (0, 0) and reaching 1 at u = 1."""
    u = centres / scale
    keep = u < 1.0
    pts_u = np.concatenate([[0.0], u[keep], [1.0]])
    pts_f = np.concatenate([[0.0], fitted[keep], [1.0]])
    if pts_u.size > 2 and pts_u[1] == 0.0:  # a bin of exact zeros: its own value, not the anchor
        pts_u, pts_f = pts_u[1:], pts_f[1:]
    grid = np.linspace(0.0, 1.0, n)
    table = np.maximum.accumulate(np.clip(np.interp(grid, pts_u, pts_f), 0.0, 1.0))
    return table * (1.0 - _RAMP) + _RAMP * grid


# --------------------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------------------

def _forward(curve: IspCurve, x: np.ndarray) -> np.ndarray:
    """``curve.forward`` on a float64 array (a table through np.interp: several times faster than torch here)."""
    if curve.kind == "lut":
        return np.interp(np.clip(x, 0.0, 1.0), np.linspace(0.0, 1.0, len(curve.lut)), curve.lut)
    return curve.forward(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _inverse(curve: IspCurve, y: np.ndarray) -> np.ndarray:
    """``curve.inverse`` on a float64 array."""
    if curve.kind == "lut":
        return np.interp(np.clip(y, 0.0, 1.0), curve.lut, np.linspace(0.0, 1.0, len(curve.lut)))
    return curve.inverse(torch.from_numpy(np.ascontiguousarray(y))).numpy()


def _curve_inverse_and_slope(curve: IspCurve, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f^-1(y), f'(f^-1(y))) of an IspCurve on float64 arrays (slope by central differences, step 1e-5)."""
    t = _inverse(curve, y)
    h = 1e-5
    lo, hi = np.clip(t - h, 0.0, 1.0), np.clip(t + h, 0.0, 1.0)
    return t, (_forward(curve, hi) - _forward(curve, lo)) / np.maximum(hi - lo, 1e-12)


def _fit_matrix(blocks: tuple[np.ndarray, np.ndarray, np.ndarray, int], curve: IspCurve,
                a_prev: np.ndarray | None, levels: int) -> tuple[np.ndarray, int]:
    """(A [3, 3], blocks used): weighted least squares of the block means of f^-1(y) on the block means of the RAW
    (``_blocks``; averaging makes the RAW's noise and demosaicing differences, which would bias the fit towards a
    less saturated matrix, average out, while the relation stays exact where nothing is clipped).

    Blocks are used when the RAW is nowhere saturated in them and every output value lies away from black and
    white: by ``_MARGIN_FIRST`` in the output itself for the first fit; then by ``_MARGIN`` in the output the
    previous fit ``a_prev`` predicts from the block's mean (the output's noise does not enter that choice, so
    noisy values near black that hide clipped negatives do not bias the fit), no value clipped at all."""
    yb, xm, xmax, _ = blocks
    y_lo, y_hi = yb.min(axis=(1, 2)), yb.max(axis=(1, 2))
    if a_prev is None:
        ok = (y_lo >= _MARGIN_FIRST) & (y_hi <= 1.0 - _MARGIN_FIRST)
    else:
        lin = xm @ a_prev.T
        pred = _forward(curve, lin)
        ok = (lin.min(axis=1) > 0) & (pred.min(axis=1) >= _MARGIN) & (pred.max(axis=1) <= 1.0 - _MARGIN)
        ok &= (y_lo >= 0.5 / levels) & (y_hi <= 1.0 - 0.5 / levels)
    ok &= xmax < _RAW_SATURATED
    if ok.sum() < 16:
        raise ValueError(f"cannot fit an ISP: only {int(ok.sum())} pixels (or blocks) are clipped neither in the "
                         "RAW nor in the sRGB (need at least 16)")
    t, slope = _curve_inverse_and_slope(curve, yb[ok].astype(np.float64))
    tm, w_all = t.mean(axis=1), np.clip(slope, 1e-3, None).mean(axis=1)
    a = np.empty((3, 3))
    for c in range(3):
        w = w_all[:, c]
        sol, *_ = np.linalg.lstsq(xm[ok] * w[:, None], tm[:, c] * w, rcond=None)
        a[c] = sol
    return a, int(ok.sum())


# --------------------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------------------

def _model(a: np.ndarray, curve: IspCurve, bits: int) -> IspModel:
    """IspModel with gain = mean row sum of A and M = A / gain; ValueError (one line) if that is no valid ISP."""
    gain = float(a.sum(axis=1).mean())
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"cannot fit an ISP: the fitted matrix maps white to {a.sum(axis=1).tolist()}")
    try:
        return IspModel(gain=gain, srgb_from_cam=tuple(float(v) for v in (a / gain).ravel()), curve=curve, clip=1.0,
                        bits=bits)
    except SchemaError as e:
        raise ValueError(f"cannot fit an ISP: {e}") from None


def fit_isp(srgb: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
            raw: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor], *, bits: int = 8,
            lut_size: int = DEFAULT_LUT_SIZE, iterations: int = 4, max_pixels: int = 1_000_000,
            block: int = 8, seed: int = 0) -> tuple[IspModel, dict[str, Any]]:
    """A global ISP fitted to aligned training pairs (module docstring), and its residual.

    Args:
        srgb: H x W x 3 sRGB images (uint8 levels, uint16, or float in [0, 1]); one image or a sequence.
        raw: the aligned linear RAWs, H x W x 3 float in [0, 1] (the project's RAW convention); same count.
        bits: output bit depth of the ISP, 8 or 16 (the levels the residual is measured in).
        lut_size: entries of the fitted curve table, 2..65536.
        iterations: alternations of the matrix and curve steps, >= 1.
        max_pixels: pixels used by the curve step and the residual (a seeded sample when the pairs hold more), and
            in the matrix step's blocks, >= 1000.
        block: side of the blocks the matrix step averages over, >= 1 (halved for pairs too small to give 256).
        seed: seed of the samples.
    Returns (model, residual): ``residual`` holds ``rms_levels`` and ``psnr_db`` (:func:`isp_residual`), the counts
    ``pixels`` (sampled), ``blocks_matrix`` (used by the matrix step, unclipped) and ``pixels_white``,
    ``white_level`` (the linear level, before rescaling, at which the curve reaches 1), and the settings.
    Raises ValueError (one line) for unusable data (misaligned, too few unclipped pixels, a singular fit).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if not 2 <= int(lut_size) <= 65536 or iterations < 1 or max_pixels < 1000 or block < 1:
        raise ValueError("need 2 <= lut_size <= 65536, iterations >= 1, max_pixels >= 1000, block >= 1")
    levels = (1 << bits) - 1
    srgb_l, raw_l = _as_list(srgb), _as_list(raw)
    y, x = _sample(srgb_l, raw_l, int(max_pixels), seed)
    blocks = _blocks(srgb_l, raw_l, block, max(16, int(max_pixels) // max(1, block * block)), seed)
    curve = IspCurve(kind="srgb", tone=0.0)
    a, used, scale = None, 0, 1.0
    for _ in range(iterations):
        a, used = _fit_matrix(blocks, curve, a, levels)
        lin = np.clip(x @ a.T, 0.0, None)
        valid = x.max(axis=1) < _RAW_SATURATED  # a saturated RAW channel does not say where l really is
        lv, yv = lin[valid].ravel(), y[valid].ravel()
        centres, fitted, white = _level_isotonic(lv, yv, curve, levels)
        scale = _white_level(centres, fitted, _white_onset(lv, yv, levels), levels)
        curve = IspCurve(kind="lut", lut=tuple(_curve_table(centres, fitted, scale, int(lut_size)).tolist()))
        a = a / scale
    model = _model(a, curve, bits)
    res = isp_residual(model, y, x)
    return model, {"method": "fit_isp: least-squares matrix + isotonic curve", **res, "blocks_matrix": used,
                   "block": blocks[3], "pixels_white": white, "white_level": scale, "lut_size": int(lut_size),
                   "iterations": int(iterations)}


def isp_residual(isp: IspModel, srgb: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
                 raw: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor], *,
                 max_pixels: int = 1_000_000, seed: int = 0) -> dict[str, Any]:
    """How well ``isp.render(raw)`` reproduces ``srgb``: ``rms_levels`` (RMS difference in the ISP's output levels,
    0..2^bits - 1), ``psnr_db`` (``20 log10(levels / rms)``, inf for a perfect match) and ``pixels`` (compared).

    ``srgb`` / ``raw`` as for :func:`fit_isp`; or already sampled [N, 3] float arrays (sRGB in [0, 1], RAW).
    """
    if isinstance(srgb, np.ndarray) and srgb.ndim == 2:
        y, x = np.clip(_unit(srgb), 0.0, 1.0), np.clip(_unit(np.asarray(raw)), 0.0, 1.0)
    else:
        y, x = _sample(_as_list(srgb), _as_list(raw), int(max_pixels), seed)
    img = torch.from_numpy(np.ascontiguousarray(x.T.reshape(3, -1, 1)))
    out = isp.render(img, quantize=True).reshape(3, -1).numpy().T
    rms = float(np.sqrt(np.mean(((out - y) * isp.levels) ** 2)))
    psnr = float("inf") if rms == 0 else 20.0 * math.log10(isp.levels / rms)
    return {"rms_levels": rms, "psnr_db": psnr, "pixels": int(y.shape[0])}


# --------------------------------------------------------------------------------------------------------------
# Comparing ISPs
# --------------------------------------------------------------------------------------------------------------

def _close(a: float, b: float, tol: float) -> bool:
    """|a - b| <= tol, relative to the larger magnitude where that exceeds 1 (tol > 0, unitless)."""
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def isp_close(a: IspModel | None, b: IspModel | None, *, tol: float = 1e-6) -> bool:
    """Whether two ISPs are the same up to ``tol`` (relative, at least absolute) in every number: gain, matrix,
    clip, the curve's parameters or table; bits and the curve's kind exactly. Two Nones are the same."""
    if a is None or b is None:
        return a is b
    if a.bits != b.bits or a.curve.kind != b.curve.kind or len(a.curve.lut) != len(b.curve.lut):
        return False
    pa = (a.gain, a.clip, a.curve.tone, a.curve.power, a.curve.slope, *a.srgb_from_cam, *a.curve.lut)
    pb = (b.gain, b.clip, b.curve.tone, b.curve.power, b.curve.slope, *b.srgb_from_cam, *b.curve.lut)
    return all(_close(u, v, tol) for u, v in zip(pa, pb))


def common_isp(isps: Sequence[IspModel], *, tol: float = 1e-4) -> IspModel | None:
    """The first ISP if every one agrees with it (:func:`isp_close` at ``tol``), else None (or for no ISP)."""
    if not isps:
        return None
    first = isps[0]
    return first if all(isp_close(first, o, tol=tol) for o in isps[1:]) else None


def isp_summary(isp: IspModel | None) -> str:
    """One line naming an ISP: gain, curve, matrix (4 significant digits), for messages."""
    if isp is None:
        return "no ISP"
    c = isp.curve
    curve = {"srgb": f"sRGB curve, tone {c.tone:.4g}", "gamma": f"gamma ({c.power:.4g}, {c.slope:.4g})",
             "lut": f"{len(c.lut)}-entry curve table"}[c.kind]
    m = ", ".join(f"{v:.4g}" for v in isp.srgb_from_cam)
    return f"gain {isp.gain:.6g}, {curve}, matrix [{m}], {isp.bits} bits"
