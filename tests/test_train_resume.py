"""--resume continues one run: a checkpoint trained with another noise schedule, camera or U-Net is refused with one
line naming the field (it was silently mixed into the new run's description and weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rawdiff_infer.camera import CAMERAS
from rawdiff_infer.checkpoint import ModelMeta, read_meta
from rawdiff_infer.model import UNetConfig
from rawdiff_infer.schedule import ScheduleConfig
from rawdiff_train.trainer import ResumeMismatch, TrainConfig, Trainer, check_resumable

MICRO = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(1,), head_channels=8, groups=4,
                   mid_block=False, patch_size=16)


class NoiseSource:
    """Batches of noise: enough to build and save a Trainer (nothing is trained here)."""

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1,
                torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1)


def _trainer(out: Path, meta: ModelMeta) -> Trainer:
    return Trainer(NoiseSource(), out, config=TrainConfig(steps=2, batch_size=2, warmup=1), meta=meta,
                   model_config=meta.model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    return _trainer(out, ModelMeta(model=MICRO)).save()


def test_the_same_description_resumes(saved: Path, tmp_path: Path) -> None:
    tr = _trainer(tmp_path, ModelMeta(model=MICRO))
    tr.load(saved)
    assert tr.step == 0


@pytest.mark.parametrize("change, field", [
    (dict(schedule=ScheduleConfig(kind="linear")), "schedule.kind"),
    (dict(schedule=ScheduleConfig(beta_end=0.02)), "schedule.beta_end"),
    (dict(camera=CAMERAS["canon-eos-5d"]), "camera."),
])
def test_another_schedule_or_camera_is_refused(saved: Path, tmp_path: Path, change: dict, field: str) -> None:
    tr = _trainer(tmp_path, ModelMeta(model=MICRO, **change))
    before = {k: v.clone() for k, v in tr.ema.state_dict().items()}
    with pytest.raises(ResumeMismatch) as e:
        tr.load(saved)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(saved)) and f"trained with {field}" in msg, msg
    assert "train into a new --out" in msg
    assert all(torch.equal(before[k], v) for k, v in tr.ema.state_dict().items())  # nothing was restored


def test_check_resumable_compares_the_stored_description(saved: Path) -> None:
    stored = read_meta(saved / "model.safetensors")
    check_resumable(stored, ModelMeta(model=MICRO), saved)  # the JSON round trip compares equal
    with pytest.raises(ResumeMismatch, match=r"model\.base_channels = 8, this run has 16"):
        check_resumable(stored, ModelMeta(model=dataclasses.replace(MICRO, base_channels=16)), saved)
