"""PyTorch backend: the U-Net on CPU or CUDA in fp32 / fp16 / bf16, channels_last, torch.compile, CUDA graphs."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from ..checkpoint import ModelMeta, load_checkpoint
from ..compile_cache import CompileCacheError, configure_compile_cache
from ..model import UNet
from .base import Backend, BackendError

__all__ = ["TorchBackend", "parse_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise BackendError(f"unknown dtype {name!r}; choose fp32, fp16 or bf16") from None


class TorchBackend(Backend):
    """Runs a ``UNet`` module.

    Args:
        model: the U-Net (moved and cast here).
        meta: its description.
        device: "cpu", "cuda", "cuda:1", ...
        dtype: weights and activations (fp16 / bf16 need CUDA for speed; fp16 on CPU works but is slow).
        channels_last: NHWC memory format (default on: 2-5x faster than NCHW on CPU too, measured).
        compile: wrap the forward in ``torch.compile`` (mode "default"; "max-autotune-no-cudagraphs" etc. allowed).
        compile_cache: with ``compile`` only: the folder where torch keeps compiled graphs and kernels between runs,
            so that a second run skips most of the compilation (see ``rawdiff_infer.compile_cache``). None or True:
            ``TORCHINDUCTOR_CACHE_DIR`` if the user set it, else ``$XDG_CACHE_HOME/rawdiff/inductor`` (if that
            folder is unusable: a warning, and torch's own setting); a path: that folder (created, mode 0o700;
            BackendError if unusable); False: leave torch's own setting alone (``/tmp/torchinductor_<user>``).
            Process-wide, like torch's setting.
        cuda_graph: capture the forward for the fixed batch ``max_batch_size`` (smaller batches are padded) and
            replay it; CUDA only.
        max_batch_size: largest batch; required with ``cuda_graph``.
    """

    name: ClassVar[str] = "torch"

    def __init__(self, model: UNet, meta: ModelMeta, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = torch.float32, channels_last: bool | None = None,
                 compile: bool | str = False, cuda_graph: bool = False, max_batch_size: int | None = None,
                 compile_cache: str | os.PathLike[str] | bool | None = None) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("CUDA was requested but torch sees no CUDA device")
        dt = parse_dtype(dtype)
        super().__init__(meta, dev, dt, max_batch_size)
        if cuda_graph and (dev.type != "cuda" or not max_batch_size):
            raise BackendError("cuda_graph needs a CUDA device and a max_batch_size")
        self.channels_last = True if channels_last is None else channels_last
        self.model = model.to(device=dev, dtype=dt).eval()
        self.model.set_fused_attention(True)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = self.model.forward
        #: the compile-cache folder this backend configured (None: not compiling, or torch's own setting kept)
        self.compile_cache_dir: Path | None = None
        #: torch.compile mode in use ("default", "reduce-overhead", ...), None when eager
        self.compile_mode: str | None = None
        if compile:
            if compile_cache is not False:
                explicit = compile_cache is not None and compile_cache is not True
                try:
                    self.compile_cache_dir = configure_compile_cache(compile_cache if explicit else None)
                except CompileCacheError as e:
                    if explicit:
                        raise BackendError(str(e)) from None
                    log.warning("%s; torch.compile keeps torch's own cache setting", e)  # the default: never fatal
            self.compile_mode = compile if isinstance(compile, str) else "default"
            self._forward = torch.compile(self.model, mode=self.compile_mode, fullgraph=True, dynamic=False)
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, ...] | None = None
        self._recording = False

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: object) -> "TorchBackend":
        """Load a rawdiff checkpoint (file or sharded directory) into a backend."""
        model, meta = load_checkpoint(path)
        return cls(model, meta, **kwargs)  # type: ignore[arg-type]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.input_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def capturable(self) -> bool:
        """On CUDA the forward is pure device work: an enclosing CUDA graph may record it."""
        return self.device.type == "cuda"

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside: the plain (compiled) forward even with ``cuda_graph``; graphs do not nest, and the warm-up
        calls of a caller's capture must compile the very path the capture records."""
        saved, self._recording = self._recording, True
        try:
            yield
        finally:
            self._recording = saved

    @torch.inference_mode()
    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cuda_graph and not self._recording:
            return self._replay(x_t, cond, t)
        eps = self._forward(self._prep(x_t), self._prep(cond), t.to(self.device, torch.float32))
        return eps.float().contiguous()

    def _replay(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, bs = x_t.shape[0], self.max_batch_size
        assert bs is not None
        if self._graph is None:
            p = x_t.shape[-1]
            sx = self._prep(torch.zeros(bs, 3, p, p, device=self.device))
            sc = self._prep(torch.zeros(bs, 3, p, p, device=self.device))
            st = torch.zeros(bs, device=self.device)
            self._graph, so = self._capture(sx, sc, st)
            self._static = (sx, sc, st, so)
        sx, sc, st, so = self._static  # type: ignore[misc]
        if x_t.shape[1:] != sx.shape[1:]:
            raise BackendError(f"CUDA graph captured for patches {tuple(sx.shape[1:])}, got {tuple(x_t.shape[1:])}")
        sx[:n].copy_(x_t)
        sc[:n].copy_(cond)
        st[:n].copy_(t)
        if n < bs:  # keep the padded tail finite and cheap
            sx[n:].zero_()
            sc[n:].zero_()
            st[n:].zero_()
        with torch.cuda.device(self.device):  # launched on this device's current stream, wherever the caller is
            self._graph.replay()
        return so[:n].clone()

    def _capture(self, sx: torch.Tensor, sc: torch.Tensor, st: torch.Tensor) -> tuple[torch.cuda.CUDAGraph,
                                                                                      torch.Tensor]:
        """Warm up and record the forward on the static inputs: (graph, its output). Recorded on a side stream of
        this backend's own device (``stream=``: without it torch captures on the *current* device, and on cuda:N
        the kernels would run eagerly while replay returns stale eps), in ``thread_local`` mode so that another
        thread pinning memory meanwhile (the runner's decode thread) cannot break the capture."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    self._forward(sx, sc, st)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                so = self._forward(sx, sc, st).float()
        return graph, so

    @torch.inference_mode()
    def _probe(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eager module (no compilation or graph capture for a one-patch shape that real batches never use)."""
        return self.model(self._prep(x_t), self._prep(cond), t).float()

    def close(self) -> None:
        self._graph = None
        self._static = None

    def describe(self) -> str:
        compiled = None
        if self.compile_mode is not None:
            compiled = "compiled" if self.compile_mode == "default" else f"compiled({self.compile_mode})"
        extra = [s for s, on in (("channels_last", self.channels_last), (compiled, compiled is not None),
                                 ("cuda-graph", self.cuda_graph)) if on]
        return super().describe() + (" " + ",".join(extra) if extra else "")
