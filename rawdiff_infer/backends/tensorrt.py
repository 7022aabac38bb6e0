"""TensorRT backend: a serialized engine built by rawdiff (TensorRT 10/11 or TensorRT-RTX) on one CUDA GPU.

Life cycle (one object): read the engine's sidecar JSON -> refuse the engine with one line if it was built for
another GPU or TensorRT version, or rebuild it for this GPU from the recorded ONNX file with ``rebuild=True`` ->
load and activate it (``trt_engine.Engine``), checking the shapes the engine reports against the sidecar ->
allocate torch-owned I/O buffers for the maximum batch -> per call: copy the batch in, set the input shapes (only
when the batch size changes), ``execute_async_v3`` on a private (non-default) CUDA stream, copy the output into a
fresh tensor the caller owns -> ``close``. Everything that touches the GPU runs with the backend's device current,
the rebuild included.

CUDA graphs (``cuda_graph=True``), in one of two ways (``graph_mode``):

- "manual": the engine call is recorded once in a torch CUDA graph for the fixed maximum batch (smaller batches
  are padded) and replayed; the shapes never change afterwards, so the graph never goes stale. TensorRT 10/11
  always; TensorRT-RTX when the engine was built with ``REQUIRE_USER_ALLOCATION`` and the context reports
  ``is_stream_capturable``.
- "native": otherwise, on TensorRT-RTX: its own CUDA-graph strategy (``WHOLE_GRAPH_CAPTURE``) records and replays
  each batch shape inside ``execute_async_v3``.

The pieces that need no GPU live beside this module and are shared with rawdiff-export: ``trt_runtime`` (the
TensorRT adapter), ``trt_sidecar`` (sidecar and compatibility rules), ``trt_build`` (the engine builder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import torch

from ..fsio import sha256_file
from ..messages import show_path
from .base import INPUT_NAMES, OUTPUT_NAME, Backend, BackendError
from .trt_build import EngineBuildError, rebuild_engine
from .trt_engine import Engine, GraphMode, RuntimeCacheFile, check_profile
from .trt_runtime import INSTALL_HINT, TensorRT, TensorRTNotFound, load_tensorrt, make_logger
from .trt_sidecar import (SIDECAR_FORMAT, EngineSidecar, GpuInfo, RuntimeEnv, SidecarError, check_engine_compat,
                          detect_gpu, gpu_slug, parse_cc, parse_version, read_sidecar, sidecar_path)

__all__ = ["INSTALL_HINT", "SIDECAR_FORMAT", "GpuInfo", "RuntimeEnv", "TensorRT", "TensorRTBackend", "activate_engine",
           "TensorRTNotFound", "check_engine_compat", "detect_gpu", "gpu_slug", "load_tensorrt", "make_logger",
           "parse_cc", "parse_version", "read_sidecar", "runtime_cache_path", "sidecar_path"]

log = logging.getLogger(__name__)


def runtime_cache_path(engine_path: str | os.PathLike[str]) -> Path:
    """Where a TensorRT-RTX engine's runtime cache is kept by default: ``model.x.plan`` -> ``model.x.plan.rtcache``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".rtcache")


