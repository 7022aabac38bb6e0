"""Planning a run of rawdiff-infer: which inputs, which output files, and every problem found before any compute.

- ``expand_inputs``: files, folders (their images, sorted, not recursive) and quoted globs -> paths. A bad input
  (missing, a symlink loop, a name the system refuses) is a problem of that input only.
- ``plan_outputs``: every output path decided up front, so that collisions, an output that would overwrite its
  input, and a bad ``-o`` fail before the model is even loaded.
- ``check_outputs``: per job, existing outputs (refused without ``--force``, skipped with ``--resume`` only when
  they are regular files), non-regular things at an output path, names too long, folders that cannot be written.

Problems of the command line as a whole raise :class:`UsageError` (exit 2); problems of one input are returned as
one-line messages (that input fails, the others go on).
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import fsio
from .io import RAW_SUFFIXES, SUPPORTED_INPUT_SUFFIXES, is_supported_image
from .messages import first_line, show_path

__all__ = ["FORMATS", "Inputs", "Job", "UsageError", "check_output_file", "check_output_files", "check_outputs",
           "expand_inputs", "output_dir_of", "plan_outputs", "prepare_output_dir", "shard", "world_from_env"]

FORMATS = {"dng": ".dng", "tiff": ".tiff", "npy": ".npy"}
_SUFFIX_FORMAT = {".dng": "dng", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}
#: longest file name (bytes) most file systems take
NAME_MAX = 255


class UsageError(Exception):
    """A problem with the command line as a whole (exit 2), found before any compute."""


@dataclass
class Job:
    """One input and the output file of each format."""

    source: Path
    outputs: dict[str, Path]  # format -> path


@dataclass
class Inputs:
    paths: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)    # reported, and make the exit status 1
    notes: list[str] = field(default_factory=list)     # reported as warnings only


def _stat(path: Path) -> tuple[os.stat_result | None, str | None]:
    """(stat, None), (None, None) when missing, or (None, reason) when the system refuses the path."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return None, None
        return None, e.strerror or first_line(e)


def _key(path: Path) -> str:
    """A path's identity for duplicate detection (symlinks resolved; never raises, loops included)."""
    try:
        return os.path.realpath(path)
    except (OSError, RuntimeError, ValueError):
        return os.path.abspath(path)


def expand_inputs(items: tuple[str, ...]) -> Inputs:
    """Files, directories (their supported images, sorted, non-recursive) and globs -> paths and problems.

    Files named explicitly are always attempted (the decoder reports what is wrong with them); in directories and
    glob matches, hidden files and files that are not JPEG/PNG/TIFF/WebP by suffix (RAW files next to their JPEGs,
    sidecars, ...) are left out with one summary warning per directory or pattern.
    """
    res = Inputs()

    def add_listing(where: str, files: list[Path]) -> None:
        images = [q for q in files if is_supported_image(q)]
        others = [q for q in files if not is_supported_image(q)]
        res.paths.extend(images)
        if others:
            res.notes.append(f"{where}: ignored {len(others)} file(s) that are not JPEG, PNG, TIFF or WebP "
                             f"images (e.g. {show_path(others[0].name)})")
        if not images:
            res.errors.append(f"{where}: no JPEG, PNG, TIFF or WebP images found")

    def is_file(q: Path) -> bool:
        st, _ = _stat(q)
        return st is not None and stat.S_ISREG(st.st_mode)

    for item in items:
        p = Path(item)
        st, problem = _stat(p)
        if st is None and problem is None and any(ch in item for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item))]
            files = [m for m in matches if is_file(m) and not m.name.startswith(".")]
            if not matches:
                res.errors.append(f"{show_path(item)}: no file matches this pattern")
            else:
                add_listing(show_path(item), files)
        elif st is not None and stat.S_ISDIR(st.st_mode):
            try:
                entries = sorted(q for q in p.iterdir() if not q.name.startswith(".") and is_file(q))
            except OSError as e:
                res.errors.append(f"{show_path(p)}: cannot list the folder ({e.strerror or first_line(e)})")
                continue
            add_listing(show_path(p), entries)
        else:
            res.paths.append(p)  # missing / bad files are reported per image, with the others still processed
    seen: set[str] = set()
    unique = []
    for p in res.paths:
        key = _key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    res.paths = unique
    return res


