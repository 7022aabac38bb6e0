"""rawdiff U-Net -> AOTInductor ``.pt2`` package for this machine's CPU or GPU (PyTorch's ahead-of-time engine).

``torch.export`` traces the model with a dynamic batch axis (N in 1..``max_batch``) and a fixed patch size P;
``torch._inductor.aoti_compile_and_package`` compiles it ahead of time (C++ kernels on the CPU, Triton kernels and
host code on CUDA) into one zip with the weights inside. Loading the package later (``AotiBackend``) takes a fraction
of a second, instead of the ``torch.compile`` of every new process. The interface is float32 whatever the precision
inside, as for the ONNX graphs::

    inputs   x_t  [N, 3, P, P] float32, cond [N, 3, P, P] float32, t [N] float32
    output   eps  [N, 3, P, P] float32

x_t and cond are compiled for the channels_last layout (``AotiBackend`` converts whatever it is given). The package's
metadata holds the rawdiff ``ModelMeta`` JSON, the precision, patch size, batch range, input layout, the checkpoint's
sha256 and the build target (device type, torch version, GPU and compute capability, CPU and its instruction-set
flags), so the package alone is enough to run, and the runtime refuses it on a machine it was not built for
(``rawdiff_infer.backends.aoti.check_aoti_compat``). Build it on the machine (and GPU model) that will run it.

Costs measured with ``benchmarks/compile_cost.py`` are in ``benchmarks/RESULTS.md`` when recorded; the package is
about the size of the weights in the chosen precision plus the code.
"""

from __future__ import annotations

import copy
import errno
import io
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rawdiff_infer import __version__
from rawdiff_infer.backends.aoti import AOTI_FORMAT, AotiBackend, current_target, read_aoti_info
from rawdiff_infer.backends.base import BackendError
from rawdiff_infer.checkpoint import ModelMeta, file_sha256, load_checkpoint
from rawdiff_infer.fsio import OutputExistsError, atomic_path
from rawdiff_infer.model import UNet

from .onnx_export import ExportError, FloatOutput, default_out_dir, export_patch_size, output_stem

__all__ = ["AotiExport", "aoti_parity", "build_device", "default_aoti_path", "export_aoti", "export_checkpoint_aoti"]

log = logging.getLogger(__name__)

AotiPrecision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the largest dynamic batch accepted (patches per call)
MAX_BATCH_LIMIT = 1 << 16


def _default_precision(device: torch.device) -> AotiPrecision:
    return "fp16" if device.type == "cuda" else "fp32"


