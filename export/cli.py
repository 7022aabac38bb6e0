"""rawdiff-export: checkpoint -> model.onnx + model.fp16.onnx -> TensorRT engine (+ sidecar JSON).

A thin layer: click parses the command line into one frozen ``ExportOptions``; the run goes through its phases
(plan and check every path, load the checkpoint, export the ONNX graphs, build the engine, report), each a call into
the library (``onnx_export``, the runtime's engine builder). Every error is one line on stderr. Exit status:

    0   done
    1   the export failed (parity outside its tolerance, a graph or engine that cannot be built, a write error);
        nothing is published for a failed step
    2   bad options, paths or checkpoint, or an existing output without --force: checked before any compute
    130 / 143 / 129   Ctrl-C / SIGTERM / SIGHUP (no partial or temporary file is left)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from rawdiff_infer.backends.onnx_info import OnnxInfoError
from rawdiff_infer.backends.trt_build import (BuildOptions, BuildResult, EngineBuildError, build_engine,
                                              default_engine_path)
from rawdiff_infer.backends.trt_runtime import INSTALL_HINT, TensorRT, TensorRTNotFound, load_tensorrt
from rawdiff_infer.backends.trt_sidecar import detect_gpu, sidecar_path
from rawdiff_infer.checkpoint import CheckpointError, file_sha256, load_checkpoint
from rawdiff_infer.console import Console, OneLineCommand
from rawdiff_infer.fsio import check_target, reading
from rawdiff_infer.interrupts import Interrupted, handle_interrupts
from rawdiff_infer.messages import first_line, show_path

from .onnx_export import ExportedCheckpoint, ExportError, default_out_dir, export_model, onnx_targets, output_stem
from .trt_build import describe_target

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "ExportOptions", "main"]

log = logging.getLogger("rawdiff_export")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

HELP = """Export a rawdiff checkpoint to ONNX (fp32 and fp16 graphs) and build a strongly typed TensorRT engine.

\b
Writes, next to the checkpoint unless --out is given:
  <name>.onnx            fp32 graph
  <name>.fp16.onnx       fp16 graph (fp32 I/O; GroupNorm, softmax and timestep embedding in fp32)
  <name>.<target>.plan   TensorRT engine from the fp16 graph (--fp32: from the fp32 graph)
  <name>.<target>.plan.json   what the engine was built from and for (ONNX sha256, TensorRT, GPU, profile)

