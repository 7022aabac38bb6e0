"""rawdiff-export: checkpoint -> ONNX (fp32 and fp16) -> strongly typed TensorRT engine.

    from rawdiff_export import export_checkpoint, build_engine, BuildOptions, read_onnx_meta

    res = export_checkpoint("model.safetensors")                 # model.onnx, model.fp16.onnx (+ parity numbers)
    eng = build_engine(res.fp16_path, options=BuildOptions(max_batch=512))   # model.<target>.plan + .plan.json
"""

from .onnx_export import (ExportedCheckpoint, ExportError, OnnxInfo, check_graph, export_checkpoint, export_onnx,
                          onnx_parity, op_dtype_counts, read_onnx_info, read_onnx_meta)
from .trt_build import (BuildOptions, BuildResult, build_engine, default_engine_path, network_dtype_counts,
                        parse_network)

__all__ = ["BuildOptions", "BuildResult", "ExportError", "ExportedCheckpoint", "OnnxInfo", "build_engine",
           "check_graph", "default_engine_path", "export_checkpoint", "export_onnx", "network_dtype_counts",
           "onnx_parity",
           "op_dtype_counts", "parse_network", "read_onnx_info", "read_onnx_meta"]