def export_aoti(model: UNet, meta: ModelMeta, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                precision: AotiPrecision | None = None, patch_size: int | None = None, max_batch: int = 512,
                checkpoint_sha256: str = "", overwrite: bool = False) -> Path:
    """Compile ``model`` ahead of time for ``device`` into an AOTInductor package (written atomically).

    Args:
        model: the U-Net (not modified: a copy is cast, moved and compiled).
        meta: its description, stored in the package.
        path: destination, conventionally ``.pt2`` (``default_aoti_path``).
        device: "cpu", "cuda" or "cuda:N": the device type, GPU architecture and CPU the package will run on.
        precision: weights and activations inside: "fp32", "fp16" or "bf16" (default: fp16 on CUDA, fp32 on the
            CPU); GroupNorm statistics, softmax and the timestep embedding stay fp32 (model.py), I/O is float32.
        patch_size: P, pixels (default: the model's training patch); a positive multiple of 2**(stages-1).
        max_batch: the largest N the package accepts, 2..65536 (N is dynamic from 1 to this).
        checkpoint_sha256: recorded in the metadata (``file_sha256`` of the checkpoint).
        overwrite: replace an existing ``path``; otherwise ``fsio.OutputExistsError``, raised before compiling.
    Returns the path written.
    Raises ExportError (one line): bad options, no CUDA device, the trace or the compilation failed.
    """
    dev, prec, p = _check_options(model, device, precision, patch_size, max_batch)
    out = Path(path)
    if out.exists() and not overwrite:  # before minutes of compilation; atomic_path checks again at the end
        raise OutputExistsError(errno.EEXIST, "exists; not replaced (overwrite=True replaces it)", str(out))
    try:
        target = current_target(dev)
    except BackendError as e:
        raise ExportError(str(e)) from None
    metadata = {"rawdiff": meta.to_json(), "rawdiff.format": AOTI_FORMAT, "rawdiff.precision": prec,
                "rawdiff.patch_size": str(p), "rawdiff.min_batch": "1", "rawdiff.max_batch": str(max_batch),
                "rawdiff.input_layout": "channels_last",
                "rawdiff.checkpoint_sha256": checkpoint_sha256, "rawdiff.version": __version__,
                **target.to_metadata()}
    t0 = time.perf_counter()
    data = _compile(model, dev, prec, p, max_batch, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    log.info("wrote %s (%s, %s, patch %d, batch 1..%d, %.1f MB; %.1f s)", out, dev.type, prec, p, max_batch,
             out.stat().st_size / 1e6, time.perf_counter() - t0)
    return out


def build_device(device: str | torch.device) -> torch.device:
    """The device a package is built for, with its index: "cuda" is the current GPU (``cuda:N``), not GPU 0.
    ExportError (one line) for another device type, a CUDA device torch does not see."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ExportError(f"AOTInductor packages are built for cpu or cuda, not {dev.type}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ExportError("a CUDA package must be built on the GPU that will run it, and torch sees no CUDA device")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise ExportError(f"no GPU cuda:{index} here (torch sees {torch.cuda.device_count()})")
    return torch.device("cuda", index)


def _check_options(model: UNet, device: str | torch.device, precision: AotiPrecision | None,
                   patch_size: int | None, max_batch: int) -> tuple[torch.device, str, int]:
    """(device with its index, precision, patch size) checked; ExportError (one line) otherwise."""
    dev = build_device(device)
    prec = precision or _default_precision(dev)
    if prec not in _DTYPES:
        raise ExportError(f"unknown precision {prec!r}; choose fp32, fp16 or bf16")
    p = export_patch_size(model, patch_size)
    if not 2 <= max_batch <= MAX_BATCH_LIMIT:
        raise ExportError(f"max_batch must be in 2..{MAX_BATCH_LIMIT}, got {max_batch}")
    return dev, prec, p


def _compile(model: UNet, dev: torch.device, prec: str, p: int, max_batch: int, metadata: dict[str, str]) -> bytes:
    """torch.export with a dynamic batch, then AOTInductor: the package's bytes. ExportError on failure."""
    # channels_last weights and inputs: the layout the convolutions are fast in (TorchBackend's default too).
    # Inductor would not choose it by itself here: its layout optimisation is off on CUDA once the batch is dynamic.
    cl = torch.channels_last
    cfg = model.config
    m = copy.deepcopy(model).to(device=dev, dtype=_DTYPES[prec]).to(memory_format=cl).eval()
    m.set_fused_attention(True)  # scaled_dot_product_attention: the fast kernels on either device
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, cfg.in_channels, p, p, generator=g).to(dev).contiguous(memory_format=cl),
            (torch.rand(2, cfg.cond_channels, p, p, generator=g) * 2 - 1).to(dev).contiguous(memory_format=cl),
            torch.tensor([1.0, 999.0], device=dev))  # batch 2: 0 and 1 would be specialised by torch.export
    batch = torch.export.Dim("N", min=1, max=max_batch)
    try:
        with torch.no_grad(), torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
            program = torch.export.export(FloatOutput(m), args, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
        buf = io.BytesIO()
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=buf, inductor_configs={"aot_inductor.metadata": metadata})
    except Exception as e:  # noqa: BLE001 - export and Inductor raise many types (compiler missing, unsupported op)
        raise ExportError(f"AOTInductor build for {dev.type} failed: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}") from None
    return buf.getvalue()


