"""rawdiff checkpoint -> ONNX graphs (fp32 and fp16), with the model's description inside the file.

Both graphs have the same interface, float32 whatever the precision inside::

    inputs   x_t  [N, 3, P, P] float32   noisy RAW patches (model space)
             cond [N, 3, P, P] float32   sRGB patches in [-1, 1]
             t    [N]          float32   timesteps (training units, fractional allowed)
    output   eps  [N, 3, P, P] float32

N is dynamic, P (the patch size) is fixed. The fp16 graph is the model with its weights cast to fp16 (``model.half()``)
and a wrapper that casts the output back to fp32; the model itself casts its fp32 inputs to the weights' dtype. The
fp32 islands that the model writes explicitly survive the export: GroupNorm (lowered to Reshape +
InstanceNormalization on fp32 tensors, never the ONNX ``GroupNormalization`` op), the attention softmax and the
sinusoidal timestep embedding (Sin / Cos). A strongly typed TensorRT build then keeps exactly these types.

The ONNX file's ``metadata_props`` hold the rawdiff ``ModelMeta`` JSON (key ``"rawdiff"``), the checkpoint's sha256,
the precision, patch size, opset and exporter, so an ONNX file alone is enough to run. The runtime owns that format
(``rawdiff_infer.backends.onnx_info``: ``OnnxInfo``, ``read_onnx_info``); this module writes it.

Parity (``export_model``): both graphs are written to temporary files beside their targets, run by onnxruntime on
the CPU against the torch model, and only published (renamed to their names) when the maximum relative error
``max |onnx - torch| / max |torch|`` is finite and within ``PARITY_TOLERANCE``: 1e-4 for the fp32 graph (measured:
1.4e-6 paper size, 2.8e-7 the bundled model), 1e-2 for the fp16 graph against the same weights run in fp16 by torch
(measured: 2.2e-3 and 5.2e-4). A model with a NaN weight, or an exporter that mistranslates it, publishes nothing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rawdiff_infer import __version__
from rawdiff_infer.backends.base import INPUT_NAMES, OUTPUT_NAME
from rawdiff_infer.backends.onnx_info import ONNX_FORMAT, read_onnx_info
from rawdiff_infer.checkpoint import ModelMeta, file_sha256, load_checkpoint
from rawdiff_infer.fsio import NotRegularFileError, OutputExistsError, atomic_path
from rawdiff_infer.messages import first_line, show_path
from rawdiff_infer.model import UNet

__all__ = ["DEFAULT_OPSET", "ONNX_FORMAT", "PARITY_TOLERANCE", "ExportError", "ExportedCheckpoint", "check_graph",
           "check_parity", "check_targets", "default_out_dir", "export_checkpoint", "export_model", "export_onnx",
           "onnx_graph", "onnx_parity", "onnx_targets", "op_dtype_counts", "output_stem"]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]
DEFAULT_OPSET = 17
OPSETS = (17, 18, 19)
#: ops whose tensors must be fp16 in the fp16 graph (the heavy arithmetic)
HALF_OPS = ("Conv", "MatMul", "Gemm")
#: ops whose tensors must stay fp32 in both graphs (the fp32 islands written in model.py)
FP32_ISLAND_OPS = ("InstanceNormalization", "Softmax", "Sin", "Cos")
#: largest accepted max relative error of onnxruntime (CPU) against torch, per graph (see the module docstring)
PARITY_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2}


class ExportError(Exception):
    """The export cannot be done or produced an unusable graph (message: one line)."""


@dataclass(frozen=True)
class ExportedCheckpoint:
    """Result of ``export_model`` / ``export_checkpoint``: both graphs and how closely they reproduce the model."""

    fp32_path: Path
    fp16_path: Path
    meta: ModelMeta
    checkpoint_sha256: str
    #: max |onnx - torch| / max |torch| on a random batch (None where not measured)
    fp32_rel_error: float | None
    fp16_rel_error: float | None
    #: what the fp16 graph was compared with
    fp16_reference: str | None


class FloatOutput(nn.Module):
    """fp32 output whatever the weights' dtype (the model casts its fp32 inputs itself)."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, cond, t).float()


