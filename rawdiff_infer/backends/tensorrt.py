"""TensorRT backend: a serialized engine built by ``rawdiff-export`` (TensorRT 10/11 or TensorRT-RTX).

Life cycle (one object): load the engine and its sidecar JSON -> refuse it clearly if it was built for another GPU or
TensorRT version (or rebuild it from the recorded ONNX file with ``rebuild=True``) -> allocate torch-owned I/O
buffers for the profile's maximum batch and set their addresses once -> per call: copy the batch in, set the input
shapes (only when the batch size changes), ``execute_async_v3`` on a private (non-default) CUDA stream, copy the
output into a fresh tensor the caller owns -> ``close``.

With ``cuda_graph=True`` the engine call is captured once in a CUDA graph for the fixed maximum batch (smaller batches
are padded) and replayed; the shapes never change afterwards, so the graph never goes stale.

The backend needs an NVIDIA GPU and TensorRT. The rest of this module does not: ``load_tensorrt`` (one adapter over
the ``tensorrt`` and ``tensorrt_rtx`` packages, whichever is installed), the engine sidecar and the compatibility rules
(``check_engine_compat``, a pure function over the sidecar), which rawdiff-export shares.

Flavours:
- ``tensorrt`` (TensorRT 10 / 11): builds on the GPU it targets; engines run on the same GPU model with the same
  TensorRT version, unless built version-compatible (later versions of the same or next major) or
  hardware-compatible (any Ampere-or-later GPU).
- ``tensorrt_rtx`` (TensorRT-RTX; the bindings-only wheel's module is ``tensorrt_rtx_bindings``): builds ahead of time
  without a GPU for a list of compute capabilities and compiles kernels on the target GPU when loading; engines are
  tied to the exact release. Its GPUs: compute capability 7.5 (when named), 8.0, 8.6, 8.9, 12.x; not Hopper (sm_90).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch

from ..checkpoint import ModelMeta
from .base import INPUT_NAMES as INPUTS
from .base import OUTPUT_NAME as OUTPUT
from .base import Backend, BackendError

__all__ = ["INSTALL_HINT", "SIDECAR_FORMAT", "GpuInfo", "RuntimeEnv", "TensorRT", "TensorRTBackend",
           "TensorRTNotFound", "check_engine_compat", "detect_gpu", "gpu_slug", "load_tensorrt", "make_logger",
           "parse_cc", "parse_version", "read_sidecar", "sidecar_path"]

log = logging.getLogger(__name__)


# ---- the TensorRT adapter, engine sidecar and compatibility rules (pure, no GPU needed) ----

SIDECAR_FORMAT = "rawdiff-trt-engine/1"
#: TensorRT-RTX's default targets when none are named (its documentation: 8.0, 8.6, 8.9, 12.0 and later)
RTX_DEFAULT_MIN_CC = (8, 0)
RTX_UNSUPPORTED_MAJORS = (9, 10, 11)  # Hopper, data-centre Blackwell (sm_100/sm_110) are not RTX targets

INSTALL_HINT = ("install TensorRT: `pip install tensorrt-rtx` (TensorRT-RTX: ahead-of-time builds without a GPU, "
                "runs on RTX/GeForce GPUs of compute capability 7.5-12.x) or `pip install tensorrt` (TensorRT 10/11, "
                "needs an NVIDIA GPU and NVIDIA's package index)")

# module name -> flavour; tried in this order unless RAWDIFF_TENSORRT names one
_MODULES = (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx"), ("tensorrt_rtx_bindings", "tensorrt-rtx"))


class TensorRTNotFound(ImportError):
    """No usable TensorRT Python package (message: one line with the install hint)."""


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT module and what it is."""

    module: ModuleType
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def module_name(self) -> str:
        return self.module.__name__

    def describe(self) -> str:
        return f"{self.flavour} {self.version} (module {self.module_name})"


