"""rawdiff-train robustness: every bad option, bad data, bad checkpoint, divergence and interrupt ends with one
line on stderr and a meaningful exit status, never a traceback, never a non-finite checkpoint."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import generated_photos
import torch
from click.testing import CliRunner
from PIL import Image

from rawdiff_infer.checkpoint import ModelMeta, load_checkpoint
from rawdiff_infer.model import UNetConfig
from rawdiff_train.cli import cli
from rawdiff_train.trainer import TrainConfig, Trainer, TrainingDiverged

MICRO = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(1,), head_channels=8, groups=4,
                   mid_block=False, patch_size=16)
FAST = ["--config", "tiny", "--batch-size", "2", "--variants", "1", "--val-count", "0", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small generated photos, no held-out names."""
    return generated_photos(tmp_path_factory.mktemp("photos"), 4)


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _one_line_error(result, code: int, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("rawdiff-train: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Options: checked up front, exit 2, one line
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "nan"], "'--lr': 'nan' is not a finite number"),
    (["--lr", "-1"], "'--lr': -1 is not in (0, 1]"),
    (["--lr", "inf"], "'--lr'"),
    (["--lr", "5"], "'--lr': 5 is not in (0, 1]"),
    (["--lr", "fast"], "'--lr': 'fast' is not a number"),
    (["--lr-min", "nan"], "'--lr-min'"),
    (["--lr-min", "-1e-6"], "'--lr-min'"),
    (["--lr-min", "0.5"], "lr_min (0.5) must not exceed lr (0.0002)"),
    (["--grad-clip", "nan"], "'--grad-clip'"),
    (["--grad-clip", "-1"], "'--grad-clip'"),
    (["--grad-clip", "0"], "'--grad-clip'"),
    (["--ema", "nan"], "'--ema'"),
    (["--ema", "1"], "'--ema': 1 is not in [0, 1)"),
    (["--ema", "-0.1"], "'--ema'"),
    (["--max-minutes", "nan"], "'--max-minutes'"),
    (["--max-minutes", "-3"], "'--max-minutes'"),
    (["--seed", "-1"], "'--seed'"),
    (["--steps", "0"], "'--steps'"),
    (["--warmup", "-5"], "'--warmup'"),
    (["--batch-size", "6", "--grad-accum", "4"], "batch_size (6) must be divisible by grad_accum (4)"),
    (["--device", "tpu9"], "'--device'"),
    (["--camera", "leica-m9"], "unknown camera 'leica-m9'"),
    (["--no-such-option"], "No such option"),
])
def test_bad_options_exit_2_with_one_line_before_any_work(photos: Path, tmp_path: Path, extra, fragment) -> None:
    out = tmp_path / "run"
    r = _invoke(["--photos", str(photos), "--out", str(out), *FAST, *extra])
    _one_line_error(r, 2, fragment)
    assert not out.exists()  # nothing was created


def test_command_line_contradictions_exit_2(photos: Path, tmp_path: Path) -> None:
    _one_line_error(_invoke(["--out", str(tmp_path / "x")]), 2, "exactly one of --photos, --raw, --fivek")
    _one_line_error(_invoke(["--photos", str(photos), "--raw", str(photos), "--out", str(tmp_path / "x")]), 2,
                    "exactly one of")
    _one_line_error(_invoke(["--photos", str(photos), "--out", str(tmp_path / "x"), "--init", str(photos),
                             "--resume"]), 2, "contradict")
    _one_line_error(_invoke(["--photos", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]), 2,
                    "does not exist")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(_invoke(["--photos", str(photos), "--out", str(a_file / "run"), *FAST]), 2, "is not a folder")


