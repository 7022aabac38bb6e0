"""AOTInductor backend: a ``.pt2`` package built by ``rawdiff-export --aoti`` (PyTorch's ahead-of-time engine).

The package holds the U-Net compiled ahead of time by TorchInductor for one device: a shared library (C++ kernels on
the CPU; host code plus Triton cubins on CUDA) with the weights inside, a dynamic batch axis N in
``min_batch..max_batch`` and a fixed patch size P. Loading it takes a fraction of a second: no tracing, no code
generation, no compiler. Its interface is the graph interface of every backend, float32 whatever the precision
inside: x_t, cond [N, 3, P, P], t [N] -> eps [N, 3, P, P].

The package's metadata (read from the zip without loading any code: ``read_aoti_info``) carries the rawdiff
``ModelMeta`` JSON and what the package was built for. The compiled code is tied to that, and AOTInductor does not
check its inputs at run time (a batch outside the range or another patch size runs and reads out of bounds), so:

- :func:`check_aoti_compat` refuses, with one line, a package built for another device type (CPU vs CUDA), another
  torch version, another GPU architecture (compute capability: the cubins are built for one), or on a CPU with
  instructions this one lacks (the C++ is compiled with ``-march=native`` on the build machine, the host code of a
  CUDA package too);
- ``Backend.__call__`` refuses batches above ``max_batch`` and other patch sizes; ``infer`` hands the library
  float32 tensors on the package's device in the memory layout it was compiled for (channels_last).

A package is code: load only packages you built or trust, as you would a shared library.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..checkpoint import ModelMeta
from ..fsio import check_regular
from ..messages import first_line, show_path
from ..validate import zip_namelist
from .base import Backend, BackendError

__all__ = ["AOTI_FORMAT", "AotiBackend", "AotiInfo", "AotiTarget", "check_aoti_compat", "current_target",
           "read_aoti_info"]

log = logging.getLogger(__name__)

AOTI_FORMAT = "rawdiff-aoti/1"
#: input layouts a package may be compiled for -> the memory format ``infer`` hands the library
_LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: x86 ISA levels in the order AOTInductor picks them (ATen's CPU capability names)
_ISA_RANK = {"DEFAULT": 0, "INVALID": 0, "": 0, "AVX2": 1, "AVX512": 2}


@dataclass(frozen=True)
class AotiTarget:
    """A machine a package is built for or runs on.

    Attributes:
        device_type: "cpu" or "cuda".
        torch_version: ``torch.__version__`` (with its local tag, e.g. "2.13.0+cu128").
        cuda_version: ``torch.version.cuda`` ("" for a CPU package or a CPU-only torch).
        gpu: the GPU's name ("" for CPU).
        compute_capability: "major.minor" of the GPU ("" for CPU).
        cpu: the CPU model name (information).
        cpu_flags: the CPU's instruction-set flags (from ``/proc/cpuinfo``; empty where unknown).
        cpu_isa: ATen's CPU capability ("AVX512", "AVX2", "DEFAULT", ...).
        device_index: the GPU's index on the machine (information: where the package was built and checked;
            -1 for CPU or unknown). It runs on any GPU of the same compute capability.
    """

    device_type: str
    torch_version: str
    cuda_version: str = ""
    gpu: str = ""
    compute_capability: str = ""
    cpu: str = ""
    cpu_flags: frozenset[str] = frozenset()
    cpu_isa: str = ""
    device_index: int = -1

    def to_metadata(self) -> dict[str, str]:
        return {"rawdiff.device_type": self.device_type, "rawdiff.torch_version": self.torch_version,
                "rawdiff.cuda_version": self.cuda_version, "rawdiff.gpu": self.gpu,
                "rawdiff.compute_capability": self.compute_capability, "rawdiff.cpu": self.cpu,
                "rawdiff.cpu_flags": " ".join(sorted(self.cpu_flags)), "rawdiff.cpu_isa": self.cpu_isa,
                "rawdiff.device_index": str(self.device_index)}

    @classmethod
    def from_metadata(cls, md: dict[str, str]) -> "AotiTarget":
        return cls(device_type=md["rawdiff.device_type"], torch_version=md["rawdiff.torch_version"],
                   cuda_version=md.get("rawdiff.cuda_version", ""), gpu=md.get("rawdiff.gpu", ""),
                   compute_capability=md.get("rawdiff.compute_capability", ""), cpu=md.get("rawdiff.cpu", ""),
                   cpu_flags=frozenset(md.get("rawdiff.cpu_flags", "").split()),
                   cpu_isa=md.get("rawdiff.cpu_isa", ""),
                   device_index=int(md.get("rawdiff.device_index", "-1")))

    def describe(self) -> str:
        if self.device_type == "cuda":
            return f"{self.gpu} (compute capability {self.compute_capability}), torch {self.torch_version}"
        return f"CPU {self.cpu or '?'} ({self.cpu_isa or '?'}), torch {self.torch_version}"


#: x86 ``/proc/cpuinfo`` flags that name instruction-set extensions a compiler may use with ``-march=native`` (the
#: other flags, such as ``hypervisor`` or ``constant_tsc``, describe the machine, not its instructions)
_X86_ISA_PREFIXES = ("3dnow", "abm", "adx", "aes", "amx", "avx", "bmi", "cldemote", "clflushopt", "clwb", "clzero",
                     "cx16", "f16c", "fma", "fsgsbase", "gfni", "lahf_lm", "lzcnt", "mmx", "movbe", "movdir",
                     "mwaitx", "pclmulqdq", "pku", "popcnt", "prefetchw", "rdpid", "rdrand", "rdseed", "rtm",
                     "serialize", "sha", "sse", "ssse3", "tbm", "vaes", "vpclmulqdq", "waitpkg", "wbnoinvd",
                     "xop", "xsave")


def _isa_flags(flags: frozenset[str]) -> frozenset[str]:
    """The instruction-set flags among a CPU's flags (x86: by name; other architectures: all their features)."""
    if not flags & {"sse2", "lm", "fpu"}:  # not x86: /proc/cpuinfo "Features" lists only instruction sets
        return flags
    return frozenset(f for f in flags if f.startswith(_X86_ISA_PREFIXES))