def load_tensorrt(prefer: str | None = None) -> TensorRT:
    """Import TensorRT or TensorRT-RTX, whichever is installed.

    Args:
        prefer: a flavour ("tensorrt" / "tensorrt-rtx") or module name to try first (e.g. the flavour an engine was
            built with). The environment variable RAWDIFF_TENSORRT, if set, restricts the choice to that one
            ("none" disables TensorRT).
    Raises TensorRTNotFound with an install hint.
    """
    order = list(_MODULES)
    forced = os.environ.get("RAWDIFF_TENSORRT")
    if forced and forced.lower() in ("none", "0", "off"):
        raise TensorRTNotFound(f"TensorRT disabled by RAWDIFF_TENSORRT={forced}; {INSTALL_HINT}")
    want = forced or prefer
    if want:
        first = [m for m in order if want in m]
        order = first + ([] if forced else [m for m in order if m not in first])
        if not order:
            raise TensorRTNotFound(f"RAWDIFF_TENSORRT={forced!r} names no known TensorRT module "
                                   f"({', '.join(m for m, _ in _MODULES)})")
    failures = []
    for name, flavour in order:
        try:
            mod = importlib.import_module(name)
            version = str(mod.__version__)
            _ = mod.Builder  # a stub package without the bindings fails here
        except Exception as e:  # noqa: BLE001 - ImportError, OSError from missing .so, stub packages ...
            if not isinstance(e, ModuleNotFoundError) or e.name != name:
                failures.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        return TensorRT(mod, flavour, version)
    why = f" ({'; '.join(failures)})" if failures else ""
    raise TensorRTNotFound(f"TensorRT is not installed{why}; {INSTALL_HINT}")


