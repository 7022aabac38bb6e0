"""A hostile checkpoint is refused at load, before any compute, with one line naming the file and the field."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from rawdiff_infer.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from rawdiff_infer.model import UNet

from conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "weights"
    save_checkpoint(UNet(TINY_CONFIG), d, shard_bytes=600_000)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _tamper(src: Path, dst: Path, edit) -> Path:
    """A copy of the sharded checkpoint with its rawdiff.json edited by ``edit(dict) -> JSON-able``."""
    d = _copy(src, dst)
    index = json.loads((d / "rawdiff.json").read_text())
    (d / "rawdiff.json").write_text(json.dumps(edit(index)))
    return d


def _set(path: str, value):
    def edit(d):
        node = d
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return d
    return edit


BAD_FIELDS = {  # field -> (value, words the message must contain)
    "encoding.gamma=0": ("encoding.gamma", 0, "gamma"),
    "encoding.gamma=nan": ("encoding.gamma", float("nan"), "gamma"),
    "encoding.gamma=-2.2": ("encoding.gamma", -2.2, "gamma"),
    "camera.color_matrix nan": ("camera.color_matrix", [float("nan")] + [0.5] * 8, "color_matrix"),
    "camera.color_matrix 1e300": ("camera.color_matrix", [1e300] + [0.5] * 8, "color_matrix"),
    "camera.color_matrix inf": ("camera.color_matrix", [float("inf")] + [0.5] * 8, "color_matrix"),
    "camera.color_matrix singular": ("camera.color_matrix", [1.0] * 9, "singular"),
    "camera.illuminant=70000": ("camera.illuminant", 70000, "illuminant"),
    "schedule.num_timesteps=1000.5": ("schedule.num_timesteps", 1000.5, "num_timesteps"),
    "schedule.num_timesteps=1e12": ("schedule.num_timesteps", 10**12, "num_timesteps"),
    "schedule.num_timesteps=2e8": ("schedule.num_timesteps", 2e8, "num_timesteps"),
    "schedule.beta_end nan": ("schedule.beta_end", float("nan"), "beta_end"),
    "model.groups=0": ("model.groups", 0, "groups"),
    "model.head_channels=0": ("model.head_channels", 0, "head_channels"),
    "model.base_channels=32.0": ("model.base_channels", 32.0, "base_channels"),
    "model.base_channels=-32": ("model.base_channels", -32, "base_channels"),
    "model.patch_size=0": ("model.patch_size", 0, "patch_size"),
    "model.channel_mults=[]": ("model.channel_mults", [], "channel_mults"),
    "model.mid_block=1": ("model.mid_block", 1, "mid_block"),
    "camera.black_level=true": ("camera.black_level", True, "black_level"),
    "model is a list": ("model", [1, 2], "model"),
}

#: a valid ``isp`` section (the synthetic camera's shape); each hostile case below breaks one field of it
_ISP = {"gain": 2.0, "srgb_from_cam": [1.6, -0.5, -0.1, 0.0, 1.25, -0.25, 0.05, -0.3, 1.25],
        "curve": {"kind": "srgb", "tone": 0.5}, "clip": 1.0, "bits": 8}


def _isp(**changes):
    d = json.loads(json.dumps(_ISP))
    for k, v in changes.items():
        d[k] = v
    return d


BAD_FIELDS.update({
    "isp.gain=0": ("isp", _isp(gain=0), "gain"),
    "isp.gain=-2": ("isp", _isp(gain=-2.0), "gain"),
    "isp.gain=nan": ("isp", _isp(gain=float("nan")), "gain"),
    "isp.gain=1e300": ("isp", _isp(gain=1e300), "gain"),
    "isp.gain string": ("isp", _isp(gain="2"), "gain"),
    "isp missing gain": ("isp", {k: v for k, v in _ISP.items() if k != "gain"}, "gain"),
    "isp.srgb_from_cam 8": ("isp", _isp(srgb_from_cam=[1.0] * 8), "srgb_from_cam"),
    "isp.srgb_from_cam singular": ("isp", _isp(srgb_from_cam=[1.0] * 9), "singular"),
    "isp.srgb_from_cam inf": ("isp", _isp(srgb_from_cam=[float("inf")] + [0.0] * 8), "srgb_from_cam"),
    "isp.curve.kind": ("isp", _isp(curve={"kind": "log"}), "kind"),
    "isp.curve.tone=2": ("isp", _isp(curve={"kind": "srgb", "tone": 2.0}), "tone"),
    "isp.curve.power=0": ("isp", _isp(curve={"kind": "gamma", "power": 0.0, "slope": 4.5}), "power"),
    "isp.curve.lut decreasing": ("isp", _isp(curve={"kind": "lut", "lut": [0.0, 0.6, 0.5, 1.0]}), "increasing"),
    "isp.curve.lut one value": ("isp", _isp(curve={"kind": "lut", "lut": [0.5]}), "lut"),
    "isp.curve.lut huge": ("isp", _isp(curve={"kind": "lut", "lut": [0.0] * 70000}), "lut"),
    "isp.curve.lut above 1": ("isp", _isp(curve={"kind": "lut", "lut": [0.0, 2.0]}), "lut"),
    "isp.curve extra key": ("isp", _isp(curve={"kind": "srgb", "tone": 0.5, "lut": [0.0, 1.0]}), "lut"),
    "isp.clip=0": ("isp", _isp(clip=0.0), "clip"),
    "isp.clip=1.5": ("isp", _isp(clip=1.5), "clip"),
    "isp.bits=12": ("isp", _isp(bits=12), "bits"),
    "isp.bits=8.0": ("isp", _isp(bits=True), "bits"),
    "isp unknown key": ("isp", _isp(gamma=2.2), "gamma"),
    "isp is a list": ("isp", [1, 2], "isp"),
})


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_bad_description_field(tiny_dir, tmp_path, case):
    field_path, value, words = BAD_FIELDS[case]
    d = _tamper(tiny_dir, tmp_path / "c", _set(field_path, value))
    for load in (read_meta, load_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(d)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(d / "rawdiff.json")) and words in msg, msg


def test_description_that_is_a_list_or_nested_too_deep(tiny_dir, tmp_path):
    d = _tamper(tiny_dir, tmp_path / "list", lambda d: [d])
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        load_checkpoint(d)
    d2 = _copy(tiny_dir, tmp_path / "deep")
    (d2 / "rawdiff.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d2)
    assert str(e.value).startswith(str(d2 / "rawdiff.json")) and "deep" in str(e.value)


def test_single_file_description_that_is_a_list(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in UNet(TINY_CONFIG).state_dict().items()}, str(p),
              metadata={"rawdiff": "[1, 2, 3]"})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: .*JSON object"):
        load_checkpoint(p)


def test_huge_declared_architecture_is_refused_before_it_is_built(tiny_dir, tmp_path):
    d = _tamper(tiny_dir, tmp_path / "big", _set("model.base_channels", 1024))
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert time.perf_counter() - t < 10.0  # nothing of 7 GB was allocated
    assert str(e.value).startswith(str(d / "rawdiff.json")) and "parameters" in str(e.value)


@pytest.mark.parametrize("bad", ["nan", "inf", "int64", "bool"])
def test_bad_weights(tmp_path, bad):
    from safetensors.torch import save_file

    model = UNet(TINY_CONFIG)
    p = save_checkpoint(model, tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        header = f.metadata()
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    name = "conv_in.weight"
    if bad == "nan":
        sd[name].view(-1)[7] = float("nan")
    elif bad == "inf":
        sd[name].view(-1)[3] = float("inf")
    elif bad == "int64":
        sd[name] = sd[name].to(torch.int64)
    else:
        sd[name] = sd[name] > 0
    q = tmp_path / "bad.safetensors"
    save_file(sd, str(q), metadata=header)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(q)
    msg = str(e.value)
    assert msg.startswith(str(q)) and name in msg
    assert ("NaN or infinite" in msg) if bad in ("nan", "inf") else ("floating point" in msg)


def _fifo_never_blocks(path: Path) -> None:
    os.mkfifo(path)
    result: list[BaseException] = []

    def go() -> None:
        try:
            load_checkpoint(path.parent if path.name == "rawdiff.json" else path)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "loading blocked on a FIFO"
    assert isinstance(result[0], CheckpointError) and "FIFO" in str(result[0])


def test_fifo_as_checkpoint_index_or_shard(tiny_dir, tmp_path):
    _fifo_never_blocks(tmp_path / "model.safetensors")
    d = _copy(tiny_dir, tmp_path / "idx")
    (d / "rawdiff.json").unlink()
    _fifo_never_blocks(d / "rawdiff.json")
    d2 = _copy(tiny_dir, tmp_path / "shard")
    shard = json.loads((d2 / "rawdiff.json").read_text())["shards"][0]
    (d2 / shard).unlink()
    os.mkfifo(d2 / shard)
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(d2)


def test_shard_names_must_stay_in_the_folder(tiny_dir, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for name in ("../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".hidden"):
        d = _tamper(tiny_dir, tmp_path / f"t{abs(hash(name))}", _set("shards", [name]))
        with pytest.raises(CheckpointError, match="plain file name"):
            load_checkpoint(d)
