"""rawdiff-bench: latency / throughput of backends, precisions, batch sizes, samplers, photos and folders."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from rawdiff_infer.startup import begin_command

begin_command("rawdiff-bench", __file__)  # before the heavy imports: closed streams, Ctrl-C while importing

import click  # noqa: E402

from rawdiff_infer.console import Console, OneLineCommand
from rawdiff_infer.fsio import reading
from rawdiff_infer.interrupts import Interrupted, exit_code_of, handle_interrupts
from rawdiff_infer.messages import first_line
from rawdiff_infer.samplers import SAMPLERS

__all__ = ["main", "cli"]

_PROG = "rawdiff-bench"

HELP = """Measure rawdiff's U-Net and whole-image latency.

For every combination of --backend variant, --dtype and --batch it times one U-Net call on random patches
(ms per call, patches/s, achieved TFLOP/s from FLOPs counted once, peak memory); with --image-size it also
times whole images through the sampler (decode / denoise / write). Warm-up first, fresh random inputs, CUDA
events on GPU, median of --repeats with min/max.

The user's view, at rawdiff-infer's default settings (sampler, steps, grid, stride) and the largest --batch:
--photo WxH times whole photos, --folder N a folder of N frames of --frame WxH (sequential loop against the
pipelined runner, side by side: images/s and the share of the wall time the model is busy). Both report the
U-Net-only bound, evaluations x patches x ms per patch, and the ratio to it.

\b
Variants (torch backend): eager (NCHW), cl (channels_last), compile (channels_last + torch.compile),
graph (channels_last + compile + CUDA-graph replay). Other backends: onnx (ONNX Runtime; the model is
exported on the fly unless --model is given), trt (a TensorRT engine) and aoti (an AOTInductor package),
given with --model.

\b
Examples:
  rawdiff-bench --device cpu --backend torch --backend onnx --batch 8 --repeats 5
  rawdiff-bench --device cpu --variant cl --dtype fp32 --dtype bf16 --batch 8 --batch 16 --threads 2
  rawdiff-bench --device cuda --variant compile --variant graph --dtype fp16 --batch 1024 \\
      --photo 2048x2048 --photo 4000x3000 --folder 32 --frame 1280x720 --json gpu.json --plot gpu.png
