"""rawdiff ONNX -> TensorRT engine (strongly typed), with a sidecar JSON saying what it was built from and for.

The builder lives in the runtime because the runtime rebuilds an engine that does not fit the GPU or TensorRT it
finds (``TensorRTBackend(rebuild=True)``), and the runtime must work without the export package. rawdiff-export
calls the same :func:`build_engine`.

Precision comes from the ONNX graph alone: the network is created STRONGLY_TYPED, so the fp16 graph (fp16 weights
and activations, fp32 GroupNorm / softmax / embedding, fp32 I/O) gives an fp16 engine with exactly those fp32
islands, and the fp32 graph gives an fp32 engine. No precision builder flag is ever set (TensorRT 11 has none, and
guarding one silently builds fp32).

One optimisation profile: batch min / opt / max, the patch size fixed by the graph. TensorRT (10/11) builds on, and
for, one GPU: ``device`` (torch's numbering) names it, and the build runs with that device current. TensorRT-RTX
builds ahead of time without a GPU for a list of compute capabilities (default: the current GPU when it is an RTX
target, else TensorRT-RTX's default targets), and sets ``BuilderFlag.REQUIRE_USER_ALLOCATION`` so that the
engine's inference can be recorded in a CUDA graph (TensorRT-RTX 1.2 and later; see ``trt_engine``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..fsio import open_regular, sha256_file, write_bytes
from ..messages import first_line, show_path
from .base import INPUT_NAMES, OUTPUT_NAME
from .onnx_info import OnnxInfo, read_onnx_info
from .trt_runtime import TensorRT, load_tensorrt, make_logger
from .trt_sidecar import SIDECAR_FORMAT, EngineSidecar, GpuInfo, detect_gpu, gpu_slug, parse_cc, write_sidecar

__all__ = ["BuildOptions", "BuildResult", "EngineBuildError", "build_engine", "default_engine_path",
           "network_dtype_counts", "parse_network", "rebuild_engine"]

log = logging.getLogger(__name__)

#: sidecar "options" keys that a rebuild carries over (the rest describe the old build)
_REBUILD_KEYS = ("opt_level", "timing_cache", "version_compatible", "hardware_compatible", "workspace_mib",
                 "require_user_allocation")


class EngineBuildError(Exception):
    """An engine cannot be built (message: one line)."""


@dataclass(frozen=True)
class BuildOptions:
    """How to build.

    Attributes:
        min_batch, opt_batch, max_batch: the optimisation profile's batch sizes (1 <= min <= opt <= max).
        opt_level: builder optimisation level 0..5 (None: TensorRT's default, 3). Higher: longer builds, faster engines.
        timing_cache: file to read the timing cache from (if it exists) and to save it to afterwards (TensorRT only;
            TensorRT-RTX has no timing cache: its kernels are compiled at load time). A cache written by another
            TensorRT version or GPU is replaced by a fresh one, with a warning.
        version_compatible: TensorRT only: the engine also runs on later TensorRT versions (can be slower).
        hardware_compatible: TensorRT only: the engine runs on any Ampere-or-later GPU (can be slower).
        compute_capabilities: TensorRT-RTX only: target GPUs ("8.6", "sm89", ...); empty: the current GPU when there
            is one, else TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x).
        workspace_mib: builder workspace limit in MiB (None: TensorRT's default, the GPU's memory).
        require_user_allocation: TensorRT-RTX only: ``BuilderFlag.REQUIRE_USER_ALLOCATION``, which CUDA-graph stream
            capture needs (no runtime allocation inside ``execute_async_v3``).
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
    require_user_allocation: bool = True

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
    sidecar: EngineSidecar = field(repr=False)


def _target_tag(trt: TensorRT, gpu: GpuInfo | None, ccs: tuple[str, ...]) -> str:
    if trt.is_rtx:
        if ccs:
            return "rtx-" + "-".join("sm" + c.replace(".", "") for c in ccs)
        if gpu is not None and _rtx_targets(trt, gpu):  # built for this GPU (CURRENT)
            return f"rtx-sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}"
        return "rtx"  # TensorRT-RTX's default targets
    return gpu_slug(gpu.name) if gpu else "gpu"