def export_patch_size(model: UNet, patch_size: int | None) -> int:
    """The patch side (pixels) an export is built for: ``patch_size``, or the model's training patch; it must be a
    positive multiple of the U-Net's total downsampling (2^(levels - 1)), else ExportError."""
    p = int(patch_size or model.config.patch_size)
    step = 2 ** (len(model.config.channel_mults) - 1)
    if p < step or p % step:
        raise ExportError(f"patch size {p} must be a positive multiple of {step} for this U-Net")
    return p


def _example_inputs(model: UNet, patch: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, patch, patch, generator=g)
    c = torch.rand(batch, cfg.cond_channels, patch, patch, generator=g) * 2 - 1
    t = torch.linspace(1.0, 999.0, batch)
    return x, c, t


def _torch_export(module: nn.Module, args: tuple[torch.Tensor, ...], opset: int) -> tuple[bytes, str]:
    """Trace ``module`` to ONNX bytes. TorchScript exporter (dynamo=False) first, the dynamo exporter otherwise."""
    dyn = {"x_t": {0: "N"}, "cond": {0: "N"}, "t": {0: "N"}, OUTPUT_NAME: {0: "N"}}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter, tracer warnings (constants)
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], dynamic_axes=dyn, do_constant_folding=True)
        return buf.getvalue(), f"torch {torch.__version__} torch.onnx.export(dynamo=False)"
    except (TypeError, NotImplementedError, RuntimeError) as e:  # TorchScript exporter removed or failed
        log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", first_line(e))
    batch = torch.export.Dim("N", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                                 output_names=[OUTPUT_NAME],
                                 dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), optimize=True,
                                 external_data=False, verbose=False)
    buf = io.BytesIO()
    prog.save(buf)
    return buf.getvalue(), f"torch {torch.__version__} torch.onnx.export(dynamo=True)"


