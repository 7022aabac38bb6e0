"""One adapter over the TensorRT Python packages: import whichever is installed, a logger, dtype names.

Flavours:

- ``tensorrt`` (TensorRT 10 / 11): builds on the GPU it targets; engines run on the same GPU model with the same
  TensorRT version, unless built version-compatible or hardware-compatible.
- ``tensorrt_rtx`` (TensorRT-RTX; the bindings-only wheel's module is ``tensorrt_rtx_bindings``): builds ahead of
  time without a GPU for a list of compute capabilities and compiles kernels on the target GPU when an execution
  context is created; engines are tied to the exact release.

Nothing here needs a GPU. Nothing here imports the export package: the runtime runs exported files on its own.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from ..messages import first_line

__all__ = ["INSTALL_HINT", "TensorRT", "TensorRTNotFound", "load_tensorrt", "make_logger", "torch_dtype"]

log = logging.getLogger(__name__)

INSTALL_HINT = ("install TensorRT: `pip install tensorrt-rtx` (TensorRT-RTX: ahead-of-time builds without a GPU, "
                "runs on RTX/GeForce GPUs of compute capability 7.5-12.x) or `pip install tensorrt` (TensorRT 10/11, "
                "needs an NVIDIA GPU and NVIDIA's package index)")

#: module name -> flavour; tried in this order unless RAWDIFF_TENSORRT names one
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
                failures.append(f"{name}: {first_line(e)}")
            continue
        return TensorRT(mod, flavour, version)
    why = f" ({'; '.join(failures)})" if failures else ""
    raise TensorRTNotFound(f"TensorRT is not installed{why}; {INSTALL_HINT}")


def make_logger(trt: TensorRT, min_severity: str = "WARNING") -> Any:
    """A TensorRT ILogger that forwards to Python logging and remembers errors (``.errors``, newest last)."""
    m = trt.module
    sev = m.ILogger.Severity

    class _Logger(m.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            m.ILogger.__init__(self)
            self.errors: list[str] = []
            self.min = getattr(sev, min_severity)

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(first_line(msg))
                log.error("TensorRT: %s", msg)
            elif int(severity) <= int(self.min):
                (log.warning if severity == sev.WARNING else log.info)("TensorRT: %s", msg)

        def last(self, n: int = 2, default: str = "no detail") -> str:
            """The last ``n`` errors on one line (for exception messages)."""
            return "; ".join(self.errors[-n:]) or default

    return _Logger()


_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "BOOL": torch.bool}


def torch_dtype(trt: TensorRT, dt: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``. Raises ValueError for types rawdiff engines never use."""
    table = {getattr(trt.module.DataType, k): v for k, v in _DTYPES.items() if hasattr(trt.module.DataType, k)}
    try:
        return table[dt]
    except KeyError:
        raise ValueError(f"engine tensor dtype {dt} not supported") from None