"""


def _shape(value: str, what: str) -> tuple[int, int]:
    """'WxH' -> (height, width)."""
    m = re.fullmatch(r"(\d+)x(\d+)", value.strip().lower())
    if not m or not (1 <= int(m.group(1)) <= 65536 and 1 <= int(m.group(2)) <= 65536):
        raise click.BadParameter(f"{value!r}: write WIDTHxHEIGHT, e.g. 2048x2048", param_hint=what)
    return int(m.group(2)), int(m.group(1))


@click.command(_PROG, cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ckpt", help="rawdiff checkpoint (default: random weights of the --config size; speed only).")
@click.option("--config", "config_name", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
              help="Model size when no --ckpt is given.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "onnx", "trt", "aoti"]),
              help="Backends to measure (default: torch).")
@click.option("--model", "model_file", help="ONNX file / TensorRT engine / AOTInductor package for those backends.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(["eager", "cl", "compile", "graph"]),
              help="torch variants (default: cl, rawdiff-infer's layout; and eager on CUDA).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="torch precisions; repeat. Default auto, rawdiff-infer's: fp16 on CUDA; on a CPU bf16 when it has "
              "avx512_bf16 or AMX, else fp32 (bf16 is emulated there, 10-1000x slower).")
@click.option("--threads", type=click.IntRange(1, 1024), help="CPU threads of torch's operators "
              "(torch.set_num_threads; default: torch's, one per core).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(1, 65536), help="Patch batch sizes (default 64).")
@click.option("--patch-size", type=click.IntRange(8, 1024), default=64, show_default=True,
              help="Patch side in pixels, a multiple of 8.")
@click.option("--image-size", "image_sizes", multiple=True, type=click.IntRange(8, 65536),
              help="Also time square images of this side (pixels) end to end.")
@click.option("--image", "image_files", multiple=True, type=click.Path(dir_okay=False),
              help="Also time these image files end to end.")
@click.option("--photo", "photos", multiple=True, metavar="WxH", help="User view: a photo of this size at "
              "rawdiff-infer's defaults; repeat.")
@click.option("--folder", "folder_frames", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="User view: a folder of this many frames (sequential and pipelined).")
@click.option("--frame", default="1280x720", show_default=True, metavar="WxH", help="Frame size for --folder.")
@click.option("--sampler", "samplers", multiple=True, type=click.Choice(SAMPLERS),
              help="Samplers for the --image-size / --image runs (default dpm).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Steps for the image runs (default: the sampler's).")
@click.option("--merge", type=click.Choice(["step", "end"]), default="step", show_default=True)
@click.option("--step-graph", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="Image runs: record each sampler step's whole model evaluation as one CUDA graph (torch on "
                   "CUDA, --merge step); both: time without and with it, side by side.")
@click.option("--device", default="auto", show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="Write all results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG plot here (matplotlib).")
@click.option("--force", is_flag=True, help="Replace existing --json / --plot files.")
def cli(**p: Any) -> None:
    console = Console(_PROG)
    with console.capture(), handle_interrupts(lambda e: console.err(f"{e.verb}; nothing was written")):
        try:
            with reading([p["ckpt"], p["model_file"], *p["image_files"]]):  # never replaced, not with --force
                code = _run(p, console)
        except click.UsageError:
            raise
        except KeyboardInterrupt as e:
            console.err(f"{e.verb if isinstance(e, Interrupted) else 'interrupted'}; nothing was written")
            code = exit_code_of(e)
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            console.err(f"error: {first_line(e)}")
            code = 1
    sys.exit(code)


def _run(p: dict[str, Any], console: Console) -> int:
    import torch

    from rawdiff_infer.checkpoint import CheckpointError
    from rawdiff_infer.fsio import write_bytes
    from rawdiff_infer.io import ImageError, read_image

    from .runner import BenchPlan, load_model, run_benchmarks

    if p["patch_size"] % 8:
        raise click.BadParameter(f"{p['patch_size']} is not a multiple of 8", param_hint="--patch-size")
    photos = tuple(_shape(v, "--photo") for v in p["photos"])
    frame = _shape(p["frame"], "--frame")
    from rawdiff_infer.plan import UsageError, check_output_files

    try:  # before any measurement: a report over an input (even with --force) or over the other report
        check_output_files({"--json": p["json_path"], "--plot": p["plot_path"]}, force=p["force"])
    except UsageError as e:
        raise click.UsageError(str(e)) from None
    for f in p["image_files"]:
        try:
            read_image(f)
        except ImageError as e:
            raise click.UsageError(first_line(e)) from None
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    device = p["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or (device.startswith("cuda") and not torch.cuda.is_available()):
        raise click.BadParameter(f"{device!r}: use auto, cpu, cuda or cuda:N (a visible GPU)", param_hint="--device")
    try:
        model, meta = load_model(p["ckpt"], p["config_name"])
    except CheckpointError as e:
        raise click.UsageError(first_line(e)) from None
    plan = BenchPlan(backends=p["backends"] or ("torch",), model_file=p["model_file"], variants=p["variants"],
                     dtypes=p["dtypes"], batches=p["batches"] or (64,), patch_size=p["patch_size"],
                     image_sizes=p["image_sizes"], image_files=p["image_files"], samplers=p["samplers"] or ("dpm",),
                     steps=p["steps"], merge=p["merge"], warmup=p["warmup"], repeats=p["repeats"],
                     step_graphs={"on": (True,), "off": (False,), "both": (False, True)}[p["step_graph"]],
                     photos=photos, folder_frames=p["folder_frames"], frame_shape=frame)
    report = run_benchmarks(model, meta, plan, device=device, echo=console.err)
    console.out(report.table())
    if p["json_path"]:
        write_bytes(p["json_path"], report.json().encode(), overwrite=p["force"])
    if p["plot_path"]:
        report.plot(p["plot_path"], overwrite=p["force"])
    return 0


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name=_PROG)


if __name__ == "__main__":
    main()
