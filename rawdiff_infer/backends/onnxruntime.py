"""ONNX Runtime backend: a rawdiff ONNX file (fp32 or fp16 graph, float32 I/O) on CPU, CUDA or TensorRT EP.

The model's description is read from the ONNX file's metadata, so the file alone is enough (a FIFO or other
non-regular file is refused before anything opens it). On the CPU the batch goes through ``InferenceSession.run``
(numpy views of the torch tensors, no extra copy for contiguous float32 input). On a GPU (onnxruntime-gpu), torch
CUDA tensors are bound by address with I/O binding, so patches never round-trip through the host, and the output is
written straight into a fresh torch tensor that the caller owns.

Streams (onnxruntime's CUDA and TensorRT execution providers, provider option ``user_compute_stream``, documented
at onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html, TensorRT-ExecutionProvider.html): the
session computes on a dedicated torch CUDA stream (onnxruntime refuses handle 0, torch's default stream), which
waits for the caller's stream before each run; the caller's stream waits for it afterwards. The run option
``disable_synchronize_execution_providers=1`` (onnxruntime_run_options_config_keys.h) drops onnxruntime's host
synchronisation at the end of each run: no host synchronisation per batch. When a provider cannot take the stream
(options overridden by the caller, another GPU provider), the backend falls back to one host synchronisation
before and after each run.

TensorRT execution provider: the optimisation profile is given explicitly (``trt_profile_min_shapes`` /
``_opt_shapes`` / ``_max_shapes``: batch 1 .. max_batch_size, tuned for the full batch) so that the last, partial
batch of an image runs in the same engine instead of rebuilding it, and engines and timing caches are kept in
``trt_cache_dir`` (``trt_engine_cache_enable`` / ``trt_engine_cache_path``, ``trt_timing_cache_enable`` /
``trt_timing_cache_path``), one folder per ONNX file content.

Concurrency: ``infer`` may be called from several threads at once. The CPU path shares nothing but the session
(``InferenceSession.run`` is thread-safe); the GPU path creates one ``IOBinding`` per call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..fsio import check_regular, sha256_file
from ..messages import first_line, show_path
from .base import INPUT_NAMES, OUTPUT_NAME, Backend, BackendError
from .onnx_info import OnnxInfoError, onnx_info_from_props, read_onnx_info

__all__ = ["DEFAULT_TRT_MAX_BATCH", "PROVIDER_ALIASES", "OnnxRuntimeBackend", "default_trt_cache_dir",
           "provider_options"]

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")
#: providers that take ``user_compute_stream``
_STREAM_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
#: the TensorRT execution provider's profile maximum when the caller sets no max_batch_size
DEFAULT_TRT_MAX_BATCH = 256


def default_trt_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rawdiff/ort-tensorrt`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rawdiff" / "ort-tensorrt"


def provider_options(providers: Sequence[Any] | None, *, device_id: int | None, stream: int | None,
                     max_batch: int, patch_size: int | None, trt_cache: Path | None) -> list[Any]:
    """The ``providers`` argument of ``InferenceSession``.

    Args:
        providers: names or (name, options) tuples, aliases "cpu", "cuda", "tensorrt"; None: CUDA then CPU on a GPU
            (``device_id`` set), CPU otherwise. Options the caller gives win over the ones set here.
        device_id: the CUDA device (resolved, never None on a GPU), or None on the CPU.
        stream: the CUDA stream handle for ``user_compute_stream`` (non-zero), or None.
        max_batch: the TensorRT profile's maximum batch (its minimum is 1, its optimum ``max_batch``).
        patch_size: P in pixels (needed for the TensorRT profile shapes).
        trt_cache: folder for the TensorRT provider's engine and timing caches (None: no cache).
    """
    if providers is None:
        providers = ["cuda", "cpu"] if device_id is not None else ["cpu"]
    out: list[Any] = []
    for p in providers:
        name, given = (p[0], dict(p[1])) if isinstance(p, tuple) else (str(p), {})
        name = PROVIDER_ALIASES.get(name.lower(), name)
        opts: dict[str, Any] = {}
        if device_id is not None and name in _GPU_PROVIDERS:
            opts["device_id"] = device_id
            if stream and name in _STREAM_PROVIDERS:
                opts["user_compute_stream"] = str(stream)
        if name == "TensorrtExecutionProvider":
            opts.update(_trt_profile(max_batch, patch_size, trt_cache))
        opts.update(given)
        out.append((name, opts) if opts else name)
    return out


def _trt_profile(max_batch: int, patch_size: int | None, cache: Path | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if patch_size:
        p = patch_size

        def shapes(n: int) -> str:
            return f"x_t:{n}x3x{p}x{p},cond:{n}x3x{p}x{p},t:{n}"

        opts.update(trt_profile_min_shapes=shapes(1), trt_profile_opt_shapes=shapes(max_batch),
                    trt_profile_max_shapes=shapes(max_batch))
    if cache is not None:
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache), trt_timing_cache_enable=True,
                    trt_timing_cache_path=str(cache))
    return opts


def _names(providers: Sequence[Any]) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


class OnnxRuntimeBackend(Backend):
    """Runs a rawdiff ONNX graph with ONNX Runtime.

    Args:
        path: the ``.onnx`` file (``model.onnx`` fp32 or ``model.fp16.onnx``; both take and return float32).
        device: "cpu" or "cuda[:i]" (CUDA needs ``onnxruntime-gpu`` and a torch with CUDA).
        providers: execution providers in priority order, names or (name, options) tuples; aliases "cpu", "cuda",
            "tensorrt". Default: CPU on the CPU; CUDA (then CPU) on a GPU.
        max_batch_size: largest batch accepted (None: unlimited; with the TensorRT provider,
            ``DEFAULT_TRT_MAX_BATCH``, the profile's maximum).
        trt_cache_dir: TensorRT provider only: where its engines and timing caches go (default:
            ``default_trt_cache_dir()``), in a sub-folder named after the ONNX file's sha256.
    """

    name: ClassVar[str] = "onnx"

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 providers: Sequence[Any] | None = None, max_batch_size: int | None = None,
                 trt_cache_dir: str | os.PathLike[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu")
        self.path = Path(path)
        self.session: Any = None
        self._stream: torch.cuda.Stream | None = None
        _check_file(self.path)
        dev = _device(device)
        on_gpu = dev.type == "cuda"
        if on_gpu:
            self._stream = torch.cuda.Stream(dev)
        wants_trt = any(PROVIDER_ALIASES.get(n.lower(), n) == "TensorrtExecutionProvider"
                        for n in _names(providers or []))
        if wants_trt:
            max_batch_size = max_batch_size or DEFAULT_TRT_MAX_BATCH
        provs = provider_options(
            providers, device_id=dev.index if on_gpu else None,
            stream=self._stream.cuda_stream if self._stream is not None else None,
            max_batch=max_batch_size or DEFAULT_TRT_MAX_BATCH,
            patch_size=_patch_size(self.path) if wants_trt else None,
            trt_cache=_trt_cache(self.path, trt_cache_dir) if wants_trt else None)
        _check_available(ort, provs, on_gpu)
        self.session = _session(ort, self.path, provs)
        info = onnx_info_or_error(self.path, dict(self.session.get_modelmeta().custom_metadata_map))
        _check_graph(self.path, self.session, info.patch_size)
        super().__init__(info.meta, dev, torch.float32, max_batch_size, patch_size=info.patch_size)
        self.precision = info.precision
        self.providers = self.session.get_providers()
        if on_gpu and not any(n in self.providers for n in _GPU_PROVIDERS):
            raise BackendError(f"onnxruntime fell back to {self.providers} (CUDA libraries not loadable?)")
        self._on_torch_stream = on_gpu and _all_on_stream(self.session, provs, self._stream)
        self._run_options = ort.RunOptions()
        if self._on_torch_stream:
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                  providers: Sequence[Any] | None = None, max_batch_size: int | None = None) -> OnnxRuntimeBackend:
        """Open a rawdiff ONNX file (its description is read from the file)."""
        return cls(path, device=device, providers=providers, max_batch_size=max_batch_size)

    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            raise BackendError("backend is closed")
        if self.device.type == "cuda":
            return self._infer_bound(x_t, cond, t)
        feeds = {k: v.detach().to("cpu", torch.float32).contiguous().numpy()
                 for k, v in zip(INPUT_NAMES, (x_t, cond, t))}
        try:
            (eps,) = self.session.run([OUTPUT_NAME], feeds)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime failed: {first_line(e)}") from None
        return torch.from_numpy(np.ascontiguousarray(eps, dtype=np.float32))  # a fresh array: the caller owns it

    def _infer_bound(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dev, idx, stream = self.device, self.device.index, self._stream
        assert stream is not None
        caller = torch.cuda.current_stream(dev)
        with torch.cuda.device(dev):
            ins = [v.detach().to(dev, torch.float32).contiguous() for v in (x_t, cond, t)]
            out = torch.empty(tuple(x_t.shape), dtype=torch.float32, device=dev)
        io = self.session.io_binding()  # one per call: concurrent calls share no binding
        for name, v in zip(INPUT_NAMES, ins):
            io.bind_input(name, "cuda", idx, np.float32, tuple(v.shape), v.data_ptr())
        io.bind_output(OUTPUT_NAME, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        if self._on_torch_stream:
            stream.wait_stream(caller)  # onnxruntime reads the inputs on our stream, after the caller wrote them
            self._run(io)
            for v in (*ins, out):
                v.record_stream(stream)  # the caching allocator must not reuse them before our stream is done
            caller.wait_stream(stream)
        else:
            caller.synchronize()  # onnxruntime runs on a stream of its own
            self._run(io)
            io.synchronize_outputs()
        return out

    def _run(self, io: Any) -> None:
        try:
            self.session.run_with_iobinding(io, self._run_options)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"onnxruntime failed: {first_line(e)}") from None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self.session = None

    def describe(self) -> str:
        provs = ",".join(p.removesuffix("ExecutionProvider") for p in (self.providers or []))
        return f"{self.name} {self.path.name} ({self.precision} graph) on {self.device} [{provs}]"


# ---- construction helpers ----------------------------------------------------------------------------------------

def _check_file(path: Path) -> None:
    try:
        check_regular(path)  # a FIFO would block onnxruntime's open for ever
    except FileNotFoundError:
        raise BackendError(f"{show_path(path)}: no such ONNX file") from None
    except OSError as e:
        raise BackendError(f"{show_path(path)}: {e.strerror or first_line(e)}") from None


def _device(device: str | torch.device) -> torch.device:
    """``device`` with the CUDA index resolved once (the session and the I/O binding use the same one)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {dev} not supported by the ONNX Runtime backend (cpu or cuda)")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise BackendError("CUDA was requested but torch sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


def _patch_size(path: Path) -> int:
    try:
        return read_onnx_info(path).patch_size
    except ImportError:
        raise BackendError("the TensorRT execution provider needs the onnx package to read the patch size "
                           "(pip install onnx)") from None
    except OnnxInfoError as e:
        raise BackendError(str(e)) from None


def _trt_cache(path: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_trt_cache_dir()
    folder = root / sha256_file(path)[:16]  # engines of different weights never collide
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"TensorRT provider cache {show_path(folder)}: {e.strerror or first_line(e)}") from None
    return folder


def _check_available(ort: Any, provs: list[Any], on_gpu: bool) -> None:
    available = set(ort.get_available_providers())
    names = _names(provs)
    missing = [n for n in names if n not in available]
    if missing:
        hint = " (pip install onnxruntime-gpu)" if any(n in _GPU_PROVIDERS for n in missing) else ""
        raise BackendError(f"onnxruntime {ort.__version__} lacks {', '.join(missing)}{hint}; available: "
                           f"{', '.join(sorted(available))}")
    if on_gpu and not any(n in _GPU_PROVIDERS for n in names):
        raise BackendError("device cuda needs a GPU execution provider (cuda or tensorrt)")


def _session(ort: Any, path: Path, provs: list[Any]) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=provs)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BackendError(f"{show_path(path)}: onnxruntime cannot load it ({first_line(e)})") from None


