"""The folder runner: a folder processed with decode / denoise / write overlapped gives exactly the one-by-one result;
errors stay per image; packing follows order and size only; nothing is left behind when a write fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from PIL import Image

from rawdiff_infer.checkpoint import ModelMeta
from rawdiff_infer.io import ImageError, read_image, write_npy
from rawdiff_infer.pipeline import RawReconstructor, SamplerConfig
from rawdiff_infer.plan import Job
from rawdiff_infer.runner import FolderRunner
from rawdiff_infer.tiling import TileConfig


class PatchwiseModel:
    """Batch-invariant eps model with spatial context (each patch on its own), so any packing of the patches gives
    the same numbers bit for bit."""

    device = torch.device("cpu")
    input_dtype = torch.float32
    capturable = False
    patch_size = 64
    fixed_patch_size = False

    def __init__(self) -> None:
        self.meta = ModelMeta(model=TINY_CONFIG)
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        out = []
        for i in range(x.shape[0]):
            xi = torch.nn.functional.avg_pool2d(torch.cat([x[i:i + 1], c[i:i + 1]], 1), 3, 1, 1)
            out.append(torch.tanh(xi[:, :3] - 0.5 * xi[:, 3:]) * (1 + t[i] / 1000))
        return torch.cat(out)


def _folder(tmp: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = tmp / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _runner(rec: RawReconstructor, **kw) -> FolderRunner:
    return FolderRunner(rec, decode=lambda j: read_image(j.source).pixels,
                        write=lambda j, r, px: write_npy(j.outputs["npy"], r.encoded), seed=5,
                        fail_on=(ImageError, OSError, ValueError), **kw)


@pytest.mark.parametrize("method", ["dpm-sde", "dpm"])
def test_folder_output_equals_one_by_one_output(tmp_path: Path, method: str) -> None:
    sizes = [(40, 50), (64, 64), (20, 130), (150, 90), (33, 33), (70, 20)]
    srcs = _folder(tmp_path, sizes)
    out = tmp_path / "out"
    out.mkdir()
    model = PatchwiseModel()
    rec = RawReconstructor(model, sampler=SamplerConfig(method=method, steps=4),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=40, batch_size=12))
    jobs = [Job(p, {"npy": out / (p.stem + ".npy")}) for p in srcs]
    runner = _runner(rec, max_pack=4, prefetch=2)
    outcomes = runner.run(jobs)
    assert all(o.ok for o in outcomes) and len(outcomes) == len(jobs)
    assert runner.stats.packs < len(jobs)  # small images shared backend calls
    for p, job in zip(srcs, jobs):
        alone = rec.reconstruct(read_image(p).pixels, seed=5).encoded
        assert np.array_equal(np.load(job.outputs["npy"]), alone)


def test_packing_follows_order_and_size(tmp_path: Path) -> None:
    sizes = [(30, 30), (30, 30), (200, 200), (30, 30), (30, 30), (30, 30)]
    srcs = _folder(tmp_path, sizes)
    model = PatchwiseModel()
    rec = RawReconstructor(model, sampler=SamplerConfig(method="dpm", steps=1),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=64, batch_size=4))
    runner = _runner(rec, max_pack=2)
    runner.run([Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs])
    # one patch each for the small images, 16 for the large one: [2 small] [large] [2 small] [1 small]
    assert runner.stats.pack_sizes == [2, 1, 2, 1]


def test_errors_stay_per_image_and_nothing_is_left_behind(tmp_path: Path) -> None:
    srcs = _folder(tmp_path, [(40, 40), (40, 40), (40, 40)])
    srcs[1].write_bytes(b"not an image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "img2.npy").mkdir()  # the third output cannot be written
    model = PatchwiseModel()
    rec = RawReconstructor(model, sampler=SamplerConfig(method="dpm", steps=2),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=8))
    outcomes = _runner(rec).run([Job(p, {"npy": out / (p.stem + ".npy")}) for p in srcs])
    by_name = {o.job.source.name: o for o in outcomes}
    assert by_name["img0.png"].ok
    assert not by_name["img1.png"].ok and "img1.png" in by_name["img1.png"].message
    assert not by_name["img2.png"].ok and "img2.npy" in by_name["img2.png"].message
    assert sorted(p.name for p in out.iterdir()) == ["img0.npy", "img2.npy"]
    assert (out / "img2.npy").is_dir()


def test_a_bug_in_a_worker_stops_the_run(tmp_path: Path) -> None:
    srcs = _folder(tmp_path, [(40, 40)] * 3)
    rec = RawReconstructor(PatchwiseModel(), sampler=SamplerConfig(method="dpm", steps=1),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=8))

    def broken_write(job, r, px):
        raise ZeroDivisionError("a bug")

    runner = FolderRunner(rec, decode=lambda j: read_image(j.source).pixels, write=broken_write, seed=0,
                          fail_on=(ImageError,))
    with pytest.raises(ZeroDivisionError):
        runner.run([Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs])


@pytest.mark.gpu
def test_pinned_copies_on_the_copy_stream_give_the_same_result_on_cuda(tmp_path: Path) -> None:
    """On a GPU the runner stages images in pinned memory and copies on its own stream; the result must be the
    image's reconstruction alone on the same device."""
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.model import UNet

    torch.manual_seed(0)
    be = TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), device="cuda")
    srcs = _folder(tmp_path, [(64, 96), (30, 40), (128, 64)])
    out = tmp_path / "out"
    out.mkdir()
    rec = RawReconstructor(be, sampler=SamplerConfig(method="dpm-sde", steps=3), tiles=TileConfig(batch_size=64))
    jobs = [Job(p, {"npy": out / (p.stem + ".npy")}) for p in srcs]
    assert all(o.ok for o in _runner(rec).run(jobs))
    for p, job in zip(srcs, jobs):
        alone = rec.reconstruct(read_image(p).pixels, seed=5).encoded
        assert np.abs(np.load(job.outputs["npy"]) - alone).max() < 1e-3
