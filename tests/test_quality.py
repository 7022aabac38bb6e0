"""The bundled model's quality per model evaluation, on crops of photos it never saw (the regression guard of the
sampler defaults). Measured with these very crops, seeds and settings on the CPU (fp32): see the docstring of
each test; the assertions keep margins below those figures."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HELD_OUT_SHARED = ("kodim03.png", "kodim07.png", "kodim13.png")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The bundled model and centre crops (128 x 128) of four held-out photos, rendered by its synthetic camera."""
    import shutil

    from rawdiff_bench.evaluate import baseline_rows, photo_cases
    from rawdiff_infer.backends import default_checkpoint
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_train.heldout import HELD_OUT_PHOTOS

    ckpt = default_checkpoint()
    if ckpt is None:
        pytest.skip("this build has no bundled model")
    be = TorchBackend.from_checkpoint(ckpt)
    trained_on = set(be.meta.provenance["train_files"]) | set(be.meta.provenance["initialised_from"]["train_files"])
    d = tmp_path_factory.mktemp("heldout")
    for name in HELD_OUT_SHARED:
        shutil.copy(shared_data / "photos" / name, d / name)
    shutil.copy(REPO / "train" / "photos" / "grace_hopper.jpg", d / "grace_hopper.jpg")
    assert not trained_on & {p.name for p in d.iterdir()}  # never trained on
    assert {Path(n).stem for n in HELD_OUT_SHARED} | {"grace_hopper"} <= {Path(h).stem for h in HELD_OUT_PHOTOS}
    cases = photo_cases(d, be.meta.camera, crop=128)
    return be, cases, statistics.fmean(r.psnr for r in baseline_rows(cases))


def _mean(be, cases, spec: str) -> float:
    from rawdiff_bench.evaluate import evaluate
    from rawdiff_infer.tiling import TileConfig

    rows = evaluate(be, cases, [spec], seeds=(0, 1), tiles=TileConfig(batch_size=64))
    return statistics.fmean(r.psnr for r in rows)


def test_defaults_beat_the_previous_default_at_half_the_evaluations(bench) -> None:
    """The default sampler (10 evaluations) against the previous default, dpm-sde 2M at 20 on the logSNR grid;
    the deterministic dpm at 20 within 1 dB of it.

    Measured here (CPU, fp32; 4 crops x 2 seeds): baseline 15.04, previous default at 20 evaluations 27.26, the
    default at 10 evaluations 26.72, dpm at 20 26.80 dB. On the larger study of benchmarks/RESULTS.md (24 crops x
    4 seeds) the default at 10 gains 0.19 dB over the previous default at 20: the two are tied within the spread
    over seeds (about 1 dB per seed mean here), so the guard is "within 0.75 dB", not "above"."""
    from rawdiff_infer.pipeline import SamplerConfig

    be, cases, baseline = bench
    default = SamplerConfig()
    assert default.num_steps <= 10
    previous = _mean(be, cases, "dpm-sde:20:order=2,spacing=logSNR")
    got = _mean(be, cases, f"{default.method}:{default.num_steps}")
    deterministic = _mean(be, cases, "dpm:20")
    print(f"baseline {baseline:.2f}, previous default {previous:.2f}, default ({default.label()}) {got:.2f}, "
          f"dpm 20 {deterministic:.2f} dB")
    assert got >= previous - 0.75
    assert deterministic >= previous - 1.0
    assert got > baseline + 8.0