def onnx_info_or_error(path: Path, props: dict[str, str]) -> Any:
    """``onnx_info_from_props`` with its error as a BackendError."""
    try:
        return onnx_info_from_props(path, props)
    except OnnxInfoError as e:
        raise BackendError(str(e)) from None


def _check_graph(path: Path, session: Any, patch: int) -> None:
    ins = {i.name: i for i in session.get_inputs()}
    outs = [o.name for o in session.get_outputs()]
    if set(ins) != set(INPUT_NAMES) or outs != [OUTPUT_NAME]:
        raise BackendError(f"{show_path(path)}: graph I/O {sorted(ins)} -> {outs} is not a rawdiff eps-model")
    for n, i in ins.items():
        if i.type != "tensor(float)":
            raise BackendError(f"{show_path(path)}: input {n} is {i.type}, expected tensor(float)")
    graph_patch = ins["x_t"].shape[-1]
    if isinstance(graph_patch, int) and graph_patch != patch:
        raise BackendError(f"{show_path(path)}: the graph takes {graph_patch}-pixel patches but its metadata says "
                           f"{patch}")


def _all_on_stream(session: Any, provs: list[Any], stream: torch.cuda.Stream | None) -> bool:
    """True when every GPU provider in use was given ``stream`` as its compute stream (so the backend needs no host
    synchronisation), and onnxruntime does not report another one."""
    if stream is None:
        return False
    given = {p[0]: p[1] for p in provs if isinstance(p, tuple)}
    try:
        reported = session.get_provider_options()
    except Exception:  # noqa: BLE001 - older builds
        reported = {}
    used = [n for n in session.get_providers() if n in _GPU_PROVIDERS]
    handle = str(stream.cuda_stream)
    return bool(used) and all(str(given.get(n, {}).get("user_compute_stream")) == handle
                              and str(reported.get(n, {}).get("user_compute_stream", handle)) in (handle, "")
                              for n in used)
