"""The tiler: the only place that knows both patches and images.

It turns a patch backend (eps for a batch of P x P patches) into an ``eps_fn(x, t)`` over whole canvases of any
size >= 1 pixel, fused at every sampler step. Two grids:

- **overlap** (the classic): patches every ``stride`` pixels, the last one ending exactly at the border; eps fused
  with a separable window (Hann, linear ramp or uniform) normalised so that the weights covering each pixel sum to
  one; a deterministic scatter (no atomics race: within one ``index_add_`` no two patches overlap). Sides < P are
  padded by reflection to P and cropped back. The sRGB condition is unfolded once per image.
- **shifted**: patches without overlap (stride = P), the whole grid moved by a different offset at every model
  evaluation, so that patch borders never stay in one place and no seam can build up; the canvas is padded by
  reflection where the moved grid overhangs. Each pixel is in exactly one patch per evaluation: about
  (P / stride)^2 fewer patches than the overlap grid (1.8x fewer at stride 48). The offsets follow the R2
  low-discrepancy sequence (Roberts 2018), started at a point set by ``grid_seed``, so they are spread evenly over
  the P x P cell in few steps and are the same for the same seed. ``overlap_last`` evaluations at the end can
  use the overlap grid. Measured on held-out photos at the default 10 evaluations (benchmarks/RESULTS.md, grid
  study), it costs 0.6 dB against the overlap grid, and its last grid leaves faint seams: with so few steps, the
  overlap grid's averaging of about two predictions per pixel is worth more than the patches it saves. The
  overlap grid stays the default.

Several canvases, of different sizes, can be denoised together: their patches share backend calls (small images
fill one batch together), while each canvas keeps its own values. They travel through the sampler *packed*: one
flat tensor [1, L] holding every canvas back to back (:class:`CanvasPack`). The samplers' arithmetic is
elementwise, so a packed canvas is updated exactly as it would be alone. Every backend call has the same number of
patches (the last call of an evaluation is padded with zero patches whose eps is dropped): CPU and GPU kernels
round differently per batch size, and with one batch shape a patch's eps depends on the patch alone, so an image
packed with others gets exactly, bit for bit, the result it gets alone.

The paper's protocol (independent patches, each with its own trajectory, merged only at the end) is
``sample_independent``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .samplers import sample

__all__ = ["CPU_CHUNK", "GRIDS", "WINDOWS", "CanvasPack", "GraphedDenoiser", "NonFiniteOutputError", "PatchGrid",
           "ShiftedGrid", "TileConfig", "TiledDenoiser", "call_size", "grid_offset", "grid_starts",
           "sample_independent", "window_1d"]

Window = Literal["hann", "linear", "uniform"]
Grid = Literal["overlap", "shifted"]
WINDOWS: tuple[str, ...] = ("hann", "linear", "uniform")
GRIDS: tuple[str, ...] = ("overlap", "shifted")
PatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: patches per backend call on the CPU (``TileConfig.chunk``'s default there), chosen by measurement. A CPU call
#: costs about 10 ms plus the same time per patch at any batch size (bundled model, one thread: 98 / 185 / 345 /
#: 703 / 1395 ms for 1 / 2 / 4 / 8 / 16 patches in fp32), so padding is pure waste and large calls gain little.
#: One evaluation, against the unpadded calls of up to 16 before (min of 3, interleaved, fp32 / bf16): 1 patch
#: 1.78x / 1.72x (+0.08 / +0.05 s), 6 patches 1.05x / 1.05x, 25 patches 1.00x / 1.02x, 88 patches 0.99x / 0.97x;
#: chunks of 1 cost 1.04-1.15x on every size, 4 cost 3.4x on 1 patch and 1.35x on 6, 16 cost 13x and 2.8x.
CPU_CHUNK = 2
#: the R2 sequence's generator: 1 / g with g the plastic number, the real root of g^3 = g + 1
_R2 = (1.0 / 1.3247179572447458, 1.0 / 1.3247179572447458 ** 2)


class NonFiniteOutputError(RuntimeError):
    """The model returned NaN or infinite values (a broken model file, or a numerical overflow).

    Attributes:
        bad: indices (into the pack) of the canvases that hold them; empty when unknown.
    """

    def __init__(self, message: str, *, bad: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.bad: tuple[int, ...] = tuple(bad)


@dataclass(frozen=True)
class TileConfig:
    """Patch geometry and batching.

    Attributes:
        patch_size: P, pixels (the model's training patch: 64), a multiple of 8.
        stride: pixels between patch starts on the overlap grid, 1..P (P = no overlap).
        window: blending window of the overlap grid.
        batch_size: patches per backend call at most (>= 1); several canvases share calls up to it.
        merge: "step" (fuse eps at every sampler step) or "end" (paper: independent patches merged at the end).
        grid: "overlap" or "shifted" (see the module docstring); step fusion only.
        grid_seed: where the shifted grid's offset sequence starts (any int >= 0).
        overlap_last: shifted grid only: the last ``overlap_last`` model evaluations use the overlap grid.
        chunk: patches in *every* step-fusion backend call, 1..batch_size: the last call of an evaluation is padded
            with zero patches (their eps dropped), so the backend always sees one batch shape (see the module
            docstring). None: ``CPU_CHUNK`` on the CPU, ``batch_size`` on other devices.
    """

    patch_size: int = 64
    stride: int = 48
    window: Window = "hann"
    batch_size: int = 256
    merge: Literal["step", "end"] = "step"
    grid: Grid = "overlap"
    grid_seed: int = 0
    overlap_last: int = 0
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.patch_size < 8 or self.patch_size % 8:
            raise ValueError("patch_size must be a multiple of 8 (>= 8)")
        if not 1 <= self.stride <= self.patch_size:
            raise ValueError(f"stride must be in 1..{self.patch_size}")
        if self.window not in WINDOWS:
            raise ValueError(f"unknown window {self.window!r}; choose from {', '.join(WINDOWS)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.merge not in ("step", "end"):
            raise ValueError("merge must be 'step' or 'end'")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; choose from {', '.join(GRIDS)}")
        if self.grid == "shifted" and self.merge != "step":
            raise ValueError("the shifted grid is a step-fusion grid (merge='step')")
        if self.grid_seed < 0 or self.overlap_last < 0:
            raise ValueError("grid_seed and overlap_last must be >= 0")
        if self.chunk is not None and not 1 <= self.chunk <= self.batch_size:
            raise ValueError(f"chunk must be in 1..batch_size ({self.batch_size})")


def grid_starts(length: int, patch: int, stride: int) -> np.ndarray:
    """Patch start offsets along one axis of ``length`` >= patch pixels: 0, s, 2s, ... and finally length - patch."""
    if length < patch:
        raise ValueError("length must be >= patch (pad first)")
    n = math.ceil((length - patch) / stride) + 1
    starts = np.minimum(np.arange(n) * stride, length - patch)
    return np.unique(starts)


def grid_offset(k: int, patch: int, seed: int = 0) -> tuple[int, int]:
    """The shifted grid's (row, column) offset, 0..patch-1 each, at model evaluation ``k`` (R2 sequence)."""
    u = (0.5 + (seed + k) * _R2[0]) % 1.0
    v = (0.5 + (seed + k) * _R2[1]) % 1.0
    return int(u * patch), int(v * patch)


def window_1d(kind: Window, patch: int) -> np.ndarray:
    """Strictly positive 1-D window of ``patch`` samples (fp64), peak 1.

    hann: sin^2(pi (u + 0.5) / P); linear: triangular ramp min(u + 0.5, P - u - 0.5) / (P / 2); uniform: ones.
    """
    u = np.arange(patch, dtype=np.float64) + 0.5
    if kind == "hann":
        return np.sin(np.pi * u / patch) ** 2
    if kind == "linear":
        return np.minimum(u, patch - u) / (patch / 2)
    if kind == "uniform":
        return np.ones(patch)
    raise ValueError(f"unknown window {kind!r}")


def _reflect_index(length: int, indices: np.ndarray) -> np.ndarray:
    """Any integer indices (negative or >= length too) folded into 0..length-1 by reflection (edge not repeated)."""
    if length == 1:
        return np.zeros(len(indices), dtype=np.int64)
    period = 2 * (length - 1)
    m = np.mod(indices, period)
    return np.where(m < length, m, period - m).astype(np.int64)


def _min_separation_classes(starts: np.ndarray, patch: int) -> int:
    """Smallest m such that patches j and j + m never overlap (so every m-th patch can be added without conflicts)."""
    for m in range(1, len(starts) + 1):
        if m >= len(starts) or np.all(starts[m:] - starts[:-m] >= patch):
            return m
    return len(starts)


class PatchGrid:
    """The overlap grid of one canvas: patch starts, normalised separable weights, gather / fused scatter.

    Args:
        height, width: canvas size in pixels (>= 1).
        config: TileConfig (patch_size, stride, window).
        device: where index and weight tensors live.
    """

    def __init__(self, height: int, width: int, config: TileConfig, device: torch.device | str = "cpu") -> None:
        if height < 1 or width < 1:
            raise ValueError("canvas must be at least 1 x 1 pixels")
        self.config = config
        self.device = torch.device(device)
        P = config.patch_size
        self.height, self.width = height, width
        self.padded_height, self.padded_width = max(height, P), max(width, P)
        self.ys = grid_starts(self.padded_height, P, config.stride)
        self.xs = grid_starts(self.padded_width, P, config.stride)
        w = window_1d(config.window, P)
        self.wy = self._normalised(self.ys, self.padded_height, w)
        self.wx = self._normalised(self.xs, self.padded_width, w)
        ar = torch.arange(P, device=self.device)
        self.rows = torch.as_tensor(self.ys, device=self.device)[:, None] + ar  # [ny, P]
        self.cols = torch.as_tensor(self.xs, device=self.device)[:, None] + ar  # [nx, P]
        self.col_classes = _min_separation_classes(self.xs, P)
        self.pad_rows = torch.as_tensor(_reflect_index(height, np.arange(self.padded_height)), device=self.device)
        self.pad_cols = torch.as_tensor(_reflect_index(width, np.arange(self.padded_width)), device=self.device)

    def _normalised(self, starts: np.ndarray, length: int, w: np.ndarray) -> torch.Tensor:
        P = len(w)
        total = np.zeros(length)
        for s in starts:
            total[s:s + P] += w
        wn = np.stack([w / total[s:s + P] for s in starts])
        return torch.as_tensor(wn, dtype=torch.float32, device=self.device)  # [n, P]

    @property
    def num_patches(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def shape(self) -> tuple[int, int]:
        """(patch rows, patch columns)."""
        return len(self.ys), len(self.xs)

    def pad(self, canvas: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> [C, H', W'] with sides < P reflected up to P (identity otherwise)."""
        if self.padded_height == self.height and self.padded_width == self.width:
            return canvas
        return canvas[:, self.pad_rows][:, :, self.pad_cols]

    def crop(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas[..., : self.height, : self.width]

    def gather(self, canvas: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Patches start..stop-1 (row-major) of a padded canvas [C, H', W'] -> [n, C, P, P]."""
        k = torch.arange(start, stop, device=self.device)
        nx = len(self.xs)
        r = self.rows[k // nx]  # [n, P]
        c = self.cols[k % nx]
        return canvas[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)

    def scatter(self, acc: torch.Tensor, patches: torch.Tensor, start: int) -> None:
        """acc [C, H', W'] += window-weighted patches start..start+n-1 ([n, C, P, P]); deterministic."""
        nx, P = len(self.xs), self.config.patch_size
        n = patches.shape[0]
        k = start
        while k < start + n:
            i, j0 = divmod(k, nx)
            j1 = min(nx, j0 + (start + n - k))  # this row's patches in the batch: columns j0..j1-1
            row = patches[k - start: k - start + (j1 - j0)]
            row = row * self.wy[i][None, None, :, None] * self.wx[j0:j1][:, None, None, :]
            strip = acc[:, int(self.ys[i]): int(self.ys[i]) + P, :]
            for c in range(self.col_classes):
                first = j0 + ((c - j0) % self.col_classes)
                if first >= j1:
                    continue
                sel = torch.arange(first, j1, self.col_classes, device=self.device)
                data = row[sel - j0].permute(1, 2, 0, 3).reshape(acc.shape[0], P, -1)  # [C, P, m*P]
                strip.index_add_(2, self.cols[sel].reshape(-1), data)
            k += j1 - j0


class ShiftedGrid:
    """A non-overlapping grid of P x P patches moved by (oy, ox): patch (i, j) covers rows i P - oy .. and columns
    j P - ox ..; the canvas is reflected where the grid overhangs it. Every pixel is in exactly one patch.

    Args:
        height, width: canvas size in pixels (>= 1).
        patch: P.
        offset: (oy, ox), each in 0..P-1.
        device: where the index tensors live.
    """

    def __init__(self, height: int, width: int, patch: int, offset: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        oy, ox = offset
        if not (0 <= oy < patch and 0 <= ox < patch):
            raise ValueError(f"offset {offset} outside 0..{patch - 1}")
        self.height, self.width, self.patch, self.offset = height, width, patch, (oy, ox)
        self.device = torch.device(device)
        self.ny, self.nx = -(-(height + oy) // patch), -(-(width + ox) // patch)
        rows = _reflect_index(height, np.arange(self.ny * patch) - oy)
        cols = _reflect_index(width, np.arange(self.nx * patch) - ox)
        self.rows = torch.as_tensor(rows, device=self.device)
        self.cols = torch.as_tensor(cols, device=self.device)

    @property
    def num_patches(self) -> int:
        return self.ny * self.nx

    def gather_all(self, canvas: torch.Tensor) -> torch.Tensor:
        """[C, H, W] -> every patch, row-major, as a view-backed [n, C, P, P] tensor (one padded copy)."""
        P, C = self.patch, canvas.shape[0]
        padded = canvas[:, self.rows][:, :, self.cols]  # [C, ny P, nx P]
        return padded.view(C, self.ny, P, self.nx, P).permute(1, 3, 0, 2, 4).reshape(self.num_patches, C, P, P)

    def merge(self, patches: torch.Tensor) -> torch.Tensor:
        """Every patch [n, C, P, P] (row-major) -> the canvas [C, H, W] they tile (the overhang dropped)."""
        P, C = self.patch, patches.shape[1]
        full = patches.view(self.ny, self.nx, C, P, P).permute(2, 0, 3, 1, 4).reshape(C, self.ny * P, self.nx * P)
        oy, ox = self.offset
        return full[:, oy:oy + self.height, ox:ox + self.width]


class CanvasPack:
    """Several canvases [C, H_i, W_i] back to back in one flat tensor [1, L] (L = sum of C H_i W_i).

    The samplers' update is elementwise, so a pack is advanced exactly as each canvas would be alone.
    """

    def __init__(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        if not shapes:
            raise ValueError("a pack needs at least one canvas")
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        sizes = [c * h * w for c, h, w in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.shapes)

    def pack(self, canvases: Sequence[torch.Tensor]) -> torch.Tensor:
        """[C, H_i, W_i] tensors (or [1, C, H_i, W_i]) -> [1, L]."""
        if len(canvases) != len(self.shapes):
            raise ValueError(f"{len(canvases)} canvases for a pack of {len(self.shapes)}")
        flat = []
        for c, shape in zip(canvases, self.shapes):
            c = c.reshape(c.shape[-3:]) if c.dim() == 4 else c
            if tuple(c.shape) != shape:
                raise ValueError(f"canvas {tuple(c.shape)} does not match the pack's {shape}")
            flat.append(c.reshape(-1))
        return torch.cat(flat)[None]

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[1, L] -> views [C, H_i, W_i] into it."""
        if tuple(x.shape) != (1, self.numel):
            raise ValueError(f"packed tensor {tuple(x.shape)} does not match the pack's (1, {self.numel})")
        flat = x[0]
        return [flat[int(a):int(b)].view(s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]


class _OverlapLayout:
    """One canvas on the overlap grid for one evaluation: gathers patches, accumulates their fused eps."""

    def __init__(self, grid: PatchGrid, canvas: torch.Tensor, cond_patches: torch.Tensor) -> None:
        self.grid, self.cond_patches = grid, cond_patches
        self.padded = grid.pad(canvas.to(grid.device, torch.float32))
        self.acc = torch.zeros(self.padded.shape, dtype=torch.float32, device=grid.device)

    def patches(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grid.gather(self.padded, a, b), self.cond_patches[a:b]

    def put(self, a: int, eps: torch.Tensor) -> None:
        self.grid.scatter(self.acc, eps, a)

    def result(self) -> torch.Tensor:
        return self.grid.crop(self.acc)


class _ShiftedLayout:
    """One canvas on the shifted grid at one offset: every patch gathered at once, eps tiled back."""

    def __init__(self, grid: ShiftedGrid, canvas: torch.Tensor, cond: torch.Tensor) -> None:
        self.grid = grid
        self.xs = grid.gather_all(canvas.to(grid.device, torch.float32))
        self.cs = grid.gather_all(cond)
        self.out = torch.empty(self.xs.shape, dtype=torch.float32, device=grid.device)

    def patches(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xs[a:b], self.cs[a:b]

    def put(self, a: int, eps: torch.Tensor) -> None:
        self.out[a:a + eps.shape[0]] = eps

    def result(self) -> torch.Tensor:
        return self.grid.merge(self.out)


Runs = list[tuple[int, int]]


def call_size(config: TileConfig, device: torch.device, max_batch: int | None = None) -> int:
    """Patches in every step-fusion backend call: ``config.chunk``, else ``CPU_CHUNK`` on the CPU and
    ``batch_size`` elsewhere; never above ``batch_size`` nor the backend's ``max_batch``."""
    size = config.chunk or (CPU_CHUNK if device.type == "cpu" else config.batch_size)
    return max(1, min(size, config.batch_size, max_batch or size))


def _padded(size: int, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each [n, ...] batch brought to [size, ...] by appending zeros (unchanged when n == size)."""
    n = batches[0].shape[0]
    if n == size:
        return batches
    return tuple(torch.cat([b, b.new_zeros((size - n, *b.shape[1:]))]) for b in batches)


def batch_calls(runs: Sequence[Runs], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Backend calls over the canvases' patch runs: lists of (canvas, first patch, stop) segments, each list
    holding at most ``batch_size`` patches, canvases and runs in order."""
    calls: list[list[tuple[int, int, int]]] = [[]]
    room = batch_size
    for ci, canvas_runs in enumerate(runs):
        for a, b in canvas_runs:
            k = a
            while k < b:
                take = min(room, b - k)
                calls[-1].append((ci, k, k + take))
                k += take
                room -= take
                if room == 0:
                    calls.append([])
                    room = batch_size
    return [c for c in calls if c]


def active_runs(grid: PatchGrid, needed: torch.Tensor) -> Runs:
    """Runs (start, stop) of row-major overlap-grid patches that hold at least one needed pixel ([H, W] bool)."""
    m = grid.pad(needed[None].to(grid.device, torch.float32))
    hit = grid.gather(m, 0, grid.num_patches).amax(dim=(1, 2, 3)) > 0
    idx = hit.nonzero()[:, 0].tolist()
    runs: Runs = []
    for k in idx:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


class TiledDenoiser:
    """eps over whole canvases from a patch backend, fused at every step (see the module docstring).

    Args:
        patch_fn: backend-like callable (x_t [N,3,P,P], cond [N,3,P,P], t [N]) -> eps [N,3,P,P] float32;
            ``input_dtype`` / ``device`` attributes are honoured when present.
        cond: the sRGB condition in [-1, 1]: a tensor [B, 3, H, W] (B canvases of one size) or a sequence of
            [3, H_i, W_i] tensors (canvases of any sizes).
        config: TileConfig (merge must be "step").
        steps: the evaluations the sampler will make (needed for ``overlap_last``).
        needed: per canvas, None or an [H_i, W_i] bool mask of the pixels the model must see: patches of the
            overlap grid without any are skipped (their eps is 0 and ``coverage`` says by how much each pixel is
            covered by evaluated patches). Overlap grid only.

    Calling it as ``eps_fn(x, t, step=k)`` (k: the evaluation index, 0-based) takes either x [B, 3, H, W] with t
    [B] (canvases of one size), or the packed form x [1, L] (``self.pack``) with t [1], and returns eps in the same
    layout (float32). Patches of all canvases share backend calls of exactly ``call_size`` patches (the last one
    padded). ``nonfinite`` holds one device flag per canvas, set without a host synchronisation when the backend
    returned NaN or inf for one of its patches; ``check_finite`` raises NonFiniteOutputError naming them.
    """

    takes_step = True

    def __init__(self, patch_fn: PatchFn, cond: torch.Tensor | Sequence[torch.Tensor],
                 config: TileConfig | None = None, *, steps: int | None = None,
                 needed: Sequence[torch.Tensor | None] | None = None) -> None:
        self.patch_fn = patch_fn
        self.config = config or TileConfig()
        if self.config.merge != "step":
            raise ValueError("a TiledDenoiser fuses at every step (merge='step'); use sample_independent")
        conds = list(cond) if not isinstance(cond, torch.Tensor) else list(cond.unbind(0))
        if not conds:
            raise ValueError("no canvas to denoise")
        self.device = torch.device(getattr(patch_fn, "device", conds[0].device))
        self.input_dtype = getattr(patch_fn, "input_dtype", torch.float32)
        self.steps, self._calls = steps, 0
        self.pack = CanvasPack([tuple(c.shape) for c in conds])
        self.grids = [PatchGrid(c.shape[1], c.shape[2], self.config, self.device) for c in conds]
        self.cond_patches = [self._unfold(g, c) for g, c in zip(self.grids, conds)]  # overlap grid, once
        self.conds = [c.to(self.device, self.input_dtype) for c in conds] if self.config.grid == "shifted" else []
        self.runs: list[Runs] = self._active(needed)
        self.nonfinite = torch.zeros(len(conds), dtype=torch.bool, device=self.device)
        self.call_size = call_size(self.config, self.device, getattr(patch_fn, "max_batch_size", None))

    def _active(self, needed: Sequence[torch.Tensor | None] | None) -> list[Runs]:
        if needed is not None and any(m is not None for m in needed) and self.config.grid != "overlap":
            raise ValueError("patch skipping needs the overlap grid")
        needed = list(needed) if needed is not None else [None] * len(self.grids)
        if len(needed) != len(self.grids):
            raise ValueError(f"{len(needed)} masks for {len(self.grids)} canvases")
        return [[(0, g.num_patches)] if m is None else active_runs(g, m) for g, m in zip(self.grids, needed)]

    def _unfold(self, g: PatchGrid, canvas: torch.Tensor) -> torch.Tensor:
        """The condition is unfolded once per image, in the backend's input dtype: [N, 3, P, P]."""
        return g.gather(g.pad(canvas.to(self.device)), 0, g.num_patches).to(self.input_dtype).contiguous()

    @property
    def calls(self) -> int:
        """Evaluations so far (the next evaluation's index when the caller does not pass ``step``)."""
        return self._calls

    @property
    def skipping(self) -> bool:
        """Whether some patches are skipped."""
        return any(r != [(0, g.num_patches)] for r, g in zip(self.runs, self.grids))

    def coverage(self) -> list[torch.Tensor]:
        """Per canvas [1, H, W]: the summed window weight of the evaluated patches (1 where nothing is skipped)."""
        out = []
        for g, runs in zip(self.grids, self.runs):
            acc = torch.zeros((1, g.padded_height, g.padded_width), dtype=torch.float32, device=self.device)
            P = self.config.patch_size
            for a, b in runs:
                g.scatter(acc, torch.ones((b - a, 1, P, P), device=self.device), a)
            out.append(g.crop(acc))
        return out

    @property
    def num_patches(self) -> int:
        """Patches per model evaluation over all canvases (evaluated ones only; on the shifted grid, at offset 0:
        it varies by one row or column with the offset)."""
        if self.config.grid == "shifted":
            P = self.config.patch_size
            return sum(-(-g.height // P) * -(-g.width // P) for g in self.grids)
        return sum(b - a for runs in self.runs for a, b in runs)

    @property
    def canvas_shape(self) -> tuple[int, int, int, int]:
        """[B, 3, H, W] of same-sized canvases (the unpacked layout)."""
        shapes = set(self.pack.shapes)
        if len(shapes) != 1:
            raise ValueError("canvases of several sizes have no common [B, 3, H, W] shape; use the packed form")
        c, h, w = self.pack.shapes[0]
        return len(self.pack.shapes), c, h, w

    def set_condition(self, cond: torch.Tensor) -> None:
        """Swap in the condition of new images of the same size, in place (the buffers keep their addresses, so
        a recorded CUDA graph sees the new images)."""
        if tuple(cond.shape) != self.canvas_shape:
            raise ValueError(f"condition {tuple(cond.shape)} does not match this denoiser's {self.canvas_shape}")
        for g, buf, c in zip(self.grids, self.cond_patches, cond):
            buf.copy_(self._unfold(g, c))
        for buf, c in zip(self.conds, cond):
            buf.copy_(c)

    def bad_canvases(self) -> tuple[int, ...]:
        """Indices of the canvases whose eps was NaN or inf in any call so far (one host synchronisation)."""
        return tuple(int(i) for i in self.nonfinite.nonzero()[:, 0].tolist())

    def check_finite(self) -> None:
        """Raise NonFiniteOutputError if any backend call so far returned NaN or inf (one host synchronisation)."""
        bad = self.bad_canvases()
        if bad:
            raise NonFiniteOutputError("the model returned NaN or infinite values (a broken model file, or a "
                                       "numerical overflow in this precision)", bad=bad)

    def _shifted_at(self, step: int) -> bool:
        if self.config.grid != "shifted":
            return False
        last = self.config.overlap_last
        return not (last and self.steps is not None and step >= self.steps - last)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int | None = None) -> torch.Tensor:
        step = self._calls if step is None else step
        self._calls = step + 1
        packed = x.dim() == 2
        canvases = self.pack.unpack(x) if packed else list(x.unbind(0))
        if not packed and tuple(x.shape) != self.canvas_shape:
            raise ValueError(f"canvas {tuple(x.shape)} does not match this denoiser's {self.canvas_shape}")
        times = [t.reshape(-1)[0]] * len(canvases) if packed else list(t.reshape(-1))
        if self._shifted_at(step):
            P = self.config.patch_size
            offset = grid_offset(step, P, self.config.grid_seed)
            grids = [ShiftedGrid(g.height, g.width, P, offset, self.device) for g in self.grids]
            layouts: list[Any] = [_ShiftedLayout(gr, c, cd) for gr, c, cd in zip(grids, canvases, self.conds)]
            runs = [[(0, gr.num_patches)] for gr in grids]
        else:
            layouts = [_OverlapLayout(g, c, cp) for g, c, cp in zip(self.grids, canvases, self.cond_patches)]
            runs = self.runs
        out = self._evaluate(layouts, runs, times)
        return self.pack.pack(out).to(x.device) if packed else torch.stack(out).to(x.device)

    def _evaluate(self, layouts: list[Any], runs: list[Runs], times: list[torch.Tensor]) -> list[torch.Tensor]:
        """The one batching loop: calls of exactly ``call_size`` patches over all canvases (the last one padded)."""
        for segs in batch_calls(runs, self.call_size):
            parts = [layouts[ci].patches(a, b) for ci, a, b in segs]
            xp, cp = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            tb = torch.cat([times[ci].to(self.device, torch.float32).expand(b - a) for ci, a, b in segs])
            eps = self.patch_fn(*_padded(self.call_size, xp.contiguous(), cp.contiguous(), tb)).float()[:len(xp)]
            k = 0
            for ci, a, b in segs:
                e = eps[k:k + b - a]
                self._flag(ci, e)
                layouts[ci].put(a, e)
                k += b - a
        return [lay.result() for lay in layouts]

    def _flag(self, ci: int, eps: torch.Tensor) -> None:
        bad = ~torch.isfinite(eps).all()
        if self.device.type == "cpu":
            if bool(bad):  # free to check at once on the CPU: fail before more compute
                self.nonfinite[ci] = True
                self.check_finite()
        else:
            self.nonfinite[ci] |= bad


class GraphedDenoiser:
    """A TiledDenoiser whose whole evaluation is recorded once as a CUDA graph and replayed at every step.

    One replay runs what a sampler step needs from the model: gather every patch of the canvas, every batch through
    the U-Net, the windowed fusion. Python, kernel launches and the tiler's small index kernels leave the loop; the
    host only copies x and t in and launches one graph. Needs a ``capturable`` backend on CUDA (the torch backend)
    and the overlap grid (the shifted grid changes its geometry at every call).

    The graph is recorded at the first call (after ``warmup`` eager evaluations on a side stream, which also run
    torch.compile and cuDNN's autotuning); it holds its intermediates in a private memory pool for its lifetime.
    ``set_condition`` swaps in another image of the same size without recording again.

    Args:
        denoiser: the TiledDenoiser to record (its backend must be capturable).
        warmup: eager evaluations before the capture (>= 1).
        eps_fn: what to record, if not the denoiser itself: a pointwise wrapper of it (e.g.
            ``formulation.FormulatedEps``), recorded in the same graph.
    """

    takes_step = True

    def __init__(self, denoiser: TiledDenoiser, warmup: int = 2, *, eps_fn: Callable[..., torch.Tensor] | None = None
                 ) -> None:
        if denoiser.device.type != "cuda" or not getattr(denoiser.patch_fn, "capturable", False):
            raise ValueError("a graphed denoiser needs a capturable backend on a CUDA device")
        if denoiser.config.grid != "overlap":
            raise ValueError("a graphed denoiser needs the overlap grid (the shifted grid moves at every step)")
        if warmup < 1:
            raise ValueError("warmup must be >= 1")
        if denoiser.skipping:
            raise ValueError("a graphed denoiser evaluates every patch (patch skipping changes with the image)")
        self.denoiser, self.warmup = denoiser, warmup
        self.eps_fn = eps_fn if eps_fn is not None else denoiser
        self.device = denoiser.device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._x = torch.zeros(denoiser.canvas_shape, dtype=torch.float32, device=self.device)
        self._t = torch.zeros(denoiser.canvas_shape[0], dtype=torch.float32, device=self.device)
        self._out: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        return self.denoiser.num_patches

    @property
    def canvas_shape(self) -> tuple[int, int, int, int]:
        return self.denoiser.canvas_shape

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.denoiser.nonfinite

    def check_finite(self) -> None:
        self.denoiser.check_finite()

    def set_condition(self, cond: torch.Tensor) -> None:
        """See TiledDenoiser.set_condition."""
        self.denoiser.set_condition(cond)

    def capture(self) -> None:
        """Warm up and record the graph now (otherwise done at the first call). Idempotent.

        Recorded on a side stream of the denoiser's own device (``stream=``: without it torch captures on the
        *current* device, and on cuda:N the kernels would run eagerly elsewhere while replay returns stale eps),
        in ``thread_local`` mode so that another thread pinning memory meanwhile cannot break the capture."""
        if self._graph is not None:
            return
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with self.denoiser.patch_fn.recording():  # type: ignore[attr-defined]
                with torch.cuda.stream(side):
                    for k in range(self.warmup):
                        self.eps_fn(self._x, self._t, step=k)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    self._out = self.eps_fn(self._x, self._t, step=0)
        self._graph = graph

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int = 0) -> torch.Tensor:
        if tuple(x.shape) != self.canvas_shape:
            raise ValueError(f"canvas {tuple(x.shape)} does not match the recorded {self.canvas_shape}")
        self._x.copy_(x)
        self._t.copy_(t)
        self.capture()
        assert self._graph is not None and self._out is not None
        with torch.cuda.device(self.device):  # launched on this device's current stream, wherever the caller is
            self._graph.replay()
        return self._out.clone()  # the caller owns it: the next replay overwrites the graph's buffer

    def close(self) -> None:
        """Drop the graph and its memory pool."""
        self._graph = None
        self._out = None


def sample_independent(patch_fn: PatchFn, cond: torch.Tensor, schedule: Any, config: TileConfig | None = None, *,
                       generator: torch.Generator | None = None, **sampler_kwargs: Any) -> torch.Tensor:
    """The paper's protocol: every patch follows its own trajectory (own noise), patches merged at the end.

    Args:
        patch_fn: as for TiledDenoiser.
        cond: [1, 3, H, W] sRGB condition in [-1, 1].
        schedule: the model's Schedule.
        generator: noise source (patch noise drawn chunk by chunk in row-major patch order).
        **sampler_kwargs: passed to ``samplers.sample`` (method, steps, eta, ...).
    Returns x0 [1, 3, H, W] float32, the window-weighted merge of the per-patch results.
    """
    config = config or TileConfig(stride=64, merge="end")
    device = torch.device(getattr(patch_fn, "device", cond.device))
    in_dtype = getattr(patch_fn, "input_dtype", torch.float32)
    if cond.shape[0] != 1:
        raise ValueError("sample_independent takes one canvas at a time")
    g = PatchGrid(cond.shape[2], cond.shape[3], config, device)
    c = g.pad(cond[0].to(device))
    acc = torch.zeros(c.shape, dtype=torch.float32, device=device)
    P = config.patch_size
    gen_device = generator.device if generator is not None else device
    for k0 in range(0, g.num_patches, config.batch_size):
        k1 = min(k0 + config.batch_size, g.num_patches)
        cp = g.gather(c, k0, k1).to(in_dtype)
        x_T = torch.randn((k1 - k0, 3, P, P), generator=generator, device=gen_device).to(device)

        def eps_fn(x: torch.Tensor, t: torch.Tensor, cp: torch.Tensor = cp) -> torch.Tensor:
            eps = patch_fn(x, cp, t.to(device).expand(x.shape[0])).float()
            if not bool(torch.isfinite(eps).all()):
                raise NonFiniteOutputError("the model returned NaN or infinite values")
            return eps

        x0 = sample(eps_fn, x_T, schedule, generator=generator, **sampler_kwargs)
        g.scatter(acc, x0.float(), k0)
    return g.crop(acc)[None]
