"""The folder runner: a folder processed with decode / denoise / write overlapped gives exactly the one-by-one result;
errors stay per image; packing follows order and size only; nothing is left behind when a write fails."""

from __future__ import annotations

import gc
import threading
import time
import weakref
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
from rawdiff_infer.runner import FolderRunner, Outcome, Prefetch, pack
from rawdiff_infer.tiling import NonFiniteOutputError, TileConfig


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


# ---- issue 23 ------------------------------------------------------------------------------------------------------
def _returns_within(fn, seconds: float):
    """fn() in a daemon thread: (its result, its exception); fails the test if it has not returned within ``seconds``
    (a deadlocked run must not hang the test session)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"the run was still blocked after {seconds} s"
    return box.get("value"), box.get("error")


def test_a_bug_in_the_write_stage_ends_the_run_while_the_decoder_is_busy(tmp_path: Path) -> None:
    """Issue 23, bug 1: the write stage fails while the calling thread waits for the next decoded image; the run
    must end with the write stage's error, not wait forever."""
    srcs = _folder(tmp_path, [(40, 40)] * 4)
    rec = RawReconstructor(PatchwiseModel(), sampler=SamplerConfig(method="dpm", steps=1),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=8))

    failed = threading.Event()

    def slow_decode(job: Job) -> np.ndarray:
        if job.source not in srcs[:2]:  # the decode queue is empty when the first write fails
            failed.wait(10)
            time.sleep(0.2)
        return read_image(job.source).pixels

    def broken_write(job, r, px):
        time.sleep(0.3)  # the calling thread is waiting for the next decoded image by now
        failed.set()
        raise ZeroDivisionError("a bug")

    runner = FolderRunner(rec, decode=slow_decode, write=broken_write, seed=0, fail_on=(ImageError,), max_pack=1)
    _, error = _returns_within(lambda: runner.run([Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs]),
                               20)
    assert isinstance(error, ZeroDivisionError)


def test_outcomes_are_streamed_not_kept(tmp_path: Path) -> None:
    """Issue 23, bug 2: a result is released once its outcome has been reported (the run keeps only verdicts)."""
    srcs = _folder(tmp_path, [(40, 40)] * 4)
    rec = RawReconstructor(PatchwiseModel(), sampler=SamplerConfig(method="dpm", steps=1),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=8))
    earlier: list[weakref.ref] = []
    alive_then: list[int] = []

    def on_outcome(o: Outcome) -> None:
        gc.collect()
        alive_then.append(sum(r() is not None for r in earlier))
        assert o.result is not None
        earlier.append(weakref.ref(o.result.encoded))

    outcomes = _runner(rec, max_pack=1, on_outcome=on_outcome).run(
        [Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs])
    assert [o.ok for o in outcomes] == [True] * 4
    assert alive_then == [0, 0, 0, 0]


def test_a_failed_download_fails_that_image_only(tmp_path: Path) -> None:
    """Issue 23, bug 2: the copy to the host (a page-locked allocation on CUDA) failing fails its image, named."""
    srcs = _folder(tmp_path, [(40, 40)] * 4)
    rec = RawReconstructor(PatchwiseModel(), sampler=SamplerConfig(method="dpm", steps=1),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=8))
    runner = FolderRunner(rec, decode=lambda j: read_image(j.source).pixels,
                          write=lambda j, r, px: write_npy(j.outputs["npy"], r.encoded), seed=5,
                          fail_on=(ImageError, OSError, MemoryError), max_pack=2)
    download = runner.transfer.download
    calls = []

    def failing_download(tensor: torch.Tensor):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("cannot allocate 288 MB of page-locked memory")
        return download(tensor)

    runner.transfer.download = failing_download  # type: ignore[method-assign]
    outcomes = runner.run([Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs])
    by_name = {o.job.source.name: o for o in outcomes}
    assert [by_name[p.name].ok for p in srcs] == [True, False, True, True]
    assert "img1.png" in by_name["img1.png"].message and "page-locked" in by_name["img1.png"].message
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["img0.npy", "img2.npy", "img3.npy"]