def test_train_config_validates_for_library_users() -> None:
    TrainConfig()  # the defaults are valid
    bad = [dict(lr=math.nan), dict(lr=-1.0), dict(lr=0.0), dict(lr=math.inf), dict(lr=2.0), dict(lr_min=math.nan),
           dict(lr_min=-1e-9), dict(lr_min=1e-3), dict(grad_clip=math.nan), dict(grad_clip=0.0),
           dict(grad_clip=-1.0), dict(ema_decay=math.nan), dict(ema_decay=1.0), dict(ema_decay=-0.5),
           dict(steps=0), dict(steps=True), dict(steps=2.5), dict(warmup=-1), dict(seed=-1), dict(seed=2**63),
           dict(log_every=0), dict(batch_size=10, grad_accum=4), dict(lr="2e-4")]
    for kw in bad:
        with pytest.raises(ValueError):
            TrainConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------
# Data and checkpoints: exit 1, one line naming the file
# ---------------------------------------------------------------------------------------------------------------

def test_bad_data_folders_and_unreadable_photos(photos: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _invoke(["--photos", str(empty), "--out", str(tmp_path / "r1"), *FAST])
    _one_line_error(r, 1, "no photos")
    assert not (tmp_path / "r1").exists()  # a data failure leaves no empty run folder
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in photos.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "p9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing else
    r = _invoke(["--photos", str(broken), "--out", str(tmp_path / "r2"), *FAST])
    _one_line_error(r, 1, "p9.png: cannot read the photo")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (20, 20), (90, 100, 110)).save(tiny / "a.png")
    r = _invoke(["--photos", str(tiny), "--out", str(tmp_path / "r3"), *FAST])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("rawdiff-train: error: training data: no training image is large "
                                                 "enough for the patch size")
    raws = tmp_path / "raws"
    raws.mkdir()
    (raws / "notes.txt").write_text("no raw here")
    _one_line_error(_invoke(["--raw", str(raws), "--out", str(tmp_path / "r4"), *FAST]), 1, "no RAW files")
    (raws / "fake.dng").write_text("not a raw file\n" * 50)
    r = _invoke(["--raw", str(raws), "--out", str(tmp_path / "r5"), *FAST])
    if "rawpy" in r.stderr and "install" in r.stderr:  # rawpy missing: still one line
        _one_line_error(r, 1, "rawpy")
    else:
        _one_line_error(r, 1, "fake.dng")


def test_init_that_is_not_a_usable_checkpoint(photos: Path, tmp_path: Path) -> None:
    import pickle

    text = tmp_path / "model.safetensors"
    text.write_text("hello\n" * 20)
    pkl = tmp_path / "model.pt"
    pkl.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    from rawdiff_infer.checkpoint import save_checkpoint
    from rawdiff_infer.model import UNet

    other = tmp_path / "micro.safetensors"  # a real checkpoint, but not the tiny U-Net this run trains
    save_checkpoint(UNet(MICRO), other, meta=ModelMeta(model=MICRO))
    nan_ckpt = tmp_path / "nan.safetensors"  # the right U-Net with a NaN in it
    net = UNet(UNetConfig.tiny())
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(net, nan_ckpt, meta=ModelMeta(model=UNetConfig.tiny()))
    for path, fragment in ((text, "not a safetensors"), (pkl, "pickle"), (other, "not this run's"),
                           (nan_ckpt, "NaN or infinite"), (photos, "no such checkpoint")):
        out = tmp_path / f"run-{path.stem}"
        r = _invoke(["--photos", str(photos), "--out", str(out), *FAST, "--steps", "2", "--init", str(path)])
        _one_line_error(r, 1, fragment)
        assert not list(out.glob("ckpt-*"))


