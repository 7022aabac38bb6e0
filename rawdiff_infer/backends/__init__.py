"""Backends: one small class per runtime, one contract (see base.Backend), and a factory."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Backend, BackendError

__all__ = ["Backend", "BackendError", "open_backend", "BACKENDS"]

BACKENDS: tuple[str, ...] = ("torch", "onnx", "trt", "aoti")


def open_backend(kind: str, path: str | os.PathLike, *, device: str = "cpu", dtype: str = "fp32",
                 max_batch_size: int | None = None, compile: bool = False, cuda_graph: bool = False,
                 compile_cache: str | os.PathLike | bool | None = None) -> Backend:
    """Create a backend from a model file.

    Args:
        kind: "torch" (rawdiff checkpoint: .safetensors or sharded directory), "onnx" (.onnx file exported by
            rawdiff-export), "trt" (TensorRT engine built by rawdiff-export), "aoti" (AOTInductor package built by
            rawdiff-export --aoti).
        path: the model file.
        device: "cpu", "cuda", "cuda:N".
        dtype: torch backend only: fp32 | fp16 | bf16.
        max_batch_size, compile, cuda_graph: see the backend classes.
        compile_cache: torch backend with ``compile``: the persistent compile-cache folder (None / True: the
            default, ``compile_cache.default_compile_cache_dir()``; False: torch's own setting).
    """
    if kind == "torch":
        from .torch import TorchBackend

        return TorchBackend.from_checkpoint(path, device=device, dtype=dtype, max_batch_size=max_batch_size,
                                            compile=compile, cuda_graph=cuda_graph, compile_cache=compile_cache)
    if kind == "onnx":
        try:
            from .onnxruntime import OnnxRuntimeBackend
        except ImportError as e:
            raise BackendError(f"the onnx backend needs onnxruntime ({e}); pip install 'rawdiff[onnx]'") from None
        return OnnxRuntimeBackend.from_file(path, device=device, max_batch_size=max_batch_size)
    if kind == "trt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend.from_file(path, device=device if device != "cpu" else "cuda", cuda_graph=cuda_graph,
                                         max_batch_size=max_batch_size)
    if kind == "aoti":
        if cuda_graph:
            raise BackendError("the aoti backend takes no CUDA graph (its batch size is dynamic)")
        from .aoti import AotiBackend

        return AotiBackend.from_file(path, device=device, max_batch_size=max_batch_size)
    raise BackendError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")


def default_checkpoint() -> Path | None:
    """The model bundled with the package (sharded fp16 safetensors), or None if this build has none."""
    p = Path(__file__).resolve().parent.parent / "weights" / "rawdiff.json"
    return p if p.exists() else None
