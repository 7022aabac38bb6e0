"""The engine sidecar (``<engine>.json``) and the rules that say whether an engine can run here.

A TensorRT engine says little about itself; the sidecar written beside it by the builder records what it was built
from (ONNX path and sha256, precision, patch size), with what (TensorRT flavour and version), for what (GPU, compute
capabilities), the optimisation profile, the build options and the rawdiff model description. The runtime reads it
to refuse, with one line, an engine built for another GPU or TensorRT version (:func:`check_engine_compat`, a pure
function), and to rebuild one from its ONNX file.

Also here: which GPU this process would use (:func:`detect_gpu`) and small parsers. Nothing here needs a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..checkpoint import ModelMeta
from ..fsio import open_regular, write_bytes
from ..messages import first_line, show_path

__all__ = ["RTX_DEFAULT_MIN_CC", "SIDECAR_FORMAT", "EngineSidecar", "GpuInfo", "RuntimeEnv", "SidecarError",
           "check_engine_compat",
           "detect_gpu", "gpu_slug", "parse_cc", "parse_version", "read_sidecar", "sidecar_path", "write_sidecar"]

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "rawdiff-trt-engine/1"
#: TensorRT-RTX's default targets when none are named (its documentation: 8.0, 8.6, 8.9, 12.0 and later)
RTX_DEFAULT_MIN_CC = (8, 0)
RTX_UNSUPPORTED_MAJORS = (9, 10, 11)  # Hopper, data-centre Blackwell (sm_100/sm_110) are not RTX targets
_REQUIRED = ("tensorrt", "target", "profile", "onnx", "rawdiff")


class SidecarError(ValueError):
    """A sidecar is missing, unreadable or malformed (message: one line naming the file)."""


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA GPU: its marketing name and compute capability (major, minor)."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def detect_gpu(device: int = 0) -> GpuInfo | None:
    """CUDA GPU number ``device`` (torch's numbering): via torch, else ``nvidia-smi``; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability(device)
            return GpuInfo(torch.cuda.get_device_name(device), (int(cc[0]), int(cc[1])))
    except Exception as e:  # noqa: BLE001 - a broken CUDA setup: fall back to nvidia-smi
        log.debug("torch cannot query GPU %d: %s", device, e)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.strip().splitlines()
            if len(out) > device:
                name, cc = (s.strip() for s in out[device].rsplit(",", 1))
                return GpuInfo(name, parse_cc(cc))
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return None


def parse_version(v: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35)."""
    return tuple(int(x) for x in re.findall(r"\d+", v))


def parse_cc(s: str | tuple[int, int]) -> tuple[int, int]:
    """'8.6' | 'sm86' | 'sm_86' | '86' | 'SM120' | (8, 6) -> (8, 6). Raises ValueError."""
    if isinstance(s, tuple):
        return (int(s[0]), int(s[1]))
    t = str(s).strip().lower().removeprefix("sm").removeprefix("_")
    if "." in t:
        a, b = t.split(".", 1)
        return (int(a), int(b))
    if not t.isdigit() or len(t) < 2:
        raise ValueError(f"not a compute capability: {s!r} (write 8.6 or sm86)")
    return (int(t[:-1]), int(t[-1]))


def gpu_slug(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'nvidia-geforce-rtx-4090' (for engine file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


@dataclass(frozen=True)
class EngineSidecar:
    """An engine's sidecar, parsed and checked once (``parse``, ``read_sidecar``): what the runtime, its compatibility
    rules and a rebuild read, typed. ``data`` keeps the JSON object as written (read-only).

    Attributes:
        flavour, trt_version: the TensorRT flavour ("tensorrt", "tensorrt-rtx") and version it was built with.
        target_gpu, target_cc: the GPU and compute capability it was built for ("AOT/none": none, ahead of time).
        target_ccs: TensorRT-RTX's named target compute capabilities (empty: its default targets).
        built_on_gpu: the GPU the build ran on (None: none).
        min_batch, opt_batch, max_batch, patch_size: the optimisation profile (batch sizes, patch side in pixels).
        version_compatible, hardware_compatible, require_user_allocation: build options the runtime honours.
        options: every recorded build option (a rebuild carries some over).
        engine_sha256: the engine file's sha256 ("": not recorded).
        onnx_path, onnx_sha256, onnx_precision, onnx_opset, onnx_exporter: the ONNX file it was built from.
        checkpoint_sha256: the source checkpoint's sha256 ("" if unknown).
        meta: the rawdiff model description.
    """

    flavour: str
    trt_version: str
    target_gpu: str
    target_cc: str
    target_ccs: tuple[str, ...]
    built_on_gpu: str | None
    min_batch: int
    opt_batch: int
    max_batch: int
    patch_size: int
    version_compatible: bool
    hardware_compatible: bool
    require_user_allocation: bool
    options: Mapping[str, Any]
    engine_sha256: str
    onnx_path: str
    onnx_sha256: str
    onnx_precision: str
    onnx_opset: int
    onnx_exporter: str
    checkpoint_sha256: str
    meta: ModelMeta
    data: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, d: Any, where: str = "sidecar") -> "EngineSidecar":
        """A sidecar's JSON object, checked; SidecarError (one line starting with ``where``) otherwise."""
        if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise SidecarError(f"{where}: unknown sidecar format {got!r} (expected {SIDECAR_FORMAT})")
        for key in _REQUIRED:
            if not isinstance(d.get(key), dict):
                raise SidecarError(f"{where}: sidecar lacks {key!r}")
        prof = _profile(d["profile"], where)
        try:
            meta = ModelMeta.from_dict(d["rawdiff"])
        except (ValueError, KeyError, TypeError) as e:
            raise SidecarError(f"{where}: invalid rawdiff description in the sidecar ({first_line(e)})") from None
        trt, tgt, onnx = d["tensorrt"], d["target"], d["onnx"]
        opts, engine = _dict(d.get("options")), _dict(d.get("engine"))
        try:
            return cls(flavour=str(trt["flavour"]), trt_version=str(trt["version"]),
                       target_gpu=str(tgt.get("gpu") or ""), target_cc=str(tgt.get("compute_capability") or ""),
                       target_ccs=tuple(str(c) for c in tgt.get("compute_capabilities") or ()),
                       built_on_gpu=None if tgt.get("built_on_gpu") is None else str(tgt["built_on_gpu"]),
                       **prof, version_compatible=bool(opts.get("version_compatible")),
                       hardware_compatible=bool(opts.get("hardware_compatible")),
                       require_user_allocation=bool(opts.get("require_user_allocation")),
                       options=MappingProxyType(dict(opts)), engine_sha256=str(engine.get("sha256") or ""),
                       onnx_path=str(onnx.get("path") or ""), onnx_sha256=str(onnx.get("sha256") or ""),
                       onnx_precision=str(onnx.get("precision", "fp16")), onnx_opset=int(onnx.get("opset", 0)),
                       onnx_exporter=str(onnx.get("exporter", "")),
                       checkpoint_sha256=str(d.get("checkpoint_sha256") or ""), meta=meta,
                       data=MappingProxyType(d))
        except (KeyError, TypeError, ValueError) as e:
            raise SidecarError(f"{where}: invalid sidecar ({type(e).__name__}: {first_line(e)})") from None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _profile(prof: dict[str, Any], where: str) -> dict[str, int]:
    """The optimisation profile's four numbers, checked (1 <= min <= opt <= max, patch >= 1)."""
    try:
        p = {k: int(prof[k]) for k in ("min_batch", "opt_batch", "max_batch", "patch_size")}
        if not 1 <= p["min_batch"] <= p["opt_batch"] <= p["max_batch"]:
            raise ValueError("min <= opt <= max does not hold")
        if p["patch_size"] < 1:
            raise ValueError("patch size < 1")
    except (KeyError, TypeError, ValueError) as e:
        raise SidecarError(f"{where}: invalid profile ({first_line(e)})") from None
    return p


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.x.plan`` -> ``model.x.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path: str | os.PathLike[str]) -> EngineSidecar:
    """The sidecar written next to an engine by the builder, parsed once. Raises SidecarError (one line) if it is
    missing, not a regular file (a FIFO is refused without blocking), not JSON, or lacks what the runtime needs."""
    sp = sidecar_path(engine_path)
    try:
        with open_regular(sp) as f:
            text = f.read(1 << 24)
    except FileNotFoundError:
        raise SidecarError(f"{show_path(sp)}: engine sidecar missing (the engine was not built by rawdiff, or the "
                           ".json was not copied with it)") from None
    except OSError as e:
        raise SidecarError(f"{show_path(sp)}: {e.strerror or first_line(e)}") from None
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SidecarError(f"{show_path(sp)}: invalid JSON ({first_line(e)})") from None
    return EngineSidecar.parse(d, show_path(sp))