def test_resume_without_or_with_a_damaged_checkpoint(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _one_line_error(_invoke(["--photos", str(photos), "--out", str(out), *FAST, "--resume"]), 1, "no checkpoint yet")
    r = _invoke(["--photos", str(photos), "--out", str(out), *FAST, "--steps", "2"])
    assert r.exit_code == 0, r.stderr
    (out / "ckpt-0000002" / "train_state.safetensors").write_bytes(b"garbage")
    r = _invoke(["--photos", str(photos), "--out", str(out), *FAST, "--steps", "4", "--resume"])
    _one_line_error(r, 1, "--resume: cannot restore")


# ---------------------------------------------------------------------------------------------------------------
# Divergence: stop with one line, never a non-finite checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _all_finite(ckpt_dir: Path) -> bool:
    model, _ = load_checkpoint(ckpt_dir / "model.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(ckpt_dir / "train_state.safetensors"))
    tensors = [*model.state_dict().values(), *(v for k, v in state.items() if k.startswith("model."))]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_a_diverging_cli_run_stops_with_one_line_and_no_nonfinite_checkpoint(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _invoke(["--photos", str(photos), "--out", str(out), *FAST, "--steps", "30", "--lr", "1", "--lr-min", "0",
                 "--warmup", "0", "--log-every", "3", "--ckpt-every", "1"])
    _one_line_error(r, 1, "training diverged")
    ckpts = sorted(out.glob("ckpt-*"))
    assert ckpts, "the first steps were finite and saved"
    assert all(_all_finite(d) for d in ckpts)
    latest = out / (out / "latest").read_text().strip()
    assert latest == ckpts[-1] and (latest / "train_state.json").is_file()
    assert int(ckpts[-1].name.split("-")[1]) < 30


class _SourceTurningNaN:
    """Finite patches, then NaN from the ``bad_from``-th batch on (a data bug or an overflow upstream)."""

    def __init__(self, bad_from: int) -> None:
        self.calls, self.bad_from = 0, bad_from

    def batch(self, n: int, generator: torch.Generator):
        self.calls += 1
        cond = torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1
        target = cond.flip(1).clone()
        if self.calls >= self.bad_from:
            target[0, 0, 0, 0] = float("nan")
        return cond, target


def _micro_trainer(source, out: Path, **kw) -> Trainer:
    cfg = TrainConfig(**{**dict(steps=20, batch_size=4, lr=1e-3, warmup=1, lr_min=1e-4, log_every=5,
                                ckpt_every=3, val_every=10**6), **kw})
    return Trainer(source, out, config=cfg, meta=ModelMeta(model=MICRO), model_config=MICRO)


def test_trainer_raises_on_nonfinite_loss_and_refuses_to_save_nonfinite_weights(tmp_path: Path) -> None:
    tr = _micro_trainer(_SourceTurningNaN(bad_from=5), tmp_path / "a")
    with pytest.raises(TrainingDiverged, match="diverged") as e:
        tr.run(progress=False)
    assert e.value.step == 5 and e.value.loss is not None and math.isnan(e.value.loss)
    assert [d.name for d in sorted((tmp_path / "a").glob("ckpt-*"))] == ["ckpt-0000003"]
    assert _all_finite(tmp_path / "a" / "ckpt-0000003")
    assert (tmp_path / "a" / "latest").read_text().strip() == "ckpt-0000003"
    logged = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert logged[-1].startswith("5,nan")  # the log records what happened
    # a checkpoint step that is not a log step: the weight check before saving stops it
    tr = _micro_trainer(_SourceTurningNaN(bad_from=2), tmp_path / "b", log_every=10)
    with pytest.raises(TrainingDiverged, match="non-finite weights at step 3"):
        tr.run(progress=False)
    assert not list((tmp_path / "b").glob("ckpt-*")) and not (tmp_path / "b" / "latest").exists()
    # save() itself refuses, and writes nothing
    tr = _micro_trainer(_SourceTurningNaN(bad_from=10**9), tmp_path / "c")
    tr.train_step()
    with torch.no_grad():
        next(tr.ema.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="ema."):
        tr.save()
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Interrupts: the conventional status, one line, nothing half-written
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_interrupt_exits_with_the_signal_status_and_leaves_an_intact_checkpoint(photos: Path, tmp_path: Path,
                                                                                 sig, code, word) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rawdiff_train.cli", "--photos", str(photos), "--out", str(out), *FAST,
           "--steps", "100000", "--ckpt-every", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (out / "latest").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        time.sleep(0.5)  # mid-run, most likely between or inside checkpoint writes
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rawdiff-train: {word}"), err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind
    latest = out / (out / "latest").read_text().strip()
    assert _all_finite(latest)  # the checkpoint `latest` names is complete and loads
