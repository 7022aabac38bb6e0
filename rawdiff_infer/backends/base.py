"""The backend contract: run the eps-model on one batch of patches.

A backend knows nothing about images, grids or samplers. Life cycle: construct (load) -> ``infer`` any number of
times -> ``close`` (or use it as a context manager). ``infer`` returns a tensor the caller owns (never an internal
buffer that the next call overwrites). Errors are exceptions (``BackendError``), never ``exit``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch

from ..checkpoint import ModelMeta

__all__ = ["Backend", "BackendError", "INPUT_NAMES", "OUTPUT_NAME"]

#: the eps-model's graph interface, the same in the torch module, the ONNX graph and the TensorRT engine:
#: inputs x_t [N, 3, P, P], cond [N, 3, P, P], t [N] (float32); output eps [N, 3, P, P] (float32)
INPUT_NAMES: tuple[str, str, str] = ("x_t", "cond", "t")
OUTPUT_NAME = "eps"


class BackendError(RuntimeError):
    """A backend cannot be created or run (message: one line)."""


class Backend(ABC):
    """Runs eps = model(x_t, cond, t) on a batch of patches.

    Attributes:
        name: short backend name ("torch", "onnx", "trt").
        meta: the model's description (schedule, camera, encoding, U-Net config).
        device: torch device where ``infer`` wants its inputs (and returns its output).
        input_dtype: dtype in which inputs are cheapest to hand over (cond patches are cached in it).
        patch_size: P, the patch side in pixels that ``infer`` takes (an ONNX graph or engine fixes it; the torch
            module takes any multiple of 8, and reports the model's training patch).
        max_batch_size: the largest batch ``infer`` accepts (None: unlimited).
        capturable: True when ``infer`` only launches device work on the current stream (no host synchronisation,
            no host-side buffers), so that a caller may record it inside its own CUDA graph (see
            ``tiling.GraphedDenoiser``, which records a whole sampler step).
    """

    name: ClassVar[str] = "base"

    def __init__(self, meta: ModelMeta, device: torch.device, input_dtype: torch.dtype = torch.float32,
                 max_batch_size: int | None = None, patch_size: int | None = None) -> None:
        self.meta = meta
        self.device = device
        self.input_dtype = input_dtype
        self.max_batch_size = max_batch_size
        self.patch_size = int(patch_size or meta.model.patch_size)
        #: True when the patch size is fixed by the model file (ONNX, TensorRT); False: any multiple of 8
        self.fixed_patch_size = patch_size is not None

    @abstractmethod
    def infer(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps for a batch.

        Args:
            x_t: [N, 3, P, P] noisy RAW patches (model space), float32 or ``input_dtype``, on ``device``.
            cond: [N, 3, P, P] sRGB patches in [-1, 1], on ``device``.
            t: [N] timesteps (training units, float32).
        Returns:
            [N, 3, P, P] float32 eps on ``device``, owned by the caller.
        """

    @property
    def capturable(self) -> bool:
        return False

    def recording(self) -> AbstractContextManager[None]:
        """Context for a caller that records ``infer`` into its own CUDA graph: inside it, ``infer`` takes exactly
        the path that the capture will see (no graph of its own), so warm-up calls made inside it compile and
        autotune everything the capture needs. Only meaningful when ``capturable``."""
        return nullcontext()

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``infer`` after checking the batch: x_t and cond [N, 3, P, P] with N in 1..max_batch_size, t [N]
        (P = ``patch_size`` when the model file fixes it, else any square side)."""
        n = x_t.shape[0] if x_t.dim() == 4 else 0
        p = self.patch_size if self.fixed_patch_size else (x_t.shape[-1] if x_t.dim() == 4 else 0)
        if (x_t.dim() != 4 or tuple(x_t.shape[1:]) != (3, p, p) or tuple(cond.shape) != tuple(x_t.shape)
                or tuple(t.shape) != (n,) or n < 1):
            raise BackendError(f"expected x_t, cond [N, 3, {p}, {p}] and t [N] with N >= 1; got "
                               f"{tuple(x_t.shape)}, {tuple(cond.shape)}, {tuple(t.shape)}")
        if self.max_batch_size is not None and n > self.max_batch_size:
            raise BackendError(f"batch of {n} exceeds the backend's maximum {self.max_batch_size}")
        return self.infer(x_t, cond, t)

    def self_test(self) -> None:
        """One patch through the model before any image is computed: a model file that returns the wrong shape or
        non-finite values is refused here (BackendError, one line), not after a whole image of compute."""
        p, n = self.patch_size, 1
        x = torch.zeros((n, 3, p, p), device=self.device, dtype=torch.float32)
        t = torch.full((n,), self.meta.schedule.num_timesteps / 2, device=self.device, dtype=torch.float32)
        try:
            eps = self._probe(x, x.clone(), t)
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the runtime raises: one line
            raise BackendError(f"{self.describe()}: the model fails on one {p}x{p} patch "
                               f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                               ) from None
        if tuple(eps.shape) != (n, 3, p, p):
            raise BackendError(f"{self.describe()}: the model returns {tuple(eps.shape)} for a batch of shape "
                               f"{(n, 3, p, p)}; not a rawdiff eps-model")
        if not bool(torch.isfinite(eps).all()):
            raise BackendError(f"{self.describe()}: the model returns NaN or infinite values")

    def _probe(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """How ``self_test`` runs its patch (backends may take a cheaper path than ``infer``)."""
        return self(x_t, cond, t)

    def close(self) -> None:
        """Release device resources (idempotent)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line for logs and summaries."""
        return f"{self.name} on {self.device} ({str(self.input_dtype).removeprefix('torch.')})"
