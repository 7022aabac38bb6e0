"""rawdiff-infer: the command line over RawReconstructor. Parses, calls the library, maps errors to exit codes.

Phases, so that every problem that can be found before any compute is found before the model is loaded:
options (one frozen ``InferOptions``) -> expand the inputs -> plan every output path (collisions, inputs that would
be overwritten) -> shard (torchrun) -> prepare and probe the output folders -> skip / refuse existing outputs ->
load and self-test the model, check the options against it -> run the folder runner (decode, reconstruct, write
atomically, overlapped). Errors are one line on stderr, ``rawdiff-infer: <file>: <problem>``.

Exit status: 0 all done, 1 some inputs failed, 2 bad command line / model / output location (nothing computed),
128 + N for signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .startup import begin_command

begin_command("rawdiff-infer", __file__)  # before the heavy imports: closed streams, Ctrl-C while importing

import click  # noqa: E402

from .console import Console, OneLineCommand
from .interrupts import Interrupted, exit_code_of, handle_interrupts
from .messages import first_line, show_path
from .plan import (FORMATS, Job, UsageError, check_outputs, expand_inputs, plan_outputs, prepare_output_dir, shard,
                   world_from_env)
from .samplers import DEFAULT_METHOD, SAMPLERS, SPECS
from .tiling import GRIDS, WINDOWS

__all__ = ["InferOptions", "cli", "main", "run"]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "rawdiff-infer"
MAX_SEED = 2**64 - 1
MAX_BATCH = 65536
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferOptions:
    """Everything rawdiff-infer was asked to do, validated on construction (ValueError -> exit 2)."""

    inputs: tuple[str, ...]
    output: str | None = None
    formats: tuple[str, ...] = ()
    encoded: bool = False
    ckpt: str | None = None
    model_file: str | None = None
    backend: str = "torch"
    sampler: str = DEFAULT_METHOD
    steps: int | None = None
    eta: float | None = None
    order: int | None = None
    seed: int = 0
    patch_size: int | None = None
    stride: int = 48
    window: str = "hann"
    merge: str = "step"
    grid: str = "overlap"
    batch_size: int | None = None
    max_pack: int = 8
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_cache: str | None = None
    no_compile_cache: bool = False
    cuda_graph: bool = False
    max_pixels: int | None = None
    consistency: str = "auto"
    band: float | None = None
    skip_determined: bool = True
    force: bool = False
    resume: bool = False
    quiet: bool = False
    verbose: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.force and self.resume:
            raise ValueError("--force (recompute and overwrite) and --resume (skip finished outputs) contradict "
                             "each other")
        if self.ckpt and self.model_file:
            raise ValueError("give --ckpt (a checkpoint) or --model (an exported file), not both")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.cuda_graph and self.device == "cpu":
            raise ValueError("--cuda-graph needs a CUDA device")
        if self.patch_size is not None and self.patch_size % 8:
            raise ValueError(f"--patch-size {self.patch_size} is not a multiple of 8")
        from .samplers import check_options

        check_options(self.sampler, steps=self.steps, eta=self.eta, order=self.order)
        if self.grid == "shifted" and self.merge == "end":
            raise ValueError("--grid shifted fuses at every step; it does not go with --merge end")
        from .consistency import ConsistencyConfig

        ConsistencyConfig(mode=self.consistency, band=self.band, skip=self.skip_determined)

    @classmethod
    def from_click(cls, params: dict[str, Any]) -> "InferOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in names})


# ---- phases ------------------------------------------------------------------------------------------------------

def _resolve_device(device: str) -> str:
    """auto -> cuda[:LOCAL_RANK] or cpu; a CUDA device must exist (UsageError otherwise)."""
    import torch

    if device == "cpu":
        return device
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local_rank = os.environ.get("LOCAL_RANK")
        device = f"cuda:{local_rank}" if local_rank is not None else "cuda"
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA device (a CPU-only build, or no GPU)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _plan(opts: InferOptions, console: Console, rank: int, world: int,
          reads: contextlib.ExitStack) -> tuple[list[Job], int, int, int]:
    """Inputs, outputs and their checks. Returns (jobs to run, inputs failed so far, skipped, inputs). The inputs
    and the model are declared read in ``reads`` (``fsio.reading``): no output replaces one, not with --force."""
    from .fsio import reading

    expanded = expand_inputs(opts.inputs)
    reads.enter_context(reading([*expanded.paths, opts.ckpt, opts.model_file]))
    if rank == 0:  # under torchrun, input problems are reported (and counted) once
        for note in expanded.notes:
            console.warn(note)
        for problem in expanded.errors:
            console.err(problem)
    if not expanded.paths:
        raise UsageError("no input images" if not expanded.errors else "no input images (see above)")
    failed = len(expanded.errors) if rank == 0 else 0
    planned = plan_outputs(expanded.paths, opts.output, opts.formats)
    if opts.encoded and rank == 0 and set(planned[0].outputs) == {"dng"}:
        console.warn("--encoded changes only TIFF and NPY outputs; a DNG always holds linear RAW")
    jobs = shard(planned, rank, world)
    if opts.output:
        prepare_output_dir(opts.output)
    checked = check_outputs(jobs, force=opts.force, resume=opts.resume)
    for problem in checked.errors:
        console.err(problem)
    for job in checked.skipped:
        console.out(f"{show_path(job.source)}: skipped, outputs exist (--resume)")
    return checked.todo, failed + len(checked.errors), len(checked.skipped), len(jobs) + len(expanded.errors)


def _load(opts: InferOptions, device: str):
    """The backend, self-tested (one patch through it) before any image is computed. UsageError otherwise."""
    from .backends import BackendError, default_checkpoint, open_backend
    from .checkpoint import CheckpointError

    path = opts.ckpt or opts.model_file
    if path is None:
        if opts.backend != "torch":
            raise UsageError(f"--backend {opts.backend} needs --model FILE (an .onnx file, an engine or an "
                             "AOTInductor package from rawdiff-export)")
        default = default_checkpoint()
        if default is None:
            raise UsageError("this build of rawdiff ships no default model; pass --ckpt MODEL.safetensors")
        path = str(default)
    dtype = _dtype(opts, device)
    per_batch_graph = backend_graphs(opts.cuda_graph, opts.backend)
    try:
        be = open_backend(opts.backend, path, device=device, dtype=dtype,
                          max_batch_size=_batch_size(opts, device) if per_batch_graph else None,
                          compile=opts.compile, cuda_graph=per_batch_graph,
                          compile_cache=False if opts.no_compile_cache else opts.compile_cache)
        be.self_test()
    except (CheckpointError, BackendError, ValueError, RuntimeError, OSError) as e:
        raise UsageError(first_line(e)) from None
    return be


def backend_graphs(cuda_graph: bool, backend: str) -> bool:
    """``--cuda-graph``'s one meaning: replay recorded CUDA graphs instead of launching kernels one by one.

    The backend replays its batches as graphs (the torch backend records one per batch shape, and every call of an
    evaluation has one shape, ``TileConfig.chunk``; a TensorRT engine runs in its own graph), for every run: packed
    folders, skipped patches and ``--merge end`` alike. A backend that can be captured (torch) also records, for a
    lone image on the step grid, each sampler step's whole model evaluation (``RawReconstructor(step_graph=)``).
    Returns whether the backend is opened with graphs; raises UsageError for a backend that replays none."""
    if not cuda_graph:
        return False
    if backend in ("onnx", "aoti"):
        raise UsageError(f"--cuda-graph: the {backend} backend replays no CUDA graphs (use --backend torch or trt)")
    return True


def _dtype(opts: InferOptions, device: str) -> str:
    """The torch backend's precision: --dtype, where auto is fp16 on CUDA and, on a CPU, bf16 only when the CPU
    has native bf16 arithmetic (``cpu.default_cpu_dtype``). Logged with -v; a warning for bf16 asked for where it is
    emulated."""
    from .cpu import default_cpu_dtype, resolve_dtype

    dtype, reason = resolve_dtype(opts.dtype, device)
    if opts.backend != "torch":
        return dtype  # the other backends run the precision their file was built for
    log.info("dtype %s on %s: %s", dtype, device, reason)
    if opts.dtype == "bf16" and device == "cpu":
        cpu_dtype, why = default_cpu_dtype()
        if cpu_dtype != "bf16":
            log.warning("--dtype bf16: %s", why)
    return dtype


def _batch_size(opts: InferOptions, device: str) -> int:
    # CPU: 16, the most patches per second on a 2-core CPU (channels_last fp32: 24 patches/s at 16, 19 at 64;
    # bf16 on avx512_bf16 was measured at 16 only: 33 patches/s)
    return opts.batch_size or (16 if device.startswith("cpu") else 256)


def _reconstructor(opts: InferOptions, be: Any, device: str):
    """Tiles, sampler and consistency checked against the loaded model (UsageError before any compute)."""
    from .pipeline import ConsistencyConfig, RawReconstructor, SamplerConfig
    from .tiling import TileConfig

    P = opts.patch_size or be.patch_size
    if be.fixed_patch_size and P != be.patch_size:
        raise UsageError(f"--patch-size {P}: {show_path(opts.model_file or opts.ckpt or '')} is built for "
                         f"{be.patch_size}-pixel patches")
    lo, hi = max(8, be.meta.model.patch_size // 2), 2 * be.meta.model.patch_size
    if not lo <= P <= hi:
        raise UsageError(f"--patch-size {P}: this model was trained on {be.meta.model.patch_size}-pixel patches "
                         f"and runs on {lo}..{hi}")
    try:
        be.meta.model.check_patch_cost(P)  # the description's own bound, at the patch size asked for
    except ValueError as e:
        raise UsageError(f"--patch-size {P}: {first_line(e)}") from None
    try:
        tiles = TileConfig(patch_size=P, stride=min(opts.stride, P), window=opts.window,  # type: ignore[arg-type]
                           batch_size=_batch_size(opts, device), merge=opts.merge,  # type: ignore[arg-type]
                           grid=opts.grid)  # type: ignore[arg-type]
        sampler = SamplerConfig(method=opts.sampler, steps=opts.steps, eta=opts.eta, order=opts.order)
        if sampler.num_steps > be.meta.schedule.num_timesteps:
            raise ValueError(f"--steps {sampler.num_steps}: the model's schedule has only "
                             f"{be.meta.schedule.num_timesteps} timesteps")
        step_graph = opts.cuda_graph and opts.merge == "step" and be.capturable
        if opts.consistency == "on" and be.meta.isp is None:
            raise ValueError(f"--consistency on: {show_path(opts.model_file or opts.ckpt or 'the model')} does not "
                             "describe its camera's ISP (no 'isp' in its description); use --consistency off")
        consistency = ConsistencyConfig(mode=opts.consistency, band=opts.band, skip=opts.skip_determined)
        return RawReconstructor(be, sampler=sampler, tiles=tiles, step_graph=step_graph, consistency=consistency)
    except ValueError as e:
        raise UsageError(first_line(e)) from None


def _os_problem(e: OSError, directory: Path) -> str:
    """The reason of a failed write, in words. numpy's ``tofile`` (which tifffile uses) reports a short write as
    ``OSError("N requested and M written")`` without errno: on a (nearly) full disk that is "no space left"."""
    from .fsio import OutputExistsError

    if isinstance(e, OutputExistsError):
        return f"{e.strerror or 'exists'} (use --force to replace)"
    if e.strerror:
        return e.strerror
    msg = first_line(e)
    if re.fullmatch(r"\d+ requested and \d+ written", msg):
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = None
        if free is not None and free < 1 << 20:
            return "No space left on device"
        return f"short write ({msg}); is the disk full?"
    return msg


class _WriteError(Exception):
    """An output file could not be written (message: one line naming it)."""


def _writer(opts: InferOptions, camera: Any, software: str):
    from .io import write_dng, write_npy, write_tiff

    def write(job: Job, rec: Any, srgb: Any) -> None:
        linear = rec.linear  # computed once (H x W x 3 float32)
        for fmt, path in job.outputs.items():
            data = rec.encoded if (opts.encoded and fmt != "dng") else linear
            try:
                if fmt == "dng":
                    write_dng(path, linear, camera=camera, preview_srgb=srgb, software=software,
                              description=f"rawdiff reconstruction of {job.source.name}", overwrite=opts.force)
                elif fmt == "tiff":
                    write_tiff(path, data, software=software, overwrite=opts.force)
                else:
                    write_npy(path, data, overwrite=opts.force)
            except OSError as e:
                raise _WriteError(f"{show_path(path)}: cannot write: {_os_problem(e, path.parent)}") from None

    return write


def _decoder(opts: InferOptions):
    """job -> (pixels, band): the band from the decoded file (its bit depth, a JPEG's quality) unless --band."""
    from .consistency import Band
    from .io import read_image

    def decode(job: Job):
        img = read_image(job.source, max_pixels=opts.max_pixels)
        band = Band.for_input(255 if img.bit_depth == 8 else 65535, width_8bit=opts.band,
                              jpeg_quality=getattr(img, "jpeg_quality", None))
        return img.pixels, band

    return decode


def _check_size(job: Job, pixels: Any) -> str | None:
    h, w = pixels.shape[:2]
    if "dng" in job.outputs and min(h, w) < 2:
        return (f"{show_path(job.source)}: a {w}x{h} image is too small for a DNG (2x2 at least); use --format "
                "tiff or npy")
    return None


def run(opts: InferOptions, console: Console, state: dict[str, Any]) -> int:
    """Run rawdiff-infer with validated options; returns the exit status (raises UsageError for exit 2)."""
    rank, world = world_from_env()
    with contextlib.ExitStack() as reads:
        todo, failed, skipped, n_inputs = _plan(opts, console, rank, world, reads)
        if not todo:
            return _summary(console, failed, 0, skipped, n_inputs)
        return _compute(opts, console, state, todo, failed, skipped, n_inputs)


def _compute(opts: InferOptions, console: Console, state: dict[str, Any], todo: list[Job], failed: int,
             skipped: int, n_inputs: int) -> int:
    """Load the model, check it against the options, run the jobs."""
    device = _resolve_device(opts.device)
    with _load(opts, device) as be:
        rec = _reconstructor(opts, be, device)
        if not rec.consistent and opts.consistency == "auto":
            console.out("note: this model does not describe its camera's ISP, so its output is not made "
                        "consistent with the input (see --consistency)")
        return _process(opts, console, state, rec, be, todo, failed, skipped, n_inputs)


def _process(opts: InferOptions, console: Console, state: dict[str, Any], rec: Any, be: Any, todo: list[Job],
             failed: int, skipped: int, n_inputs: int) -> int:
    from . import __version__
    from .backends import BackendError
    from .io import ImageError
    from .runner import FolderRunner, Outcome, default_progress
    from .tiling import NonFiniteOutputError

    done = 0

    def on_outcome(o: Outcome) -> None:
        nonlocal done, failed
        if not o.ok:
            failed += 1
            console.err(o.message)
            return
        done += 1
        assert o.result is not None
        h, w = o.result.encoded.shape[:2]
        outs = ", ".join(show_path(p) for p in o.job.outputs.values())
        shared = o.result.extra.get("pack_size", 1)
        evaluated = o.result.extra.get("evaluated_patches", o.result.patches)
        skipped_note = (f" ({o.result.patches - evaluated} determined: closed form)"
                        if shared == 1 and evaluated < o.result.patches else "")
        console.out(f"{show_path(o.job.source)} -> {outs}  {w}x{h}, {o.result.patches} patches{skipped_note}, {o.result.steps} "
                    f"steps ({opts.sampler}), {o.result.seconds:.1f} s"
                    + (f" (shared by {shared} images)" if shared > 1 else ""))

    show_progress = not opts.quiet and (opts.progress if opts.progress is not None else sys.stderr.isatty())
    console.bars = show_progress
    runner = FolderRunner(rec, decode=_decoder(opts), write=_writer(opts, be.meta.camera, f"rawdiff {__version__}"),
                          seed=opts.seed, max_pack=opts.max_pack,
                          fail_on=(ImageError, _WriteError, BackendError, NonFiniteOutputError, MemoryError,
                                   ValueError, RuntimeError, OSError),
                          check=_check_size, on_outcome=on_outcome,
                          progress=default_progress(show_progress, sys.stderr))
    state["runner"] = runner
    runner.run(todo)
    return _summary(console, failed, done, skipped, n_inputs)


def _summary(console: Console, failed: int, done: int, skipped: int, n_inputs: int) -> int:
    """A count line on stderr when some of several inputs failed; the exit status."""
    if failed and n_inputs > 1:
        console.err(f"{failed} failed, {done} done" + (f", {skipped} skipped (--resume)" if skipped else ""))
    return EXIT_SOME_FAILED if failed else EXIT_OK


# ---- the click command ---------------------------------------------------------------------------------------------

HELP = f"""Reconstruct camera RAW from sRGB photos (JPEG, PNG, TIFF, WebP).

INPUTS are image files, directories (their images, non-recursive) or quoted globs. Each input gives
INPUT.dng next to it unless -o names a file (one input) or a directory (created if needed). The DNG holds
the reconstructed Bayer mosaic with the model camera's colour matrix, so any raw converter renders it;
--format tiff writes a 16-bit demosaiced linear TIFF, --format npy a float32 H x W x 3 array in [0, 1]
(--encoded: TIFF/NPY hold the model's gamma-encoded space instead of linear; the DNG is always linear).

\b
Examples:
  rawdiff-infer photo.jpg                               # -> photo.dng, default model and sampler
  rawdiff-infer photo.jpg -o out.dng --sampler ddpm     # the paper's 1000-step sampler
  rawdiff-infer shots/ "more/*.png" -o raw/ --format dng --format npy --resume
  torchrun --nproc-per-node 4 -m rawdiff_infer.cli shots/ -o raw/ --resume   # one GPU per rank

Exit status: 0 all images done, 1 some failed (each reported on stderr), 2 bad command line, model or output
folder (nothing computed), 128+N for signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; within seconds, even in
the middle of a model call). Outputs are written atomically and never replace a file, not even one that
appeared while rawdiff was computing, without --force: never a partial file.
"""


def _sampler_help() -> str:
    return "; ".join(f"{k}: {s.summary}" for k, s in SPECS.items())


@click.command(_PROG, cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output file (one input; suffix .dng/.tiff/.npy) or directory.")
@click.option("--format", "formats", multiple=True, type=click.Choice(sorted(FORMATS)),
              help="Output format(s); repeat for several. Default: from -o's suffix, else dng.")
@click.option("--encoded", is_flag=True, help="TIFF/NPY hold the gamma-encoded RAW (model space) instead of linear.")
@click.option("--ckpt", help="rawdiff checkpoint (.safetensors or sharded folder). Default: the bundled model.")
@click.option("--model", "model_file", help="Model for --backend onnx|trt|aoti: an .onnx file, a TensorRT engine or "
              "an AOTInductor package (.pt2).")
@click.option("--backend", type=click.Choice(["torch", "onnx", "trt", "aoti"]), default="torch", show_default=True)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=DEFAULT_METHOD, show_default=True,
              help=_sampler_help())
@click.option("--steps", type=click.IntRange(1, 1000),
              help="Model evaluations. Default: " + ", ".join(f"{k} {s.default_steps}" for k, s in SPECS.items())
              + ".")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), help="Noise re-injected per step, in [0, 1] (0: the "
              "deterministic ODE step). Default: " + ", ".join(f"{k} {s.default_eta:g}" for k, s in SPECS.items()
                                                              if s.default_eta is not None) + ".")
