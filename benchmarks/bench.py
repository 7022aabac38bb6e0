"""Latency and throughput measurements for rawdiff backends and samplers.

Two kinds of measurement:
- ``bench_unet``: one U-Net evaluation on a batch of patches: ms per call, patches/s, achieved TFLOP/s (model FLOPs
  counted once with FlopCounterMode, not guessed), peak device memory.
- ``bench_image``: one whole image through RawReconstructor: decode / denoise / write seconds.

Timing method: warm-up calls first (compilation, graph capture, allocator growth), then ``repeats`` timed calls on
fresh random inputs (rotated among several input sets so caches do not flatter the result), CUDA events on GPU or
a synchronised perf_counter on CPU; report the median and the spread (min, max).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rawdiff_infer.backends.base import Backend
from rawdiff_infer import cpu as cpu_info
from rawdiff_infer.model import UNet, UNetConfig, count_flops

__all__ = ["UnetResult", "ImageResult", "bench_unet", "bench_image", "environment", "time_callable",
           "profile_unet", "kernel_category"]

log = logging.getLogger(__name__)


@dataclass
class UnetResult:
    """One U-Net measurement (times in milliseconds)."""

    backend: str
    variant: str
    dtype: str
    batch: int
    patch: int
    ms_median: float
    ms_min: float
    ms_max: float
    patches_per_s: float
    tflops: float
    gflop_per_patch: float
    peak_mem_mb: float | None
    repeats: int


@dataclass
class ImageResult:
    """One whole-image measurement (times in seconds)."""

    backend: str
    variant: str
    sampler: str
    steps: int
    merge: str
    width: int
    height: int
    patches: int
    decode_s: float
    denoise_s: float
    write_s: float
    total_s: float
    denoise_s_min: float
    denoise_s_max: float
    tflops: float
    peak_mem_mb: float | None
    repeats: int
    psnr_db: float | None = None
    step_graph: bool = False


def environment() -> dict[str, Any]:
    """Card, driver and library versions for the report."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    flags = cpu_info.cpu_flags()
    env["cpu_bf16"] = ",".join(f for f in cpu_info.BF16_FLAGS if f in flags) or "none"  # native bf16 flags
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_mem_gb=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # pragma: no cover
            env["driver"] = "unknown"
    for mod in ("onnxruntime", "onnx", "tensorrt", "tensorrt_rtx"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    return env


def time_callable(fn: Callable[[int], Any], *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn(i)`` warmup + repeats times; return the timed durations in seconds (repeats of them)."""
    for i in range(warmup):
        fn(i)
    times = []
    cuda = device.type == "cuda"
    for i in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append(time.perf_counter() - t0)
    return times


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # process peak RSS, MiB (Linux: KiB)
    except Exception:  # pragma: no cover
        return None


def flops_per_patch(config: UNetConfig, patch: int) -> int:
    """Model FLOPs for one patch (counted once on the CPU with FlopCounterMode)."""
    return count_flops(UNet(config), patch_size=patch)


def bench_unet(backend: Backend, *, batch: int, patch: int = 64, variant: str = "", warmup: int = 3,
               repeats: int = 10, input_sets: int = 3, gflop: float | None = None) -> UnetResult:
    """Time ``backend(x_t, cond, t)`` on [batch, 3, patch, patch] random inputs."""
    dev = backend.device
    g = torch.Generator(device="cpu").manual_seed(0)
    sets = [(torch.randn(batch, 3, patch, patch, generator=g).to(dev),
             (torch.rand(batch, 3, patch, patch, generator=g) * 2 - 1).to(dev),
             torch.randint(0, 1000, (batch,), generator=g).float().to(dev)) for _ in range(input_sets)]
    fl = gflop * 1e9 if gflop is not None else flops_per_patch(backend.meta.model, patch)
    _peak_reset(dev)
    times = time_callable(lambda i: backend(*sets[i % input_sets]), device=dev, warmup=warmup, repeats=repeats)
    med = statistics.median(times)
    return UnetResult(backend=backend.name, variant=variant or backend.describe(),
                      dtype=str(backend.input_dtype).removeprefix("torch."), batch=batch, patch=patch,
                      ms_median=med * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3,
                      patches_per_s=batch / med, tflops=fl * batch / med / 1e12, gflop_per_patch=fl / 1e9,
                      peak_mem_mb=_peak_mb(dev), repeats=repeats)


def bench_image(backend: Backend, image: np.ndarray | Path, *, sampler: str = "dpm", steps: int | None = None,
                merge: str = "step", stride: int | None = None, batch_size: int = 512, variant: str = "",
                warmup: int = 1, repeats: int = 3, write: bool = True, seed: int = 0,
                reference: np.ndarray | None = None, gflop: float | None = None,
                step_graph: bool = False) -> ImageResult:
    """Time one image end to end: decode (if a path), denoise (RawReconstructor), write (DNG to a temp dir).

    ``reference`` (H x W x 3 encoded RAW in [0, 1]) adds the PSNR of the result. ``step_graph``: record the whole
    model evaluation of a sampler step as one CUDA graph (see RawReconstructor).
    The warm-up calls absorb compilation and the graph's capture.
    """
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.tiling import TileConfig

    dev = backend.device
    t0 = time.perf_counter()
    if isinstance(image, (str, Path)):
        from rawdiff_infer.io import read_image

        pixels = read_image(image).pixels
    else:
        pixels = image
    decode_s = time.perf_counter() - t0 if isinstance(image, (str, Path)) else 0.0
    P = backend.meta.model.patch_size
    tiles = TileConfig(patch_size=P, stride=stride or (P if merge == "end" else 48), batch_size=batch_size,
                       merge=merge)  # type: ignore[arg-type]
    rec = RawReconstructor(backend, sampler=SamplerConfig(method=sampler, steps=steps), tiles=tiles,
                           step_graph=step_graph)
    results = []
    _peak_reset(dev)
    try:
        times = time_callable(lambda i: results.append(rec.reconstruct(pixels, seed=seed)), device=dev,
                              warmup=warmup, repeats=repeats)
    finally:
        rec.close()
    out = results[-1]
    write_s = 0.0
    if write:
        from rawdiff_infer.io import write_dng

        with tempfile.TemporaryDirectory() as d:
            t1 = time.perf_counter()
            write_dng(Path(d) / "out.dng", out.linear, camera=backend.meta.camera, preview_srgb=pixels)
            write_s = time.perf_counter() - t1
    # model FLOPs: every evaluation runs every patch once, with step fusion and merge-at-end alike
    fl = (gflop * 1e9 if gflop is not None else flops_per_patch(backend.meta.model, P)) * out.patches * out.steps
    med = statistics.median(times)
    from rawdiff_infer.metrics import psnr as _psnr

    psnr = _psnr(out.encoded, reference) if reference is not None else None
    h, w = pixels.shape[:2]
    return ImageResult(backend=backend.name, variant=variant or backend.describe(), sampler=sampler, steps=out.steps,
                       merge=merge, width=w, height=h, patches=out.patches, decode_s=decode_s, denoise_s=med,
                       write_s=write_s, total_s=decode_s + med + write_s, denoise_s_min=min(times),
                       denoise_s_max=max(times), tflops=fl / med / 1e12, peak_mem_mb=_peak_mb(dev), repeats=repeats,
                       psnr_db=psnr, step_graph=bool(out.extra.get("step_graph")))


_CATEGORIES = (  # (category, substrings of the kernel name), first match wins; lower-case
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("convolution", ("conv", "implicit", "xmma", "cudnn", "wgrad", "dgrad", "fprop")),
    ("matmul", ("gemm", "matmul", "cutlass", "sm90_", "mm_", "addmm", "linear")),
    ("norm / elementwise (fused)", ("triton", "group_norm", "native_group_norm", "elementwise", "vectorized",
                                    "reduce", "silu", "softmax", "add", "mul", "copy", "cat", "fill")),
)


def kernel_category(name: str) -> str:
    """Coarse class of a kernel or operator name: attention, convolution, matmul, norm / elementwise, other."""
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_unet(backend: Backend, *, batch: int, patch: int = 64, calls: int = 3) -> dict[str, Any]:
    """Where one U-Net call spends its device time: torch.profiler over ``calls`` calls (after one warm-up).

    Returns {"kernels": [{name, calls, ms, share}] (top 25 by time, per U-Net call), "categories": {category: share},
    "ms_per_call": float}. On CUDA the time is kernel time on the GPU, on the CPU operator self time.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = backend.device
    cuda = dev.type == "cuda"
    x = torch.randn(batch, 3, patch, patch, device=dev)
    c = torch.rand(batch, 3, patch, patch, device=dev) * 2 - 1
    t = torch.full((batch,), 500.0, device=dev)
    backend(x, c, t)
    if cuda:
        torch.cuda.synchronize(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            backend(x, c, t)
        if cuda:
            torch.cuda.synchronize(dev)
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if cuda and getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CPU"):
            continue  # host-side operator records; kernels carry the device time
        if us > 0:
            rows.append({"name": e.key, "calls": e.count // calls, "ms": us / 1e3 / calls})
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    rows.sort(key=lambda r: -r["ms"])
    cats: dict[str, float] = {}
    for r in rows:
        cats[kernel_category(r["name"])] = cats.get(kernel_category(r["name"]), 0.0) + r["share"]
    return {"kernels": rows[:25], "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "ms_per_call": total, "batch": batch}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table from dict rows; columns = (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for k, _, f in columns:
            v = r.get(k)
            cells.append("-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


UNET_COLUMNS = [("variant", "variant", "s"), ("dtype", "dtype", "s"), ("batch", "batch", "d"),
                ("ms_median", "ms/call (median)", ".2f"), ("ms_min", "min", ".2f"), ("ms_max", "max", ".2f"),
                ("patches_per_s", "patches/s", ".0f"), ("tflops", "TFLOP/s", ".2f"),
                ("peak_mem_mb", "peak MiB", ".0f")]
IMAGE_COLUMNS = [("variant", "variant", "s"), ("sampler", "sampler", "s"), ("steps", "steps", "d"),
                 ("merge", "merge", "s"), ("step_graph", "step graph", ""), ("width", "W", "d"), ("height", "H", "d"),
                 ("patches", "patches", "d"),
                 ("decode_s", "decode s", ".3f"), ("denoise_s", "denoise s", ".3f"), ("write_s", "write s", ".3f"),
                 ("tflops", "TFLOP/s", ".1f"), ("psnr_db", "PSNR dB", ".2f")]


def to_json(env: dict[str, Any], unet: list[UnetResult], images: list[ImageResult]) -> str:
    return json.dumps({"environment": env, "unet": [asdict(r) for r in unet],
                       "images": [asdict(r) for r in images]}, indent=1)
