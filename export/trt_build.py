"""rawdiff ONNX -> TensorRT engine (strongly typed), with a sidecar JSON saying what it was built from and for.

The precision comes from the ONNX graph alone: the network is created STRONGLY_TYPED, so the fp16 graph (fp16
weights and activations, fp32 GroupNorm / softmax / embedding, fp32 I/O) gives an fp16 engine with exactly those fp32
islands, and the fp32 graph gives an fp32 engine. No precision builder flag is ever set (TensorRT 11 has none, and
guarding one silently builds fp32).

One optimization profile: batch min / opt / max, the patch size fixed by the graph. TensorRT (10/11) builds for the
GPU it runs on; TensorRT-RTX builds ahead of time without a GPU for a list of compute capabilities (default: its own
default targets, or the current GPU when there is one) and compiles kernels on the target GPU at load time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rawdiff_infer import __version__
from rawdiff_infer.fsio import sha256_file, write_bytes
from rawdiff_infer.backends.tensorrt import (SIDECAR_FORMAT, GpuInfo, TensorRT, detect_gpu, gpu_slug, load_tensorrt,
                                             make_logger, parse_cc, sidecar_path)

from .onnx_export import INPUT_NAMES, OUTPUT_NAME, ExportError, read_onnx_info

__all__ = ["BuildOptions", "BuildResult", "build_engine", "default_engine_path", "network_dtype_counts",
           "parse_network"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """How to build.

    Attributes:
        min_batch, opt_batch, max_batch: the optimization profile's batch sizes (1 <= min <= opt <= max).
        opt_level: builder optimisation level 0..5 (None: TensorRT's default, 3). Higher: longer builds, faster engines.
        timing_cache: file to read the timing cache from (if it exists) and to save it to afterwards (TensorRT only;
            TensorRT-RTX has no timing cache: its kernels are compiled at load time).
        version_compatible: TensorRT only: the engine also runs on later TensorRT versions (can be slower).
        hardware_compatible: TensorRT only: the engine runs on any Ampere-or-later GPU (can be slower).
        compute_capabilities: TensorRT-RTX only: target GPUs ("8.6", "sm89", ...); empty: the current GPU when there
            is one, else TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x).
        workspace_mib: builder workspace limit (None: TensorRT's default, the GPU's memory).
    """

    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    opt_level: int | None = None
    timing_cache: str | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    compute_capabilities: tuple[str, ...] = ()
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch sizes must satisfy 1 <= min <= opt <= max (got {self.min_batch}, "
                             f"{self.opt_batch}, {self.max_batch})")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise ValueError(f"optimisation level must be 0..5 (got {self.opt_level})")
        object.__setattr__(self, "compute_capabilities", tuple(
            "{}.{}".format(*parse_cc(c)) for c in self.compute_capabilities))


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    seconds: float
    engine_bytes: int
    sidecar: dict[str, Any] = field(repr=False)


def _target_tag(trt: TensorRT, gpu: GpuInfo | None, ccs: tuple[str, ...]) -> str:
    if trt.is_rtx:
        if ccs:
            return "rtx-" + "-".join("sm" + c.replace(".", "") for c in ccs)
        return f"rtx-sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}" if gpu else "rtx"
    return gpu_slug(gpu.name) if gpu else "gpu"


def default_engine_path(onnx_path: str | os.PathLike, trt: TensorRT, gpu: GpuInfo | None, precision: str,
                        compute_capabilities: tuple[str, ...] = ()) -> Path:
    """``model.fp16.onnx`` -> ``model.<target>.plan`` (``model.<target>.fp32.plan`` from the fp32 graph)."""
    p = Path(onnx_path)
    stem = p.name.removesuffix(".onnx").removesuffix(".fp16").removesuffix(".fp32")
    tag = _target_tag(trt, gpu, compute_capabilities)
    return p.with_name(f"{stem}.{tag}{'' if precision == 'fp16' else '.' + precision}.plan")


def parse_network(trt: TensorRT, onnx_path: str | os.PathLike, logger: Any = None) -> tuple[Any, Any, Any]:
    """Parse an ONNX file into a STRONGLY_TYPED network. Returns (builder, network, parser); raises ExportError."""
    m = trt.module
    logger = logger or make_logger(trt)
    builder = m.Builder(logger)
    if builder is None:
        raise ExportError(f"{trt.describe()}: cannot create a builder ({'; '.join(logger.errors) or 'no detail'})")
    flags = 1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = m.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors)]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ExportError(f"{onnx_path}: TensorRT ONNX parser failed: {errs[0] if errs else 'no detail'}{more}")
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in ins] != list(INPUT_NAMES) or [t.name for t in outs] != [OUTPUT_NAME]:
        raise ExportError(f"{onnx_path}: network I/O {[t.name for t in ins]} -> {[t.name for t in outs]} is not a "
                          "rawdiff graph")
    for t in ins + outs:
        if t.dtype != m.DataType.FLOAT:
            raise ExportError(f"{onnx_path}: network tensor {t.name} is {t.dtype}, expected float32 I/O")
    return builder, network, parser


def network_dtype_counts(network: Any) -> dict[tuple[str, str], int]:
    """(layer type, dtype of its first output) -> count, for a parsed network (what a strongly typed build keeps)."""
    counts: dict[tuple[str, str], int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.num_outputs == 0:
            continue
        key = (str(layer.type).split(".")[-1], str(layer.get_output(0).dtype).split(".")[-1])
        counts[key] = counts.get(key, 0) + 1
    return counts


def _configure(trt: TensorRT, builder: Any, network: Any, opts: BuildOptions, gpu: GpuInfo | None,
               ) -> tuple[Any, list[str], Any]:
    """Builder config: profile, optimisation level, caches, compatibility. Returns (config, cc list, timing cache)."""
    m = trt.module
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        profile.set_shape(t.name, (opts.min_batch, *rest), (opts.opt_batch, *rest), (opts.max_batch, *rest))
    if config.add_optimization_profile(profile) < 0:
        raise ExportError("TensorRT rejected the optimization profile")
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.workspace_mib is not None:
        config.set_memory_pool_limit(m.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    ccs: list[str] = []
    cache = None
    if trt.is_rtx:
        if opts.version_compatible:
            raise ExportError("--version-compatible is not supported by TensorRT-RTX (its engines are tied to the "
                              "release; rebuild after an upgrade)")
        if opts.hardware_compatible:
            raise ExportError("--hardware-compatible is not supported by TensorRT-RTX (name target compute "
                              "capabilities instead)")
        if opts.timing_cache:
            log.warning("TensorRT-RTX has no timing cache (kernels are compiled on the target GPU); %s not used",
                        opts.timing_cache)
        wanted = list(opts.compute_capabilities)
        if wanted:
            enum = m.ComputeCapability
            config.num_compute_capabilities = len(wanted)
            for i, c in enumerate(wanted):
                name = "SM" + c.replace(".", "")
                if not hasattr(enum, name):
                    supported = [k for k in enum.__members__ if k.startswith("SM")]
                    raise ExportError(f"TensorRT-RTX {trt.version} cannot target compute capability {c} "
                                      f"(supported: {', '.join(s[2:-1] + '.' + s[-1] for s in supported)})")
                if not config.set_compute_capability(getattr(enum, name), i):
                    raise ExportError(f"TensorRT-RTX refused compute capability {c}")
            ccs = wanted
        elif gpu is not None and hasattr(m.ComputeCapability, "SM" + gpu.cc.replace(".", "")):
            config.num_compute_capabilities = 1
            config.set_compute_capability(m.ComputeCapability.CURRENT, 0)
            ccs = [gpu.cc]
        elif gpu is not None:
            log.warning("%s (compute capability %s) is not a TensorRT-RTX target; building ahead of time for "
                        "TensorRT-RTX's default targets instead", gpu.name, gpu.cc)
        return config, ccs, None
    if opts.version_compatible:
        config.set_flag(m.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compatible:
        config.hardware_compatibility_level = m.HardwareCompatibilityLevel.AMPERE_PLUS
    if opts.timing_cache:
        tc_path = Path(opts.timing_cache)
        blob = tc_path.read_bytes() if tc_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, False):
            log.warning("timing cache %s was made on another device or version; starting a fresh one", tc_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
        elif blob:
            log.info("reusing timing cache %s (%d bytes)", tc_path, len(blob))
    return config, ccs, cache


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None, *,
                 options: BuildOptions | None = None, trt: TensorRT | None = None,
                 overwrite: bool = False) -> BuildResult:
    """Build a strongly typed TensorRT engine from a rawdiff ONNX file, and write ``<engine>.json`` beside it.

    Args:
        onnx_path: an ONNX file written by ``export_onnx`` (its rawdiff description goes into the sidecar).
        engine_path: destination (default: ``default_engine_path``).
        options: BuildOptions.
        trt: a loaded TensorRT (default: ``load_tensorrt()``).
        overwrite: replace an existing engine and sidecar; otherwise ``fsio.OutputExistsError`` if one exists.
    Returns a BuildResult. Both files are written atomically. Raises ExportError / TensorRTNotFound (one line).
    """
    opts = options or BuildOptions()
    trt = trt or load_tensorrt()
    onnx_path = Path(onnx_path)
    info = read_onnx_info(onnx_path)
    gpu = detect_gpu()
    if gpu is None and not trt.is_rtx:
        raise ExportError(f"{trt.describe()} builds engines only on an NVIDIA GPU and none is visible "
                          "(TensorRT-RTX can build ahead of time without one: pip install tensorrt-rtx)")
    logger = make_logger(trt)
    t0 = time.perf_counter()
    builder, network, _parser = parse_network(trt, onnx_path, logger)
    config, ccs, cache = _configure(trt, builder, network, opts, gpu)
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        detail = "; ".join(logger.errors[-2:]) or "no detail"
        raise ExportError(f"TensorRT engine build failed ({trt.describe()}): {detail}")
    out = Path(engine_path) if engine_path is not None else default_engine_path(
        onnx_path, trt, gpu, info.precision, opts.compute_capabilities)
    data = memoryview(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, data, overwrite=overwrite)
    if cache is not None and opts.timing_cache:  # a cache is a cache: always refreshed
        write_bytes(Path(opts.timing_cache), memoryview(config.get_timing_cache().serialize()), overwrite=True)
    # TensorRT-RTX builds for the current GPU only when it targets it (CURRENT); otherwise ahead of time
    aot = gpu is None or (trt.is_rtx and not (gpu is not None and ccs == [gpu.cc] and not opts.compute_capabilities))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "engine": {"file": out.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "onnx": {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path), "precision": info.precision,
                 "patch_size": info.patch_size, "opset": info.opset, "exporter": info.exporter},
        "checkpoint_sha256": info.checkpoint_sha256,
        "tensorrt": {"flavour": trt.flavour, "module": trt.module_name, "version": trt.version},
        "target": {"gpu": "AOT/none" if aot else gpu.name,  # type: ignore[union-attr]
                   "compute_capability": "AOT/none" if aot else gpu.cc,  # type: ignore[union-attr]
                   "compute_capabilities": ccs if trt.is_rtx else None,
                   "built_on_gpu": gpu.name if gpu else None},
        "profile": {"min_batch": opts.min_batch, "opt_batch": opts.opt_batch, "max_batch": opts.max_batch,
                    "patch_size": info.patch_size, "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME},
        "options": {**{k: v for k, v in asdict(opts).items() if k not in ("min_batch", "opt_batch", "max_batch")},
                    "compute_capabilities": list(opts.compute_capabilities), "strongly_typed": True,
                    "timing_cache": opts.timing_cache if cache is not None else None},
        "built": {"seconds": round(seconds, 3), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "rawdiff_version": __version__},
        "rawdiff": info.meta.to_dict(),
    }
    sp = sidecar_path(out)
    write_bytes(sp, (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode(), overwrite=overwrite)
    log.info("built %s (%.1f MB) in %.1f s", out, len(data) / 1e6, seconds)
    return BuildResult(out, sp, seconds, len(data), sidecar)