def default_aoti_path(out_dir: str | os.PathLike[str], stem: str, device: str | torch.device = "cpu",
                      precision: AotiPrecision | None = None) -> Path:
    """``<out_dir>/<stem>.<target>[.<precision>].pt2``: target "cpu" or the slug of the GPU it is built on
    (``nvidia-h200``: the current GPU for "cuda", GPU N for "cuda:N"); the precision is named when it is not the
    device's default (fp16 on CUDA, fp32 on the CPU)."""
    from rawdiff_infer.backends.tensorrt import gpu_slug

    dev = build_device(device)
    tag = "cpu" if dev.type == "cpu" else gpu_slug(torch.cuda.get_device_name(dev.index))
    prec = precision or _default_precision(dev)
    suffix = "" if prec == _default_precision(dev) else f".{prec}"
    return Path(out_dir) / f"{stem}.{tag}{suffix}.pt2"


def aoti_parity(path: str | os.PathLike[str], model: UNet, *, device: str | torch.device | None = None,
                batch: int = 3, seed: int = 1) -> tuple[float, str]:
    """Max relative error (max |aoti - torch| / max |torch|) of a package against the eager model in the package's
    precision, on a random batch, on ``device`` (default: the GPU the package was built on when this machine has
    it, else the package's device type); and what was compared (naming the device)."""
    if device is None:
        built = read_aoti_info(path).target
        here = torch.cuda.device_count() if built.device_type == "cuda" and torch.cuda.is_available() else 0
        device = f"cuda:{built.device_index}" if 0 <= built.device_index < here else None
    with AotiBackend(path, device=device) as backend:
        info, dev = backend.info, backend.device
        g = torch.Generator().manual_seed(seed)
        p = info.patch_size
        n = min(batch, info.max_batch)
        x = torch.randn(n, 3, p, p, generator=g)
        c = torch.rand(n, 3, p, p, generator=g) * 2 - 1
        t = torch.linspace(1.0, 999.0, n)
        out = backend(x, c, t).cpu()
    m = copy.deepcopy(model).to(device=dev, dtype=_DTYPES[info.precision]).eval()
    m.set_fused_attention(True)
    with torch.no_grad():
        ref = m(x.to(dev), c.to(dev), t.to(dev)).float().cpu()
    err = float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
    return err, f"torch eager {info.precision} on {dev}"


@dataclass(frozen=True)
class AotiExport:
    """Result of ``export_checkpoint_aoti``."""

    path: Path
    meta: ModelMeta
    checkpoint_sha256: str
    build_seconds: float
    #: max relative error against the eager model (None where not measured)
    rel_error: float | None
    reference: str | None


def export_checkpoint_aoti(ckpt: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                           device: str = "cpu", precision: AotiPrecision | None = None,
                           patch_size: int | None = None, max_batch: int = 512, stem: str | None = None,
                           parity: bool = True, overwrite: bool = False) -> AotiExport:
    """Checkpoint -> ``<out_dir>/<stem>.<target>[.<precision>].pt2`` for ``device``, then (``parity``) its agreement
    with the eager model. Raises CheckpointError for a bad checkpoint, ExportError for a failed build,
    ``fsio.OutputExistsError`` when the package exists and not ``overwrite``."""
    ckpt = Path(ckpt)
    model, meta = load_checkpoint(ckpt)
    sha = file_sha256(ckpt)
    dev = build_device(device)
    out = default_aoti_path(Path(out_dir) if out_dir is not None else default_out_dir(ckpt),
                            stem or output_stem(ckpt), dev, precision)
    t0 = time.perf_counter()
    path = export_aoti(model, meta, out, device=dev, precision=precision, patch_size=patch_size,
                       max_batch=max_batch, checkpoint_sha256=sha, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    err = what = None
    if parity:
        try:
            err, what = aoti_parity(path, model, device=dev)
        except BackendError as e:
            raise ExportError(f"{path}: built, but cannot be loaded here: {e}") from None
    return AotiExport(path, meta, sha, seconds, err, what)