def _rtx_targets(trt: TensorRT, gpu: GpuInfo) -> bool:
    """Whether TensorRT-RTX can target ``gpu`` by name (then a build without named targets is for it alone)."""
    return hasattr(trt.module.ComputeCapability, "SM" + gpu.cc.replace(".", ""))


def default_engine_path(onnx_path: str | os.PathLike[str], trt: TensorRT, gpu: GpuInfo | None, precision: str,
                        compute_capabilities: tuple[str, ...] = ()) -> Path:
    """``model.fp16.onnx`` -> ``model.<target>.plan`` (``model.<target>.fp32.plan`` from the fp32 graph)."""
    p = Path(onnx_path)
    stem = p.name.removesuffix(".onnx").removesuffix(".fp16").removesuffix(".fp32")
    tag = _target_tag(trt, gpu, compute_capabilities)
    return p.with_name(f"{stem}.{tag}{'' if precision == 'fp16' else '.' + precision}.plan")


def parse_network(trt: TensorRT, onnx_path: str | os.PathLike[str], logger: Any = None) -> tuple[Any, Any, Any]:
    """Parse an ONNX file into a STRONGLY_TYPED network. Returns (builder, network, parser); raises
    EngineBuildError."""
    m = trt.module
    logger = logger or make_logger(trt)
    builder = m.Builder(logger)
    if builder is None:
        raise EngineBuildError(f"{trt.describe()}: cannot create a builder ({logger.last()})")
    network = builder.create_network(1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = m.OnnxParser(network, logger)
    with open_regular(onnx_path) as f:  # a FIFO is refused without blocking
        data = f.read()
    if not parser.parse(data, str(onnx_path)):
        errs = [first_line(str(parser.get_error(i))) for i in range(parser.num_errors)]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise EngineBuildError(f"{show_path(onnx_path)}: TensorRT ONNX parser failed: "
                               f"{errs[0] if errs else 'no detail'}{more}")
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in ins] != list(INPUT_NAMES) or [t.name for t in outs] != [OUTPUT_NAME]:
        raise EngineBuildError(f"{show_path(onnx_path)}: network I/O {[t.name for t in ins]} -> "
                               f"{[t.name for t in outs]} is not a rawdiff graph")
    for t in ins + outs:
        if t.dtype != m.DataType.FLOAT:
            raise EngineBuildError(f"{show_path(onnx_path)}: network tensor {t.name} is {t.dtype}, expected float32 "
                                   "I/O")
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
               ) -> tuple[Any, list[str], Any, bool]:
    """Builder config: profile, optimisation level, compatibility, caches.
    Returns (config, compute capabilities targeted, timing cache or None, user allocation required)."""
    m = trt.module
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        rest = tuple(t.shape)[1:]
        profile.set_shape(t.name, (opts.min_batch, *rest), (opts.opt_batch, *rest), (opts.max_batch, *rest))
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError("TensorRT rejected the optimisation profile")
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.workspace_mib is not None:
        config.set_memory_pool_limit(m.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if trt.is_rtx:
        ccs, user_alloc = _configure_rtx(trt, config, opts, gpu)
        return config, ccs, None, user_alloc
    if opts.version_compatible:
        config.set_flag(m.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compatible:
        config.hardware_compatibility_level = m.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = _attach_timing_cache(config, opts.timing_cache) if opts.timing_cache else None
    return config, [], cache, False


def _configure_rtx(trt: TensorRT, config: Any, opts: BuildOptions, gpu: GpuInfo | None) -> tuple[list[str], bool]:
    """TensorRT-RTX: target compute capabilities and the user-allocation flag (CUDA-graph capture)."""
    m = trt.module
    if opts.version_compatible:
        raise EngineBuildError("--version-compatible is not supported by TensorRT-RTX (its engines are tied to the "
                               "release; rebuild after an upgrade)")
    if opts.hardware_compatible:
        raise EngineBuildError("--hardware-compatible is not supported by TensorRT-RTX (name target compute "
                               "capabilities instead)")
    if opts.timing_cache:
        log.warning("TensorRT-RTX has no timing cache (kernels are compiled on the target GPU); %s not used",
                    opts.timing_cache)
    user_alloc = False
    if opts.require_user_allocation:
        flag = getattr(m.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)  # TensorRT-RTX 1.2 and later
        if flag is None:
            log.warning("%s has no BuilderFlag.REQUIRE_USER_ALLOCATION: the engine cannot be recorded in a CUDA "
                        "graph by rawdiff (TensorRT-RTX's own CUDA-graph strategy is used instead)", trt.describe())
        else:
            config.set_flag(flag)
            user_alloc = True
    enum = m.ComputeCapability
    wanted = list(opts.compute_capabilities)
    if wanted:
        config.num_compute_capabilities = len(wanted)
        for i, c in enumerate(wanted):
            name = "SM" + c.replace(".", "")
            if not hasattr(enum, name):
                supported = [k for k in enum.__members__ if k.startswith("SM")]
                raise EngineBuildError(f"TensorRT-RTX {trt.version} cannot target compute capability {c} "
                                       f"(supported: {', '.join(s[2:-1] + '.' + s[-1] for s in supported)})")
            if not config.set_compute_capability(getattr(enum, name), i):
                raise EngineBuildError(f"TensorRT-RTX refused compute capability {c}")
        return wanted, user_alloc
    if gpu is not None and _rtx_targets(trt, gpu):
        config.num_compute_capabilities = 1
        config.set_compute_capability(enum.CURRENT, 0)
        return [gpu.cc], user_alloc
    if gpu is not None:
        log.warning("%s (compute capability %s) is not a TensorRT-RTX target; building ahead of time for "
                    "TensorRT-RTX's default targets instead", gpu.name, gpu.cc)
    return [], user_alloc


def _attach_timing_cache(config: Any, path: str) -> Any:
    """Read the timing cache at ``path`` (if present) into ``config``. A cache that TensorRT cannot use (written by
    another TensorRT version or GPU, or damaged) never aborts the build: a fresh one is used, with a warning, and
    replaces the file afterwards. TensorRT may refuse such a blob by raising, by returning None, by
    ``set_timing_cache`` returning False, or by silently returning an empty cache (it logs "Failed to deserialize
    timing cache"): all four are handled."""
    blob = b""
    try:
        with open_regular(path) as f:
            blob = f.read()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise EngineBuildError(f"timing cache {show_path(path)}: {e.strerror or first_line(e)}") from None
    fresh = config.create_timing_cache(b"")
    if fresh is None:
        raise EngineBuildError("TensorRT cannot create an empty timing cache")
    if blob:
        cache = _timing_cache_from(config, blob, fresh)
        if cache is not None and config.set_timing_cache(cache, False):
            log.info("reusing timing cache %s (%d bytes)", path, len(blob))
            return cache
        log.warning("timing cache %s was written by another TensorRT version or GPU (or is damaged); building with "
                    "a fresh one, which will replace it", show_path(path))
    if not config.set_timing_cache(fresh, False):
        raise EngineBuildError("TensorRT refused an empty timing cache")
    return fresh


def _timing_cache_from(config: Any, blob: bytes, fresh: Any) -> Any:
    """The cache deserialized from ``blob``, or None when TensorRT rejected it (including an empty result)."""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as e:  # noqa: BLE001 - the bindings raise RuntimeError / TypeError on a foreign blob
        log.debug("create_timing_cache failed: %s", e)
        return None
    try:
        if cache is not None and bytes(cache.serialize()) == bytes(fresh.serialize()):
            return None  # TensorRT replaced the foreign content by an empty cache
    except Exception as e:  # noqa: BLE001 - cannot compare: trust set_timing_cache
        log.debug("timing cache comparison failed: %s", e)
    return cache


@contextlib.contextmanager
def _on_device(device: int | None) -> Iterator[int]:
    """Make CUDA device ``device`` current while building (TensorRT builds on the current device). Yields the index
    used: ``device``, else the current device, else 0 without CUDA."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        cuda = False
    if not cuda:
        yield device or 0
        return
    index = torch.cuda.current_device() if device is None else device
    with torch.cuda.device(index):
        yield index


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str] | None = None, *,
                 options: BuildOptions | None = None, trt: TensorRT | None = None, device: int | None = None,
                 info: OnnxInfo | None = None, overwrite: bool = False) -> BuildResult:
    """Build a strongly typed TensorRT engine from a rawdiff ONNX file, and write ``<engine>.json`` beside it.

    Args:
        onnx_path: an ONNX file written by rawdiff-export (its rawdiff description goes into the sidecar).
        engine_path: destination (default: ``default_engine_path``).
        options: BuildOptions.
        trt: a loaded TensorRT (default: ``load_tensorrt()``).
        device: CUDA device to build on and for (torch's numbering; None: the current device). TensorRT-RTX without
            a GPU builds ahead of time and ignores it.
        info: the ONNX file's rawdiff description when the caller already knows it (a rebuild takes it from the old
            sidecar, so that the runtime needs no ``onnx`` package); default: read from ``onnx_path``.
        overwrite: replace an existing engine and sidecar; otherwise ``fsio.OutputExistsError`` if one exists.
    Returns a BuildResult. Both files are written atomically. Raises EngineBuildError, OnnxInfoError (one line).
    """
    opts = options or BuildOptions()
    trt = trt or load_tensorrt()
    onnx_path = Path(onnx_path)
    info = info or read_onnx_info(onnx_path)
    with _on_device(device) as index:
        gpu = detect_gpu(index)
        if gpu is None and not trt.is_rtx:
            raise EngineBuildError(f"{trt.describe()} builds engines only on an NVIDIA GPU and none is visible "
                                   "(TensorRT-RTX can build ahead of time without one: pip install tensorrt-rtx)")
        logger = make_logger(trt)
        t0 = time.perf_counter()
        builder, network, _parser = parse_network(trt, onnx_path, logger)
        config, ccs, cache, user_alloc = _configure(trt, builder, network, opts, gpu)
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
    if plan is None:
        raise EngineBuildError(f"TensorRT engine build failed ({trt.describe()}): {logger.last()}")
    out = Path(engine_path) if engine_path is not None else default_engine_path(
        onnx_path, trt, gpu, info.precision, opts.compute_capabilities)
    data = memoryview(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, data, overwrite=overwrite)
    if cache is not None and opts.timing_cache:  # a cache is a cache: always refreshed
        write_bytes(Path(opts.timing_cache), memoryview(config.get_timing_cache().serialize()), overwrite=True)
    # TensorRT-RTX builds for the current GPU only when it targets it (CURRENT); otherwise ahead of time
    aot = gpu is None or (trt.is_rtx and not (ccs == [gpu.cc] and not opts.compute_capabilities))
    sidecar = _sidecar(out, data, onnx_path, info, trt, gpu, aot, ccs, opts, cache is not None, user_alloc, seconds)
    sp = write_sidecar(out, sidecar, overwrite=overwrite)
    parsed = EngineSidecar.parse(sidecar, show_path(sp))
    log.info("built %s (%.1f MB) in %.1f s", out, len(data) / 1e6, seconds)
    return BuildResult(out, sp, seconds, len(data), parsed)


def _sidecar(out: Path, data: memoryview, onnx_path: Path, info: OnnxInfo, trt: TensorRT, gpu: GpuInfo | None,
             aot: bool, ccs: list[str], opts: BuildOptions, timing_cache: bool, user_alloc: bool,
             seconds: float) -> dict[str, Any]:
    """The sidecar JSON (format ``SIDECAR_FORMAT``; see ``trt_sidecar``)."""
    return {
        "format": SIDECAR_FORMAT,
        "engine": {"file": out.name, "bytes": len(data), "sha256": sha256_file(out)},  # as written on disk
        "onnx": {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path), "precision": info.precision,
                 "patch_size": info.patch_size, "opset": info.opset, "exporter": info.exporter},
        "checkpoint_sha256": info.checkpoint_sha256,
        "tensorrt": {"flavour": trt.flavour, "module": trt.module_name, "version": trt.version},
        "target": {"gpu": "AOT/none" if aot or gpu is None else gpu.name,
                   "compute_capability": "AOT/none" if aot or gpu is None else gpu.cc,
                   "compute_capabilities": ccs if trt.is_rtx else None,
                   "built_on_gpu": gpu.name if gpu else None},
        "profile": {"min_batch": opts.min_batch, "opt_batch": opts.opt_batch, "max_batch": opts.max_batch,
                    "patch_size": info.patch_size, "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME},
        "options": {**{k: v for k, v in asdict(opts).items() if k not in ("min_batch", "opt_batch", "max_batch")},
                    "compute_capabilities": list(opts.compute_capabilities), "strongly_typed": True,
                    "timing_cache": opts.timing_cache if timing_cache else None,
                    "require_user_allocation": user_alloc},
        "built": {"seconds": round(seconds, 3), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "rawdiff_version": __version__},
        "rawdiff": info.meta.to_dict(),
    }


def rebuild_engine(engine_path: Path, sidecar: EngineSidecar, why: str, *, trt: TensorRT,
                   device: int) -> BuildResult:
    """Rebuild an engine that does not fit this GPU / TensorRT from the ONNX file its sidecar records, for CUDA
    device ``device`` (torch's numbering), with the same profile and options; written next to ``engine_path``
    (under the name this GPU gets, replacing a file of that name). Needs no ``onnx`` package.

    Raises EngineBuildError (one line, starting with ``why``) when the ONNX file is missing or changed, or the build
    fails.
    """
    name = engine_path.name
    recorded = sidecar.onnx_path
    if not recorded:
        raise EngineBuildError(f"{name}: {why}; cannot rebuild: the sidecar records no ONNX file")
    onnx_path = Path(recorded)
    want = sidecar.onnx_sha256
    try:
        have = sha256_file(onnx_path)
    except OSError as e:
        raise EngineBuildError(f"{name}: {why}; cannot rebuild: the recorded ONNX file {show_path(onnx_path)}: "
                               f"{e.strerror or first_line(e)}") from None
    if want and have != want:
        raise EngineBuildError(f"{name}: {why}; cannot rebuild: {show_path(onnx_path)} changed since the engine "
                               "was built")
    options, info = _rebuild_plan(sidecar)
    log.warning("%s: %s; rebuilding from %s on CUDA device %d", name, why, onnx_path, device)
    target = default_engine_path(onnx_path, trt, detect_gpu(device), info.precision)
    try:
        return build_engine(onnx_path, engine_path.parent / target.name, options=options, trt=trt, device=device,
                            info=info, overwrite=True)
    except (EngineBuildError, OSError, ValueError) as e:
        raise EngineBuildError(f"{name}: rebuild failed: {first_line(e)}") from None


def _rebuild_plan(sidecar: EngineSidecar) -> tuple[BuildOptions, OnnxInfo]:
    """Build options and ONNX description of a rebuild, from the old engine's sidecar."""
    opts = sidecar.options
    try:
        options = BuildOptions(min_batch=sidecar.min_batch, opt_batch=sidecar.opt_batch, max_batch=sidecar.max_batch,
                               **{k: opts[k] for k in _REBUILD_KEYS if k in opts})
        info = OnnxInfo(meta=sidecar.meta, precision=sidecar.onnx_precision, patch_size=sidecar.patch_size,
                        checkpoint_sha256=sidecar.checkpoint_sha256, opset=sidecar.onnx_opset,
                        exporter=sidecar.onnx_exporter)
    except (KeyError, TypeError, ValueError) as e:
        raise EngineBuildError(f"cannot rebuild: invalid sidecar ({first_line(e)})") from None
    return options, info
