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

__all__ = ["Report", "run_benchmarks", "torch_variant"]



@dataclass
class Report:
    env: dict[str, Any]
    unet: list[UnetResult] = field(default_factory=list)
    images: list[ImageResult] = field(default_factory=list)

    def table(self) -> str:
        env = ", ".join(f"{k}={v}" for k, v in self.env.items())
        parts = [f"environment: {env}", "", "U-Net, one call on a batch of patches:",
                 format_table([asdict(r) for r in self.unet], UNET_COLUMNS)]
        if self.images:
            parts += ["", "Whole images (denoise = median over repeats):",
                      format_table([asdict(r) for r in self.images], IMAGE_COLUMNS)]
        return "\n".join(parts)

    def json(self) -> str:
        return to_json(self.env, self.unet, self.images)

    def plot(self, path: str | Path) -> None:
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
        fig.savefig(path, dpi=120)
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


def run_benchmarks(*, ckpt: str | None, config_name: str, backends: Sequence[str], model_file: str | None,
                   variants: Sequence[str], dtypes: Sequence[str], batches: Sequence[int], patch_size: int,
                   image_sizes: Sequence[int], image_files: Sequence[str], samplers: Sequence[str],
                   steps: int | None, merge: str, device: str, warmup: int, repeats: int,
                   step_graphs: Sequence[bool] = (False,),
                   echo: Callable[[str], None] = print) -> Report:
    """Run every requested measurement; returns a Report."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if ckpt:
        model, meta = load_checkpoint(ckpt)
    else:
        torch.manual_seed(0)
        cfg = UNetConfig() if config_name == "paper" else UNetConfig.tiny()
        model, meta = UNet(cfg).eval(), ModelMeta(model=cfg)
    variants = list(variants) or (["eager", "cl"] if cuda else ["eager"])
    dtypes = list(dtypes) or (["fp16"] if cuda else ["fp32"])
    report = Report(env={**environment(), "device": device, "model_params_m": round(
        sum(p.numel() for p in model.parameters()) / 1e6, 2)})
    gflop = flops_per_patch(model.config, patch_size) / 1e9
    rng = np.random.default_rng(0)
    images: list[tuple[str, Any]] = [(f"{s}x{s}", (rng.random((s, s, 3)) * 255).astype(np.uint8)) for s in image_sizes]
    images += [(Path(f).name, Path(f)) for f in image_files]
    with tempfile.TemporaryDirectory() as td:
        for kind in backends:
            combos: list[tuple[str, str]] = ([(v, d) for v in variants for d in dtypes] if kind == "torch"
                                             else [(kind, "fp32")])
            for v, d in combos:
                for b in batches:
                    if kind == "torch":
                        if v == "graph" and not cuda:
                            echo(f"skip torch/{v}: CUDA graphs need a GPU")
                            continue
                        be = torch_variant(model, meta, v, d, device, b)
                    elif kind == "onnx":
                        be = _onnx_backend(model, meta, model_file, device, Path(td))
                    else:
                        from rawdiff_infer.backends.tensorrt import TensorRTBackend

                        if not model_file:
                            raise ValueError("--backend trt needs --model ENGINE")
                        be = TensorRTBackend.from_file(model_file, device=device)
                    name = f"{kind}/{v}" if kind == "torch" else kind
                    echo(f"measuring {name} {d} batch {b} ...")
                    r = bench_unet(be, batch=b, patch=patch_size, variant=name, warmup=warmup, repeats=repeats,
                                   gflop=gflop)
                    r.dtype = d if kind == "torch" else r.dtype
                    report.unet.append(r)
                    if b == max(batches):
                        for label, img in images:
                            for s in samplers:
                                for sg in step_graphs:
                                    if sg and not (be.capturable and merge == "step"):
                                        echo(f"  skip step graph for {name}: needs a capturable CUDA backend "
                                             "and --merge step")
                                        continue
                                    echo(f"  image {label} {s} ...")
                                    ir = bench_image(be, img, sampler=s, steps=steps, merge=merge, batch_size=b,
                                                     variant=name, warmup=1, repeats=max(1, min(3, repeats)),
                                                     gflop=gflop, step_graph=sg)
                                    report.images.append(ir)
                    be.close()
    return report
