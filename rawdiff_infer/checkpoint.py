"""Checkpoints: safetensors weights + a JSON description, never pickle.

A checkpoint is either
- one ``.safetensors`` file whose header metadata holds the JSON description under the key ``"rawdiff"``, or
- a directory (or its ``rawdiff.json``) holding ``rawdiff.json`` (the description plus a ``"shards"`` list) and the
  listed ``.safetensors`` shards (how the default model ships: every file under 16 MiB).

The description (``ModelMeta``) records the U-Net config, the noise schedule, the RAW encoding, the camera, free-form
provenance (training data, steps, date, ...) and the format / package versions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .camera import DEFAULT_CAMERA, Camera
from .fsio import atomic_path, write_bytes
from .model import UNet, UNetConfig
from .rawspace import RawEncoding
from .schedule import ScheduleConfig

__all__ = ["ModelMeta", "CheckpointError", "save_checkpoint", "load_checkpoint", "read_meta", "FORMAT"]

FORMAT = "rawdiff-checkpoint/1"
_INDEX = "rawdiff.json"


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

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "rawdiff_version": __version__, "architecture": "rawdiff.UNet",
                "model": self.model.to_dict(), "schedule": self.schedule.to_dict(),
                "encoding": self.encoding.to_dict(), "camera": self.camera.to_dict(),
                "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {d.get('format')!r} (expected {FORMAT})")
        if d.get("architecture") != "rawdiff.UNet":
            raise ValueError(f"architecture {d.get('architecture')!r} is not rawdiff.UNet")
        return cls(model=UNetConfig.from_dict(d["model"]), schedule=ScheduleConfig.from_dict(d["schedule"]),
                   encoding=RawEncoding.from_dict(d["encoding"]), camera=Camera.from_dict(d["camera"]),
                   provenance=dict(d.get("provenance", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


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
    meta = ModelMeta(model=model.config, schedule=meta.schedule, encoding=meta.encoding, camera=meta.camera,
                     provenance={**meta.provenance, **provenance})
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


def _sniff(path: Path) -> None:
    """Refuse pickles / zip archives / non-safetensors data before any parser touches them."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated (not a safetensors checkpoint)")
    n = int.from_bytes(head[:8], "little")
    if not (0 < n <= 100_000_000 and head[8:9] == b"{"):  # not a safetensors header: say what it is
        if head[:2] == b"PK":
            raise CheckpointError(f"{path}: a zip / PyTorch .pt archive; rawdiff loads only safetensors "
                                  "(pickles are never unpickled)")
        if head[:1] == b"\x80":
            raise CheckpointError(f"{path}: a Python pickle; rawdiff loads only safetensors "
                                  "(pickles are never unpickled)")
        raise CheckpointError(f"{path}: not a safetensors file")
    if os.path.getsize(path) < 8 + n:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes)")


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import SafetensorError, safe_open

    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable safetensors file ({msg})") from None
    return tensors, header


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / _INDEX
    if not p.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    return p


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The description of a checkpoint, without loading its weights."""
    return _load(path, weights=False)[1]


def _load(path: str | os.PathLike, weights: bool = True) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    p = _resolve(path)
    try:
        if p.suffix == ".json":
            try:
                index = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{p}: invalid JSON ({e})") from None
            meta = ModelMeta.from_dict(index)
            sd: dict[str, torch.Tensor] = {}
            if weights:
                for name in index.get("shards", []):
                    shard = p.parent / name
                    if not shard.exists():
                        raise CheckpointError(f"{shard}: shard listed in {p.name} is missing")
                    sd.update(_read_file(shard)[0])
            return sd, meta
        if weights:
            sd, header = _read_file(p)
        else:
            _sniff(p)
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                header = f.metadata()
            sd = {}
        if not header or "rawdiff" not in header:
            raise CheckpointError(f"{p}: safetensors file without a rawdiff description "
                                  "(not a rawdiff checkpoint, or another architecture)")
        return sd, ModelMeta.from_dict(json.loads(header["rawdiff"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: invalid rawdiff description ({e})") from None


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[UNet, ModelMeta]:
    """Load a checkpoint written by ``save_checkpoint``.

    Returns (model in eval mode on ``device``, meta). ``dtype`` casts the floating weights (default: as stored,
    promoted to fp32 when stored in fp16/bf16 so that CPU inference works).
    Raises CheckpointError (one clear line) for pickles, truncated files, non-rawdiff files and weights that do not
    fit the described architecture.
    """
    sd, meta = _load(path)
    model = UNet(meta.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the rawdiff U-Net described in it "
                              f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                              f"{(missing + unexpected)[0]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the architecture needs "
                                  f"{tuple(expected[k].shape)}")
    stored = next(iter(sd.values())).dtype if sd else torch.float32
    target = dtype or (torch.float32 if stored in (torch.float16, torch.bfloat16) else stored)
    model.load_state_dict({k: v.to(target) for k, v in sd.items()})
    return model.to(device=device, dtype=target).eval(), meta


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (or of the concatenated shards of a sharded checkpoint)."""
    p = _resolve(path)
    files = [p]
    if p.suffix == ".json":
        files = [p] + [p.parent / n for n in json.loads(p.read_text()).get("shards", [])]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
