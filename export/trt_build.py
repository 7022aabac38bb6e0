"""rawdiff ONNX -> TensorRT engine: the builder itself lives in the runtime.

``rawdiff_infer.backends.trt_build`` builds engines (strongly typed, one optimisation profile, sidecar JSON), because
the runtime must rebuild an engine for its GPU without the export package. rawdiff-export calls it as it is; this
module only names it for export users, and adds what is export's alone: a one-line description of where a built
engine runs, for the command's summary.
"""

from __future__ import annotations

from rawdiff_infer.backends.trt_build import (BuildOptions, BuildResult, EngineBuildError, build_engine,
                                              default_engine_path, network_dtype_counts, parse_network)
from rawdiff_infer.backends.trt_runtime import TensorRT

__all__ = ["BuildOptions", "BuildResult", "EngineBuildError", "build_engine", "default_engine_path",
           "describe_target", "network_dtype_counts", "parse_network"]


def describe_target(result: BuildResult, trt: TensorRT) -> str:
    """Where the engine runs, e.g. 'compute capability 8.6, 12.0 (ahead of time, no GPU)' or
    'NVIDIA H100 80GB HBM3 (compute capability 9.0)'."""
    side = result.sidecar
    if not trt.is_rtx:
        return f"{side.target_gpu} (compute capability {side.target_cc})"
    where = (f"compute capability {', '.join(side.target_ccs)}" if side.target_ccs
             else "TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x)")
    return where + (" (ahead of time, no GPU)" if side.built_on_gpu is None else f" (built on {side.built_on_gpu})")
