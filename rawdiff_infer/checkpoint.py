"""Checkpoints: safetensors weights + a JSON description, never pickle.

A checkpoint is either
- one ``.safetensors`` file whose header metadata holds the JSON description under the key ``"rawdiff"``, or
- a directory (or its ``rawdiff.json``) holding ``rawdiff.json`` (the description plus a ``"shards"`` list) and the
  listed ``.safetensors`` shards (how the default model ships: every file under 16 MiB).

The description (``ModelMeta``) records the U-Net config, the noise schedule, the RAW encoding, the camera, free-form
provenance (training data, steps, date, ...) and the format / package versions.

Loading trusts nothing in the files, and checks everything before it allocates or computes:

1. every path is a regular file (a FIFO would block ``open`` for ever), shard names are plain file names;
2. the description is parsed with a depth and size limit and validated field by field (types, ranges,
   finiteness: see ``validate``), so a bad gamma, matrix, illuminant or architecture is refused with the field's
   name, never found later at write time;
3. the declared U-Net's size is computed without allocating it (at most ``MAX_PARAMETERS``), and its tensor names
   and shapes are compared with the shapes the safetensors headers declare, before any weight is read;
4. the weights must be floating point and finite.

Every failure is a ``CheckpointError`` whose one-line message starts with the file's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .camera import DEFAULT_CAMERA, Camera
from .formulation import Formulation
from .isp import IspModel
from .fsio import NotRegularFileError, atomic_path, check_regular, open_regular, sha256_file, write_bytes
from .messages import first_line, show_path
from .model import UNet, UNetConfig
from .rawspace import RawEncoding
from .schedule import ScheduleConfig
from .validate import SchemaError, choice, int_list, obj, string

__all__ = ["ModelMeta", "CheckpointError", "save_checkpoint", "load_checkpoint", "read_meta", "parse_description",
           "file_sha256", "FORMAT", "MAX_PARAMETERS"]

FORMAT = "rawdiff-checkpoint/1"
ARCHITECTURE = "rawdiff.UNet"
_INDEX = "rawdiff.json"
#: the largest U-Net a description may declare (the paper's has 10.9 M parameters)
MAX_PARAMETERS = 500_000_000
#: largest description (rawdiff.json or a safetensors header) read, in bytes
_MAX_DESCRIPTION_BYTES = 16 << 20
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(Exception):
    """A checkpoint cannot be used: the message is one line naming the file and the reason."""


@dataclass(frozen=True)
class ModelMeta:
    """Everything besides the weights that is needed to run a model."""

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    encoding: RawEncoding = field(default_factory=RawEncoding)
    camera: Camera = DEFAULT_CAMERA
    provenance: dict[str, Any] = field(default_factory=dict)
    #: how the camera renders RAW to sRGB (``isp.IspModel``); None: unknown (no consistency at inference)
    isp: IspModel | None = None
    #: what the U-Net predicts and what the sampler diffuses (``formulation.Formulation``; absent: eps over the RAW)
    formulation: Formulation = field(default_factory=Formulation)

    def __post_init__(self) -> None:
        if self.formulation.residual and self.isp is None:
            raise SchemaError("formulation.space: 'residual' needs the description's isp (the closed form it is "
                              "the residual over)")

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "rawdiff_version": __version__, "architecture": ARCHITECTURE,
             "model": self.model.to_dict(), "schedule": self.schedule.to_dict(),
             "encoding": self.encoding.to_dict(), "camera": self.camera.to_dict(),
             "provenance": self.provenance}
        if self.isp is not None:
            d["isp"] = self.isp.to_dict()
        if not self.formulation.is_default:  # absent means eps over the RAW: earlier descriptions keep their bytes
            d["formulation"] = self.formulation.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ModelMeta":
        """Validate a description (a parsed JSON object). Raises SchemaError (a ValueError) naming the field."""
        d = obj(d, "description")
        choice(d.get("format"), "format", (FORMAT,))
        choice(d.get("architecture"), "architecture", (ARCHITECTURE,))
        for key in ("model", "schedule", "encoding", "camera"):
            if key not in d:
                raise SchemaError(f"{key}: missing")
        return cls(model=UNetConfig.from_dict(d["model"]), schedule=ScheduleConfig.from_dict(d["schedule"]),
                   encoding=RawEncoding.from_dict(d["encoding"]), camera=Camera.from_dict(d["camera"]),
                   provenance=obj(d.get("provenance", {}), "provenance"),
                   isp=IspModel.from_dict(d["isp"]) if d.get("isp") is not None else None,
                   formulation=Formulation.from_dict(d["formulation"]) if "formulation" in d else Formulation())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def parse_description(text: str | bytes, where: str) -> tuple[ModelMeta, dict[str, Any]]:
    """Parse and validate a JSON description (of a checkpoint, an ONNX file, an engine sidecar, ...).

    Args:
        text: the JSON text (at most 16 MiB).
        where: what to name in the error (usually the file, shown with ``messages.show_path``).
    Returns (ModelMeta, the parsed JSON object). Raises CheckpointError: ``"<where>: <problem>"``.
    """
    if not isinstance(text, (str, bytes)):  # e.g. a safetensors metadata value that is an object or null
        kind = {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(type(text), "a number")
        raise CheckpointError(f"{where}: the rawdiff description must be JSON text, got {kind}")
    if len(text) > _MAX_DESCRIPTION_BYTES:
        raise CheckpointError(f"{where}: description larger than {_MAX_DESCRIPTION_BYTES >> 20} MiB")
    try:
        d = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where}: invalid description (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: invalid JSON ({first_line(e)})") from None
    try:
        return ModelMeta.from_dict(d), d
    except SchemaError as e:
        raise CheckpointError(f"{where}: invalid rawdiff description: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: invalid description (nested too deeply)") from None


def _state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    return sd


def save_checkpoint(model: UNet, path: str | os.PathLike, *, meta: ModelMeta | None = None,
                    dtype: torch.dtype | None = None, shard_bytes: int | None = None, overwrite: bool = False,
                    **provenance: Any) -> Path:
    """Write ``model`` (and its description) to ``path``.

    Args:
        model: the U-Net (its config is taken from the module).
        path: a ``.safetensors`` file, or a directory when ``shard_bytes`` is given.
        meta: schedule / encoding / camera / provenance; defaults to the paper's settings.
        dtype: store floating weights in this dtype (e.g. torch.float16); default: as they are.
        shard_bytes: split the weights into shards of at most this many bytes, written into directory ``path``.
        overwrite: replace existing files; otherwise ``fsio.OutputExistsError`` if one exists.
        **provenance: extra provenance entries (merged into ``meta.provenance``).
    Returns the path written (the file, or the directory's ``rawdiff.json``). Every file is written atomically
    (``fsio``).
    """
    from safetensors.torch import save_file

    meta = meta or ModelMeta()
    meta = dataclasses.replace(meta, model=model.config, provenance={**meta.provenance, **provenance})
    sd = _state_dict(model, dtype)
    path = Path(path)
    if shard_bytes is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_file(sd, str(tmp), metadata={"rawdiff": meta.to_json()})
        return path
    # sharded directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    names = []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:02d}-of-{len(shards):02d}.safetensors"
        with atomic_path(path / name, overwrite=overwrite) as tmp:
            save_file(shard, str(tmp), metadata={"rawdiff": meta.to_json()})
        names.append(name)
    index = {**meta.to_dict(), "shards": names}
    write_bytes(path / _INDEX, json.dumps(index, indent=1, sort_keys=True).encode(), overwrite=overwrite)
    return path / _INDEX


def _sniff(path: Path) -> int:
    """Refuse pickles / zip archives / non-safetensors data before any parser touches them; returns the header
    length."""
    with open_regular(path) as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 8:
        raise CheckpointError(f"{show_path(path)}: file is empty or truncated (not a safetensors checkpoint)")
    n = int.from_bytes(head[:8], "little")
    if not (0 < n <= 100_000_000 and head[8:9] == b"{"):  # not a safetensors header: say what it is
        if head[:2] == b"PK":
            raise CheckpointError(f"{show_path(path)}: a zip / PyTorch .pt archive; rawdiff loads only safetensors "
                                  "(pickles are never unpickled)")
        if head[:1] == b"\x80":
            raise CheckpointError(f"{show_path(path)}: a Python pickle; rawdiff loads only safetensors "
                                  "(pickles are never unpickled)")
        raise CheckpointError(f"{show_path(path)}: not a safetensors file")
    if size < 8 + n:
        raise CheckpointError(f"{show_path(path)}: truncated safetensors file (header says {n} bytes)")
    return n


def _header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """A safetensors file's tensor table {name: (dtype, shape)} and metadata, from its header alone."""
    n = _sniff(path)
    with open_regular(path) as f:
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{show_path(path)}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{show_path(path)}: unreadable safetensors header (not an object)")
    meta = header.pop("__metadata__", None) or {}
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        try:
            info = obj(info, f"tensor {name!r}")
            table[name] = (string(info.get("dtype"), f"tensor {name!r}: dtype", max_len=16),
                           int_list(info.get("shape"), f"tensor {name!r}: shape", 0, 1 << 40, max_len=8))
        except SchemaError as e:
            raise CheckpointError(f"{show_path(path)}: unreadable safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{show_path(path)}: unreadable safetensors metadata")
    return table, meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open_regular(path) as f:
        data = f.read()
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{show_path(path)}: unreadable safetensors file ({first_line(e)})") from None


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        if p.is_dir():
            p = p / _INDEX
        check_regular(p)
    except FileNotFoundError:
        raise CheckpointError(f"{show_path(path)}: no such checkpoint") from None
    except NotRegularFileError as e:
        raise CheckpointError(f"{show_path(p)}: {e.strerror}") from None
    except OSError as e:
        raise CheckpointError(f"{show_path(path)}: cannot open ({e.strerror or first_line(e)})") from None
    return p


def _shard_files(index_path: Path, index: dict[str, Any]) -> list[Path]:
    names = index.get("shards")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{show_path(index_path)}: \"shards\" must be a non-empty list of file names")
    files = []
    for name in names:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{show_path(index_path)}: shard {show_path(name)} is not a plain file name in "
                                  "the checkpoint's folder")
        shard = index_path.parent / name
        try:
            check_regular(shard)
        except FileNotFoundError:
            raise CheckpointError(f"{show_path(shard)}: shard listed in {index_path.name} is missing") from None
        except OSError as e:
            raise CheckpointError(f"{show_path(shard)}: {e.strerror or first_line(e)}") from None
        files.append(shard)
    if len(set(files)) != len(files):
        raise CheckpointError(f"{show_path(index_path)}: a shard is listed twice")
    return files


