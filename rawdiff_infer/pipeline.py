"""RawReconstructor: sRGB image in, camera RAW out.

Holds a backend, the model's schedule and RAW encoding, sampler settings and tiling options; maps an sRGB array
(H x W x 3, uint8 / uint16) to the reconstructed RAW (H x W x 3 float32, linear and gamma-encoded). Memory stays
bounded for large images: patches are streamed through the backend in batches, the canvas (state, eps and the
solver history) is kept once in fp32 on the backend's device, and the sRGB condition is unfolded once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .backends.base import Backend
from .rawspace import RawEncoding, model_to_unit, srgb_to_model
from .samplers import DEFAULT_STEPS, SAMPLERS, sample
from .schedule import Schedule
from .tiling import GraphedDenoiser, TileConfig, TiledDenoiser, sample_independent

__all__ = ["SamplerConfig", "RawReconstructor", "Reconstruction"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
MAX_ORDER: dict[str, int] = {"dpm": 3, "dpm-sde": 2, "dpm-single": 3}  # solver order range per method


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler choice: method (ddpm | ddim | dpm | dpm-sde | dpm-single; default dpm-sde, the best measured at 20
    evaluations), model evaluations (None: the method's default), DDIM eta in [0, 1], solver order (None: default),
    grid spacing (None: default), x0 clamp (None: off)."""

    method: str = "dpm-sde"
    steps: int | None = None
    eta: float = 0.0
    order: int | None = None
    spacing: str | None = None
    clip_x0: float | None = 1.0

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.method!r}; choose from {', '.join(SAMPLERS)}")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError("steps must be in 1..1000")
        top = MAX_ORDER.get(self.method)
        if self.order is not None and (top is None or not 1 <= self.order <= top):
            raise ValueError(f"order {self.order} does not apply to {self.method}" if top is None else
                             f"{self.method} takes order 1..{top}, not {self.order}")

    @property
    def num_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.method]

    def kwargs(self) -> dict:
        kw: dict = {"method": self.method, "steps": self.num_steps, "eta": self.eta, "clip_x0": self.clip_x0}
        if self.order is not None:
            kw["order"] = self.order
        if self.spacing is not None:
            kw["spacing"] = self.spacing
        return kw


@dataclass
class Reconstruction:
    """Result for one image: RAW in the model's gamma-encoded space and linear, both H x W x 3 float32 in [0, 1]."""

    encoded: np.ndarray
    patches: int
    steps: int
    seconds: float
    gamma: float = 2.2
    extra: dict = field(default_factory=dict)

    @property
    def linear(self) -> np.ndarray:
        return RawEncoding(self.gamma).decode(self.encoded)


class RawReconstructor:
    """Maps sRGB photos to camera RAW with a diffusion backend.

    Args:
        backend: any Backend (torch, onnx, trt); its ``meta`` supplies the schedule, encoding and camera.
        sampler: SamplerConfig.
        tiles: TileConfig (patch size must match the model's training patch unless you know better).
        step_graph: record the whole model evaluation of a sampler step (every patch batch and the fusion) as one
            CUDA graph and replay it (``tiling.GraphedDenoiser``); needs step fusion and a capturable backend on
            CUDA. The graph is kept for the last image size, so a run of same-sized photos records it once. Off by
            default: on an H200 at 2048x2048 (batches of 1024 patches) it measured no faster than per-batch
            launches, since the host already runs ahead of the GPU, and its memory pool holds the U-Net's
            intermediates (+3.5 GiB there). It can help where batches are small and launches dominate.
    """

    def __init__(self, backend: Backend, *, sampler: SamplerConfig | None = None,
                 tiles: TileConfig | None = None, step_graph: bool = False) -> None:
        self.backend = backend
        self.sampler = sampler or SamplerConfig()
        self.tiles = tiles or TileConfig(patch_size=backend.meta.model.patch_size)
        self.schedule = Schedule(backend.meta.schedule)
        self.meta = backend.meta
        if step_graph and not (backend.capturable and backend.device.type == "cuda" and self.tiles.merge == "step"):
            raise ValueError("step_graph needs step fusion (merge='step') and a capturable backend on CUDA "
                             "(the torch backend)")
        self.step_graph = step_graph
        self._graphed: GraphedDenoiser | None = None

    def _denoiser(self, cond: torch.Tensor) -> TiledDenoiser | GraphedDenoiser:
        """The eps function for this image: a fresh TiledDenoiser, or the recorded graph when the size matches."""
        if not self.step_graph:
            return TiledDenoiser(self.backend, cond, self.tiles)
        if self._graphed is not None and self._graphed.canvas_shape == tuple(cond.shape):
            self._graphed.set_condition(cond)
            return self._graphed
        self.close()
        self._graphed = GraphedDenoiser(TiledDenoiser(self.backend, cond, self.tiles))
        return self._graphed

    def close(self) -> None:
        """Drop the recorded step graph (the backend stays open; it belongs to the caller)."""
        if self._graphed is not None:
            self._graphed.close()
            self._graphed = None

    def reconstruct(self, srgb: np.ndarray, *, seed: int = 0, progress: Progress | None = None) -> Reconstruction:
        """sRGB H x W x 3 (uint8, uint16 or float in [0, 1]) -> Reconstruction. Same seed, same output (per device)."""
        if srgb.ndim != 3 or srgb.shape[2] != 3 or min(srgb.shape[:2]) < 1:
            raise ValueError(f"expected an H x W x 3 image, got shape {srgb.shape}")
        start = time.perf_counter()
        dev = self.backend.device
        cond = srgb_to_model(srgb, dev)
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        kw = self.sampler.kwargs()
        with torch.inference_mode():
            if self.tiles.merge == "end":
                patches = _count_patches(cond, self.tiles)
                chunks = -(-patches // self.tiles.batch_size)  # each chunk of patches runs the whole sampler
                x0 = sample_independent(self.backend, cond, self.schedule, self.tiles, generator=gen,
                                        callback=_chunked_progress(progress, chunks), **kw)
                graphed = False
            else:
                eps_fn = self._denoiser(cond)
                x_T = torch.randn(cond.shape, generator=gen, device=dev)
                del cond
                x0 = sample(eps_fn, x_T, self.schedule, generator=gen, callback=progress, **kw)
                patches = eps_fn.num_patches
                graphed = isinstance(eps_fn, GraphedDenoiser)
            # H x W x 3 laid out on the device, so the copy to the host is the only host-side work
            encoded = model_to_unit(x0[0]).permute(1, 2, 0).float().contiguous().cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return Reconstruction(encoded=encoded, patches=patches, steps=self.sampler.num_steps,
                              seconds=time.perf_counter() - start, gamma=self.meta.encoding.gamma,
                              extra={"step_graph": graphed})


def _chunked_progress(progress: Progress | None, chunks: int) -> Progress | None:
    """Progress over ``chunks`` consecutive sampler runs as one count (done, chunks * evaluations per run)."""
    if progress is None:
        return None
    calls = 0

    def cb(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        progress(calls, chunks * total)

    return cb


def _count_patches(cond: torch.Tensor, tiles: TileConfig) -> int:
    from .tiling import PatchGrid

    return PatchGrid(cond.shape[2], cond.shape[3], tiles, "cpu").num_patches
