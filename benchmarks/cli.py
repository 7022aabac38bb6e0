"""rawdiff-bench: latency / throughput of backends, precisions, batch sizes, samplers; table, JSON and plot."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

__all__ = ["main", "cli"]

HELP = """Measure rawdiff's U-Net and whole-image latency.

For every combination of --backend variant, --dtype and --batch it times one U-Net call on random patches
(ms per call, patches/s, achieved TFLOP/s from FLOPs counted once, peak memory); with --image-size it also
times whole images through the sampler (decode / denoise / write). Warm-up first, fresh random inputs, CUDA
events on GPU, median of --repeats with min/max.

\b
Variants (torch backend): eager (NCHW), cl (channels_last), compile (channels_last + torch.compile),
graph (channels_last + compile + CUDA-graph replay). Other backends: onnx (ONNX Runtime; the model is
exported on the fly unless --model is given), trt (a TensorRT engine given with --model).

\b
Examples:
  rawdiff-bench --device cpu --backend torch --backend onnx --batch 8 --repeats 5
  rawdiff-bench --device cuda --variant eager --variant compile --variant graph --dtype fp16 \\
      --batch 256 --batch 1024 --image-size 2048 --sampler dpm --steps 20 --json gpu.json --plot gpu.png
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ckpt", help="rawdiff checkpoint (default: random weights of the --config size; speed only).")
@click.option("--config", "config_name", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="Model size when no --ckpt is given.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "onnx", "trt"]),
              help="Backends to measure (default: torch).")
@click.option("--model", "model_file", help="ONNX file / TensorRT engine for --backend onnx|trt.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["eager", "cl", "compile", "graph"]),
              help="torch variants (default: eager, and cl on CUDA).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="torch precisions (default: fp32 on CPU, fp16 on CUDA).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1), help="Patch batch sizes (default 64).")
@click.option("--patch-size", type=int, default=64, show_default=True)
@click.option("--image-size", "image_sizes", multiple=True, type=click.IntRange(8),
              help="Also time square images of this side (pixels) end to end.")
@click.option("--image", "image_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also time these image files end to end.")
@click.option("--sampler", "samplers", multiple=True,
              type=click.Choice(["ddpm", "ddim", "dpm", "dpm-sde", "dpm-single"]),
              help="Samplers for the image runs (default dpm).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Steps for the image runs (default: the sampler's).")
@click.option("--merge", type=click.Choice(["step", "end"]), default="step", show_default=True)
@click.option("--step-graph", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="Image runs: record each sampler step's whole model evaluation as one CUDA graph (torch on "
                   "CUDA, --merge step); both: time without and with it, side by side.")
@click.option("--device", default="auto", show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write all results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot here (matplotlib).")
def cli(ckpt, config_name, backends, model_file, variants, dtypes, batches, patch_size, image_sizes, image_files,
        samplers, steps, merge, step_graph, device, warmup, repeats, json_path, plot_path) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        from .runner import run_benchmarks

        report = run_benchmarks(ckpt=ckpt, config_name=config_name, backends=backends or ("torch",),
                                model_file=model_file, variants=variants, dtypes=dtypes, batches=batches or (64,),
                                patch_size=patch_size, image_sizes=image_sizes, image_files=image_files,
                                samplers=samplers or ("dpm",), steps=steps, merge=merge, device=device,
                                warmup=warmup, repeats=repeats,
                                step_graphs={"on": (True,), "off": (False,), "both": (False, True)}[step_graph],
                                echo=lambda s: click.echo(s, err=True))
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        click.echo(f"rawdiff-bench: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(1)
    click.echo(report.table())
    if json_path:
        Path(json_path).write_text(report.json())
    if plot_path:
        report.plot(plot_path)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="rawdiff-bench")


if __name__ == "__main__":
    main()