def _description(p: Path) -> tuple[ModelMeta, list[Path]]:
    """The validated description and the weight files of a resolved checkpoint path."""
    if p.suffix == ".json":
        with open_regular(p) as f:
            text = f.read(_MAX_DESCRIPTION_BYTES + 1)
        meta, index = parse_description(text, show_path(p))
        return meta, _shard_files(p, index)
    _, header = _header(p)
    if "rawdiff" not in header:
        raise CheckpointError(f"{show_path(p)}: safetensors file without a rawdiff description "
                              "(not a rawdiff checkpoint, or another architecture)")
    meta, _ = parse_description(header["rawdiff"], show_path(p))
    return meta, [p]


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The validated description of a checkpoint, without reading its weights. Raises CheckpointError."""
    return _description(_resolve(path))[0]


def _check_architecture(p: Path, meta: ModelMeta, files: list[Path]) -> dict[str, torch.Size]:
    """Size of the declared U-Net, and the headers' tensor names / shapes / dtypes against it, before any read."""
    n_params = meta.model.parameter_count()
    if n_params > MAX_PARAMETERS:
        raise CheckpointError(f"{show_path(p)}: declares a U-Net of {n_params / 1e6:.0f} M parameters, more than "
                              f"rawdiff accepts ({MAX_PARAMETERS / 1e6:.0f} M)")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in UNet(meta.model).state_dict().items()}
    found: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for f in files:
        table, _ = _header(f)
        for name, (dtype, shape) in table.items():
            if name in found:
                raise CheckpointError(f"{show_path(f)}: tensor {name} is also in {found[name][2].name}")
            found[name] = (dtype, shape, f)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{show_path(p)}: weights do not match the rawdiff U-Net described in it "
                              f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                              f"{(missing + unexpected)[0]})")
    for name, (dtype, shape, f) in found.items():
        if dtype not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{show_path(f)}: tensor {name} is {dtype}; rawdiff weights are floating point")
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{show_path(f)}: tensor {name} has shape {tuple(shape)}, the architecture needs "
                                  f"{tuple(expected[name])}")
    return expected


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[UNet, ModelMeta]:
    """Load a checkpoint written by ``save_checkpoint`` (see the module docstring for what is checked).

    Returns (model in eval mode on ``device``, meta). ``dtype`` casts the floating weights (default: as stored,
    promoted to fp32 when stored in fp16/bf16 so that CPU inference works).
    Raises CheckpointError (one line naming the file) for non-regular files, pickles, truncated files, invalid
    descriptions, oversized architectures, weights that do not fit the described architecture, non-floating or
    non-finite weights.
    """
    p = _resolve(path)
    meta, files = _description(p)
    _check_architecture(p, meta, files)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        tensors = _read_tensors(f)
        for name, v in tensors.items():
            if v.dtype not in _WEIGHT_DTYPES:
                raise CheckpointError(f"{show_path(f)}: tensor {name} is {v.dtype}; rawdiff weights are floating "
                                      "point")
            if not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{show_path(f)}: tensor {name} holds NaN or infinite values")
        sd.update(tensors)
    model = UNet(meta.model)
    stored = next(iter(sd.values())).dtype if sd else torch.float32
    target = dtype or (torch.float32 if stored in (torch.float16, torch.bfloat16) else stored)
    model.load_state_dict({k: v.to(target) for k, v in sd.items()})
    return model.to(device=device, dtype=target).eval(), meta


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a checkpoint: the file's bytes, or for a sharded checkpoint the bytes of ``rawdiff.json``
    followed by each shard's, in order."""
    p = _resolve(path)
    if p.suffix != ".json":
        return sha256_file(p)
    import hashlib

    _, files = _description(p)
    h = hashlib.sha256()
    for f in [p, *files]:
        with open_regular(f) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