def make_logger(trt: TensorRT, min_severity: str = "WARNING") -> Any:
    """A TensorRT ILogger that forwards to Python logging and remembers errors (``.errors``)."""
    m = trt.module
    sev = m.ILogger.Severity

    class _Logger(m.ILogger):
        def __init__(self) -> None:
            m.ILogger.__init__(self)
            self.errors: list[str] = []
            self.min = getattr(sev, min_severity)

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif int(severity) <= int(self.min):
                (log.warning if severity == sev.WARNING else log.info)("TensorRT: %s", msg)

    return _Logger()


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The CUDA GPU this process would use: via torch, else ``nvidia-smi``; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            return GpuInfo(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup: fall back to nvidia-smi
        log.debug("torch cannot query the GPU: %s", e)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.strip().splitlines()
            if len(out) > device:
                name, cc = (s.strip() for s in out[device].rsplit(",", 1))
                return GpuInfo(name, parse_cc(cc))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return None


def parse_version(v: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35)."""
    return tuple(int(x) for x in re.findall(r"\d+", v))


def parse_cc(s: str | tuple[int, int]) -> tuple[int, int]:
    """'8.6' | 'sm86' | 'sm_86' | '86' | 'SM120' | (8, 6) -> (8, 6)."""
    if isinstance(s, tuple):
        return (int(s[0]), int(s[1]))
    t = str(s).strip().lower().removeprefix("sm").removeprefix("_")
    if "." in t:
        a, b = t.split(".", 1)
        return (int(a), int(b))
    if not t.isdigit() or len(t) < 2:
        raise ValueError(f"not a compute capability: {s!r} (write 8.6 or sm86)")
    return (int(t[:-1]), int(t[-1]))


def gpu_slug(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090' (for engine file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``model.x.plan`` -> ``model.x.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON written next to an engine by ``build_engine``. Raises ValueError (one line) if missing or invalid."""
    sp = sidecar_path(engine_path)
    if not sp.is_file():
        raise ValueError(f"{sp}: engine sidecar missing (the engine was not built by rawdiff-export, or the .json "
                         "was not copied with it)")
    try:
        d = json.loads(sp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{sp}: invalid JSON ({e})") from None
    if d.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{sp}: unknown sidecar format {d.get('format')!r} (expected {SIDECAR_FORMAT})")
    for key in ("tensorrt", "target", "profile", "rawdiff"):
        if key not in d:
            raise ValueError(f"{sp}: sidecar lacks {key!r}")
    return d


@dataclass(frozen=True)
class RuntimeEnv:
    """What is running now: TensorRT flavour / version and the GPU (None: no CUDA GPU)."""

    flavour: str
    version: str
    gpu: GpuInfo | None


def check_engine_compat(sidecar: dict[str, Any], env: RuntimeEnv) -> tuple[list[str], list[str]]:
    """Whether an engine described by ``sidecar`` can run in ``env``: (errors, warnings), each a list of one-liners.

    Rules: same TensorRT flavour. Version: TensorRT-RTX needs the exact release; TensorRT needs the exact version
    unless built version-compatible (then any later version of the same or the next major). GPU: TensorRT-RTX needs
    the running compute capability among the engine's targets (default targets: 8.0 and later RTX architectures,
    not 9.x-11.x); TensorRT needs the same GPU model and compute capability unless built hardware-compatible
    ("ampere+": compute capability 8.0 or later).
    """
    errors: list[str] = []
    warnings: list[str] = []
    trt_b = sidecar["tensorrt"]
    tgt = sidecar["target"]
    opts = sidecar.get("options", {})
    built_flavour, built_version = trt_b["flavour"], str(trt_b["version"])
    if built_flavour != env.flavour:
        errors.append(f"engine built with {built_flavour} {built_version}, running {env.flavour} {env.version}")
        return errors, warnings
    bv, rv = parse_version(built_version), parse_version(env.version)
    if env.flavour == "tensorrt-rtx" or not opts.get("version_compatible"):
        if bv != rv:
            errors.append(f"engine built with {built_flavour} {built_version}, running {env.version} "
                          "(engines are tied to the exact release)")
    elif rv < bv or rv[0] - bv[0] > 1:
        errors.append(f"version-compatible engine built with {built_flavour} {built_version} cannot run on "
                      f"{env.version} (needs the same or a later version, at most one major later)")
    elif rv != bv:
        warnings.append(f"version-compatible engine built with {built_version} runs on {env.version} (may be slower "
                        "than an engine built for this version)")
    if env.gpu is None:
        errors.append("no CUDA GPU visible")
        return errors, warnings
    cc = env.gpu.compute_capability
    if env.flavour == "tensorrt-rtx":
        ccs = tgt.get("compute_capabilities")
        if isinstance(ccs, list) and ccs:
            if f"{cc[0]}.{cc[1]}" not in ccs:
                errors.append(f"engine built for compute capabilities {', '.join(ccs)}, this GPU ({env.gpu.name}) is "
                              f"{cc[0]}.{cc[1]}")
        elif cc < RTX_DEFAULT_MIN_CC or cc[0] in RTX_UNSUPPORTED_MAJORS:
            errors.append(f"engine built for TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x), this GPU "
                          f"({env.gpu.name}) is {cc[0]}.{cc[1]}")
        return errors, warnings
    hw = opts.get("hardware_compatible")
    built_cc = tgt.get("compute_capability")
    if hw:
        if cc < (8, 0):
            errors.append(f"hardware-compatible (Ampere+) engine, this GPU ({env.gpu.name}) is {cc[0]}.{cc[1]}")
        return errors, warnings
    if not built_cc or built_cc == "AOT/none":
        errors.append("engine sidecar records no GPU (TensorRT engines are built for one GPU)")
        return errors, warnings
    if parse_cc(built_cc) != cc:
        errors.append(f"engine built for {tgt.get('gpu')} (compute capability {built_cc}), this GPU is "
                      f"{env.gpu.name} ({cc[0]}.{cc[1]})")
    elif tgt.get("gpu") and tgt["gpu"] != env.gpu.name:
        errors.append(f"engine built for {tgt['gpu']}, this GPU is {env.gpu.name} (same compute capability "
                      f"{built_cc}; TensorRT engines are specific to the GPU model)")
    return errors, warnings


# ---- the backend ----



def _torch_dtype(m: Any, dt: Any) -> torch.dtype:
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool}
    table = {getattr(m.DataType, k): v for k, v in names.items() if hasattr(m.DataType, k)}
    try:
        return table[dt]
    except KeyError:
        raise BackendError(f"engine tensor dtype {dt} not supported") from None


class TensorRTBackend(Backend):
    """Runs a TensorRT engine file (with its ``.json`` sidecar) on one CUDA GPU.

    Args:
        engine_path: the ``.plan`` file; ``<engine_path>.json`` must sit beside it.
        device: "cuda" or "cuda:i".
        rebuild: if the engine does not fit this GPU / TensorRT, rebuild it from the ONNX file recorded in the sidecar
            (same profile and options, for this GPU) next to the engine, and load that.
        cuda_graph: capture the engine call for the fixed maximum batch and replay it (smaller batches are padded).
        max_batch_size: cap below the engine profile's maximum (default: the profile's maximum).
    """

    name: ClassVar[str] = "trt"

    def __init__(self, engine_path: str | os.PathLike, *, device: str | torch.device = "cuda", rebuild: bool = False,
                 cuda_graph: bool = False, max_batch_size: int | None = None) -> None:
        self._context = self._engine = self._runtime = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None
        self._shape_n: int | None = None
        path = Path(engine_path)
        if not path.is_file():
            raise BackendError(f"{path}: no such engine file")
        try:
            sidecar = read_sidecar(path)
        except ValueError as e:
            raise BackendError(str(e)) from None
        try:
            meta = ModelMeta.from_dict(sidecar["rawdiff"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"{path}: invalid rawdiff description in the sidecar ({e})") from None
        dev = torch.device(device)
        if dev.type != "cuda":
            raise BackendError(f"the TensorRT backend runs on CUDA devices only (got {dev})")
        if not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA GPU, and torch sees none (CPU-only torch build or no GPU)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self._dev_index = dev.index
        try:
            trt = load_tensorrt(prefer=sidecar["tensorrt"]["flavour"])
        except TensorRTNotFound as e:
            raise BackendError(str(e)) from None
        self.trt = trt
        gpu = detect_gpu(dev.index)
        errors, warnings = check_engine_compat(sidecar, RuntimeEnv(trt.flavour, trt.version, gpu))
        for w in warnings:
            log.warning("%s: %s", path.name, w)
        if errors:
            if not rebuild:
                raise BackendError(f"{path.name}: {errors[0]}; rebuild it (rawdiff-export, or rebuild=True)")
            path, sidecar = self._rebuild(path, sidecar, errors[0])
            errors, _ = check_engine_compat(sidecar, RuntimeEnv(trt.flavour, trt.version, gpu))
            if errors:
                raise BackendError(f"{path.name}: rebuilt, but {errors[0]}")
        self.engine_path, self.sidecar = path, sidecar
        prof = sidecar["profile"]
        self.min_batch, self.profile_max = int(prof["min_batch"]), int(prof["max_batch"])
        cap = min(max_batch_size or self.profile_max, self.profile_max)
        super().__init__(meta, dev, torch.float32, cap, patch_size=int(prof["patch_size"]))
        self.cuda_graph = cuda_graph

        m = trt.module
        self._logger = make_logger(trt)
        with torch.cuda.device(dev):
            self._runtime = m.Runtime(self._logger)
            if sidecar.get("options", {}).get("version_compatible"):
                self._runtime.engine_host_code_allowed = True  # the lean runtime shipped inside the plan
            data = path.read_bytes()
            if hasattr(self._runtime, "get_engine_validity"):  # TensorRT-RTX: header check before loading
                validity, diag = self._runtime.get_engine_validity(data[: self._runtime.engine_header_size])
                if validity == m.EngineValidity.INVALID:
                    raise BackendError(f"{path.name}: TensorRT-RTX says the engine is invalid here "
                                       f"({_diagnostics(m, diag)}); rebuild it")
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise BackendError(f"{path.name}: TensorRT could not deserialize the engine "
                                   f"({'; '.join(self._logger.errors[-2:]) or 'no detail'})")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"{path.name}: cannot create an execution context "
                                   f"({'; '.join(self._logger.errors[-2:]) or 'out of GPU memory?'})")
            self._stream = torch.cuda.Stream(dev)
            self._allocate(m)
            torch.cuda.synchronize(dev)  # the zero-filled buffers are ready for any stream

    # -- construction helpers ---------------------------------------------------------------------------------
    def _rebuild(self, path: Path, sidecar: dict[str, Any], why: str) -> tuple[Path, dict[str, Any]]:
        from rawdiff_export.trt_build import BuildOptions, build_engine, default_engine_path

        from ..fsio import sha256_file

        onnx_path = Path(sidecar.get("onnx", {}).get("path", ""))
        if not onnx_path.is_file():
            raise BackendError(f"{path.name}: {why}; cannot rebuild: the recorded ONNX file {onnx_path} is missing")
        want = sidecar["onnx"].get("sha256")
        if want and sha256_file(onnx_path) != want:
            raise BackendError(f"{path.name}: {why}; cannot rebuild: {onnx_path} changed since the engine was built")
        prof, opts = sidecar["profile"], dict(sidecar.get("options", {}))
        keep = {k: opts[k] for k in ("opt_level", "timing_cache", "version_compatible", "hardware_compatible",
                                     "workspace_mib") if k in opts}
        log.warning("%s: %s; rebuilding from %s", path.name, why, onnx_path)
        gpu = detect_gpu(self._dev_index)
        target = default_engine_path(onnx_path, self.trt, gpu, sidecar["onnx"].get("precision", "fp16"))
        options = BuildOptions(min_batch=prof["min_batch"], opt_batch=prof["opt_batch"], max_batch=prof["max_batch"],
                               **keep)
        try:
            res = build_engine(onnx_path, path.parent / target.name, options=options, trt=self.trt, overwrite=True)
        except Exception as e:  # noqa: BLE001 - ExportError, TensorRT errors
            raise BackendError(f"{path.name}: rebuild failed: {e}") from None
        return res.engine_path, res.sidecar

    def _allocate(self, m: Any) -> None:
        """Torch-owned buffers for the maximum batch; addresses set once."""
        eng, ctx = self._engine, self._context
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        if sorted(names) != sorted((*INPUTS, OUTPUT)):
            raise BackendError(f"{self.engine_path.name}: engine I/O {names} is not a rawdiff eps-model")
        bs, p = self.max_batch_size, self.patch_size
        assert bs is not None
        for name in names:
            is_input = eng.get_tensor_mode(name) == m.TensorIOMode.INPUT
            if is_input != (name in INPUTS):
                raise BackendError(f"{self.engine_path.name}: tensor {name} has the wrong direction")
            shape = (bs,) if name == "t" else (bs, 3, p, p)
            buf = torch.zeros(shape, dtype=_torch_dtype(m, eng.get_tensor_dtype(name)), device=self.device)
            self._buffers[name] = buf
            if not ctx.set_tensor_address(name, buf.data_ptr()):
                raise BackendError(f"TensorRT refused the address of {name}")

    # -- inference --------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str | torch.device = "cuda",
                  rebuild: bool = False, cuda_graph: bool = False,
                  max_batch_size: int | None = None) -> TensorRTBackend:
        """Open an engine file (its sidecar ``<path>.json`` must sit beside it)."""
        return cls(path, device=device, rebuild=rebuild, cuda_graph=cuda_graph, max_batch_size=max_batch_size)

    def _set_shapes(self, n: int) -> None:
        if n == self._shape_n:
            return
        ctx, p = self._context, self.patch_size
        for name in INPUTS:
            shape = (n,) if name == "t" else (n, 3, p, p)
            if not ctx.set_input_shape(name, shape):
                raise BackendError(f"TensorRT refused input shape {shape} for {name}")
        self._shape_n = n

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError(f"TensorRT execution failed ({'; '.join(self._logger.errors[-2:]) or 'no detail'})")

    def _capture(self) -> None:
        bs = self.max_batch_size
        self._set_shapes(bs)  # fixed from now on: the graph never sees another shape
        with torch.cuda.stream(self._stream):
            self._enqueue()  # one eager run first (lazy initialisation outside the capture)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            self._enqueue()
        self._graph = graph

    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._context is None:
            raise BackendError("backend is closed")
        n, p = x_t.shape[0], self.patch_size
        assert self.max_batch_size is not None
        run_n = self.max_batch_size if self.cuda_graph else max(n, self.min_batch)
        dev, buf = self.device, self._buffers
        caller = torch.cuda.current_stream(dev)
        out = torch.empty((n, 3, p, p), dtype=torch.float32, device=dev)  # the caller's stream owns it
        self._stream.wait_stream(caller)  # inputs produced on the caller's stream are ready
        with torch.cuda.device(dev), torch.cuda.stream(self._stream):
            buf["x_t"][:n].copy_(x_t)
            buf["cond"][:n].copy_(cond)
            buf["t"][:n].copy_(t)
            if self.cuda_graph:
                if self._graph is None:
                    self._capture()
                self._graph.replay()  # type: ignore[union-attr]
            else:
                self._set_shapes(run_n)
                self._enqueue()
            out.copy_(buf[OUTPUT][:n])
        caller.wait_stream(self._stream)  # the caller sees a finished output; our buffers are free again after it
        return out

    def close(self) -> None:
        """Release the CUDA graph, context, engine and buffers (idempotent)."""
        if getattr(self, "_stream", None) is not None:
            self._stream.synchronize()
            self._stream = None
        self._graph = None
        self._context = None
        self._engine = None
        self._runtime = None
        self._buffers = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - interpreter shutdown
            log.debug("close() in __del__ failed: %s", e)

    def describe(self) -> str:
        tgt = self.sidecar.get("target", {})
        return (f"{self.name} {self.engine_path.name} ({self.trt.describe()}, built for {tgt.get('gpu')}, "
                f"{self.sidecar['onnx'].get('precision')}) on {self.device}"
                + (f" cuda-graph batch {self.max_batch_size}" if self.cuda_graph else ""))


def _diagnostics(m: Any, diag: int) -> str:
    names = [k.lower() for k, v in m.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
    return ", ".join(names) or f"diagnostics {int(diag)}"