@click.option("--order", type=click.IntRange(1, 3), help="Solver order. Default: " + ", ".join(
              f"{k} {s.default_order}" + (f" ({s.default_order - 1} below {s.top_order_min_steps} steps)"
                                          if s.top_order_min_steps > 1 else "")
              for k, s in SPECS.items() if s.orders) + ".")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Noise seed, 0..2^64-1 (same seed, same output).")
@click.option("--patch-size", type=click.IntRange(8, 1024), help="Patch size in pixels, a multiple of 8, from half "
              "to twice the model's training patch (default: the model's, 64; an ONNX graph or engine fixes it).")
@click.option("--stride", type=click.IntRange(1, 1024), default=48, show_default=True,
              help="Pixels between patches of the overlap grid (overlap = patch - stride; at most the patch size).")
@click.option("--grid", type=click.Choice(GRIDS), default="overlap", show_default=True,
              help="overlap: patches every --stride pixels, window-fused; shifted: no overlap, the grid moved at "
              "every step: 0.56x the patches, but 0.6 dB lower and faint seams at 10 steps (measured).")
@click.option("--window", type=click.Choice(WINDOWS), default="hann", show_default=True)
@click.option("--merge", type=click.Choice(["step", "end"]), default="step", show_default=True,
              help="step: fuse overlapping patches at every step (seamless); end: the paper's independent patches.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), help="Patches per model call (default: 256 on "
              "CUDA, 16 on CPU). Small images are packed together up to this many patches.")
@click.option("--max-pack", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Most images that share the model's calls (1: one image at a time).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="torch backend precision. auto: fp16 on CUDA; on a CPU, bf16 when the CPU has native bf16 "
              "arithmetic (avx512_bf16: AMD Zen 4+, Intel Cooper Lake; or AMX: Intel Sapphire Rapids+), about 2x "
              "fp32's speed (measured on Zen 4), else fp32: elsewhere bf16 is emulated, 10-1000x slower. -v says "
              "which was chosen and why.")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the U-Net (CUDA). The compiled kernels are "
              "cached on disk, so only the first run pays the compilation.")
