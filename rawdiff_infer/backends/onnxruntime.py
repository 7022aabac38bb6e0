"""ONNX Runtime backend: a rawdiff ONNX file (fp32 or fp16 graph, float32 I/O) on CPU, CUDA or TensorRT EP.

The model's description is read from the ONNX file's metadata, so the file alone is enough. On the CPU the batch goes
through ``InferenceSession.run`` (numpy views of the torch tensors, no extra copy for contiguous float32 input). On a
GPU (onnxruntime-gpu), torch CUDA tensors are bound by address with I/O binding, so patches never round-trip through
the host, and the output is written straight into a fresh torch tensor that the caller owns.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..checkpoint import ModelMeta
from .base import INPUT_NAMES as INPUTS
from .base import OUTPUT_NAME as OUTPUT
from .base import Backend, BackendError

__all__ = ["PROVIDER_ALIASES", "OnnxRuntimeBackend"]

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")


def _meta_from_props(path: Path, props: dict[str, str]) -> ModelMeta:
    if "rawdiff" not in props:
        raise BackendError(f"{path}: ONNX file without a rawdiff description (not exported by rawdiff-export)")
    try:
        return ModelMeta.from_dict(json.loads(props["rawdiff"]))
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{path}: invalid rawdiff description in ONNX metadata ({e})") from None


def _normalise_providers(providers: Sequence[Any] | None, dev: torch.device) -> list[Any]:
    if providers is None:
        if dev.type == "cuda":
            return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    out: list[Any] = []
    for p in providers:
        if isinstance(p, tuple):
            name, opts = p
            out.append((PROVIDER_ALIASES.get(name.lower(), name), dict(opts)))
        else:
            name = PROVIDER_ALIASES.get(str(p).lower(), str(p))
            if dev.type == "cuda" and name in _GPU_PROVIDERS:
                out.append((name, {"device_id": dev.index or 0}))
            else:
                out.append(name)
    return out


class OnnxRuntimeBackend(Backend):
    """Runs a rawdiff ONNX graph with ONNX Runtime.

    Args:
        path: the ``.onnx`` file (``model.onnx`` fp32 or ``model.fp16.onnx``; both take and return float32).
        device: "cpu" or "cuda[:i]" (CUDA needs ``onnxruntime-gpu`` and a torch with CUDA).
        providers: execution providers in priority order, names or (name, options) tuples; aliases "cpu", "cuda",
            "tensorrt". Default: CPU on the CPU; CUDA (then CPU) on a GPU.
        max_batch_size: largest batch accepted (None: unlimited).
        threads: intra-op threads on the CPU (None: ONNX Runtime's default).
    """

    name: ClassVar[str] = "onnx"

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 providers: Sequence[Any] | None = None, max_batch_size: int | None = None,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu")
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: no such ONNX file")
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise BackendError(f"device {dev} not supported by the ONNX Runtime backend (cpu or cuda)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA was requested but torch sees no CUDA device")
        provs = _normalise_providers(providers, dev)
        available = set(ort.get_available_providers())
        names = [p[0] if isinstance(p, tuple) else p for p in provs]
        missing = [n for n in names if n not in available]
        if missing:
            hint = " (pip install onnxruntime-gpu)" if any(n in _GPU_PROVIDERS for n in missing) else ""
            raise BackendError(f"onnxruntime {ort.__version__} lacks {', '.join(missing)}{hint}; available: "
                               f"{', '.join(sorted(available))}")
        if dev.type == "cuda" and not any(n in _GPU_PROVIDERS for n in names):
            raise BackendError("device cuda needs a GPU execution provider (cuda or tensorrt)")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=provs)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        meta = _meta_from_props(self.path, props)
        shape = self.session.get_inputs()[0].shape
        graph_patch = shape[-1] if isinstance(shape[-1], int) else None
        try:
            patch = int(props.get("rawdiff.patch_size", graph_patch or meta.model.patch_size))
        except ValueError:
            raise BackendError(f"{self.path}: invalid rawdiff.patch_size in the ONNX metadata") from None
        if graph_patch is not None and graph_patch != patch:
            raise BackendError(f"{self.path}: the graph takes {graph_patch}-pixel patches but its metadata says "
                               f"{patch}")
        super().__init__(meta, dev, torch.float32, max_batch_size, patch_size=patch)
        self.precision = props.get("rawdiff.precision", "fp32")
        used = self.session.get_providers()
        if dev.type == "cuda" and not any(n in used for n in _GPU_PROVIDERS):
            raise BackendError(f"onnxruntime fell back to {used} (CUDA libraries not loadable?)")
        self.providers = used
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        if set(ins) != set(INPUTS) or outs != [OUTPUT]:
            raise BackendError(f"{self.path}: graph I/O {sorted(ins)} -> {outs} is not a rawdiff eps-model")
        for n, i in ins.items():
            if i.type != "tensor(float)":
                raise BackendError(f"{self.path}: input {n} is {i.type}, expected tensor(float)")
        self._io = self.session.io_binding() if dev.type == "cuda" else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                  providers: Sequence[Any] | None = None, max_batch_size: int | None = None) -> OnnxRuntimeBackend:
        """Open a rawdiff ONNX file (its description is read from the file)."""
        return cls(path, device=device, providers=providers, max_batch_size=max_batch_size)

    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        if self.session is None:
            raise BackendError("backend is closed")
        if self._io is not None:
            return self._infer_bound(n, x_t, cond, t)
        feeds = {k: v.detach().to("cpu", torch.float32).contiguous().numpy()
                 for k, v in zip(INPUTS, (x_t, cond, t))}
        try:
            (eps,) = self.session.run([OUTPUT], feeds)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime failed: {str(e).splitlines()[0]}") from None
        return torch.from_numpy(np.ascontiguousarray(eps, dtype=np.float32))  # a fresh array: the caller owns it

    def _infer_bound(self, n: int, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dev, io = self.device, self._io
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        ins = [v.detach().to(dev, torch.float32).contiguous() for v in (x_t, cond, t)]
        out = torch.empty(tuple(x_t.shape), dtype=torch.float32, device=dev)
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, v in zip(INPUTS, ins):
            io.bind_input(name, "cuda", idx, np.float32, tuple(v.shape), v.data_ptr())
        io.bind_output(OUTPUT, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        # ONNX Runtime runs on its own CUDA stream: the inputs must be ready before it reads them
        torch.cuda.current_stream(dev).synchronize()
        try:
            self.session.run_with_iobinding(io)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime failed: {str(e).splitlines()[0]}") from None
        io.synchronize_outputs()
        return out

    def close(self) -> None:
        self._io = None
        self.session = None  # type: ignore[assignment]

    def describe(self) -> str:
        provs = ",".join(p.removesuffix("ExecutionProvider") for p in (self.providers or []))
        return f"{self.name} {self.path.name} ({self.precision} graph) on {self.device} [{provs}]"
