"""rawdiff-export: checkpoint -> ONNX (fp32 and fp16) -> strongly typed TensorRT engine.

    from rawdiff_export import export_checkpoint, build_engine, BuildOptions, read_onnx_meta

    res = export_checkpoint("model.safetensors")                 # model.onnx, model.fp16.onnx (parity-checked)
    eng = build_engine(res.fp16_path, options=BuildOptions(max_batch=512))   # model.<target>.plan + .plan.json

The ONNX metadata reader and the engine builder belong to the runtime (``rawdiff_infer.backends``), which must run
and rebuild exported files without this package; they are named here for convenience.
"""

from rawdiff_infer.startup import begin_command as _begin_command

# rawdiff-export imports this package (torch, onnx: seconds) before its cli module: closed streams and Ctrl-C
_begin_command("rawdiff-export", __file__.replace("__init__.py", "cli.py"))

from rawdiff_infer.backends.onnx_info import OnnxInfo, OnnxInfoError, read_onnx_info, read_onnx_meta

from .onnx_export import (PARITY_TOLERANCE, ExportedCheckpoint, ExportError, check_graph, check_parity,
                          export_checkpoint, export_model, export_onnx, onnx_parity, op_dtype_counts)
from .trt_build import (BuildOptions, BuildResult, EngineBuildError, build_engine, default_engine_path,
                        network_dtype_counts, parse_network)

__all__ = ["PARITY_TOLERANCE", "BuildOptions", "BuildResult", "EngineBuildError", "ExportError", "ExportedCheckpoint",
           "OnnxInfo", "OnnxInfoError", "build_engine", "check_graph", "check_parity", "default_engine_path",
           "export_checkpoint", "export_model", "export_onnx", "network_dtype_counts", "onnx_parity",
           "op_dtype_counts", "parse_network", "read_onnx_info", "read_onnx_meta"]