class NaNOnBlack(PatchwiseModel):
    """PatchwiseModel that returns NaN for the patches of a black image (its condition is -1 everywhere)."""

    def __call__(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = super().__call__(x, c, t)
        black = (c <= -0.999).flatten(1).all(1)
        return torch.where(black[:, None, None, None], torch.full_like(eps, float("nan")), eps)


def test_a_nan_image_fails_alone_and_is_named(tmp_path: Path) -> None:
    """Issue 23: one image whose model output is NaN fails alone, with its name; the images packed with it get
    their one-by-one results."""
    srcs = _folder(tmp_path, [(40, 50), (40, 40), (30, 60)])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(srcs[1])
    out = tmp_path / "out"
    out.mkdir()
    rec = RawReconstructor(NaNOnBlack(), sampler=SamplerConfig(method="dpm", steps=3),  # type: ignore[arg-type]
                           tiles=TileConfig(stride=48, batch_size=16))
    runner = FolderRunner(rec, decode=lambda j: read_image(j.source).pixels,
                          write=lambda j, r, px: write_npy(j.outputs["npy"], r.encoded), seed=5,
                          fail_on=(ImageError, OSError, NonFiniteOutputError), max_pack=4)
    jobs = [Job(p, {"npy": out / (p.stem + ".npy")}) for p in srcs]
    outcomes = runner.run(jobs)
    by_name = {o.job.source.name: o for o in outcomes}
    assert [by_name[p.name].ok for p in srcs] == [True, False, True]
    assert runner.stats.pack_sizes == [3]  # they were packed together
    assert "img1.png" in by_name["img1.png"].message and "NaN" in by_name["img1.png"].message
    for i in (0, 2):
        alone = rec.reconstruct(read_image(srcs[i]).pixels, seed=5).encoded
        assert np.array_equal(np.load(jobs[i].outputs["npy"]), alone)


def test_pack_is_a_function_of_order_and_cost() -> None:
    costs = [1, 1, 16, 1, None, 1, 1, 3]
    groups = list(pack(range(len(costs)), lambda i: costs[i], budget=4, max_pack=2))
    # a failed item (cost None) passes alone at once, the group being filled stays open
    assert groups == [[0, 1], [2], [4], [3, 5], [6, 7]]
    assert list(pack([], lambda i: 1, budget=4, max_pack=2)) == []


def test_prefetch_raises_the_producers_error_in_the_consumer_after_its_items() -> None:
    def source():
        yield 1
        yield 2
        raise ZeroDivisionError("in the decode thread")

    got = []
    with pytest.raises(ZeroDivisionError, match="decode thread"):
        with Prefetch(source(), depth=1) as it:
            for x in it:
                got.append(x)
    assert got == [1, 2]


def test_prefetch_close_stops_the_producer() -> None:
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    it = Prefetch(source(), depth=2)
    assert next(it) == 0
    it.close()
    assert not it._thread.is_alive()
    assert len(produced) <= 5
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.gpu
def test_results_on_cuda_hold_no_page_locked_memory(tmp_path: Path) -> None:
    """Issue 23, bug 2, on a GPU: an outcome's RAW owns its memory (no ``.base`` chain to the pinned buffer)."""
    from rawdiff_infer.backends.torch import TorchBackend
    from rawdiff_infer.model import UNet

    torch.manual_seed(0)
    be = TorchBackend(UNet(TINY_CONFIG), ModelMeta(model=TINY_CONFIG), device="cuda")
    srcs = _folder(tmp_path, [(64, 96), (30, 40)])
    rec = RawReconstructor(be, sampler=SamplerConfig(method="dpm", steps=2), tiles=TileConfig(batch_size=64))
    chains: list[list[object]] = []

    def on_outcome(o: Outcome) -> None:
        assert o.result is not None
        chain, a = [], o.result.encoded
        while a is not None:
            chain.append(a)
            a = getattr(a, "base", None)
        chains.append(chain)

    outcomes = _runner(rec, on_outcome=on_outcome).run([Job(p, {"npy": tmp_path / (p.stem + ".npy")}) for p in srcs])
    assert all(o.ok for o in outcomes) and len(chains) == 2
    assert not any(isinstance(b, torch.Tensor) for chain in chains for b in chain)


@pytest.mark.parametrize("sizes", [[(40, 40), (30, 50), (40, 40), (64, 64)], [(100, 70), (40, 40), (150, 90)]])
def test_a_packed_folder_run_gives_each_image_its_one_by_one_result_bit_for_bit(tmp_path: Path, sizes) -> None:
    """Issue 23: with the real U-Net (whose CPU kernels round differently per batch size), a folder run that packs
    images into shared backend calls gives every image exactly the result it gets alone."""
    from conftest import perturbed_tiny_model

    from rawdiff_infer.backends.torch import TorchBackend

    be = TorchBackend(perturbed_tiny_model(0), ModelMeta(model=TINY_CONFIG), device="cpu", dtype=torch.float32)
    srcs = _folder(tmp_path, sizes)
    out = tmp_path / "out"
    out.mkdir()
    rec = RawReconstructor(be, sampler=SamplerConfig(method="dpm-sde", steps=2), tiles=TileConfig(batch_size=8))
    jobs = [Job(p, {"npy": out / (p.stem + ".npy")}) for p in srcs]
    runner = _runner(rec, max_pack=4)
    assert all(o.ok for o in runner.run(jobs))
    assert max(runner.stats.pack_sizes) > 1
    for p, job in zip(srcs, jobs):
        alone = rec.reconstruct(read_image(p).pixels, seed=5).encoded
        diff = float(np.abs(np.load(job.outputs["npy"]) - alone).max())
        assert diff == 0.0, f"{p.name}: {diff:.2e} from its one-by-one result"
