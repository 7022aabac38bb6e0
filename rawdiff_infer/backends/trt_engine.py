"""One TensorRT engine on one GPU: load -> activate -> allocate -> enqueue -> close.

The life cycle of NVIDIA's demo ``Engine`` (TensorRT ``demo/Diffusion`` and TensorRT-RTX ``demo/utils/engine.py``),
without its faults: errors are exceptions with one line (never ``exit``), warnings go to logging, the I/O shapes
come from the engine itself (``get_tensor_profile_shape``, and ``IExecutionContext.get_tensor_shape`` of the output
after ``set_input_shape``) and are checked against what the sidecar promised, and the buffers are never handed out
(the backend copies its output into a tensor the caller owns).

- ``load``: read the plan (a FIFO or other non-regular file is refused without blocking). TensorRT-RTX first asks
  ``Runtime.get_engine_validity`` about the header; its verdict is logged (a warning for INVALID, with the
  diagnostics) and deserialisation decides: the header check can be wrong (for instance on a machine whose driver it
  cannot query), ``deserialize_cuda_engine`` cannot.
- ``activate``: the execution context. With TensorRT-RTX (API as documented for TensorRT-RTX 1.7, checked against
  ``tensorrt_rtx_bindings`` 1.7.1; ``IRuntimeConfig`` since 1.1, CUDA-graph strategy and
  ``REQUIRE_USER_ALLOCATION`` / ``is_stream_capturable`` since 1.2) through an ``IRuntimeConfig``:

  * ``dynamic_shapes_kernel_specialization_strategy = EAGER``: the shape-specialised kernels for a batch size are
    compiled before its first inference, so every call at that size runs the same kernels (the default, LAZY,
    runs a fallback kernel while compiling in the background and switches later: the same input would give a
    slightly different eps from one call to the next, and a CUDA graph recorded before the switch would go stale);
  * ``cuda_graph_strategy``: ``WHOLE_GRAPH_CAPTURE`` ("native": TensorRT-RTX records and replays each shape
    itself) or ``DISABLED`` (no graph, or rawdiff records the graph itself: "manual", which needs an engine built
    with ``BuilderFlag.REQUIRE_USER_ALLOCATION`` and ``IExecutionContext.is_stream_capturable(stream)`` true);
  * a runtime cache (``IRuntimeConfig.create_runtime_cache`` / ``set_runtime_cache``; ``IRuntimeCache.serialize`` /
    ``deserialize``) kept in a file, so that a process does not recompile the kernels at every load.

- ``allocate``: torch-owned buffers for a maximum batch, addresses set once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..fsio import open_regular, write_bytes
from ..messages import first_line, show_path
from .base import INPUT_NAMES, OUTPUT_NAME, BackendError
from .trt_runtime import TensorRT, make_logger, torch_dtype
from .trt_sidecar import EngineSidecar

__all__ = ["RTX_RUNTIME_API", "Engine", "EngineIO", "GraphMode", "RuntimeCacheFile", "check_profile",
           "read_engine_io"]

log = logging.getLogger(__name__)

#: "off": no CUDA graph; "manual": rawdiff records the engine call in a torch CUDA graph; "native": TensorRT-RTX's
#: own CUDA-graph strategy (WHOLE_GRAPH_CAPTURE)
GraphMode = Literal["off", "manual", "native"]

#: TensorRT-RTX names this module uses (tests check them against the installed bindings)
RTX_RUNTIME_API = {
    "ICudaEngine": ("create_runtime_config", "create_execution_context", "get_tensor_profile_shape"),
    "IRuntimeConfig": ("cuda_graph_strategy", "dynamic_shapes_kernel_specialization_strategy", "create_runtime_cache",
                       "set_runtime_cache"),
    "IRuntimeCache": ("serialize", "deserialize"),
    "IExecutionContext": ("is_stream_capturable", "set_input_shape", "get_tensor_shape", "set_tensor_address",
                          "execute_async_v3"),
    "Runtime": ("get_engine_validity", "engine_header_size", "deserialize_cuda_engine"),
    "CudaGraphStrategy": ("DISABLED", "WHOLE_GRAPH_CAPTURE"),
    "DynamicShapesKernelSpecializationStrategy": ("EAGER",),
    "EngineValidity": ("VALID", "SUBOPTIMAL", "INVALID"),
    "BuilderFlag": ("REQUIRE_USER_ALLOCATION",),
}


@dataclass(frozen=True)
class EngineIO:
    """What an engine says about its I/O (optimisation profile 0): batch range, patch side (pixels), dtypes."""

    min_batch: int
    opt_batch: int
    max_batch: int
    patch_size: int
    dtypes: dict[str, torch.dtype]


def read_engine_io(trt: TensorRT, engine: Any, name: str = "engine") -> EngineIO:
    """Check that ``engine`` is a rawdiff eps-model (inputs x_t, cond [N, 3, P, P] and t [N]; output eps) and read
    its profile-0 shapes. Raises BackendError (one line)."""
    m = trt.module
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted((*INPUT_NAMES, OUTPUT_NAME)):
        raise BackendError(f"{name}: engine I/O {names} is not a rawdiff eps-model")
    ranges = {}
    for t in names:
        if (engine.get_tensor_mode(t) == m.TensorIOMode.INPUT) != (t in INPUT_NAMES):
            raise BackendError(f"{name}: tensor {t} has the wrong direction")
        if t in INPUT_NAMES:
            ranges[t] = [tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(t, 0)]
    mins, opts, maxs = zip(*(ranges[t] for t in INPUT_NAMES))
    p = ranges["x_t"][0][-1] if len(ranges["x_t"][0]) == 4 else -1
    image = (3, p, p)
    for t, (lo, mid, hi) in ranges.items():
        want_rest = () if t == "t" else image
        if any(s[1:] != want_rest for s in (lo, mid, hi)) or p < 1:
            raise BackendError(f"{name}: engine profile of {t} is {lo}..{hi}, not [N{', ' if want_rest else ''}"
                               f"{', '.join(map(str, want_rest))}]")
    if len({s[0] for s in mins}) != 1 or len({s[0] for s in opts}) != 1 or len({s[0] for s in maxs}) != 1:
        raise BackendError(f"{name}: the engine's inputs have different batch ranges")
    dtypes = {t: torch_dtype(trt, engine.get_tensor_dtype(t)) for t in names}
    return EngineIO(mins[0][0], opts[0][0], maxs[0][0], p, dtypes)


def check_profile(io: EngineIO, sidecar: EngineSidecar, name: str = "engine") -> None:
    """Refuse, with one line, a sidecar whose profile disagrees with its engine (a sidecar copied beside the wrong
    engine, or edited by hand)."""
    said = (sidecar.min_batch, sidecar.opt_batch, sidecar.max_batch, sidecar.patch_size)
    has = (io.min_batch, io.opt_batch, io.max_batch, io.patch_size)
    if said != has:
        raise BackendError(f"{name}: the sidecar says batch {said[0]}/{said[1]}/{said[2]}, patch {said[3]}, but the "
                           f"engine has batch {has[0]}/{has[1]}/{has[2]}, patch {has[3]} (sidecar of another engine?)")


class RuntimeCacheFile:
    """A TensorRT-RTX runtime cache kept in a file: the kernels compiled when a context is created (and, with the
    EAGER strategy, for each new batch size) are loaded from it, and saved back by ``save``.

    A missing file starts an empty cache; a file that TensorRT-RTX rejects (another TensorRT-RTX version, GPU, driver
    or operating system; ``IRuntimeCache.deserialize`` returns False) or that is not a regular file starts an empty
    one with a warning, and is replaced on ``save``. A cache is only ever a speed-up: no failure here is fatal.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.cache: Any = None

    def attach(self, config: Any) -> None:
        """Set the cache on an ``IRuntimeConfig``: created and filled from the file the first time, shared by the
        configs of later contexts."""
        if self.cache is not None:
            if not config.set_runtime_cache(self.cache):
                log.warning("TensorRT-RTX refused the runtime cache; kernels are compiled at every load")
            return
        self.cache = config.create_runtime_cache()
        blob = self._read()
        if blob and not self.cache.deserialize(blob):
            log.warning("runtime cache %s was written by another TensorRT-RTX, GPU or driver; compiling afresh (it "
                        "will be replaced)", show_path(self.path))
        if not config.set_runtime_cache(self.cache):
            log.warning("TensorRT-RTX refused the runtime cache; kernels are compiled at every load")
            self.cache = None

    def _read(self) -> bytes:
        try:
            with open_regular(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return b""
        except OSError as e:
            log.warning("runtime cache %s: %s; compiling afresh", show_path(self.path), e.strerror or first_line(e))
            return b""

    def save(self) -> None:
        """Write the cache back (atomically; a failure is a warning)."""
        if self.cache is None:
            return
        if self.path.exists() and not self.path.is_file():
            log.warning("runtime cache %s is not a regular file; not replaced", show_path(self.path))
            return
        try:
            write_bytes(self.path, memoryview(self.cache.serialize()), overwrite=True)
        except (OSError, RuntimeError) as e:
            log.warning("cannot save the runtime cache to %s: %s", show_path(self.path),
                        getattr(e, "strerror", None) or first_line(e))


class Engine:
    """A deserialized engine, its execution context and its I/O buffers (see the module docstring).

    Args:
        trt: the loaded TensorRT flavour.
        name: the engine's name in messages.
    """

    def __init__(self, trt: TensorRT, name: str = "engine") -> None:
        self.trt = trt
        self.name = name
        self.logger = make_logger(trt)
        self.runtime: Any = None
        self.engine: Any = None
        self.config: Any = None  # IRuntimeConfig (TensorRT-RTX); kept alive as long as its context
        self.context: Any = None
        self.io: EngineIO | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.graph: GraphMode = "off"
        self.runtime_cache: RuntimeCacheFile | None = None
        self._batch: int | None = None

    # -- load ---------------------------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike[str], *, allow_host_code: bool = False) -> EngineIO:
        """Deserialize the plan at ``path``; returns its I/O description. ``allow_host_code``: a version-compatible
        engine carries the lean runtime it needs."""
        try:
            with open_regular(path) as f:
                data = f.read()
        except OSError as e:
            raise BackendError(f"{show_path(path)}: {e.strerror or first_line(e)}") from None
        return self.load_bytes(data, allow_host_code=allow_host_code)

    def load_bytes(self, data: bytes, *, allow_host_code: bool = False) -> EngineIO:
        """``load`` from the plan's bytes."""
        self.runtime = self.trt.module.Runtime(self.logger)
        if allow_host_code:
            self.runtime.engine_host_code_allowed = True
        verdict = self._header_verdict(data)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            why = self.logger.last()
            raise BackendError(f"{self.name}: {self.trt.flavour} could not deserialize the engine ({why})"
                               + (f"; its header check said: {verdict}" if verdict else "") + "; rebuild it")
        self.io = read_engine_io(self.trt, self.engine, self.name)
        return self.io

    def _header_verdict(self, data: bytes) -> str | None:
        """TensorRT-RTX's header check, logged. Returns the INVALID diagnostics (None when valid or unchecked)."""
        rt, m = self.runtime, self.trt.module
        if not hasattr(rt, "get_engine_validity"):
            return None
        try:
            validity, diag = rt.get_engine_validity(data[: rt.engine_header_size])
        except Exception as e:  # noqa: BLE001 - a check, not a requirement
            log.debug("get_engine_validity failed: %s", e)
            return None
        text = _diagnostics(m, diag)
        if validity == m.EngineValidity.INVALID:
            log.warning("%s: TensorRT-RTX's header check says the engine cannot run here (%s); trying to load it "
                        "anyway", self.name, text)
            return f"invalid ({text})"
        if validity == m.EngineValidity.SUBOPTIMAL:
            log.warning("%s: TensorRT-RTX says the engine is suboptimal here (%s)", self.name, text)
        return None

    # -- activate -----------------------------------------------------------------------------------------------
    def activate(self, *, graph: GraphMode = "off", runtime_cache: RuntimeCacheFile | None = None) -> None:
        """Create the execution context (replacing any earlier one; buffers stay and are bound again)."""
        if self.engine is None:
            raise BackendError(f"{self.name}: activate() before load()")
        self.context = None
        self.config = None
        if self.trt.is_rtx and hasattr(self.engine, "create_runtime_config"):
            self.config = self._rtx_config(graph, runtime_cache)
            self.context = self.engine.create_execution_context(self.config)
        elif graph == "native":
            raise BackendError(f"{self.name}: {self.trt.describe()} has no CUDA-graph strategy of its own")
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{self.name}: cannot create an execution context "
                               f"({self.logger.last(default='out of GPU memory?')})")
        self.graph = graph
        self._batch = None
        if self.buffers:
            self._bind()

    def _rtx_config(self, graph: GraphMode, runtime_cache: RuntimeCacheFile | None) -> Any:
        m = self.trt.module
        config = self.engine.create_runtime_config()
        config.dynamic_shapes_kernel_specialization_strategy = m.DynamicShapesKernelSpecializationStrategy.EAGER
        config.cuda_graph_strategy = (m.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE if graph == "native"
                                      else m.CudaGraphStrategy.DISABLED)
        self.runtime_cache = runtime_cache
        if runtime_cache is not None:
            runtime_cache.attach(config)
        return config

    def stream_capturable(self, stream_handle: int) -> bool:
        """Whether the engine call on this CUDA stream may be recorded in a CUDA graph (TensorRT-RTX asks
        ``is_stream_capturable``; TensorRT 10/11 engines are capturable after one eager run)."""
        check = getattr(self.context, "is_stream_capturable", None)
        return True if check is None else bool(check(stream_handle))

    # -- allocate -----------------------------------------------------------------------------------------------
    def allocate(self, device: torch.device, max_batch: int) -> dict[str, torch.Tensor]:
        """Torch-owned I/O buffers for ``max_batch`` patches (within the engine's profile), bound once.
        Returns them by name (the caller must not hand them out)."""
        io = self.io
        if io is None or self.context is None:
            raise BackendError(f"{self.name}: allocate() before load() and activate()")
        if not io.min_batch <= max_batch <= io.max_batch:
            raise BackendError(f"{self.name}: batch {max_batch} is outside the engine's profile "
                               f"{io.min_batch}..{io.max_batch}")
        p = io.patch_size
        shapes = {"x_t": (max_batch, 3, p, p), "cond": (max_batch, 3, p, p), "t": (max_batch,)}
        self.buffers = {n: torch.zeros(s, dtype=io.dtypes[n], device=device) for n, s in shapes.items()}
        out_shape = self.set_batch(max_batch)
        self.buffers[OUTPUT_NAME] = torch.zeros(out_shape, dtype=io.dtypes[OUTPUT_NAME], device=device)
        self._bind()
        return self.buffers

    def _bind(self) -> None:
        for n, buf in self.buffers.items():
            if not self.context.set_tensor_address(n, buf.data_ptr()):
                raise BackendError(f"{self.name}: TensorRT refused the address of {n}")
        if self._batch is None and OUTPUT_NAME in self.buffers:
            self.set_batch(self.buffers[OUTPUT_NAME].shape[0])

    def set_batch(self, n: int) -> tuple[int, ...]:
        """Set the input shapes for a batch of ``n`` (only when it changes) and check the output shape the engine
        then reports. Returns the output shape."""
        p = self.io.patch_size  # type: ignore[union-attr]
        want = (n, 3, p, p)
        if n != self._batch:
            for t in INPUT_NAMES:
                shape = (n,) if t == "t" else want
                if not self.context.set_input_shape(t, shape):
                    raise BackendError(f"{self.name}: TensorRT refused input shape {shape} for {t}")
            got = tuple(int(d) for d in self.context.get_tensor_shape(OUTPUT_NAME))
            if got != want:
                raise BackendError(f"{self.name}: for a batch of {n} the engine's output is {got}, not {want}")
            self._batch = n
        return want

    # -- run ----------------------------------------------------------------------------------------------------
    def enqueue(self, stream_handle: int) -> None:
        """``execute_async_v3`` on a CUDA stream (a non-default one: 0 is refused by graph capture)."""
        if not self.context.execute_async_v3(stream_handle):
            raise BackendError(f"{self.name}: TensorRT execution failed ({self.logger.last()})")

    def close(self) -> None:
        """Save the runtime cache and release context, engine and buffers (idempotent; the caller synchronises
        the streams that use the buffers first)."""
        if self.runtime_cache is not None and self.context is not None:
            self.runtime_cache.save()
        self.context = None
        self.config = None
        self.engine = None
        self.runtime = None
        self.buffers = {}
        self._batch = None


def _diagnostics(m: Any, diag: int) -> str:
    names = [k.lower() for k, v in m.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
    return ", ".join(names) or f"diagnostics {int(diag)}"