def _cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, instruction-set flags) from ``/proc/cpuinfo``; (platform's name, empty) elsewhere."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), _isa_flags(flags)


def current_target(device: str | torch.device = "cpu") -> AotiTarget:
    """This machine as a build or run target for ``device`` ("cpu", "cuda", "cuda:N")."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"AOTInductor packages are built for cpu or cuda, not {dev.type}")
    cpu, flags = _cpu_info()
    isa = str(torch.backends.cpu.get_cpu_capability()).upper()
    gpu = cc = ""
    index = -1
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError("CUDA was requested but torch sees no CUDA device")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        cc = f"{major}.{minor}"
    return AotiTarget(device_type=dev.type, torch_version=torch.__version__,
                      cuda_version=(torch.version.cuda or "") if dev.type == "cuda" else "", gpu=gpu,
                      compute_capability=cc, cpu=cpu, cpu_flags=flags, cpu_isa=isa, device_index=index)


def check_aoti_compat(built: AotiTarget, here: AotiTarget) -> tuple[list[str], list[str]]:
    """Whether a package built for ``built`` can run on ``here``: (errors, warnings), each a list of one-liners.

    Rules: the same device type; exactly the same torch version (the package's code calls into this libtorch); on
    CUDA the same compute capability (its cubins are built for one architecture; another GPU model of the same
    capability runs it, with a warning); the build CPU's instruction-set flags all present here (the C++ is built
    with ``-march=native``), or, where flags are unknown, an ISA level no higher than this CPU's.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if built.device_type != here.device_type:
        errors.append(f"package built for {built.device_type.upper()}, asked to run on {here.device_type.upper()}")
        return errors, warnings
    if built.torch_version != here.torch_version:
        errors.append(f"package built with torch {built.torch_version}, running torch {here.torch_version} "
                      "(packages are tied to the exact torch build)")
    if built.device_type == "cuda":
        if built.compute_capability != here.compute_capability:
            errors.append(f"package built for {built.gpu} (compute capability {built.compute_capability}), this GPU "
                          f"is {here.gpu} ({here.compute_capability})")
        elif built.gpu != here.gpu:
            warnings.append(f"package built on {built.gpu}, running on {here.gpu} (same compute capability "
                            f"{here.compute_capability}; kernels were tuned for the other model)")
    if built.cpu_flags and here.cpu_flags:
        missing = sorted(built.cpu_flags - here.cpu_flags)
        if missing:
            shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
            errors.append(f"package built on a CPU ({built.cpu}) with instructions this CPU ({here.cpu}) lacks: "
                          f"{shown}")
    elif _ISA_RANK.get(built.cpu_isa, 0) > _ISA_RANK.get(here.cpu_isa, 0):
        errors.append(f"package built for CPU instruction set {built.cpu_isa}, this CPU supports {here.cpu_isa}")
    return errors, warnings


@dataclass(frozen=True)
class AotiInfo:
    """What a rawdiff AOTInductor package says about itself.

    Attributes:
        meta: the model's description.
        precision: weights and activations inside ("fp32", "fp16", "bf16"); I/O is float32 regardless.
        patch_size: P, pixels (fixed).
        min_batch, max_batch: the range of N the package was compiled for.
        target: what it was built for.
        input_layout: the strides x_t and cond were compiled for: "channels_last" (NHWC in memory, what
            ``export_aoti`` builds) or "contiguous" (NCHW).
        checkpoint_sha256: the source checkpoint's sha256 ("" if unknown).
        rawdiff_version: the exporter's rawdiff version.
    """

    meta: ModelMeta
    precision: str
    patch_size: int
    min_batch: int
    max_batch: int
    target: AotiTarget
    input_layout: str = "contiguous"
    checkpoint_sha256: str = ""
    rawdiff_version: str = ""


def _package_metadata(path: Path) -> dict[str, str]:
    """The metadata AOTInductor stored in the package (``*_metadata.json`` under ``data/aotinductor/``)."""
    try:
        check_regular(path)
        with zipfile.ZipFile(path) as z:
            names = [n for n in zip_namelist(z) if "/data/aotinductor/" in f"/{n}" and n.endswith("_metadata.json")]
            for name in sorted(names):
                md = json.loads(z.read(name).decode("utf-8"))
                if isinstance(md, dict) and "rawdiff" in md:
                    return {str(k): str(v) for k, v in md.items()}
    except FileNotFoundError:
        raise BackendError(f"{show_path(path)}: no such package file") from None
    except zipfile.BadZipFile:
        raise BackendError(f"{show_path(path)}: not an AOTInductor .pt2 package (not a zip archive)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BackendError(f"{show_path(path)}: cannot read the package ({first_line(e)})") from None
    raise BackendError(f"{show_path(path)}: AOTInductor package without a rawdiff description (not built by "
                       "rawdiff-export)")


def read_aoti_info(path: str | os.PathLike[str]) -> AotiInfo:
    """The rawdiff description of a ``.pt2`` package, read from the zip without loading its code.

    Raises BackendError (one line): missing file, not a package, not a rawdiff package, unknown format.
    """
    p = Path(path)
    md = _package_metadata(p)
    if md.get("rawdiff.format") != AOTI_FORMAT:
        raise BackendError(f"{show_path(p)}: unknown rawdiff package format {md.get('rawdiff.format')!r} "
                           f"(expected {AOTI_FORMAT})")
    try:
        info = AotiInfo(meta=ModelMeta.from_dict(json.loads(md["rawdiff"])), precision=md["rawdiff.precision"],
                        patch_size=int(md["rawdiff.patch_size"]), min_batch=int(md["rawdiff.min_batch"]),
                        max_batch=int(md["rawdiff.max_batch"]), target=AotiTarget.from_metadata(md),
                        input_layout=md.get("rawdiff.input_layout", "contiguous"),
                        checkpoint_sha256=md.get("rawdiff.checkpoint_sha256", ""),
                        rawdiff_version=md.get("rawdiff.version", ""))
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{show_path(p)}: invalid rawdiff description in the package ({first_line(e)})") from None
    if info.input_layout not in _LAYOUTS:
        raise BackendError(f"{show_path(p)}: unknown input layout {info.input_layout!r} in the package")
    return info


class AotiBackend(Backend):
    """Runs a rawdiff AOTInductor package on the device it was built for.

    Args:
        path: the ``.pt2`` package written by ``rawdiff-export --aoti``.
        device: "cpu", or "cuda" / "cuda:N" for a CUDA package (default: the package's device type).
        max_batch_size: cap below the package's maximum batch (default: the package's maximum).
    Raises BackendError (one line): unreadable or foreign package, built for another device type, torch version,
    GPU architecture or CPU, or the library fails to load.
    """

    name: ClassVar[str] = "aoti"

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device | None = None,
                 max_batch_size: int | None = None) -> None:
        self._model: Any = None
        p = Path(path)
        info = read_aoti_info(p)
        built = info.target
        dev = torch.device(device if device is not None else built.device_type)
        if dev.type != built.device_type:
            raise BackendError(f"{show_path(p.name)}: package built for {built.device_type.upper()}, asked to "
                               f"run on {dev.type.upper()}; build one for this device (rawdiff-export --aoti)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"{show_path(p.name)}: package built for CUDA ({built.gpu}), and torch sees no CUDA "
                               "device here")
        errors, warnings = check_aoti_compat(built, current_target(dev))
        for w in warnings:
            log.warning("%s: %s", p.name, w)
        if errors:
            raise BackendError(f"{show_path(p.name)}: {errors[0]}; rebuild it here (rawdiff-export --aoti)")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        cap = min(max_batch_size or info.max_batch, info.max_batch)
        if cap < 1:
            raise BackendError(f"max_batch_size must be >= 1, got {max_batch_size}")
        super().__init__(info.meta, dev, torch.float32, cap, patch_size=info.patch_size)
        self.path, self.info = p, info
        self._lock = threading.Lock()
        try:
            from torch._inductor import aoti_load_package

            # run_single_threaded: AOTInductor's default run() waits on the host for the previous run's device work
            # to end before it starts the next one (its thread-safety for several callers); ``infer`` takes a host
            # lock instead, so calls queue on the device as they do with every other backend
            self._model = aoti_load_package(str(p), run_single_threaded=True,
                                            device_index=dev.index if dev.type == "cuda" else -1)
        except Exception as e:  # noqa: BLE001 - the loader raises RuntimeError, OSError, ...
            raise BackendError(f"{show_path(p.name)}: AOTInductor could not load the package ({first_line(e)})") \
                from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None,
                  max_batch_size: int | None = None) -> "AotiBackend":
        """Open a package (the same as the constructor; the name the other file backends use)."""
        return cls(path, device=device, max_batch_size=max_batch_size)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        # the library assumes the dtype, device and strides it was compiled with, and checks none of them
        x = x.to(device=self.device, dtype=torch.float32)
        return x.contiguous(memory_format=_LAYOUTS[self.info.input_layout]) if x.dim() == 4 else x.contiguous()

    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            raise BackendError("backend is closed")
        n = x_t.shape[0]
        if n < self.info.min_batch:  # pragma: no cover - packages are built with min_batch 1
            raise BackendError(f"batch of {n} is below the package's minimum {self.info.min_batch}")
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext(), torch.no_grad():
            x_t, cond, t = self._prep(x_t), self._prep(cond), self._prep(t)
            with self._lock:  # the library is loaded single-threaded: one call at a time
                eps = self._model(x_t, cond, t)
        return eps  # allocated by the library on every call: the caller owns it

    def close(self) -> None:
        """Release the loaded library's model (idempotent)."""
        self._model = None

    def describe(self) -> str:
        return (f"{self.name} {self.path.name} ({self.info.precision}, built for {self.info.target.describe()}) "
                f"on {self.device}")
