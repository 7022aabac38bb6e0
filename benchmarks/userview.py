"""What a user waits for: whole photos and folders at the settings rawdiff-infer uses, against the U-Net-only bound.

- ``bench_photo``: one photo of a given size, the default configuration of rawdiff-infer (sampler, steps, grid,
  stride, batch), timed per image (sampler and tiling, from the sRGB array to the RAW on the host).
- ``bench_folder``: a folder of frames written as JPEG files, processed the way rawdiff-infer processes a folder:
  ``sequential`` (decode, denoise, write, one image after another: rawdiff 0.1's loop) and ``pipelined`` (the
  FolderRunner: decode and write threads beside the denoising, small frames packed into shared backend calls),
  side by side in one run; images per second, and the share of the wall time the model was busy (CUDA events
  around every backend call on a GPU; host time inside the calls on the CPU).
- Both report the U-Net-only bound: evaluations x patches x (ms per patch at the batch size used, measured in the
  same run), and the ratio measured / bound (1.0 would be a runtime with no cost outside the U-Net).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from rawdiff_infer.backends.base import Backend

__all__ = ["BusyMeter", "FolderResult", "PhotoResult", "bench_folder", "bench_photo", "synthetic_photo"]


class BusyMeter:
    """Wraps a backend and adds up the time its calls keep the device busy (CUDA events; host time on the CPU)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._events: list[tuple[Any, Any]] = []
        self.host_s = 0.0
        for name in ("meta", "device", "input_dtype", "patch_size", "fixed_patch_size", "capturable",
                     "max_batch_size"):
            setattr(self, name, getattr(backend, name))

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.backend(x_t, cond, t)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.backend(x_t, cond, t)
        self.host_s += time.perf_counter() - t0
        return out

    def busy_s(self) -> float:
        """Seconds of model work so far (synchronises the device)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            return sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        return self.host_s

    def recording(self):  # noqa: ANN201 - delegate for the step graph
        return self.backend.recording()


@dataclass
class PhotoResult:
    label: str
    width: int
    height: int
    sampler: str
    evaluations: int
    patches: int
    seconds: float
    seconds_min: float
    unet_bound_s: float
    ratio_to_bound: float
    peak_mem_mb: float | None
    #: patches the model saw (the rest were determined: with consistency, patches without a clipped pixel take the
    #: closed form); the bound counts these
    evaluated_patches: int | None = None


@dataclass
class FolderResult:
    mode: str
    frames: int
    width: int
    height: int
    seconds: float
    images_per_s: float
    model_busy_share: float
    unet_bound_s: float
    ratio_to_bound: float
    packs: int


def synthetic_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 image (smooth gradients, edges and texture) of the given size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.25 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1) * 220
    img += (x // 97 % 2)[..., None] * 20
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _ms_per_patch(backend: Backend, batch: int, repeats: int = 3) -> float:
    from .bench import bench_unet

    r = bench_unet(backend, batch=batch, patch=backend.patch_size, warmup=1, repeats=repeats)
    return r.ms_median / batch


def _peak(dev: torch.device) -> float | None:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return None


def bench_photo(rec: Any, height: int, width: int, *, label: str = "", repeats: int = 2,
                ms_per_patch: float | None = None, image: np.ndarray | None = None) -> PhotoResult:
    """Time ``rec.reconstruct`` on one photo (one warm-up run first): ``image`` (H x W x 3, height x width), or a
    synthetic one."""
    img = synthetic_photo(height, width) if image is None else image
    dev = rec.backend.device
    rec.reconstruct(img, seed=0)  # warm-up: compilation, allocator, graph capture
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = rec.reconstruct(img, seed=i)
        times.append(time.perf_counter() - t0)
    mpp = ms_per_patch if ms_per_patch is not None else _ms_per_patch(rec.backend, rec.tiles.batch_size)
    evaluated = int(out.extra.get("evaluated_patches", out.patches))
    bound = rec.sampler.num_steps * evaluated * mpp / 1000.0
    med = statistics.median(times)
    return PhotoResult(label or f"{width}x{height}", width, height, rec.sampler.label(), rec.sampler.num_steps,
                       out.patches, med, min(times), bound, med / bound if bound else float("nan"), _peak(dev),
                       evaluated)


def bench_folder(rec: Any, frames: int, height: int, width: int, *, modes: tuple[str, ...] = ("sequential",
                 "pipelined"), max_pack: int = 8, ms_per_patch: float | None = None,
                 frame: Callable[[int], np.ndarray] | None = None,
                 around: Callable[[str], ContextManager[Any]] | None = None) -> list[FolderResult]:
    """A folder of ``frames`` JPEG frames through both loops, side by side (DNG outputs into a temporary folder).

    ``frame(i)``: the i-th frame (height x width x 3 uint8; default: synthetic). ``around(mode)``: a context manager
    entered around each mode's timed run (e.g. a profiler)."""
    from PIL import Image

    from rawdiff_infer.io import read_image, write_dng
    from rawdiff_infer.pipeline import RawReconstructor
    from rawdiff_infer.plan import Job
    from rawdiff_infer.runner import FolderRunner

    mpp = ms_per_patch if ms_per_patch is not None else _ms_per_patch(rec.backend, rec.tiles.batch_size)
    results = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in"
        src.mkdir()
        make = frame or (lambda i: synthetic_photo(height, width, seed=i))
        for i in range(frames):
            Image.fromarray(make(i)).save(src / f"f{i:03d}.jpg", quality=92)
        rec.reconstruct(make(0), seed=0)  # warm-up
        camera = rec.backend.meta.camera
        for mode in modes:
            out = Path(d) / mode
            out.mkdir()
            jobs = [Job(p, {"dng": out / (p.stem + ".dng")}) for p in sorted(src.iterdir())]
            meter = BusyMeter(rec.backend)
            r = RawReconstructor(meter, sampler=rec.sampler, tiles=rec.tiles)  # type: ignore[arg-type]
            scope = around(mode) if around is not None else contextlib.nullcontext()
            scope.__enter__()
            t0 = time.perf_counter()
            packs = 0
            if mode == "sequential":
                for job in jobs:
                    px = read_image(job.source).pixels
                    res = r.reconstruct(px, seed=0)
                    write_dng(job.outputs["dng"], res.linear, camera=camera, preview_srgb=px)
                    packs += 1
            else:
                runner = FolderRunner(r, decode=lambda j: read_image(j.source).pixels,
                                      write=lambda j, res, px: write_dng(j.outputs["dng"], res.linear, camera=camera,
                                                                         preview_srgb=px),
                                      seed=0, fail_on=(), max_pack=max_pack)
                outcomes = runner.run(jobs)
                if not all(o.ok for o in outcomes):
                    raise RuntimeError(f"{sum(not o.ok for o in outcomes)} frames failed in the benchmark")
                packs = runner.stats.packs
            wall = time.perf_counter() - t0
            busy = meter.busy_s()
            scope.__exit__(None, None, None)
            n = r.patches_for(height, width)
            bound = frames * rec.sampler.num_steps * n * mpp / 1000.0
            results.append(FolderResult(mode, frames, width, height, wall, frames / wall, busy / wall, bound,
                                        wall / bound, packs))
    return results