def _cuda_device(device: str | torch.device) -> torch.device:
    """``device`` as ``cuda:N`` with N resolved once (CUDA only)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BackendError(f"the TensorRT backend runs on CUDA devices only (got {dev})")
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs a CUDA GPU, and torch sees none (CPU-only torch build or no GPU)")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def activate_engine(engine: Engine, *, cuda_graph: bool, user_allocation: bool, stream_handle: int,
                    device: torch.device, max_batch: int, runtime_cache: RuntimeCacheFile | None) -> GraphMode:
    """Activate and allocate a loaded engine, choosing how CUDA graphs are used; returns the mode.

    Without ``cuda_graph``: "off". TensorRT 10/11: "manual" (refused if the context cannot be captured).
    TensorRT-RTX: "manual" when the engine was built with REQUIRE_USER_ALLOCATION (``user_allocation``, from the
    sidecar) and ``is_stream_capturable(stream_handle)`` holds; otherwise "native" (its CUDA-graph strategy).
    """
    rtx = engine.trt.is_rtx
    mode: GraphMode = "off"
    if cuda_graph:
        mode = "manual" if not rtx or user_allocation else "native"
        if mode == "native":
            log.info("%s: built without REQUIRE_USER_ALLOCATION: using TensorRT-RTX's own CUDA graphs", engine.name)
    engine.activate(graph=mode, runtime_cache=runtime_cache)
    engine.allocate(device, max_batch)
    if mode == "manual" and not engine.stream_capturable(stream_handle):
        if not rtx:
            raise BackendError(f"{engine.name}: the engine cannot be recorded in a CUDA graph")
        log.info("%s: TensorRT-RTX says the context is not stream-capturable: using its own CUDA graphs", engine.name)
        mode = "native"
        engine.activate(graph=mode, runtime_cache=runtime_cache)
    return mode


def _check_engine_hash(path: Path, sidecar: EngineSidecar) -> None:
    """Refuse a sidecar written for another engine file (its recorded sha256 differs)."""
    want = sidecar.engine_sha256
    if want and sha256_file(path) != want:
        raise BackendError(f"{show_path(path)}: the sidecar describes another engine (sha256 {want[:12]}..., this "
                           "file differs); rebuild it or copy the matching .json")


class TensorRTBackend(Backend):
    """Runs a TensorRT engine file (with its ``.json`` sidecar) on one CUDA GPU.

    Args:
        engine_path: the ``.plan`` file; ``<engine_path>.json`` must sit beside it.
        device: "cuda" or "cuda:i".
        rebuild: if the engine does not fit this GPU / TensorRT, rebuild it on this device from the ONNX file
            recorded in the sidecar (same profile and options) next to the engine, and load that.
        cuda_graph: replay the engine call from a CUDA graph (see the module docstring for how).
        max_batch_size: cap below the engine profile's maximum (default: the profile's maximum).
        runtime_cache: TensorRT-RTX only: True (``runtime_cache_path(engine)``), a file, or False (no cache).

    One set of I/O buffers and one stream: calls from several threads at once are not supported (open one backend
    per thread); calls from one thread on any CUDA stream are.
    """

    name: ClassVar[str] = "trt"

    def __init__(self, engine_path: str | os.PathLike[str], *, device: str | torch.device = "cuda",
                 rebuild: bool = False, cuda_graph: bool = False, max_batch_size: int | None = None,
                 runtime_cache: bool | str | os.PathLike[str] = True) -> None:
        self._engine: Engine | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._stream: torch.cuda.Stream | None = None
        path = Path(engine_path)
        try:
            if not path.is_file():
                raise BackendError(f"{show_path(path)}: no such engine file" if not path.exists() else
                                   f"{show_path(path)}: not a regular file")
            sidecar = read_sidecar(path)
            _check_engine_hash(path, sidecar)
        except SidecarError as e:
            raise BackendError(str(e)) from None
        dev = _cuda_device(device)
        try:
            self.trt = load_tensorrt(prefer=sidecar.flavour)
        except TensorRTNotFound as e:
            raise BackendError(str(e)) from None
        with torch.cuda.device(dev):
            path, sidecar = self._fit(path, sidecar, dev, rebuild)
            self.engine_path, self.sidecar = path, sidecar
            engine = Engine(self.trt, path.name)
            io = engine.load(path, allow_host_code=sidecar.version_compatible)
            check_profile(io, sidecar, path.name)
            cap = min(max_batch_size or io.max_batch, io.max_batch)
            super().__init__(sidecar.meta, dev, torch.float32, cap, patch_size=io.patch_size)
            self.min_batch, self.cuda_graph = io.min_batch, cuda_graph
            self._buffer_batch = max(cap, io.min_batch)  # smaller batches run padded to the profile's minimum
            self._stream = torch.cuda.Stream(dev)
            self._engine = engine
            self._activate(engine, sidecar, runtime_cache)
            torch.cuda.synchronize(dev)  # the zero-filled buffers are ready for any stream

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cuda",
                  rebuild: bool = False, cuda_graph: bool = False,
                  max_batch_size: int | None = None) -> TensorRTBackend:
        """Open an engine file (its sidecar ``<path>.json`` must sit beside it)."""
        return cls(path, device=device, rebuild=rebuild, cuda_graph=cuda_graph, max_batch_size=max_batch_size)

    def _fit(self, path: Path, sidecar: EngineSidecar, dev: torch.device,
             rebuild: bool) -> tuple[Path, EngineSidecar]:
        """The engine to load: ``path`` if it fits this GPU and TensorRT, else (``rebuild``) one rebuilt on ``dev``."""
        gpu = detect_gpu(dev.index)
        env = RuntimeEnv(self.trt.flavour, self.trt.version, gpu)
        errors, warnings = check_engine_compat(sidecar, env)
        for w in warnings:
            log.warning("%s: %s", path.name, w)
        if not errors:
            return path, sidecar
        if not rebuild:
            raise BackendError(f"{path.name}: {errors[0]}; rebuild it (rawdiff-export, or rebuild=True)")
        try:
            res = rebuild_engine(path, sidecar, errors[0], trt=self.trt, device=int(dev.index))  # type: ignore[arg-type]
        except EngineBuildError as e:
            raise BackendError(str(e)) from None
        errors, _ = check_engine_compat(res.sidecar, env)
        if errors:
            raise BackendError(f"{res.engine_path.name}: rebuilt, but {errors[0]}")
        return res.engine_path, res.sidecar

    def _activate(self, engine: Engine, sidecar: EngineSidecar, runtime_cache: bool | str | os.PathLike[str]) -> None:
        cache = None
        if self.trt.is_rtx and runtime_cache:
            cache = RuntimeCacheFile(runtime_cache_path(self.engine_path) if runtime_cache is True else runtime_cache)
        activate_engine(engine, cuda_graph=self.cuda_graph,
                        user_allocation=sidecar.require_user_allocation,
                        stream_handle=self._stream.cuda_stream, device=self.device,  # type: ignore[union-attr]
                        max_batch=self._buffer_batch, runtime_cache=cache)

    @property
    def graph_mode(self) -> GraphMode:
        """How CUDA graphs are used: "off", "manual" (rawdiff records the call) or "native" (TensorRT-RTX does)."""
        return self._engine.graph if self._engine is not None else "off"

    # -- inference ----------------------------------------------------------------------------------------------
    def _capture(self) -> None:
        engine, stream = self._engine, self._stream
        assert engine is not None and stream is not None
        engine.set_batch(self._buffer_batch)  # fixed from now on: the graph never sees another shape
        with torch.cuda.stream(stream):
            engine.enqueue(stream.cuda_stream)  # one eager run first (lazy initialisation outside the capture)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            engine.enqueue(stream.cuda_stream)
        self._graph = graph

    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        engine, stream = self._engine, self._stream
        if engine is None or stream is None:
            raise BackendError("backend is closed")
        n, p = x_t.shape[0], self.patch_size
        manual = self.graph_mode == "manual"
        dev, buf = self.device, engine.buffers
        caller = torch.cuda.current_stream(dev)
        out = torch.empty((n, 3, p, p), dtype=torch.float32, device=dev)  # the caller's stream owns it
        stream.wait_stream(caller)  # inputs produced on the caller's stream are ready
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            for name, v in zip(INPUT_NAMES, (x_t, cond, t)):
                buf[name][:n].copy_(v)
            if manual:
                if self._graph is None:
                    self._capture()
                self._graph.replay()  # type: ignore[union-attr]
            else:
                engine.set_batch(max(n, self.min_batch))
                engine.enqueue(stream.cuda_stream)
            out.copy_(buf[OUTPUT_NAME][:n])
        caller.wait_stream(stream)  # the caller sees a finished output; our buffers are free again after it
        return out

    def close(self) -> None:
        """Release the CUDA graph, context, engine and buffers; save the runtime cache (idempotent)."""
        if self._stream is not None:
            self._stream.synchronize()
            self._stream = None
        self._graph = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - interpreter shutdown
            log.debug("close() in __del__ failed: %s", e)

    def describe(self) -> str:
        return (f"{self.name} {self.engine_path.name} ({self.trt.describe()}, built for {self.sidecar.target_gpu}, "
                f"{self.sidecar.onnx_precision}) on {self.device}"
                + (f" cuda-graph {self.graph_mode} batch {self._buffer_batch}" if self.cuda_graph else ""))