@click.option("--compile-cache", type=click.Path(file_okay=False), help="Folder of the persistent compile cache "
              "(default: $XDG_CACHE_HOME/rawdiff/inductor, or TORCHINDUCTOR_CACHE_DIR when set).")
@click.option("--no-compile-cache", is_flag=True, help="Leave torch's own compile-cache setting alone.")
@click.option("--cuda-graph", is_flag=True,
              help="Replay recorded CUDA graphs instead of launching kernels one by one (torch and trt backends): "
              "the model's calls always, and with the torch backend each sampler step's whole model evaluation of "
              "a lone image on the step grid. Costs GPU memory.")
@click.option("--consistency", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Project every prediction onto the RAWs that the model's camera ISP renders to the input: exact "
              "where the photo is not clipped, at or above white where it is. auto: when the model describes its "
              "ISP (the bundled one does); on: fail if it does not; off: the model's own output.")
@click.option("--band", type=click.FloatRange(0.0, 64.0), metavar="LEVELS",
              help="Half-width, in 8-bit levels, of the band around each unclipped input level that the output must "
              "render into. Default: 0 (the closed form on every unclipped channel: the bundled model measured no "
              "better inside the band) for lossless input and JPEG of quality 75 or more, up to 1 at quality 50, "
              "from the file's quantisation tables. 0.5 is the whole quantisation step.")
