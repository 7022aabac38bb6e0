"""What a rawdiff ONNX file says about itself: the model description and export facts in its ``metadata_props``.

rawdiff-export writes these properties; the ONNX Runtime backend reads them from its session, the engine builder
copies them into the engine sidecar. Keys::

    rawdiff                     ModelMeta JSON (U-Net config, schedule, RAW encoding, camera, provenance)
    rawdiff.format              "rawdiff-onnx/1"
    rawdiff.precision           "fp32" | "fp16" (the graph's inside; its I/O is float32 either way)
    rawdiff.patch_size          P, pixels (the graph's fixed patch side)
    rawdiff.checkpoint_sha256   sha256 of the checkpoint it was exported from
    rawdiff.opset, rawdiff.exporter, rawdiff.version

Reading a file by name (:func:`read_onnx_info`) needs the ``onnx`` package; :func:`onnx_info_from_props` does not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..checkpoint import ModelMeta
from ..fsio import open_regular
from ..messages import first_line, show_path

__all__ = ["ONNX_FORMAT", "PRECISIONS", "OnnxInfo", "OnnxInfoError", "onnx_info_from_props", "read_onnx_info",
           "read_onnx_meta"]

ONNX_FORMAT = "rawdiff-onnx/1"
PRECISIONS = ("fp32", "fp16")


class OnnxInfoError(ValueError):
    """An ONNX file is missing, not ONNX, or carries no valid rawdiff description (message: one line)."""


@dataclass(frozen=True)
class OnnxInfo:
    """What a rawdiff ONNX file says about itself (from its metadata_props)."""

    meta: ModelMeta
    precision: str  # "fp32" | "fp16"
    patch_size: int  # pixels
    checkpoint_sha256: str  # hex, "" if not recorded
    opset: int  # 0 if not recorded
    exporter: str


def onnx_info_from_props(path: str | os.PathLike[str], props: Mapping[str, str]) -> OnnxInfo:
    """Parse the rawdiff metadata properties of the ONNX file ``path`` (used only in messages)."""
    where = show_path(path)
    if "rawdiff" not in props:
        raise OnnxInfoError(f"{where}: ONNX file without a rawdiff description (not exported by rawdiff-export)")
    try:
        meta = ModelMeta.from_dict(json.loads(props["rawdiff"]))
        precision = props.get("rawdiff.precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        patch = int(props.get("rawdiff.patch_size", meta.model.patch_size))
        if patch < 1:
            raise ValueError(f"patch size {patch}")
        return OnnxInfo(meta=meta, precision=precision, patch_size=patch,
                        checkpoint_sha256=props.get("rawdiff.checkpoint_sha256", ""),
                        opset=int(props.get("rawdiff.opset", 0)), exporter=props.get("rawdiff.exporter", ""))
    except (ValueError, KeyError, TypeError) as e:
        raise OnnxInfoError(f"{where}: invalid rawdiff description in the ONNX metadata ({first_line(e)})") from None


def read_onnx_info(path: str | os.PathLike[str]) -> OnnxInfo:
    """The rawdiff description stored in an ONNX file. A FIFO or other non-regular file is refused without
    blocking. Raises OnnxInfoError (one line)."""
    import onnx

    p = Path(path)
    try:
        with open_regular(p) as f:
            proto = onnx.load_model_from_string(f.read())
    except FileNotFoundError:
        raise OnnxInfoError(f"{show_path(p)}: no such ONNX file") from None
    except OSError as e:
        raise OnnxInfoError(f"{show_path(p)}: {e.strerror or first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types
        raise OnnxInfoError(f"{show_path(p)}: not an ONNX file ({type(e).__name__})") from None
    return onnx_info_from_props(p, {kv.key: kv.value for kv in proto.metadata_props})


def read_onnx_meta(path: str | os.PathLike[str]) -> ModelMeta:
    """The rawdiff ``ModelMeta`` stored in an ONNX file."""
    return read_onnx_info(path).meta
