"""rawdiff-export: checkpoint -> model.onnx + model.fp16.onnx -> TensorRT engine (+ sidecar JSON).

Parses the command line, calls the library (``onnx_export``, ``trt_build``), maps errors to one line on stderr and a
non-zero exit code. Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

__all__ = ["main"]

log = logging.getLogger("rawdiff_export")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

HELP = """Export a rawdiff checkpoint to ONNX (fp32 and fp16 graphs) and build a strongly typed TensorRT engine.

\b
Writes, next to the checkpoint unless --out is given:
  <name>.onnx            fp32 graph
  <name>.fp16.onnx       fp16 graph (fp32 I/O; GroupNorm, softmax and timestep embedding in fp32)
  <name>.<target>.plan   TensorRT engine from the fp16 graph (--fp32: from the fp32 graph)
  <name>.<target>.plan.json   what the engine was built from and for (ONNX sha256, TensorRT, GPU, profile)

Without TensorRT installed the ONNX files are written and the engine step is skipped.
"""


class _Fail(Exception):
    """One-line error with an exit code."""

    def __init__(self, msg: str, code: int = EXIT_ERROR) -> None:
        super().__init__(msg)
        self.code = code


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _ccs(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--ckpt", required=True, help="rawdiff checkpoint: a .safetensors file or a sharded folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default: next to --ckpt).")
@click.option("--onnx-only", is_flag=True, help="Write the ONNX files only; no TensorRT engine.")
@click.option("--fp16/--fp32", "fp16", default=True, show_default=True,
              help="Which ONNX graph feeds the engine (both ONNX files are always written).")
@click.option("--min-batch", type=click.IntRange(1), default=1, show_default=True, help="Profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(1), default=64, show_default=True, help="Profile: tuned batch.")
@click.option("--max-batch", type=click.IntRange(1), default=256, show_default=True, help="Profile: largest batch.")
@click.option("--patch-size", type=click.IntRange(8), help="Patch size in pixels (default: the model's, 64).")
@click.option("--opset", type=click.IntRange(17, 19), default=17, show_default=True, help="ONNX opset (17-19).")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT timing cache file: read if present, saved after the build.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimisation level (TensorRT default 3).")
@click.option("--version-compatible", is_flag=True, help="Engine also runs on later TensorRT versions (TensorRT only).")
@click.option("--hardware-compatible", is_flag=True, help="Engine runs on any Ampere+ GPU (TensorRT only).")
@click.option("--compute-capability", "ccs", multiple=True, metavar="CC",
              help="TensorRT-RTX target(s), e.g. 8.6 or sm89,sm120 (default: this GPU, or RTX's defaults).")
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime-vs-torch parity check.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary; the written paths and errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (TensorRT messages included).")
def main(ckpt, out_dir, onnx_only, fp16, min_batch, opt_batch, max_batch, patch_size, opset, timing_cache, opt_level,
         version_compatible, hardware_compatible, ccs, no_parity, quiet, verbose) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING,
                        format="rawdiff-export: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    try:
        code = _run(ckpt, out_dir, onnx_only, fp16, min_batch, opt_batch, max_batch, patch_size, opset, timing_cache,
                    opt_level, version_compatible, hardware_compatible, _ccs(ccs), no_parity, quiet)
    except _Fail as e:
        click.echo(f"rawdiff-export: error: {e}", err=True)
        code = e.code
    except KeyboardInterrupt:
        click.echo("rawdiff-export: interrupted; no partial files were left", err=True)
        code = EXIT_INTERRUPTED
    except Exception as e:
        log.debug("internal error", exc_info=True)
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"rawdiff-export: error: {type(e).__name__}: {msg}", err=True)
        code = EXIT_ERROR
    sys.exit(code)


def _run(ckpt, out_dir, onnx_only, fp16, min_batch, opt_batch, max_batch, patch_size, opset, timing_cache, opt_level,
         version_compatible, hardware_compatible, ccs, no_parity, quiet) -> int:
    from rawdiff_infer.backends.tensorrt import INSTALL_HINT, TensorRTNotFound, detect_gpu, load_tensorrt
    from rawdiff_infer.checkpoint import CheckpointError, file_sha256, load_checkpoint

    from .onnx_export import ExportError, default_out_dir, export_onnx, onnx_parity, output_stem
    from .trt_build import BuildOptions, build_engine

    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    try:
        build_opts = BuildOptions(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, opt_level=opt_level,
                                  timing_cache=timing_cache, version_compatible=version_compatible,
                                  hardware_compatible=hardware_compatible, compute_capabilities=ccs)
    except ValueError as e:
        raise _Fail(str(e), EXIT_USAGE) from None

    t0 = time.perf_counter()
    say(f"loading {ckpt}")
    try:
        model, meta = load_checkpoint(ckpt)
        sha = file_sha256(ckpt)
    except CheckpointError as e:
        raise _Fail(str(e)) from None
    except OSError as e:
        raise _Fail(f"{ckpt}: {e.strerror or e}") from None
    cfg = model.config
    patch = patch_size or cfg.patch_size
    out = Path(out_dir) if out_dir else default_out_dir(ckpt)
    stem = output_stem(Path(ckpt))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    say(f"  U-Net base {cfg.base_channels} x {cfg.channel_mults}, {n_params:.2f} M parameters, patch {patch}, "
        f"sha256 {sha[:12]}")

    written: list[tuple[str, Path]] = []
    parity: dict[str, tuple[float, str]] = {}
    paths = {}
    for precision, name in (("fp32", f"{stem}.onnx"), ("fp16", f"{stem}.fp16.onnx")):
        say(f"exporting {precision} ONNX -> {out / name}")
        try:
            paths[precision] = export_onnx(model, meta, out / name, precision=precision, patch_size=patch,
                                           opset=opset, checkpoint_sha256=sha)
        except ExportError as e:
            raise _Fail(str(e)) from None
        except OSError as e:
            raise _Fail(f"{out / name}: cannot write: {e.strerror or e}") from None
        written.append((f"ONNX {precision}", paths[precision]))
        if not no_parity:
            try:
                parity[precision] = onnx_parity(paths[precision], model, precision=precision)
            except ImportError:
                say("  parity check skipped: onnxruntime is not installed (pip install onnxruntime)")
            else:
                say(f"  onnxruntime CPU vs {parity[precision][1]}: max relative error {parity[precision][0]:.2e}")

    engine_note = "skipped (--onnx-only)"
    engine = None
    if not onnx_only:
        try:  # without a GPU only TensorRT-RTX can build (ahead of time): prefer it then
            trt = load_tensorrt(prefer=None if detect_gpu() else "tensorrt-rtx")
        except TensorRTNotFound as e:
            engine_note = "skipped: TensorRT is not installed"
            click.echo(f"rawdiff-export: engine step skipped: {e}", err=True)
        else:
            src = paths["fp16" if fp16 else "fp32"]
            say(f"building TensorRT engine from {src.name} with {trt.describe()} (strongly typed, batch "
                f"{min_batch}/{opt_batch}/{max_batch})")
            try:
                engine = build_engine(src, options=build_opts, trt=trt)
            except ExportError as e:
                raise _Fail(f"{e} (the ONNX files were written)") from None
            except OSError as e:
                raise _Fail(f"cannot write the engine: {e.strerror or e} (the ONNX files were written)") from None
            tgt = engine.sidecar["target"]
            if trt.is_rtx:
                where = (f"compute capability {', '.join(tgt['compute_capabilities'])}" if tgt["compute_capabilities"]
                         else "TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x)")
                where += " (ahead of time, no GPU)" if tgt["gpu"] == "AOT/none" else f" (built on {tgt['gpu']})"
            else:
                where = f"{tgt['gpu']} (compute capability {tgt['compute_capability']})"
            engine_note = f"{trt.flavour} {trt.version}, for {where}, built in {engine.seconds:.1f} s"
            written += [("TensorRT engine", engine.engine_path), ("engine sidecar", engine.sidecar_path)]

    if quiet:
        for _, p in written:
            click.echo(str(p))
        return EXIT_OK
    click.echo(f"rawdiff-export: done in {time.perf_counter() - t0:.1f} s")
    for what, p in written:
        click.echo(f"  {what:16s} {p}  ({_mb(p)})")
    for precision, (err, ref) in parity.items():
        click.echo(f"  parity {precision}: max relative error {err:.2e} (onnxruntime CPU vs {ref})")
    click.echo(f"  engine: {engine_note}")
    if engine is None and not onnx_only and "not installed" in engine_note:
        click.echo(f"  to build engines, {INSTALL_HINT}")
    return EXIT_OK


if __name__ == "__main__":
    main()