def write_sidecar(engine_path: str | os.PathLike[str], sidecar: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``sidecar`` beside ``engine_path`` atomically (``fsio``); returns the sidecar's path."""
    sp = sidecar_path(engine_path)
    write_bytes(sp, (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode(), overwrite=overwrite)
    return sp


@dataclass(frozen=True)
class RuntimeEnv:
    """What is running now: TensorRT flavour / version and the GPU (None: no CUDA GPU)."""

    flavour: str
    version: str
    gpu: GpuInfo | None


def check_engine_compat(sidecar: EngineSidecar, env: RuntimeEnv) -> tuple[list[str], list[str]]:
    """Whether an engine described by ``sidecar`` can run in ``env``: (errors, warnings), each a list of one-liners.

    Rules: same TensorRT flavour. Version: TensorRT-RTX needs the exact release; TensorRT needs the exact version
    unless built version-compatible (then any later version of the same or the next major). GPU: TensorRT-RTX needs
    the running compute capability among the engine's targets (default targets: 8.0 and later RTX architectures,
    not 9.x-11.x); TensorRT needs the same GPU model and compute capability unless built hardware-compatible
    ("ampere+": compute capability 8.0 or later).
    """
    errors: list[str] = []
    warnings: list[str] = []
    built_flavour, built_version = sidecar.flavour, sidecar.trt_version
    if built_flavour != env.flavour:
        errors.append(f"engine built with {built_flavour} {built_version}, running {env.flavour} {env.version}")
        return errors, warnings
    _check_version(sidecar, env, errors, warnings)
    if env.gpu is None:
        errors.append("no CUDA GPU visible")
    elif env.flavour == "tensorrt-rtx":
        _check_rtx_gpu(sidecar, env.gpu, errors)
    else:
        _check_trt_gpu(sidecar, env.gpu, errors)
    return errors, warnings


def _check_version(sidecar: EngineSidecar, env: RuntimeEnv, errors: list[str], warnings: list[str]) -> None:
    flavour, built = sidecar.flavour, sidecar.trt_version
    bv, rv = parse_version(built), parse_version(env.version)
    if env.flavour == "tensorrt-rtx" or not sidecar.version_compatible:
        if bv != rv:
            errors.append(f"engine built with {flavour} {built}, running {env.version} "
                          "(engines are tied to the exact release)")
    elif rv < bv or rv[0] - bv[0] > 1:
        errors.append(f"version-compatible engine built with {flavour} {built} cannot run on {env.version} "
                      "(needs the same or a later version, at most one major later)")
    elif rv != bv:
        warnings.append(f"version-compatible engine built with {built} runs on {env.version} (may be slower than "
                        "an engine built for this version)")


def _check_rtx_gpu(sidecar: EngineSidecar, gpu: GpuInfo, errors: list[str]) -> None:
    cc = gpu.compute_capability
    ccs = sidecar.target_ccs
    if ccs:
        if gpu.cc not in ccs:
            errors.append(f"engine built for compute capabilities {', '.join(ccs)}, this GPU ({gpu.name}) is {gpu.cc}")
    elif cc < RTX_DEFAULT_MIN_CC or cc[0] in RTX_UNSUPPORTED_MAJORS:
        errors.append(f"engine built for TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x), this GPU "
                      f"({gpu.name}) is {gpu.cc}")


def _check_trt_gpu(sidecar: EngineSidecar, gpu: GpuInfo, errors: list[str]) -> None:
    built_cc, built_gpu = sidecar.target_cc, sidecar.target_gpu
    if sidecar.hardware_compatible:
        if gpu.compute_capability < (8, 0):
            errors.append(f"hardware-compatible (Ampere+) engine, this GPU ({gpu.name}) is {gpu.cc}")
    elif not built_cc or built_cc == "AOT/none":
        errors.append("engine sidecar records no GPU (TensorRT engines are built for one GPU)")
    elif parse_cc(built_cc) != gpu.compute_capability:
        errors.append(f"engine built for {built_gpu} (compute capability {built_cc}), this GPU is "
                      f"{gpu.name} ({gpu.cc})")
    elif built_gpu and built_gpu != gpu.name:
        errors.append(f"engine built for {built_gpu}, this GPU is {gpu.name} (same compute capability "
                      f"{built_cc}; TensorRT engines are specific to the GPU model)")