def output_is_file(output: str | None) -> bool:
    """-o names one output file (suffix .dng/.tif/.tiff/.npy, not an existing directory), else a directory."""
    if not output:
        return False
    out = Path(output)
    st, _ = _stat(out)
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    return out.suffix.lower() in _SUFFIX_FORMAT and not is_dir and not output.endswith(("/", os.sep))


def output_dir_of(output: str) -> Path:
    """The folder that ``-o`` writes into."""
    return Path(output).parent if output_is_file(output) else Path(output)


def _name_problem(path: Path) -> str | None:
    if len(os.fsencode(path.name)) > NAME_MAX:
        return f"file name too long ({len(os.fsencode(path.name))} bytes; at most {NAME_MAX})"
    return None


def plan_outputs(inputs: list[Path], output: str | None, formats: tuple[str, ...]) -> list[Job]:
    """Decide every output path up front (so collisions and bad targets fail before any compute)."""
    out = Path(output) if output else None
    out_is_file = output_is_file(output)
    if out is not None:
        st, problem = _stat(out)
        if problem:
            raise UsageError(f"-o {show_path(out)}: {problem}")
        if not out_is_file and st is None and out.suffix.lower() in SUPPORTED_INPUT_SUFFIXES | RAW_SUFFIXES:
            raise UsageError(f"-o {show_path(out)}: rawdiff writes .dng, .tiff or .npy files; name one of those, "
                             "or a directory")
        if out_is_file and (problem := _name_problem(out)):
            raise UsageError(f"-o {show_path(out)}: {problem}")
    fmts = list(dict.fromkeys(formats)) if formats else []
    if out_is_file:
        assert out is not None
        if len(inputs) > 1:
            raise UsageError(f"-o {show_path(out)} names one file but {len(inputs)} inputs were given; "
                             "give a directory")
        if not fmts:
            fmts = [_SUFFIX_FORMAT[out.suffix.lower()]]
    if not fmts:
        fmts = ["dng"]
    sources = {_key(p): p for p in inputs}
    jobs: list[Job] = []
    taken: dict[str, Path] = {}
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
            key = _key(target)
            if key in sources:
                raise UsageError(f"{show_path(src)}: the output {show_path(target)} would overwrite the input "
                                 f"{show_path(sources[key])}; use -o DIR")
            if key in taken:
                raise UsageError(f"{show_path(src)} and {show_path(taken[key])} would both write "
                                 f"{show_path(target)}; use separate output folders")
            taken[key] = src
            outs[f] = target
        jobs.append(Job(src, outs))
    return jobs


def world_from_env(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it; the one rule of every command.

    A WORLD_SIZE or RANK that is not an integer, a RANK outside WORLD_SIZE, and a WORLD_SIZE above 1 without RANK
    (a variable left over from another shell: the run would silently take a share of its inputs) are command-line
    errors (:class:`UsageError`, exit 2).
    """
    env = os.environ if environ is None else environ
    world_s, rank_s = env.get("WORLD_SIZE"), env.get("RANK")
    try:
        world = int(world_s) if world_s is not None else 1
        rank = int(rank_s) if rank_s is not None else 0
    except ValueError:
        raise UsageError(f"WORLD_SIZE={world_s!r} / RANK={rank_s!r}: not integers (set by torchrun; unset them "
                         "to run alone)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if world > 1 and rank_s is None:
        raise UsageError(f"WORLD_SIZE={world} is set but RANK is not (left over from another run? torchrun sets "
                         "both; unset WORLD_SIZE to run alone)")
    return rank, world


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """Under torchrun (WORLD_SIZE > 1) each rank takes every WORLD_SIZE-th input (planned over all inputs)."""
    return jobs[rank::world] if world > 1 else jobs


def probe_directory(directory: Path) -> str | None:
    """None if a file can be created in ``directory`` (checked by creating an anonymous temporary file, which
    is true even for root on read-only mounts), else the reason."""
    st, problem = _stat(directory)
    if problem:
        return problem
    if st is None:
        return "does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e.strerror or first_line(e)
    return None


def prepare_output_dir(output: str) -> Path:
    """Create ``-o``'s folder if needed and check that files can be created in it (UsageError otherwise)."""
    out_dir = output_dir_of(output)
    st, problem = _stat(out_dir)
    if problem:
        raise UsageError(f"-o {show_path(output)}: {problem}")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"-o {show_path(output)}: {show_path(out_dir)} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output directory {show_path(out_dir)}: "
                         f"{e.strerror or first_line(e)}") from None
    problem = probe_directory(out_dir)
    if problem:
        raise UsageError(f"cannot write to output directory {show_path(out_dir)}: {problem}")
    return out_dir