\b
Both graphs are checked against the torch model with onnxruntime before they are published: a max relative error
that is not finite, or above 1e-4 (fp32 graph) / 1e-2 (fp16 graph), fails the export and writes nothing.
Existing files are not replaced without --force. Without TensorRT the engine step is skipped.
Exit status: 0 done, 1 export failed, 2 bad options / paths / checkpoint (nothing computed), 130/143 interrupted.
"""


class CliError(Exception):
    """One-line error with an exit status."""

    def __init__(self, msg: str, code: int = EXIT_FAILED) -> None:
        super().__init__(msg)
        self.code = code


@dataclass(frozen=True)
class ExportOptions:
    """Everything the command line says (built from click's parameters by ``from_params``)."""

    ckpt: Path
    out_dir: Path
    stem: str
    onnx_only: bool
    engine_precision: str  # "fp16" | "fp32": which graph feeds the engine
    build: BuildOptions
    patch_size: int | None  # pixels; None: the model's
    opset: int
    parity: bool
    force: bool
    quiet: bool
    verbose: bool
    aoti: str | None = None  # device of an AOTInductor package to build too (cpu, cuda, cuda:N)
    aoti_precision: str | None = None

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> ExportOptions:
        """Raises CliError (exit 2) for values click cannot check alone (the batch profile, compute capabilities)."""
        ccs = tuple(v.strip() for item in p["ccs"] for v in item.split(",") if v.strip())
        try:
            build = BuildOptions(min_batch=p["min_batch"], opt_batch=p["opt_batch"], max_batch=p["max_batch"],
                                 opt_level=p["opt_level"], timing_cache=p["timing_cache"],
                                 version_compatible=p["version_compatible"],
                                 hardware_compatible=p["hardware_compatible"], compute_capabilities=ccs)
        except ValueError as e:
            raise CliError(first_line(e), EXIT_USAGE) from None
        ckpt = Path(p["ckpt"])
        return cls(ckpt=ckpt, out_dir=Path(p["out_dir"]) if p["out_dir"] else default_out_dir(ckpt),
                   stem=output_stem(ckpt), onnx_only=p["onnx_only"], engine_precision="fp16" if p["fp16"] else "fp32",
                   build=build, patch_size=p["patch_size"], opset=p["opset"], parity=not p["no_parity"],
                   force=p["force"], quiet=p["quiet"], verbose=p["verbose"], aoti=p.get("aoti"),
                   aoti_precision=p.get("aoti_precision"))

    def say(self, msg: str) -> None:
        """Progress on stderr (silent with --quiet)."""
        if not self.quiet:
            click.echo(msg, err=True)


@dataclass(frozen=True)
class Plan:
    """What will be written, decided and checked before any compute."""

    onnx: dict[str, Path]  # precision -> target
    trt: TensorRT | None  # None: no engine step
    engine: Path | None
    engine_note: str  # why there is no engine step ("" when there is one)
    aoti: Path | None = None  # the AOTInductor package to build (None: no such step)


def _os_message(e: OSError) -> str:
    where = f"{show_path(e.filename)}: " if e.filename else ""
    return where + (e.strerror or first_line(e))


# ---- phases -------------------------------------------------------------------------------------------------------

def _plan(opts: ExportOptions) -> Plan:
    """Check the checkpoint path, the output folder and every output file; decide the engine step. Exit 2 on
    problems, before any compute."""
    if not opts.ckpt.exists():
        raise CliError(f"{show_path(opts.ckpt)}: no such checkpoint", EXIT_USAGE)
    _check_out_dir(opts.out_dir)
    if opts.parity and importlib.util.find_spec("onnxruntime") is None:
        raise CliError("the parity check needs onnxruntime (pip install onnxruntime); --no-parity skips it",
                       EXIT_USAGE)
    onnx = onnx_targets(opts.out_dir, opts.stem)
    trt, engine, note = _engine_plan(opts, onnx[opts.engine_precision])
    aoti = _aoti_target(opts)
    outputs = [*onnx.values(), *([engine, sidecar_path(engine)] if engine else []), *([aoti] if aoti else [])]
    try:  # fsio's rule: no existing file without --force, never a non-regular file or a file the run reads
        for target in outputs:
            check_target(target, overwrite=opts.force)
        if opts.build.timing_cache and trt is not None:
            check_target(opts.build.timing_cache, overwrite=True)  # a cache is refreshed; a FIFO is not
    except OSError as e:
        raise CliError(_os_message(e), EXIT_USAGE) from None
    return Plan(onnx=onnx, trt=trt, engine=engine, engine_note=note, aoti=aoti)


def _aoti_target(opts: ExportOptions) -> Path | None:
    """Where ``--aoti`` writes its package (exit 2 for a device that cannot build one here)."""
    if opts.aoti is None:
        return None
    from .aoti_export import default_aoti_path

    try:
        return default_aoti_path(opts.out_dir, opts.stem, opts.aoti, opts.aoti_precision)  # type: ignore[arg-type]
    except (ExportError, RuntimeError, ValueError) as e:
        raise CliError(f"--aoti {opts.aoti}: {first_line(e)}", EXIT_USAGE) from None


#: largest max relative error accepted between an AOTInductor package and the eager model, by precision
AOTI_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def _aoti(opts: ExportOptions, plan: Plan, model: Any, meta: Any, sha: str) -> tuple[Path, float | None] | None:
    """The AOTInductor package, parity-checked against the eager model (a failed check removes it: exit 1)."""
    if plan.aoti is None:
        return None
    from .aoti_export import aoti_parity, export_aoti

    opts.say(f"building the AOTInductor package {show_path(plan.aoti)} for {opts.aoti} (minutes on a CPU)")
    try:
        path = export_aoti(model, meta, plan.aoti, device=opts.aoti, precision=opts.aoti_precision,  # type: ignore
                           patch_size=opts.patch_size, max_batch=opts.build.max_batch, checkpoint_sha256=sha,
                           overwrite=opts.force)
    except ExportError as e:
        raise CliError(f"{first_line(e)} (the ONNX files were written)") from None
    if not opts.parity:
        return path, None
    err, _ = aoti_parity(path, model)
    precision = opts.aoti_precision or ("fp16" if str(opts.aoti).startswith("cuda") else "fp32")
    if not err <= AOTI_TOLERANCE[precision]:  # NaN fails too
        path.unlink(missing_ok=True)
        raise CliError(f"{show_path(path)}: max relative error {err:.2e} against the eager model is above "
                       f"{AOTI_TOLERANCE[precision]:.0e}; the package was removed")
    return path, err


def _check_out_dir(out: Path) -> None:
    """``out`` is a writable folder, or can be created (its nearest existing ancestor is a writable folder)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"{show_path(probe)}: not a folder (--out)", EXIT_USAGE)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CliError(f"{show_path(probe)}: not writable (--out)", EXIT_USAGE)


def _engine_plan(opts: ExportOptions, src: Path) -> tuple[TensorRT | None, Path | None, str]:
    """(TensorRT, engine path, note): the engine step, or why there is none."""
    if opts.onnx_only:
        return None, None, "skipped (--onnx-only)"
    gpu = detect_gpu()
    try:  # without a GPU only TensorRT-RTX can build (ahead of time): prefer it then
        trt = load_tensorrt(prefer=None if gpu else "tensorrt-rtx")
    except TensorRTNotFound as e:
        click.echo(f"rawdiff-export: engine step skipped: {e}", err=True)
        return None, None, "skipped: TensorRT is not installed"
    if gpu is None and not trt.is_rtx:
        click.echo(f"rawdiff-export: engine step skipped: {trt.describe()} builds only on an NVIDIA GPU, and none "
                   "is visible (TensorRT-RTX builds without one: pip install tensorrt-rtx)", err=True)
        return None, None, "skipped: no GPU for TensorRT"
    return trt, default_engine_path(src, trt, gpu, opts.engine_precision, opts.build.compute_capabilities), ""


def _load(opts: ExportOptions) -> tuple[Any, Any, str]:
    """The checkpoint's model, description and sha256. Exit 2 for a bad checkpoint or patch size."""
    opts.say(f"loading {show_path(opts.ckpt)}")
    try:
        model, meta = load_checkpoint(opts.ckpt)
        sha = file_sha256(opts.ckpt)
    except CheckpointError as e:
        raise CliError(first_line(e), EXIT_USAGE) from None
    except OSError as e:
        raise CliError(_os_message(e) if e.filename else f"{show_path(opts.ckpt)}: {first_line(e)}",
                       EXIT_USAGE) from None
    cfg = model.config
    patch, step = opts.patch_size or cfg.patch_size, 2 ** (len(cfg.channel_mults) - 1)
    if patch % step:
        raise CliError(f"--patch-size {patch} must be a multiple of {step} for this U-Net", EXIT_USAGE)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    opts.say(f"  U-Net base {cfg.base_channels} x {cfg.channel_mults}, {n_params:.2f} M parameters, patch {patch}, "
             f"sha256 {sha[:12]}")
    return model, meta, sha


def _export(opts: ExportOptions, model: Any, meta: Any, sha: str) -> ExportedCheckpoint:
    """Both ONNX graphs, parity-checked, then published. Exit 1 on failure (nothing written)."""
    try:
        return export_model(model, meta, opts.out_dir, opts.stem, checkpoint_sha256=sha, patch_size=opts.patch_size,
                            opset=opts.opset, parity=opts.parity, overwrite=opts.force, progress=opts.say)
    except (ExportError, OnnxInfoError) as e:
        raise CliError(f"{first_line(e)} (nothing was written)") from None
    except OSError as e:
        raise CliError(f"cannot write: {_os_message(e)} (nothing was written)") from None
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # torch cannot trace this U-Net
        raise CliError(f"{show_path(opts.ckpt)}: its U-Net cannot be exported ({type(e).__name__}: "
                       f"{first_line(e)}) (nothing was written)") from None


def _build(opts: ExportOptions, plan: Plan, exported: ExportedCheckpoint) -> BuildResult | None:
    """The engine and its sidecar (None without an engine step). Exit 1 on failure (the ONNX files stay)."""
    if plan.trt is None or plan.engine is None:
        return None
    src = exported.fp16_path if opts.engine_precision == "fp16" else exported.fp32_path
    b = opts.build
    opts.say(f"building TensorRT engine from {src.name} with {plan.trt.describe()} (strongly typed, batch "
             f"{b.min_batch}/{b.opt_batch}/{b.max_batch})")
    try:
        return build_engine(src, plan.engine, options=b, trt=plan.trt, overwrite=opts.force)
    except (EngineBuildError, OnnxInfoError) as e:
        raise CliError(f"{first_line(e)} (the ONNX files were written)") from None
    except OSError as e:
        raise CliError(f"cannot write the engine: {_os_message(e)} (the ONNX files were written)") from None


def _report(opts: ExportOptions, plan: Plan, exported: ExportedCheckpoint, engine: BuildResult | None,
            seconds: float) -> None:
    """The summary on stdout (--quiet: the written paths only)."""
    written = [("ONNX fp32", exported.fp32_path), ("ONNX fp16", exported.fp16_path)]
    if engine is not None:
        written += [("TensorRT engine", engine.engine_path), ("engine sidecar", engine.sidecar_path)]
    if opts.quiet:
        for _, p in written:
            click.echo(str(p))
        return
    click.echo(f"rawdiff-export: done in {seconds:.1f} s")
    for what, p in written:
        click.echo(f"  {what:16s} {p}  ({p.stat().st_size / 1e6:.1f} MB)")
    for precision, err in (("fp32", exported.fp32_rel_error), ("fp16", exported.fp16_rel_error)):
        if err is not None:
            ref = "torch fp32 (CPU)" if precision == "fp32" else exported.fp16_reference
            click.echo(f"  parity {precision}: max relative error {err:.2e} (onnxruntime CPU vs {ref})")
    if not opts.parity:
        click.echo("  parity: not checked (--no-parity)")
    if engine is not None and plan.trt is not None:
        click.echo(f"  engine: {plan.trt.flavour} {plan.trt.version}, for {describe_target(engine, plan.trt)}, "
                   f"built in {engine.seconds:.1f} s")
    else:
        click.echo(f"  engine: {plan.engine_note}")
        if "not installed" in plan.engine_note:
            click.echo(f"  to build engines, {INSTALL_HINT}")


def run(opts: ExportOptions) -> int:
    """All phases; returns the exit status. Raises CliError, Interrupted."""
    t0 = time.perf_counter()
    plan = _plan(opts)
    model, meta, sha = _load(opts)
    exported = _export(opts, model, meta, sha)
    engine = _build(opts, plan, exported)
    aoti = _aoti(opts, plan, model, meta, sha)
    _report(opts, plan, exported, engine, time.perf_counter() - t0)
    if aoti is not None and not opts.quiet:
        click.echo(f"  AOTInductor      {aoti[0]}  ({aoti[0].stat().st_size / 1e6:.1f} MB)"
                   + (f", max relative error {aoti[1]:.2e} against the eager model" if aoti[1] is not None else ""))
    elif aoti is not None:
        click.echo(str(aoti[0]))
    return EXIT_OK


# ---- the command --------------------------------------------------------------------------------------------------

def _stopped(e: Interrupted) -> None:
    click.echo(f"rawdiff-export: {e.verb}; no partial files were left", err=True)


@click.command("rawdiff-export", cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ckpt", required=True, help="rawdiff checkpoint: a .safetensors file or a sharded folder.")
@click.option("--out", "out_dir", type=click.Path(), help="Output folder (default: next to --ckpt).")
@click.option("--onnx-only", is_flag=True, help="Write the ONNX files only; no TensorRT engine.")
@click.option("--fp16/--fp32", "fp16", default=True, show_default=True,
              help="Which ONNX graph feeds the engine (both ONNX files are always written).")
@click.option("--min-batch", type=click.IntRange(1), default=1, show_default=True, help="Profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(1), default=64, show_default=True, help="Profile: tuned batch.")
@click.option("--max-batch", type=click.IntRange(1), default=256, show_default=True, help="Profile: largest batch.")
@click.option("--patch-size", type=click.IntRange(8), help="Patch size in pixels (default: the model's, 64).")
@click.option("--opset", type=click.IntRange(17, 19), default=17, show_default=True, help="ONNX opset (17-19).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache file: read if present (a foreign one is replaced), saved after the build.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimisation level (TensorRT default 3).")
@click.option("--version-compatible", is_flag=True, help="Engine also runs on later TensorRT versions (TensorRT only).")
@click.option("--hardware-compatible", is_flag=True, help="Engine runs on any Ampere+ GPU (TensorRT only).")
@click.option("--compute-capability", "ccs", multiple=True, metavar="CC",
              help="TensorRT-RTX target(s), e.g. 8.6 or sm89,sm120 (default: this GPU, or RTX's defaults).")
@click.option("--aoti", metavar="DEVICE", help="Also build an AOTInductor package (PyTorch's ahead-of-time engine; "
              "runs on Hopper where TensorRT cannot) for cpu, cuda or cuda:N of this machine: <name>.<target>.pt2.")
@click.option("--aoti-precision", type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Precision inside the package (default: fp16 on CUDA, fp32 on the CPU).")
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime-vs-torch parity check (publishes unchecked).")
@click.option("--force", is_flag=True, help="Replace existing ONNX files, engine and sidecar.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary; the written paths and errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (TensorRT messages included).")
def main(**params: Any) -> None:
    console = Console("rawdiff-export", verbose=params["verbose"])  # torch's exporter logs: only with -v
    try:
        with console.capture(libraries=False), handle_interrupts(_stopped), reading([params["ckpt"]]):
            code = run(ExportOptions.from_params(params))  # the checkpoint is never replaced, not with --force
    except CliError as e:
        click.echo(f"rawdiff-export: error: {e}", err=True)
        code = e.code
    except Interrupted as e:
        _stopped(e)
        code = e.exit_code
    except KeyboardInterrupt:
        click.echo("rawdiff-export: interrupted; no partial files were left", err=True)
        code = 130
    except OSError as e:
        click.echo(f"rawdiff-export: error: {_os_message(e)}", err=True)
        code = EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        log.debug("internal error", exc_info=True)
        click.echo(f"rawdiff-export: error: {type(e).__name__}: {first_line(e)}", err=True)
        code = EXIT_FAILED
    sys.exit(code)


if __name__ == "__main__":
    main()
