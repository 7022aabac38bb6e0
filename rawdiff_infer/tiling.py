"""The tiler: the only place that knows both patches and images.

It turns a patch backend (eps for a batch of P x P patches) into an ``eps_fn(x, t)`` over a whole canvas of any
size >= 1 pixel:

- a patch grid per axis with a configurable stride whose last patch ends exactly at the border (no padding for
  sides >= P; sides < P are padded by reflection to P and cropped back);
- patches evaluated in batches of up to ``batch_size``;
- eps fused at every step with a separable window (Hann, linear ramp or uniform) normalised so that the weights of
  the patches covering each pixel sum to one; the fusion is a deterministic scatter (no atomics race: within one
  ``index_add_`` no two patches overlap);
- the sRGB condition unfolded once per image and cached in the backend's input dtype.

The paper's protocol (independent patches, each with its own trajectory, merged only at the end) is
``sample_independent``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch

from .samplers import sample

__all__ = ["TileConfig", "PatchGrid", "TiledDenoiser", "GraphedDenoiser", "grid_starts", "window_1d",
           "sample_independent", "WINDOWS"]

Window = Literal["hann", "linear", "uniform"]
WINDOWS: tuple[str, ...] = ("hann", "linear", "uniform")
PatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TileConfig:
    """Patch geometry and batching.

    patch_size: P, pixels (the model's training patch: 64). stride: pixels between patch starts, 1..P
    (P = no overlap). window: blending window. batch_size: patches per backend call (>= 1).
    merge: "step" (fuse eps at every sampler step) or "end" (paper: independent patches merged at the end).
    """

    patch_size: int = 64
    stride: int = 48
    window: Window = "hann"
    batch_size: int = 256
    merge: Literal["step", "end"] = "step"

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


def grid_starts(length: int, patch: int, stride: int) -> np.ndarray:
    """Patch start offsets along one axis of ``length`` >= patch pixels: 0, s, 2s, ... and finally length - patch."""
    if length < patch:
        raise ValueError("length must be >= patch (pad first)")
    n = math.ceil((length - patch) / stride) + 1
    starts = np.minimum(np.arange(n) * stride, length - patch)
    return np.unique(starts)


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


def _reflect_index(length: int, size: int) -> np.ndarray:
    """Indices 0..size-1 folded into 0..length-1 by reflection (without repeating the edge pixel)."""
    idx = np.arange(size)
    if length == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (length - 1)
    m = idx % period
    return np.where(m < length, m, period - m).astype(np.int64)


def _min_separation_classes(starts: np.ndarray, patch: int) -> int:
    """Smallest m such that patches j and j + m never overlap (so every m-th patch can be added without conflicts)."""
    for m in range(1, len(starts) + 1):
        if m >= len(starts) or np.all(starts[m:] - starts[:-m] >= patch):
            return m
    return len(starts)


class PatchGrid:
    """Geometry of one canvas: patch starts, normalised separable weights, gather / fused-scatter operations.

    Args:
        height, width: canvas size in pixels (>= 1).
        config: TileConfig.
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
        self.pad_rows = torch.as_tensor(_reflect_index(height, self.padded_height), device=self.device)
        self.pad_cols = torch.as_tensor(_reflect_index(width, self.padded_width), device=self.device)

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


class TiledDenoiser:
    """eps over a whole canvas from a patch backend, fused at every step.

    Args:
        patch_fn: backend-like callable (x_t [N,3,P,P], cond [N,3,P,P], t [N]) -> eps [N,3,P,P] float32;
            ``input_dtype`` / ``device`` attributes are honoured when present.
        cond: [B, 3, H, W] sRGB condition in [-1, 1] (B canvases of one size).
        config: TileConfig.
    Calling it as ``eps_fn(x, t)`` with x [B, 3, H, W] and t [B] returns eps [B, 3, H, W] (float32).
    """

    def __init__(self, patch_fn: PatchFn, cond: torch.Tensor, config: TileConfig | None = None) -> None:
        self.patch_fn = patch_fn
        self.config = config or TileConfig()
        self.device = torch.device(getattr(patch_fn, "device", cond.device))
        self.input_dtype = getattr(patch_fn, "input_dtype", torch.float32)
        b, _, h, w = cond.shape
        self.grid = PatchGrid(h, w, self.config, self.device)
        self.cond_patches = [self._unfold(c) for c in cond]

    def _unfold(self, canvas: torch.Tensor) -> torch.Tensor:
        """The condition is unfolded once per image, in the backend's input dtype: [N, 3, P, P]."""
        g = self.grid
        return g.gather(g.pad(canvas.to(self.device)), 0, g.num_patches).to(self.input_dtype).contiguous()

    @property
    def num_patches(self) -> int:
        return self.grid.num_patches

    @property
    def canvas_shape(self) -> tuple[int, int, int, int]:
        """[B, 3, H, W] of the canvases this denoiser takes."""
        return len(self.cond_patches), 3, self.grid.height, self.grid.width

    def set_condition(self, cond: torch.Tensor) -> None:
        """Swap in the condition of new images of the same size, in place (the buffers keep their addresses, so
        a recorded CUDA graph sees the new images)."""
        if tuple(cond.shape) != self.canvas_shape:
            raise ValueError(f"condition {tuple(cond.shape)} does not match this denoiser's {self.canvas_shape}")
        for buf, c in zip(self.cond_patches, cond):
            buf.copy_(self._unfold(c))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g, bs = self.grid, self.config.batch_size
        unpadded = (g.padded_height, g.padded_width) == (g.height, g.width)
        out = None if unpadded and x.shape[0] == 1 and x.device == self.device else torch.empty(
            x.shape, dtype=torch.float32, device=x.device)
        for b in range(x.shape[0]):
            canvas = g.pad(x[b].to(self.device, torch.float32))
            acc = torch.zeros(canvas.shape, dtype=torch.float32, device=self.device)
            for k0 in range(0, g.num_patches, bs):
                k1 = min(k0 + bs, g.num_patches)
                xp = g.gather(canvas, k0, k1)
                tt = t[b].to(self.device, torch.float32).expand(k1 - k0)
                eps = self.patch_fn(xp, self.cond_patches[b][k0:k1], tt)
                g.scatter(acc, eps.float(), k0)
            if out is None:  # one canvas, no padding: the accumulator is the result (saves a canvas copy)
                return acc[None]
            out[b] = g.crop(acc).to(x.device)
        return out


class GraphedDenoiser:
    """A TiledDenoiser whose whole evaluation is recorded once as a CUDA graph and replayed at every step.

    One replay runs what a sampler step needs from the model: gather every patch of the canvas, every batch through
    the U-Net, the windowed fusion. Python, kernel launches and the tiler's small index kernels leave the loop; the
    host only copies x and t in and launches one graph. Needs a ``capturable`` backend on CUDA (the torch backend).

    The graph is recorded at the first call (after ``warmup`` eager evaluations on a side stream, which also run
    torch.compile and cuDNN's autotuning); it holds its intermediates in a private memory pool for its lifetime.
    ``set_condition`` swaps in another image of the same size without recording again.

    Args:
        denoiser: the TiledDenoiser to record (its backend must be capturable).
        warmup: eager evaluations before the capture (>= 1).
    """

    def __init__(self, denoiser: TiledDenoiser, warmup: int = 2) -> None:
        if denoiser.device.type != "cuda" or not getattr(denoiser.patch_fn, "capturable", False):
            raise ValueError("a graphed denoiser needs a capturable backend on a CUDA device")
        if warmup < 1:
            raise ValueError("warmup must be >= 1")
        self.denoiser, self.warmup = denoiser, warmup
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

    def set_condition(self, cond: torch.Tensor) -> None:
        """See TiledDenoiser.set_condition."""
        self.denoiser.set_condition(cond)

    def capture(self) -> None:
        """Warm up and record the graph now (otherwise done at the first call). Idempotent."""
        if self._graph is not None:
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self.denoiser.patch_fn.recording():  # type: ignore[attr-defined]
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.denoiser(self._x, self._t)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self.denoiser(self._x, self._t)
        self._graph = graph

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.canvas_shape:
            raise ValueError(f"canvas {tuple(x.shape)} does not match the recorded {self.canvas_shape}")
        self._x.copy_(x)
        self._t.copy_(t)
        self.capture()
        assert self._graph is not None and self._out is not None
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
    config = config or TileConfig(stride=64)
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
            return patch_fn(x, cp, t.to(device).expand(x.shape[0]))

        x0 = sample(eps_fn, x_T, schedule, generator=generator, **sampler_kwargs)
        g.scatter(acc, x0.float(), k0)
    return g.crop(acc)[None]