@dataclass
class Checked:
    """The jobs to run and what was said about the others."""

    todo: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _existing_outputs(job: Job, *, force: bool) -> tuple[dict[str, Path], str | None]:
    """(the job's outputs that exist as regular files, None) or ({}, the first problem of an output path): a name
    too long, a non-regular file, a file the run reads (``fsio.check_target``), a dangling link without force."""
    existing: dict[str, Path] = {}
    for fmt, path in job.outputs.items():
        if (bad := _name_problem(path)) is not None:
            return {}, f"{show_path(path)}: {bad}"
        st, problem = _stat(path)
        if problem:
            return {}, f"{show_path(path)}: {problem}"
        try:
            fsio.check_target(path, overwrite=force or st is not None)
        except OSError as e:
            return {}, f"{show_path(path)}: {e.strerror or first_line(e)}"
        if st is not None:
            existing[fmt] = path
    return existing, None


def check_outputs(jobs: list[Job], *, force: bool, resume: bool) -> Checked:
    """Per job: existing outputs, odd things at output paths, unwritable folders (no compute yet).

    An existing regular file is refused without ``--force`` and counts as finished with ``--resume``; a directory,
    FIFO or device at an output path is always an error of that input, as is a name the system refuses.
    """
    res = Checked()
    probed: dict[str, str | None] = {}
    for job in jobs:
        st_src, problem = _stat(job.source)
        if st_src is None:
            res.errors.append(f"{show_path(job.source)}: {problem or 'no such file'}")
            continue
        existing, bad = _existing_outputs(job, force=force)
        if bad:
            res.errors.append(bad)
            continue
        if existing and resume:
            if len(existing) == len(job.outputs):
                res.skipped.append(job)
                continue
            job = Job(job.source, {f: p for f, p in job.outputs.items() if f not in existing})
        elif existing and not force:
            first = next(iter(existing.values()))
            res.errors.append(f"{show_path(first)}: exists, not overwritten (use --force to overwrite, "
                              "--resume to skip)")
            continue
        folders = sorted({str(p.parent) for p in job.outputs.values()})
        for d in folders:
            if d not in probed:
                probed[d] = probe_directory(Path(d))
        bad_dirs = [d for d in folders if probed[d]]
        if bad_dirs:
            res.errors.append(f"{show_path(job.source)}: cannot write output to {show_path(bad_dirs[0])}: "
                              f"{probed[bad_dirs[0]]}")
            continue
        res.todo.append(job)
    return res


def check_output_file(path: str | os.PathLike[str], *, force: bool) -> None:
    """A report or plot target (``--json``, ``--plot``): its folder exists and can be written, it is not a folder or
    another non-regular file, not a file the run reads (``fsio.reading``; even with ``force``), and it is not
    replaced without ``force``. UsageError (one line) otherwise."""
    p = Path(path)
    if (problem := _name_problem(p)) is not None:
        raise UsageError(f"{show_path(p)}: {problem}")
    st, problem = _stat(p)
    if problem:
        raise UsageError(f"{show_path(p)}: {problem}")
    try:
        fsio.check_target(p, overwrite=force)
    except fsio.OutputExistsError as e:
        what = "exists" if st is not None else (e.strerror or "exists").split(";")[0]
        raise UsageError(f"{show_path(p)}: {what}, not overwritten (use --force)") from None
    except OSError as e:
        raise UsageError(f"{show_path(p)}: {e.strerror or first_line(e)}") from None
    folder = p.parent if str(p.parent) else Path(".")
    if (problem := probe_directory(folder)) is not None:
        raise UsageError(f"{show_path(p)}: cannot write to {show_path(folder)}: {problem}")


def check_output_files(named: dict[str, str | os.PathLike[str] | None], *, force: bool) -> None:
    """Every report target of a command (option name -> path; None: not asked for), before any compute: each as
    :func:`check_output_file`, and no two the same file (by name or by device and inode). UsageError otherwise."""
    seen: dict[object, str] = {}
    for option, path in named.items():
        if not path:
            continue
        check_output_file(path, force=force)
        keys: list[object] = [os.path.realpath(path)]
        try:
            st = os.stat(path)
            keys.append((st.st_dev, st.st_ino))
        except OSError:
            pass
        for key in keys:
            if key in seen:
                raise UsageError(f"{show_path(path)}: given as two reports ({seen[key]} and {option}); they must differ")
        seen.update(dict.fromkeys(keys, option))
