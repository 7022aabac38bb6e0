"""rawdiff-infer: the command line over RawReconstructor. Parses, calls the library, maps errors to exit codes.

Phases, so that every problem that can be found before any compute is found before the model is loaded:
expand the inputs -> plan every output path (collisions, inputs that would be overwritten) -> shard (torchrun)
-> prepare and probe the output folders -> skip / refuse existing outputs -> load the model -> per image: decode,
reconstruct, write atomically. Errors are one line on stderr, ``rawdiff-infer: <file>: <problem>``.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import click

__all__ = ["cli", "main"]

log = logging.getLogger("rawdiff_infer.cli")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
FORMATS = {"dng": ".dng", "tiff": ".tiff", "npy": ".npy"}
_SUFFIX_FORMAT = {".dng": "dng", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}
_PROG = "rawdiff-infer"


class UsageError(Exception):
    """A problem with the command line as a whole (exit 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that temporary files are removed on the way out."""


@dataclass
class Job:
    source: Path
    outputs: dict[str, Path]  # format -> path


@dataclass
class Inputs:
    paths: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)    # reported, and make the exit status 1
    notes: list[str] = field(default_factory=list)     # reported as warnings only


@dataclass
class RunState:
    """What the run is doing now (for the interrupt message)."""

    current: Path | None = None


def _err(msg: str) -> None:
    click.echo(f"{_PROG}: {msg}", err=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _expand_inputs(items: tuple[str, ...]) -> Inputs:
    """Files, directories (their supported images, sorted, non-recursive) and globs -> paths and problems.

    Files named explicitly are always attempted (the decoder reports what is wrong with them); in directories and
    glob matches, hidden files and files that are not JPEG/PNG/TIFF/WebP by suffix (RAW files next to their JPEGs,
    sidecars, ...) are left out with one summary warning per directory or pattern.
    """
    from .io import is_supported_image

    res = Inputs()

    def add_listing(where: str, files: list[Path]) -> None:
        images = [q for q in files if is_supported_image(q)]
        others = [q for q in files if not is_supported_image(q)]
        res.paths.extend(images)
        if others:
            res.notes.append(f"{where}: ignored {len(others)} file(s) that are not JPEG, PNG, TIFF or WebP "
                             f"images (e.g. {others[0].name})")
        if not images:
            res.errors.append(f"{where}: no JPEG, PNG, TIFF or WebP images found")

    for item in items:
        p = Path(item)
        if any(ch in item for ch in "*?[") and not p.exists():
            matches = [Path(m) for m in sorted(glob.glob(item))]
            files = [m for m in matches if m.is_file() and not m.name.startswith(".")]
            if not matches:
                res.errors.append(f"{item}: no file matches this pattern")
            else:
                add_listing(item, files)
        elif p.is_dir():
            add_listing(str(p), sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")))
        else:
            res.paths.append(p)  # missing / bad files are reported per image, with the others still processed
    seen: set[Path] = set()
    unique = []
    for p in res.paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    res.paths = unique
    return res


def _output_is_file(output: str | None) -> bool:
    """-o names one output file (suffix .dng/.tif/.tiff/.npy, not an existing directory), else a directory."""
    if not output:
        return False
    out = Path(output)
    return out.suffix.lower() in _SUFFIX_FORMAT and not out.is_dir() and not output.endswith(("/", os.sep))


def _plan(inputs: list[Path], output: str | None, formats: tuple[str, ...]) -> list[Job]:
    """Decide every output path up front (so collisions and bad targets fail before any compute)."""
    from .io import RAW_SUFFIXES, SUPPORTED_INPUT_SUFFIXES

    out = Path(output) if output else None
    out_is_file = _output_is_file(output)
    if out is not None and not out_is_file and not out.is_dir() and (
            out.suffix.lower() in SUPPORTED_INPUT_SUFFIXES | RAW_SUFFIXES):
        raise UsageError(f"-o {out}: rawdiff writes .dng, .tiff or .npy files; name one of those, or a directory")
    fmts = list(dict.fromkeys(formats)) if formats else []
    if out_is_file:
        assert out is not None
        if len(inputs) > 1:
            raise UsageError(f"-o {out} names one file but {len(inputs)} inputs were given; give a directory")
        if not fmts:
            fmts = [_SUFFIX_FORMAT[out.suffix.lower()]]
    if not fmts:
        fmts = ["dng"]
    sources = {p.resolve(): p for p in inputs}
    jobs: list[Job] = []
    taken: dict[Path, Path] = {}
    for src in inputs:
        outs = {}
        for f in fmts:
            if out_is_file:
                assert out is not None
                target = out if _SUFFIX_FORMAT[out.suffix.lower()] == f else out.with_suffix(FORMATS[f])
            elif out is not None:
                target = out / (src.stem + FORMATS[f])
            else:
                target = src.with_suffix(FORMATS[f])
            key = target.resolve()
            if key in sources:
                raise UsageError(f"{src}: the output {target} would overwrite the input {sources[key]}; "
                                 "use -o DIR")
            if key in taken:
                raise UsageError(f"{src} and {taken[key]} would both write {target}; use separate output folders")
            taken[key] = src
            outs[f] = target
        jobs.append(Job(src, outs))
    return jobs


def _world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} / RANK={os.environ.get('RANK')!r} "
                         "are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def _shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """Under torchrun (WORLD_SIZE > 1) each rank takes every WORLD_SIZE-th input (planned over all inputs)."""
    return jobs[rank::world] if world > 1 else jobs


def _resolve_device(device: str) -> str:
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}" if local_rank is not None else "cuda"
        return "cpu"
    return device


def _probe_directory(directory: Path) -> str | None:
    """None if a file can be created in ``directory`` (checked by creating an anonymous temporary file, which
    is true even for root on read-only mounts), else the reason."""
    if not directory.exists():
        return "does not exist"
    if not directory.is_dir():
        return "is not a directory"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e.strerror or _first_line(e)
    return None


def _load_backend(backend: str, ckpt: str | None, device: str, dtype: str, batch_size: int, compile_: bool,
                  cuda_graph: bool):
    from .backends import default_checkpoint, open_backend

    path = ckpt
    if path is None:
        if backend != "torch":
            raise UsageError(f"--backend {backend} needs --model FILE (an .onnx file or an engine from rawdiff-export)")
        default = default_checkpoint()
        if default is None:
            raise UsageError("this build of rawdiff ships no default model yet; pass --ckpt MODEL.safetensors "
                             "(train one with rawdiff-train)")
        path = str(default)
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return open_backend(backend, path, device=device, dtype=dtype,
                        max_batch_size=batch_size if cuda_graph else None, compile=compile_, cuda_graph=cuda_graph)


def _write_outputs(job: Job, rec, srgb, camera, encoded_only: bool, software: str, overwrite: bool) -> None:
    """Write every output of ``job``; an OSError names the output file that failed."""
    from .io import write_dng, write_npy, write_tiff

    linear = rec.linear  # computed once (H x W x 3 float32)
    for fmt, path in job.outputs.items():
        try:
            if fmt == "dng":
                write_dng(path, linear, camera=camera, preview_srgb=srgb, software=software,
                          description=f"rawdiff reconstruction of {job.source.name}", overwrite=overwrite)
            elif fmt == "tiff":
                write_tiff(path, rec.encoded if encoded_only else linear, software=software, overwrite=overwrite)
            else:
                write_npy(path, rec.encoded if encoded_only else linear, overwrite=overwrite)
        except OSError as e:
            raise _WriteError(f"{path}: cannot write: {_os_problem(e, path.parent)}") from None


def _os_problem(e: OSError, directory: Path) -> str:
    """The reason of a failed write, in words. numpy's ``tofile`` (which tifffile uses) reports a short write as
    ``OSError("N requested and M written")`` without errno: on a (nearly) full disk that is "no space left"."""
    if e.strerror:
        return e.strerror
    msg = _first_line(e)
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


class _StderrHandler(logging.Handler):
    """Library log records -> ``rawdiff-infer: warning: ...`` on the current stderr (click's, under CliRunner)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
            level = record.levelname.lower()
            click.echo(f"{_PROG}: {level}: {msg}", err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


HELP = """Reconstruct camera RAW from sRGB photos (JPEG, PNG, TIFF, WebP).

INPUTS are image files, directories (their images, non-recursive) or quoted globs. Each input gives
INPUT.dng next to it unless -o names a file (one input) or a directory (created if needed). The DNG holds
the reconstructed Bayer mosaic with the model camera's colour matrix, so any raw converter renders it;
--format tiff writes a 16-bit demosaiced linear TIFF, --format npy a float32 H x W x 3 array in [0, 1]
(--encoded: TIFF/NPY hold the model's gamma-encoded space instead of linear; the DNG is always linear).

\b
Examples:
  rawdiff-infer photo.jpg                               # -> photo.dng, default model, dpm 20 steps
  rawdiff-infer photo.jpg -o out.dng --sampler ddpm     # the paper's 1000-step sampler
  rawdiff-infer shots/ "more/*.png" -o raw/ --format dng --format npy --resume
  torchrun --nproc-per-node 4 -m rawdiff_infer.cli shots/ -o raw/ --resume   # one GPU per rank

Exit status: 0 all images done, 1 some failed (each reported on stderr), 2 bad command line, model or output
folder (nothing computed), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Outputs are written
atomically: never a partial file, never an existing file overwritten without --force.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output file (one input; suffix .dng/.tiff/.npy) or directory.")
@click.option("--format", "formats", multiple=True, type=click.Choice(sorted(FORMATS)),
              help="Output format(s); repeat for several. Default: from -o's suffix, else dng.")
@click.option("--encoded", is_flag=True, help="TIFF/NPY hold the gamma-encoded RAW (model space) instead of linear.")
@click.option("--ckpt", help="rawdiff checkpoint (.safetensors or sharded folder). Default: the bundled model.")
@click.option("--model", "model_file", help="Model for --backend onnx|trt: an .onnx file or a TensorRT engine.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "trt"]), default="torch", show_default=True)
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "dpm", "dpm-sde", "dpm-single"]), default="dpm-sde",
              show_default=True, help="ddpm: 1000-step ancestral; ddim; dpm: DPM-Solver++ multistep (ODE); "
              "dpm-sde: SDE-DPM-Solver++ multistep (stochastic: re-injects noise like ddpm); "
              "dpm-single: singlestep DPM-Solver (the paper's fast sampler).")
@click.option("--steps", type=click.IntRange(1, 1000),
              help="Model evaluations. Default: ddpm 1000, ddim 50, dpm 20, dpm-sde 20, dpm-single 20.")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True, help="DDIM noise.")
@click.option("--order", type=click.IntRange(1, 3), help="Solver order (dpm: 2, dpm-sde: 2 at most, dpm-single: 3).")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (same seed, same output).")
@click.option("--patch-size", type=click.IntRange(8), help="Patch size in pixels, a multiple of 8 "
              "(default: the model's, 64).")
@click.option("--stride", type=click.IntRange(1), default=48, show_default=True,
              help="Pixels between patches (overlap = patch - stride; at most the patch size).")
@click.option("--window", type=click.Choice(["hann", "linear", "uniform"]), default="hann", show_default=True)
@click.option("--merge", type=click.Choice(["step", "end"]), default="step", show_default=True,
              help="step: fuse overlapping patches at every step (seamless); end: the paper's independent patches.")
@click.option("--batch-size", type=click.IntRange(1), help="Patches per model call (default: 256 on CUDA, 64 on CPU, "
              "where larger batches are slower).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="torch backend precision (auto: fp16 on CUDA, fp32 on CPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the U-Net (CUDA; slow first image).")
@click.option("--cuda-graph", is_flag=True,
              help="Replay CUDA graphs (torch backend). --merge step: each sampler step's whole model evaluation "
              "(every patch batch and the fusion) is recorded once per image size; --merge end: the U-Net per "
              "batch (fixed --batch-size). Helps where batches are small; costs GPU memory.")
@click.option("--max-pixels", type=click.IntRange(1), help="Raise/lower the decompression-bomb limit (pixels).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--resume", is_flag=True, help="Skip inputs whose outputs all exist (they are complete: writes are "
              "atomic); write only the missing ones of the others.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summaries; errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and show tracebacks of internal errors).")
def cli(inputs, output, formats, encoded, ckpt, model_file, backend, sampler, steps, eta, order, seed, patch_size,
        stride, window, merge, batch_size, device, dtype, compile_, cuda_graph, max_pixels, force, resume, quiet,
        verbose) -> None:
    pkg_log = logging.getLogger("rawdiff_infer")
    handler = _StderrHandler()
    saved_log = (pkg_log.level, pkg_log.propagate)
    pkg_log.addHandler(handler)
    pkg_log.setLevel(logging.INFO if verbose else logging.WARNING)
    pkg_log.propagate = False
    state = RunState()
    saved_term = None
    if threading.current_thread() is threading.main_thread():
        saved_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = _run(inputs, output, formats, encoded, ckpt or model_file, backend, sampler, steps, eta, order, seed,
                    patch_size, stride, window, merge, batch_size, device, dtype, compile_, cuda_graph, max_pixels,
                    force, resume, quiet, state)
    except UsageError as e:
        _err(f"error: {e}")
        code = EXIT_USAGE
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        where = f" while processing {state.current}" if state.current is not None else ""
        _err(f"{what}{where}; no partial output was written")
        code = EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback with -v
        if verbose:
            import traceback

            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {_first_line(e)} (please report it; -v shows the traceback)")
        code = EXIT_SOME_FAILED
    finally:
        pkg_log.removeHandler(handler)
        pkg_log.setLevel(saved_log[0])
        pkg_log.propagate = saved_log[1]
        if saved_term is not None:
            signal.signal(signal.SIGTERM, saved_term)
    sys.exit(code)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _run(inputs, output, formats, encoded, model_path, backend_kind, method, steps, eta, order, seed, patch_size,
         stride, window, merge, batch_size, device, dtype, compile_, cuda_graph, max_pixels, force, resume,
         quiet, state: RunState) -> int:
    if force and resume:
        raise UsageError("--force (recompute and overwrite) and --resume (skip finished outputs) contradict each other")
    if patch_size is not None and patch_size % 8:
        raise UsageError(f"--patch-size {patch_size} is not a multiple of 8")
    rank, world = _world()

    expanded = _expand_inputs(inputs)
    if rank == 0:  # under torchrun, input problems are reported (and counted) once
        for note in expanded.notes:
            _err(f"warning: {note}")
        for problem in expanded.errors:
            _err(problem)
    if not expanded.paths:
        raise UsageError("no input images" if not expanded.errors else "no input images (see above)")
    failed = len(expanded.errors) if rank == 0 else 0
    planned = _plan(expanded.paths, output, formats)
    if encoded and rank == 0 and set(planned[0].outputs) == {"dng"}:
        _err("warning: --encoded changes only TIFF and NPY outputs; a DNG always holds linear RAW")
    jobs = _shard(planned, rank, world)

    # output folders: -o's folder is created and probed now (a problem there is a command-line problem)
    if output:
        out_dir = Path(output).parent if _output_is_file(output) else Path(output)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"-o {output}: {out_dir} exists and is not a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output directory {out_dir}: {e.strerror or _first_line(e)}") from None
        problem = _probe_directory(out_dir)
        if problem:
            raise UsageError(f"cannot write to output directory {out_dir}: {problem}")

    probed: dict[Path, str | None] = {}
    todo: list[Job] = []
    skipped = 0
    for job in jobs:
        if not job.source.exists():
            _err(f"{job.source}: no such file")
            failed += 1
            continue
        existing = [p for p in job.outputs.values() if p.exists()]
        if existing and resume:
            if len(existing) == len(job.outputs):
                skipped += 1
                if not quiet:
                    click.echo(f"{job.source}: skipped, outputs exist (--resume)")
                continue
            job = Job(job.source, {f: p for f, p in job.outputs.items() if not p.exists()})
        elif existing and not force:
            _err(f"{existing[0]}: exists, not overwritten (use --force to overwrite, --resume to skip)")
            failed += 1
            continue
        for d in {p.parent for p in job.outputs.values()} - probed.keys():
            probed[d] = _probe_directory(d)
        bad = [(d, probed[d]) for d in sorted({p.parent for p in job.outputs.values()}) if probed[d]]
        if bad:
            _err(f"{job.source}: cannot write output to {bad[0][0]}: {bad[0][1]}")
            failed += 1
            continue
        todo.append(job)
    n_inputs = len(jobs) + len(expanded.errors)
    if not todo:
        return _summary(failed, 0, skipped, n_inputs)

    from tqdm import tqdm

    from . import __version__
    from .backends import BackendError
    from .checkpoint import CheckpointError
    from .io import ImageError, read_image
    from .pipeline import RawReconstructor, SamplerConfig
    from .tiling import TileConfig

    dev = _resolve_device(device)
    if batch_size is None:
        batch_size = 64 if dev.startswith("cpu") else 256
    try:
        sampler = SamplerConfig(method=method, steps=steps, eta=eta, order=order)
        if cuda_graph and not dev.startswith("cuda"):
            raise ValueError("--cuda-graph needs a CUDA device")
        # step fusion records the whole step (the backend's own per-batch graph would only cost memory)
        be = _load_backend(backend_kind, model_path, dev, dtype, batch_size, compile_, cuda_graph and merge == "end")
    except (CheckpointError, BackendError, ValueError, RuntimeError, OSError) as e:
        raise UsageError(_first_line(e)) from None
    done = 0
    with be:
        P = patch_size or be.meta.model.patch_size
        try:
            tiles = TileConfig(patch_size=P, stride=min(stride, P), window=window, batch_size=batch_size,
                               merge=merge)
        except ValueError as e:
            raise UsageError(_first_line(e)) from None
        step_graph = cuda_graph and merge == "step"
        if step_graph and not be.capturable:
            raise UsageError(f"--cuda-graph with --merge step needs the torch backend (got {backend_kind})")
        rec = RawReconstructor(be, sampler=sampler, tiles=tiles, step_graph=step_graph)
        images = tqdm(todo, desc="images", unit="img", disable=quiet or len(todo) < 2, file=sys.stderr)
        for job in images:
            state.current = job.source
            try:
                img = read_image(job.source, max_pixels=max_pixels)
                h, w = img.pixels.shape[:2]
                if "dng" in job.outputs and min(h, w) < 2:
                    raise ImageError(f"{job.source}: a {w}x{h} image is too small for a DNG (2x2 at least); "
                                     "use --format tiff or npy")
                bar = tqdm(total=sampler.num_steps, desc=job.source.name, unit="step", leave=False,
                           disable=quiet, file=sys.stderr)

                def progress(n: int, total: int, bar=bar) -> None:
                    bar.total = total
                    bar.n = n
                    bar.refresh()

                try:
                    result = rec.reconstruct(img.pixels, seed=seed, progress=progress)
                finally:
                    bar.close()
                _write_outputs(job, result, img.pixels, be.meta.camera, encoded, software=f"rawdiff {__version__}",
                               overwrite=force)
                done += 1
                if not quiet:
                    outs = ", ".join(str(p) for p in job.outputs.values())
                    click.echo(f"{job.source} -> {outs}  {w}x{h}, {result.patches} patches, {result.steps} steps "
                               f"({method}), {result.seconds:.1f} s")
            except ImageError as e:
                _err(_first_line(e))
                failed += 1
            except _WriteError as e:
                _err(str(e))
                failed += 1
            except MemoryError:
                _err(f"{job.source}: not enough memory for this image; try a smaller --batch-size")
                failed += 1
            except (BackendError, RuntimeError, ValueError, OSError) as e:
                _err(f"{job.source}: {_first_line(e)}")
                failed += 1
        state.current = None  # (kept on Ctrl-C, for the message)
    return _summary(failed, done, skipped, n_inputs)


def _summary(failed: int, done: int, skipped: int, n_inputs: int) -> int:
    """A count line on stderr when some of several inputs failed; the exit status."""
    if failed and n_inputs > 1:
        _err(f"{failed} failed, {done} done" + (f", {skipped} skipped (--resume)" if skipped else ""))
    return EXIT_SOME_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name=_PROG)


if __name__ == "__main__":  # torchrun -m rawdiff_infer.cli ...
    main()