@click.option("--skip-determined/--no-skip-determined", default=True, show_default=True,
              help="With consistency: patches without a clipped pixel skip the model; their answer is the "
              "closed-form inverse of the ISP (the same answer, at the default band, in less time).")
@click.option("--max-pixels", type=click.IntRange(1), help="Raise/lower the decompression-bomb limit (pixels).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--resume", is_flag=True, help="Skip inputs whose outputs all exist (they are complete: writes are "
              "atomic); write only the missing ones of the others.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: when it is a "
              "terminal).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or result lines; errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and show tracebacks of internal errors).")
def cli(**params: Any) -> None:
    console = Console(_PROG, quiet=params.get("quiet", False), verbose=params.get("verbose", False))
    state: dict[str, Any] = {}

    def last_words(e: Interrupted) -> None:
        where = _where(state)
        console.err(f"{e.verb}{where}; no partial output was written")

    code = EXIT_USAGE
    with console.capture(), handle_interrupts(last_words):
        try:
            code = run(InferOptions.from_click(params), console, state)
        except (UsageError, ValueError) as e:
            console.err(f"error: {first_line(e)}")
            code = EXIT_USAGE
        except KeyboardInterrupt as e:
            last_words(e if isinstance(e, Interrupted) else Interrupted())
            code = exit_code_of(e)
        except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback with -v
            if params.get("verbose"):
                import traceback

                traceback.print_exc()
            console.err(f"internal error: {type(e).__name__}: {first_line(e)} (please report it; -v shows the "
                        "traceback)")
            code = EXIT_SOME_FAILED
    sys.exit(code)


def _where(state: dict[str, Any]) -> str:
    runner = state.get("runner")
    current = getattr(runner, "current", None) if runner is not None else None
    return f" while processing {show_path(current)}" if current is not None else ""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name=_PROG)


if __name__ == "__main__":  # torchrun -m rawdiff_infer.cli ...
    main()
