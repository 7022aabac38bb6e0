"""A hostile checkpoint is refused at load, before any compute, with one line naming the file and the field."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from rawdiff_infer.checkpoint import CheckpointError, ModelMeta, load_checkpoint, read_meta, save_checkpoint
from rawdiff_infer.model import MAX_ATTENTION_TOKENS, MAX_PATCH_FLOPS, UNet, UNetConfig, count_flops
from rawdiff_infer.validate import SchemaError

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


def _model(**changes):
    """The tiny U-Net's ``model`` section with ``changes``: each field valid alone, the combination maybe not."""
    return {**TINY_CONFIG.to_dict(), **changes}


BAD_FIELDS.update({  # valid field by field; torch could not build or run them, or they cost hours per patch
    "model: odd base_channels": ("model", _model(base_channels=9, groups=1, head_channels=9), "even"),
    "model: first multiplier 2": ("model", _model(channel_mults=[2, 2, 2, 2]), "channel_mults"),
    "model: heads of unequal width": ("model", _model(head_channels=10), "head_channels"),
    "model: bottleneck heads of unequal width": ("model", _model(attention_stages=[], head_channels=10),
                                                 "head_channels"),
    "model: attention at stage 0, patch 1024": ("model", _model(attention_stages=[0, 1, 2, 3], patch_size=1024),
                                                "attention_stages"),
    "model: 1 TFLOP per patch": ("model", _model(base_channels=128, attention_stages=[], mid_block=False,
                                                 patch_size=1024, groups=8), "GFLOP"),
    "schedule: alphabar underflows to 0": ("schedule", {"kind": "linear", "num_timesteps": 100000,
                                                        "beta_start": 0.5, "beta_end": 0.9}, "underflows"),
    "schedule: alphabar below 1e-26": ("schedule", {"kind": "linear", "num_timesteps": 2000,
                                                    "beta_start": 0.01, "beta_end": 0.06}, "beta_end"),
    "schedule: no noise at t = 0": ("schedule.beta_start", 1e-300, "beta_start"),
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
    # 8-pixel patches: 1 G parameters within the compute bound of one patch (20 GFLOP)
    d = _tamper(tiny_dir, tmp_path / "big", lambda d: _set("model.patch_size", 8)(_set("model.base_channels", 1024)(d)))
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


def _single_file(tmp_path: Path, name: str, edit) -> Path:
    """The tiny model as one safetensors file whose JSON header went through ``edit(header dict)``."""
    good = save_checkpoint(UNet(TINY_CONFIG), tmp_path / "good.safetensors", overwrite=True)
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, allow_nan=True).encode()
    p = tmp_path / name
    p.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return p


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


HOSTILE_HEADERS = {  # name -> (edit, words)
    "description is an object": (lambda h: h["__metadata__"].update(rawdiff=json.loads(h["__metadata__"]["rawdiff"])),
                                 "an object"),
    "description is null": (lambda h: h["__metadata__"].update(rawdiff=None), "null"),
    "description is a number": (lambda h: h["__metadata__"].update(rawdiff=3), "a number"),
    "shape of Infinity": (lambda h: _first_tensor(h).update(shape=[float("inf")]), "shape"),
    "fractional shape": (lambda h: _first_tensor(h).update(shape=[16.5]), "shape"),
    "negative shape": (lambda h: _first_tensor(h).update(shape=[-16]), "shape"),
    "shape is null": (lambda h: _first_tensor(h).update(shape=None), "shape"),
    "dtype is an object": (lambda h: _first_tensor(h).update(dtype={"F32": 1}), "dtype"),
    "tensor is null": (lambda h: h.update({next(k for k in h if k != "__metadata__"): None}), "JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header_is_one_line(tmp_path, case):
    edit, words = HOSTILE_HEADERS[case]
    p = _single_file(tmp_path, "m.safetensors", edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and words in msg, msg


@pytest.mark.parametrize("case", ["description is an object", "shape of Infinity"])
def test_hostile_header_refused_by_the_command_with_exit_2(tmp_path, case):
    from click.testing import CliRunner
    from PIL import Image

    from rawdiff_infer.cli import cli

    p = _single_file(tmp_path, "m.safetensors", HOSTILE_HEADERS[case][0])
    img = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (120, 90, 60)).save(img)
    r = CliRunner().invoke(cli, [str(img), "--ckpt", str(p), "--steps", "1", "-o", str(tmp_path / "out"),
                                 "--format", "npy"])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "m.safetensors" in lines[0] and "internal error" not in lines[0], r.stderr


def test_the_30kb_checkpoint_with_attention_at_stage_0_is_refused_at_once(tmp_path):
    """The hostile case: valid field by field, an hour of self-test (1024x1024 positions attending)."""
    from safetensors.torch import save_file

    cfg = dict(base_channels=8, channel_mults=[1], attention_stages=[0], head_channels=8, groups=4,
               mid_block=False, patch_size=1024)
    meta = json.loads(ModelMeta().to_json())
    meta["model"] = {**meta["model"], **cfg}
    with torch.device("meta"):
        names = {k: v.shape for k, v in UNet(UNetConfig(**{**cfg, "patch_size": 64})).state_dict().items()}
    p = tmp_path / "small.safetensors"
    save_file({k: torch.zeros(s) for k, s in names.items()}, str(p), metadata={"rawdiff": json.dumps(meta)})
    assert p.stat().st_size < 64_000
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert time.perf_counter() - t < 5.0
    assert str(e.value).startswith(str(p)) and "model.attention_stages: stage 0 attends over 1048576" in str(e.value)


def test_a_larger_patch_than_described_is_checked_the_same_way():
    """Inference may run up to twice the described patch: the same bound answers for it (``check_patch_cost``)."""
    cfg = UNetConfig(patch_size=256)  # stage 1 attends over 128 x 128 positions: the limit
    cfg.check_patch_cost(256)
    with pytest.raises(SchemaError, match=r"^attention_stages: stage 1 attends over 65536 positions of a 512x512"):
        cfg.check_patch_cost(512)


def test_closed_form_flops_equal_the_flop_counter():
    """UNetConfig.patch_flops (what the bound uses) against torch's FlopCounterMode on the module (count_flops)."""
    configs = [UNetConfig(), TINY_CONFIG,
               UNetConfig(base_channels=12, channel_mults=(1, 3, 2), num_res_blocks=2, attention_stages=(0, 2),
                          head_channels=4, groups=2, time_embed_mult=3, mid_block=False, patch_size=32)]
    for cfg in configs:
        with torch.device("meta"):
            model = UNet(cfg)
        for p in (cfg.patch_size, 2 * cfg.patch_size):
            assert cfg.patch_flops(p, batch=2) == count_flops(model, p, batch=2)
    assert UNetConfig().patch_flops(64) == 7_774_175_232  # the paper's 7.8 GFLOP


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _unvalidated(**fields) -> UNetConfig:
    """A UNetConfig built without its checks (to show that what the checks refuse, torch cannot run)."""
    cfg = object.__new__(UNetConfig)
    for f in dataclasses.fields(UNetConfig):
        object.__setattr__(cfg, f.name, fields.get(f.name, f.default))
    return cfg


def _runs_on_meta(cfg: UNetConfig) -> bool:
    try:
        with torch.device("meta"):
            model = UNet(cfg)
            x = torch.zeros(1, 3, cfg.patch_size, cfg.patch_size)
            model(x, x, torch.zeros(1))
    except (ValueError, RuntimeError):
        return False
    return True


@seed(20261207)
@settings(max_examples=80, deadline=None)
@given(base=st.integers(1, 40), mults=st.lists(st.integers(1, 4), min_size=1, max_size=4), blocks=st.integers(1, 2),
       attn=st.sets(st.integers(0, 3), max_size=4), heads=st.integers(1, 48), groups=st.sampled_from([1, 2, 3, 4, 8]),
       mid=st.booleans(), patch=st.sampled_from([8, 16, 32, 64, 128, 1024]))
def test_a_description_is_accepted_exactly_when_torch_can_run_it_within_bounds(base, mults, blocks, attn, heads,
                                                                               groups, mid, patch):
    fields = dict(base_channels=base, channel_mults=tuple(mults), num_res_blocks=blocks,
                  attention_stages=tuple(sorted(a for a in attn if a < len(mults))), head_channels=heads,
                  groups=groups, mid_block=mid, patch_size=patch)
    try:
        cfg = UNetConfig(**fields)
    except SchemaError as e:
        msg = str(e)
        assert "\n" not in msg and msg.split(":")[0] in {f.name for f in dataclasses.fields(UNetConfig)}, msg
        if msg.split(":")[0] in ("base_channels", "groups", "head_channels", "channel_mults"):  # unrunnable
            assert not _runs_on_meta(_unvalidated(**{**fields, "patch_size": 8 * 2 ** len(mults)}))
        else:  # refused for its compute or its patch size: bounded
            assert patch % 2 ** (len(mults) - 1) or (
                _unvalidated(**fields).patch_flops(patch) > MAX_PATCH_FLOPS
                or _unvalidated(**fields).attention_tokens(patch)[0] > MAX_ATTENTION_TOKENS), msg
        return
    assert cfg.patch_flops(patch) <= MAX_PATCH_FLOPS and cfg.attention_tokens(patch)[0] <= MAX_ATTENTION_TOKENS
    assert _runs_on_meta(dataclasses.replace(cfg, patch_size=min(patch, 64)))
