"""Builds the backends a benchmark asks for and runs the measurements (used by rawdiff-bench)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rawdiff_infer.backends.base import Backend
from rawdiff_infer.checkpoint import ModelMeta, load_checkpoint
from rawdiff_infer.model import UNet, UNetConfig

from .bench import (IMAGE_COLUMNS, UNET_COLUMNS, ImageResult, UnetResult, bench_image, bench_unet, environment,
                    flops_per_patch, format_table, to_json)

__all__ = ["BenchPlan", "Report", "load_model", "run_benchmarks", "torch_variant"]

PHOTO_COLUMNS = [("label", "photo", "s"), ("sampler", "sampler", "s"), ("patches", "patches", "d"),
                 ("evaluated_patches", "model saw", "d"),
                 ("seconds", "s/image", ".3f"), ("unet_bound_s", "U-Net bound s", ".3f"),
                 ("ratio_to_bound", "ratio", ".2f"), ("peak_mem_mb", "peak MiB", ".0f")]
FOLDER_COLUMNS = [("mode", "loop", "s"), ("frames", "frames", "d"), ("width", "W", "d"), ("height", "H", "d"),
                  ("packs", "model runs", "d"), ("seconds", "wall s", ".2f"), ("images_per_s", "images/s", ".3f"),
                  ("model_busy_share", "model busy", ".2f"), ("ratio_to_bound", "ratio to bound", ".2f")]



@dataclass
class Report:
    env: dict[str, Any]
    unet: list[UnetResult] = field(default_factory=list)
    images: list[ImageResult] = field(default_factory=list)
    photos: list[Any] = field(default_factory=list)    # userview.PhotoResult
    folders: list[Any] = field(default_factory=list)   # userview.FolderResult

    def table(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in self.env.items())
        parts = [f"environment: {env}", "", "U-Net, one call on a batch of patches:",
                 format_table([asdict(r) for r in self.unet], UNET_COLUMNS)]
        if self.images:
            parts += ["", "Whole images (denoise = median over repeats):",
                      format_table([asdict(r) for r in self.images], IMAGE_COLUMNS)]
        if self.photos:
            parts += ["", "Photos at rawdiff-infer's defaults (seconds per image; bound = evaluations x patches x "
                      "ms per patch):", format_table([asdict(r) for r in self.photos], PHOTO_COLUMNS)]
        if self.folders:
            parts += ["", "Folders (images per second; model busy = share of the wall time inside model calls):",
                      format_table([asdict(r) for r in self.folders], FOLDER_COLUMNS)]
        return "\n".join(parts)

    def json(self) -> str:
        import json

        data = json.loads(to_json(self.env, self.unet, self.images))
        data["photos"] = [asdict(r) for r in self.photos]
        data["folders"] = [asdict(r) for r in self.folders]
        return json.dumps(data, indent=1)

    def plot(self, path: str | Path, *, overwrite: bool = False) -> None:
        """µs per patch against batch size for every variant (and time per image against PSNR when known)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with_psnr = [r for r in self.images if r.psnr_db is not None]
        fig, axes = plt.subplots(1, 2 if with_psnr else 1, figsize=(11 if with_psnr else 6, 4.2), squeeze=False)
        ax = axes[0][0]
        keys = sorted({(r.variant, r.dtype) for r in self.unet})
        for v, d in keys:
            rs = sorted((r for r in self.unet if (r.variant, r.dtype) == (v, d)), key=lambda r: r.batch)
            ax.plot([r.batch for r in rs], [1e3 * r.ms_median / r.batch for r in rs], "o-", label=f"{v} {d}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("patches per call")
        ax.set_ylabel("µs per 64x64 patch (median)")
        ax.set_title(self.env.get("gpu", self.env.get("cpu", "")))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        if with_psnr:
            ax2 = axes[0][1]
            for r in with_psnr:
                ax2.scatter(r.denoise_s, r.psnr_db)
                ax2.annotate(f"{r.sampler}-{r.steps} {r.merge}", (r.denoise_s, r.psnr_db), fontsize=7)
            ax2.set_xscale("log")
            ax2.set_xlabel("seconds per image")
            ax2.set_ylabel("PSNR on RAW (dB)")
            ax2.grid(True, alpha=0.3)
        fig.tight_layout()
        from rawdiff_infer.fsio import atomic_write

        with atomic_write(path, overwrite=overwrite) as f:
            fig.savefig(f, dpi=120, format="png")
        plt.close(fig)


def torch_variant(model: UNet, meta: ModelMeta, variant: str, dtype: str, device: str, batch: int) -> Backend:
    """eager (NCHW) | cl (channels_last) | compile (+ torch.compile) | graph (+ CUDA graph replay)."""
    from rawdiff_infer.backends.torch import TorchBackend

    m = UNet(model.config)
    m.load_state_dict(model.state_dict())
    return TorchBackend(m, meta, device=device, dtype=dtype, channels_last=variant != "eager",
                        compile=variant in ("compile", "graph"), cuda_graph=variant == "graph",
                        max_batch_size=batch if variant == "graph" else None)


def _onnx_backend(model: UNet, meta: ModelMeta, model_file: str | None, device: str, tmp: Path) -> Backend:
    from rawdiff_infer.backends.onnxruntime import OnnxRuntimeBackend

    if model_file is None:
        model_file = str(tmp / "bench.onnx")
        if not Path(model_file).exists():  # export once per run, reuse for every batch size
            from rawdiff_export.onnx_export import export_onnx

            export_onnx(model, meta, model_file, precision="fp32")
    return OnnxRuntimeBackend.from_file(model_file, device=device)


@dataclass(frozen=True)
class BenchPlan:
    """Everything rawdiff-bench was asked to measure (built by the command line, or by a script)."""

    backends: Sequence[str] = ("torch",)
    model_file: str | None = None
    variants: Sequence[str] = ()
    dtypes: Sequence[str] = ()
    batches: Sequence[int] = (64,)
    patch_size: int = 64
    image_sizes: Sequence[int] = ()
    image_files: Sequence[str] = ()
    samplers: Sequence[str] = ("dpm",)
    steps: int | None = None
    merge: str = "step"
    warmup: int = 3
    repeats: int = 10
    step_graphs: Sequence[bool] = (False,)
    photos: Sequence[tuple[int, int]] = ()       # (height, width): user view, rawdiff-infer's defaults
    folder_frames: int = 0
    frame_shape: tuple[int, int] = (720, 1280)   # (height, width)


def load_model(ckpt: str | None, config_name: str) -> tuple[UNet, ModelMeta]:
    """The checkpoint's model, or random weights of a preset size (speed only)."""
    if ckpt:
        return load_checkpoint(ckpt)
    torch.manual_seed(0)
    cfg = UNetConfig() if config_name == "paper" else UNetConfig.tiny()
    return UNet(cfg).eval(), ModelMeta(model=cfg)


def _backend(kind: str, v: str, d: str, b: int, model: UNet, meta: ModelMeta, plan: BenchPlan, device: str,
             tmp: Path) -> Backend:
    if kind == "torch":
        return torch_variant(model, meta, v, d, device, b)
    if kind == "onnx":
        return _onnx_backend(model, meta, plan.model_file, device, tmp)
    if not plan.model_file:
        raise ValueError(f"--backend {kind} needs --model FILE")
    from rawdiff_infer.backends import open_backend

    return open_backend(kind, plan.model_file, device=device)


def _images(be: Backend, name: str, b: int, plan: BenchPlan, images: list[tuple[str, Any]], gflop: float,
            report: Report, echo: Callable[[str], None]) -> None:
    for label, img in images:
        for s in plan.samplers:
            for sg in plan.step_graphs:
                if sg and not (be.capturable and plan.merge == "step"):
                    echo(f"  skip step graph for {name}: needs a capturable CUDA backend and --merge step")
                    continue
                echo(f"  image {label} {s} ...")
                report.images.append(bench_image(be, img, sampler=s, steps=plan.steps, merge=plan.merge,
                                                 batch_size=b, variant=name, warmup=1,
                                                 repeats=max(1, min(3, plan.repeats)), gflop=gflop, step_graph=sg))


def _user_view(be: Backend, name: str, b: int, ms_per_patch: float, plan: BenchPlan, report: Report,
               echo: Callable[[str], None]) -> None:
    """Photos and folders at rawdiff-infer's default settings (sampler, steps, grid, stride; this batch size)."""
    from rawdiff_infer.cli import InferOptions
    from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
    from rawdiff_infer.tiling import TileConfig

    from .userview import bench_folder, bench_photo

    d = InferOptions(inputs=("x",))
    rec = RawReconstructor(be, sampler=SamplerConfig(method=d.sampler, steps=plan.steps),
                           tiles=TileConfig(patch_size=be.patch_size, stride=min(d.stride, be.patch_size),
                                            window=d.window, grid=d.grid, batch_size=b))  # type: ignore[arg-type]
    for h, w in plan.photos:
        echo(f"  photo {w}x{h} at rawdiff-infer's defaults ({rec.sampler.label()}, {d.grid} grid) ...")
        r = bench_photo(rec, h, w, ms_per_patch=ms_per_patch, repeats=max(1, min(3, plan.repeats)))
        r.label = f"{name} {r.label}"
        report.photos.append(r)
    if plan.folder_frames:
        h, w = plan.frame_shape
        echo(f"  folder of {plan.folder_frames} frames of {w}x{h}, sequential and pipelined ...")
        report.folders.extend(bench_folder(rec, plan.folder_frames, h, w, ms_per_patch=ms_per_patch,
                                           max_pack=d.max_pack))


def _dtypes(requested: Sequence[str], device: str, echo: Callable[[str], None]) -> list[str]:
    """The precisions to measure: auto (also when none is given) is rawdiff-infer's choice for this device (fp16 on
    CUDA; on a CPU bf16 only with avx512_bf16 or AMX, else fp32: ``rawdiff_infer.cpu``), said once."""
    from rawdiff_infer.cpu import resolve_dtype

    out = []
    for d in requested or ("auto",):
        if d == "auto":
            d, reason = resolve_dtype("auto", device)
            echo(f"--dtype auto: {d} ({reason})")
        if d not in out:
            out.append(d)
    return out


def run_benchmarks(model: UNet, meta: ModelMeta, plan: BenchPlan, *, device: str,
                   echo: Callable[[str], None] = print) -> Report:
    """Run every requested measurement; returns a Report."""
    cuda = device.startswith("cuda")
    variants = list(plan.variants) or (["eager", "cl"] if cuda else ["cl"])  # cl: rawdiff-infer's layout
    dtypes = _dtypes(plan.dtypes, device, echo)
    report = Report(env={**environment(), "device": device, "model_params_m": round(
        sum(p.numel() for p in model.parameters()) / 1e6, 2)})
    gflop = flops_per_patch(model.config, plan.patch_size) / 1e9
    rng = np.random.default_rng(0)
    images: list[tuple[str, Any]] = [(f"{s}x{s}", (rng.random((s, s, 3)) * 255).astype(np.uint8))
                                     for s in plan.image_sizes]
    images += [(Path(f).name, Path(f)) for f in plan.image_files]
    with tempfile.TemporaryDirectory() as td:
        for kind in plan.backends:
            combos = [(v, d) for v in variants for d in dtypes] if kind == "torch" else [(kind, "fp32")]
            for v, d in combos:
                if kind == "torch" and v == "graph" and not cuda:
                    echo(f"skip torch/{v}: CUDA graphs need a GPU")
                    continue
                for b in plan.batches:
                    be = _backend(kind, v, d, b, model, meta, plan, device, Path(td))
                    name = f"{kind}/{v}" if kind == "torch" else kind
                    echo(f"measuring {name} {d} batch {b} ...")
                    r = bench_unet(be, batch=b, patch=plan.patch_size, variant=name, warmup=plan.warmup,
                                   repeats=plan.repeats, gflop=gflop)
                    r.dtype = d if kind == "torch" else r.dtype
                    report.unet.append(r)
                    if b == max(plan.batches):
                        _images(be, name, b, plan, images, gflop, report, echo)
                        _user_view(be, f"{name} {r.dtype}", b, r.ms_median / b, plan, report, echo)
                    be.close()
    return report