def _elem_types(model_proto) -> dict[str, int]:
    """Tensor name -> ONNX elem type, after shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model_proto, strict_mode=False)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({init.name: init.data_type for init in g.initializer})
    for node in g.node:  # Constant nodes: their value's type
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def op_dtype_counts(model_proto_or_path) -> collections.Counter:
    """Counter of (op type, dtype of its first output) over the graph, dtypes as names ("FLOAT16", "FLOAT", ...)."""
    import onnx

    m = onnx.load(str(model_proto_or_path)) if isinstance(model_proto_or_path, (str, os.PathLike)) \
        else model_proto_or_path
    types = _elem_types(m)
    name = onnx.TensorProto.DataType.Name
    return collections.Counter((n.op_type, name(types.get(n.output[0], 0))) for n in m.graph.node)


def check_graph(model_proto, precision: Precision) -> list[str]:
    """Problems with an exported graph (empty list: fine).

    Checks: float32 I/O named as documented; no ``GroupNormalization`` op (GroupNorm must be Reshape +
    InstanceNormalization); InstanceNormalization / Softmax / Sin / Cos on fp32 tensors (inputs and outputs); for the
    fp16 graph, Conv / MatMul / Gemm on fp16 tensors and their weights stored in fp16; for the fp32 graph, no fp16
    anywhere.
    """
    import onnx

    TP = onnx.TensorProto
    problems: list[str] = []
    g = model_proto.graph
    types = _elem_types(model_proto)
    inputs = [i.name for i in g.input if i.name not in {init.name for init in g.initializer}]
    if tuple(inputs) != INPUT_NAMES or [o.name for o in g.output] != [OUTPUT_NAME]:
        problems.append(f"graph I/O are {inputs} -> {[o.name for o in g.output]}, expected {list(INPUT_NAMES)} -> "
                        f"[{OUTPUT_NAME!r}]")
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type != TP.FLOAT:
            problems.append(f"graph I/O {vi.name} is {TP.DataType.Name(vi.type.tensor_type.elem_type)}, not FLOAT")
    want = {"fp16": TP.FLOAT16, "fp32": TP.FLOAT}[precision]
    for n in g.node:
        if n.op_type == "GroupNormalization":
            problems.append(f"{n.name}: ONNX GroupNormalization op present (TensorRT wants InstanceNormalization)")
        if n.op_type in FP32_ISLAND_OPS:
            for tname in [*n.input[:1], *n.output]:
                if types.get(tname) != TP.FLOAT:
                    problems.append(f"{n.op_type} {n.name}: tensor {tname} is "
                                    f"{TP.DataType.Name(types.get(tname, 0))}, must be FLOAT")
        if n.op_type in HALF_OPS:
            for tname in [*n.input, *n.output]:
                if tname and types.get(tname) != want:
                    problems.append(f"{n.op_type} {n.name}: tensor {tname} is "
                                    f"{TP.DataType.Name(types.get(tname, 0))}, expected {TP.DataType.Name(want)}")
        if precision == "fp32":
            for tname in n.output:
                if types.get(tname) in (TP.FLOAT16, TP.BFLOAT16):
                    problems.append(f"{n.op_type} {n.name}: low-precision tensor {tname} in the fp32 graph")
    if not any(n.op_type == "InstanceNormalization" for n in g.node):
        problems.append("no InstanceNormalization op: GroupNorm was not lowered as expected")
    return problems


def onnx_graph(model: UNet, meta: ModelMeta, *, precision: Precision = "fp32", patch_size: int | None = None,
               opset: int = DEFAULT_OPSET, checkpoint_sha256: str = "", producer_note: str = "") -> Any:
    """The checked ``onnx.ModelProto`` of ``model`` (not modified: a copy is cast and exported, on the CPU).

    Args:
        precision: "fp32", or "fp16" (fp16 weights and activations, fp32 I/O and fp32 islands).
        patch_size: P, pixels (default: the model's training patch size); a positive multiple of 2**(stages-1).
        opset: ONNX opset, 17..19.
        checkpoint_sha256: recorded in the metadata.
    Raises ExportError (one line) for bad arguments or a graph that fails the checker or ``check_graph``.
    """
    import onnx

    if precision not in ("fp32", "fp16"):
        raise ExportError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} not supported; choose one of {', '.join(map(str, OPSETS))}")
    p = export_patch_size(model, patch_size)
    m = copy.deepcopy(model).to(device="cpu", dtype=torch.float16 if precision == "fp16" else torch.float32).eval()
    m.set_fused_attention(False)  # the explicit fp32-softmax attention
    with torch.no_grad():
        data, exporter = _torch_export(FloatOutput(m), _example_inputs(m, p), opset)
    proto = onnx.load_model_from_string(data)
    props = {"rawdiff": meta.to_json(), "rawdiff.format": ONNX_FORMAT, "rawdiff.precision": precision,
             "rawdiff.patch_size": str(p), "rawdiff.checkpoint_sha256": checkpoint_sha256,
             "rawdiff.opset": str(opset), "rawdiff.exporter": exporter, "rawdiff.version": __version__}
    if producer_note:
        props["rawdiff.note"] = producer_note
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = (f"rawdiff eps-model U-Net, {precision}, patch {p}x{p}, dynamic batch; "
                        f"inputs x_t/cond [N,3,{p},{p}] float32, t [N] float32; output eps [N,3,{p},{p}] float32")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported {precision} graph fails onnx.checker: {first_line(e)}") from None
    problems = check_graph(proto, precision)
    if problems:
        raise ExportError(f"exported {precision} graph is wrong: {problems[0]} (+{len(problems) - 1} more)")
    return proto


def export_onnx(model: UNet, meta: ModelMeta, path: str | os.PathLike[str], *, precision: Precision = "fp32",
                patch_size: int | None = None, opset: int = DEFAULT_OPSET, checkpoint_sha256: str = "",
                producer_note: str = "", overwrite: bool = False) -> Path:
    """Export ``model`` to one ONNX file (``onnx_graph``, written atomically; no parity check: see
    ``export_model``). ``overwrite``: replace an existing ``path``; otherwise ``fsio.OutputExistsError``.
    Returns the path written."""
    import onnx

    proto = onnx_graph(model, meta, precision=precision, patch_size=patch_size, opset=opset,
                       checkpoint_sha256=checkpoint_sha256, producer_note=producer_note)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=overwrite) as tmp:
        onnx.save_model(proto, str(tmp))
    log.info("wrote %s (%s, %.1f MB)", out, precision, out.stat().st_size / 1e6)
    return out


def _rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (relative to the reference's scale, so near-zero entries do not blow it up);
    NaN when either holds a non-finite value."""
    a, ref = a.double(), ref.double()
    if not (torch.isfinite(a).all() and torch.isfinite(ref).all()):
        return math.nan
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def onnx_parity(onnx_path: str | os.PathLike[str], model: UNet, *, precision: Precision = "fp32", batch: int = 2,
                seed: int = 1) -> tuple[float, str]:
    """Max relative error of onnxruntime (CPU) on ``onnx_path`` against the torch model (NaN if either output is
    not finite), and what was compared.

    fp32: the fp32 model. fp16: the same weights in fp16 run by torch on the CPU (fp32 GroupNorm / softmax / embedding
    as in the graph); where torch has no fp16 CPU kernels, the fp32 model with fp16-rounded weights.
    """
    import onnxruntime as ort

    info = read_onnx_info(onnx_path)
    m = copy.deepcopy(model).to("cpu").eval()
    m.set_fused_attention(False)
    x, c, t = _example_inputs(m, info.patch_size, batch, seed)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run([OUTPUT_NAME], {"x_t": x.numpy(), "cond": c.numpy(), "t": t.numpy()})[0])
    with torch.no_grad():
        if precision == "fp32":
            ref, what = m.float()(x, c, t).float(), "torch fp32 (CPU)"
        else:
            try:
                ref, what = m.half()(x, c, t).float(), "torch fp16 weights+activations (CPU)"
            except (RuntimeError, NotImplementedError):
                m = m.half().float()
                ref, what = m(x, c, t).float(), "torch fp32 with fp16-rounded weights (CPU)"
    return _rel_error(out, ref), what


