"""Checkpoints: safetensors + JSON, clear errors, nothing unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rawdiff_infer.camera import CAMERAS
from rawdiff_infer.checkpoint import CheckpointError, ModelMeta, load_checkpoint, read_meta, save_checkpoint
from rawdiff_infer.model import UNet, UNetConfig
from rawdiff_infer.schedule import ScheduleConfig

from conftest import TINY_CONFIG


def _model() -> UNet:
    torch.manual_seed(1)
    return UNet(TINY_CONFIG).eval()


def test_round_trip_file(tmp_path: Path) -> None:
    model = _model()
    meta = ModelMeta(schedule=ScheduleConfig(kind="linear"), camera=CAMERAS["canon-eos-5d"])
    p = save_checkpoint(model, tmp_path / "m.safetensors", meta=meta, steps=123)
    loaded, m2 = load_checkpoint(p)
    assert m2.model == TINY_CONFIG
    assert m2.schedule.kind == "linear"
    assert m2.camera == CAMERAS["canon-eos-5d"]
    assert m2.provenance["steps"] == 123
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert read_meta(p) == m2


def test_round_trip_sharded_fp16(tmp_path: Path) -> None:
    model = UNet()  # paper size: ~22 MB in fp16
    idx = save_checkpoint(model, tmp_path / "weights", dtype=torch.float16, shard_bytes=8 << 20)
    shards = sorted((tmp_path / "weights").glob("*.safetensors"))
    assert len(shards) >= 3
    assert all(s.stat().st_size < 16 << 20 for s in shards)
    loaded, meta = load_checkpoint(tmp_path / "weights")
    assert meta.model == UNetConfig()
    assert loaded.dtype == torch.float32  # fp16 storage promoted for CPU use
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float())
    assert read_meta(idx).model == UNetConfig()


def test_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: D401 - executing this would create the marker file
            return (Path.touch, (marker,))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(p)
    torch.save(_model().state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="zip|pickle"):
        load_checkpoint(tmp_path / "model.pt")
    assert not marker.exists()


def test_truncated_file(tmp_path: Path) -> None:
    p = save_checkpoint(_model(), tmp_path / "m.safetensors")
    data = p.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(q)
        assert "\n" not in str(e.value)


def test_other_architecture(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, p)
    with pytest.raises(CheckpointError, match="rawdiff description"):
        load_checkpoint(p)
    # right description, wrong weights
    good = save_checkpoint(_model(), tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        header = f.metadata()
    save_file({"fc.weight": torch.zeros(3, 3)}, tmp_path / "mismatch.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.safetensors")


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty|truncated"):
        load_checkpoint(tmp_path / "empty.safetensors")


def test_header_length_128_mod_256_is_not_mistaken_for_a_pickle(tmp_path: Path) -> None:
    """A safetensors file whose 8-byte header length starts with 0x80 must load (regression)."""
    from safetensors.torch import save_file

    model = _model()
    p = save_checkpoint(model, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        header = f.metadata()
    tensors = {k: v for k, v in model.state_dict().items()}
    for pad in range(0, 300):  # grow the metadata until the header length is 128 mod 256
        q = tmp_path / "pad.safetensors"
        save_file(tensors, str(q), metadata={**header, "pad": "x" * pad})
        if q.read_bytes()[0] == 0x80:
            break
    assert q.read_bytes()[0] == 0x80
    loaded, _ = load_checkpoint(q)
    assert torch.equal(next(iter(loaded.state_dict().values())), next(iter(model.state_dict().values())))