def check_parity(err: float, precision: str, tolerance: float | None = None) -> None:
    """Raise ExportError (one line) unless ``err`` is finite and at most ``tolerance`` (default
    ``PARITY_TOLERANCE[precision]``)."""
    tol = PARITY_TOLERANCE[precision] if tolerance is None else tolerance
    if not math.isfinite(err):
        raise ExportError(f"{precision} graph: onnxruntime and torch outputs are not finite (max relative error "
                          f"{err}): NaN or infinite weights in the checkpoint?")
    if err > tol:
        raise ExportError(f"{precision} graph: max relative error {err:.2e} against torch exceeds the tolerance "
                          f"{tol:.0e}")


def output_stem(ckpt: Path) -> str:
    """The file-name stem of a checkpoint's exports: ``model.safetensors`` -> ``model``; a sharded checkpoint's
    folder name."""
    if ckpt.is_dir() or ckpt.name == "rawdiff.json":
        d = ckpt if ckpt.is_dir() else ckpt.parent
        return d.name or "model"
    return ckpt.name.removesuffix(".safetensors") if ckpt.name.endswith(".safetensors") else ckpt.stem


def default_out_dir(ckpt: str | os.PathLike[str]) -> Path:
    """Next to the checkpoint: its folder (a file's parent; a sharded checkpoint's own directory)."""
    p = Path(ckpt)
    return p if p.is_dir() else p.parent


def onnx_targets(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """{"fp32": <out>/<stem>.onnx, "fp16": <out>/<stem>.fp16.onnx}."""
    out = Path(out_dir)
    return {"fp32": out / f"{stem}.onnx", "fp16": out / f"{stem}.fp16.onnx"}


def check_targets(paths: list[Path], *, overwrite: bool) -> None:
    """Before any compute: refuse targets that exist (unless ``overwrite``) or are not regular files (never
    replaced, not even with ``overwrite``). Raises OutputExistsError / NotRegularFileError (OSError subclasses)."""
    for p in paths:
        if not os.path.lexists(p):
            continue
        if not p.is_file():
            raise NotRegularFileError(errno.EINVAL, "exists and is not a regular file; not replaced", str(p))
        if not overwrite:
            raise OutputExistsError(errno.EEXIST, "exists; not replaced without --force", str(p))


@contextlib.contextmanager
def _staged(paths: dict[str, Path], overwrite: bool) -> Iterator[dict[str, Path]]:
    """Temporary files beside each target, published together on a clean exit (all discarded otherwise)."""
    with contextlib.ExitStack() as stack:
        yield {k: stack.enter_context(atomic_path(p, overwrite=overwrite)) for k, p in paths.items()}


def export_model(model: UNet, meta: ModelMeta, out_dir: str | os.PathLike[str], stem: str, *,
                 checkpoint_sha256: str = "", patch_size: int | None = None, opset: int = DEFAULT_OPSET,
                 parity: bool = True, overwrite: bool = False,
                 progress: Callable[[str], None] | None = None) -> ExportedCheckpoint:
    """Write ``<stem>.onnx`` (fp32) and ``<stem>.fp16.onnx`` into ``out_dir``: both graphs go to temporary files,
    are checked (``onnx_graph``) and, with ``parity``, compared with the torch model (``check_parity``); only then
    are both published. On any failure or interrupt nothing is written.

    Raises ExportError (one line), OutputExistsError / NotRegularFileError (targets, checked before any compute),
    ImportError (parity without onnxruntime).
    """
    import onnx

    say = progress or log.info
    targets = onnx_targets(out_dir, stem)
    check_targets(list(targets.values()), overwrite=overwrite)
    if parity:
        import onnxruntime  # noqa: F401 - fail before any compute
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    errors: dict[str, float | None] = {"fp32": None, "fp16": None}
    reference = None
    with _staged(targets, overwrite) as tmp:
        for precision, target in targets.items():
            say(f"exporting {precision} ONNX -> {show_path(target)}")
            proto = onnx_graph(model, meta, precision=precision, patch_size=patch_size,  # type: ignore[arg-type]
                               opset=opset, checkpoint_sha256=checkpoint_sha256)
            onnx.save_model(proto, str(tmp[precision]))
            if parity:
                err, what = onnx_parity(tmp[precision], model, precision=precision)  # type: ignore[arg-type]
                say(f"  onnxruntime CPU vs {what}: max relative error {err:.2e}")
                check_parity(err, precision)
                errors[precision], reference = err, what if precision == "fp16" else reference
    return ExportedCheckpoint(targets["fp32"], targets["fp16"], meta, checkpoint_sha256, errors["fp32"],
                              errors["fp16"], reference)


def export_checkpoint(ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                      patch_size: int | None = None, opset: int = DEFAULT_OPSET, parity: bool = True,
                      stem: str | None = None, overwrite: bool = False) -> ExportedCheckpoint:
    """``export_model`` for a checkpoint file or folder (default output: next to it, named after it).

    Raises CheckpointError for a bad checkpoint, and what ``export_model`` raises.
    """
    ckpt = Path(ckpt)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt)
    name = stem or output_stem(ckpt)
    check_targets(list(onnx_targets(out, name).values()), overwrite=overwrite)
    model, meta = load_checkpoint(ckpt)  # CheckpointError propagates (the CLI prints it)
    return export_model(model, meta, out, name, checkpoint_sha256=file_sha256(ckpt), patch_size=patch_size,
                        opset=opset, parity=parity, overwrite=overwrite)
