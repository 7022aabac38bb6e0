"""The folder runner: decode, denoise and write overlapped, small images packed into shared backend calls.

Three stages run side by side:

1. a decode thread reads the next images (and, on CUDA, stages them in page-locked memory) into a bounded queue;
2. the calling thread takes them *in order*, packs consecutive small images together (while their patches fit one
   backend batch), runs the sampler on the pack, and starts the copy of the results to the host on a dedicated
   CUDA stream (``transfer.DeviceTransfer``);
3. a write thread waits for each copy and writes the outputs atomically.

So the GPU computes the next pack while the CPU decodes and writes around it. Memory stays bounded: at most
``prefetch`` decoded images wait, and at most two packs wait to be written. Packing depends on the order and the
sizes of the images only (never on timing), so a run is reproducible; each image keeps its own seed and noise.

Errors stay per image: a file that cannot be decoded or written is reported (one line) and counted, and the others
go on. An interrupt stops decoding at once; the write in progress completes or leaves nothing (``fsio``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .consistency import Band
from .pipeline import RawReconstructor, Reconstruction
from .plan import Job
from .transfer import DeviceTransfer, PendingHost

__all__ = ["FolderRunner", "Outcome", "RunStats"]

_DONE = object()


@dataclass
class Outcome:
    """What happened to one input: ok, or the one-line reason it failed."""

    job: Job
    ok: bool
    message: str = ""
    result: Reconstruction | None = None


@dataclass
class RunStats:
    """Wall time and GPU-side timing of a run (for rawdiff-bench)."""

    wall_s: float = 0.0
    denoise_s: float = 0.0       # time the calling thread spent in the sampler (includes waiting on the device)
    packs: int = 0
    images: int = 0
    pack_sizes: list[int] = field(default_factory=list)


@dataclass
class _Decoded:
    job: Job
    pixels: np.ndarray | None
    staged: Any
    error: str | None
    band: Band | None = None


class FolderRunner:
    """Runs jobs through a RawReconstructor with decode / compute / write overlapped.

    Args:
        rec: the reconstructor (backend, sampler, tiles).
        decode: job -> H x W x 3 sRGB array, or (array, its consistency Band); raises ``fail_on`` exceptions for a
            bad input (message = one line).
        write: (job, reconstruction, srgb) -> None; raises ``fail_on`` exceptions for an output that failed.
        seed: the seed of every image (0 <= seed < 2**64).
        fail_on: exception types that fail one image (anything else is a bug and stops the run).
        max_pack: most images per pack (1 disables packing).
        prefetch: decoded images that may wait for the sampler (>= 1).
        check: job, srgb -> a one-line reason to refuse the image before compute, or None.
        on_outcome: called (from the write thread, or the calling thread) with each outcome as it is known.
        progress: factory (job names, evaluations total) -> callback(done, total) | None, and a close function.
    """

    def __init__(self, rec: RawReconstructor, *, decode: Callable[[Job], np.ndarray | tuple[np.ndarray, Band]],
                 write: Callable[[Job, Reconstruction, np.ndarray], None], seed: int,
                 fail_on: tuple[type[BaseException], ...], max_pack: int = 8, prefetch: int = 4,
                 check: Callable[[Job, np.ndarray], str | None] | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 progress: Callable[[Sequence[Job], int], tuple[Any, Callable[[], None]]] | None = None) -> None:
        if max_pack < 1 or prefetch < 1:
            raise ValueError("max_pack and prefetch must be >= 1")
        self.rec, self.decode, self.write, self.seed = rec, decode, write, int(seed)
        self.fail_on, self.max_pack, self.prefetch = fail_on, max_pack, prefetch
        self.check, self.on_outcome, self.progress = check, on_outcome, progress
        self.transfer = DeviceTransfer(rec.backend.device)
        self.stats = RunStats()
        self._stop = threading.Event()
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        #: the input being denoised now (the first of its pack), for an interrupt message
        self.current = None

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _report(self, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _fail(self, job: Job, e: BaseException | str) -> None:
        self._report(Outcome(job, False, e if isinstance(e, str) else " ".join(str(e).split())))

    # ---- stage 1: decode ---------------------------------------------------------------------------------------
    def _decoder(self, jobs: Sequence[Job], out: queue.Queue) -> None:
        try:
            for job in jobs:
                if self._stop.is_set():
                    break
                try:
                    px, band = _with_band(self.decode(job))
                    reason = self.check(job, px) if self.check is not None else None
                    item = _Decoded(job, None, None, reason) if reason else \
                        _Decoded(job, px, self.transfer.stage(px), None, band)
                except self.fail_on as e:
                    item = _Decoded(job, None, None, " ".join(str(e).split()))
                self._put(out, item)
        except BaseException as e:  # noqa: BLE001 - a bug: hand it to the calling thread
            self._error = e
        finally:
            self._put(out, _DONE)

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # ---- stage 3: write ------------------------------------------------------------------------------------------
    def _writer(self, q: queue.Queue) -> None:
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _DONE:
                return
            items, pending, seconds, stats = item
            for (job, px), host in zip(items, pending):
                if self._stop.is_set():
                    return
                try:
                    rec = self.rec.result(host.result(), seconds=seconds, pack_size=len(items), stats=stats)
                    self.write(job, rec, px)
                    self._report(Outcome(job, True, result=rec))
                except self.fail_on as e:
                    self._fail(job, e)
                except BaseException as e:  # noqa: BLE001 - a bug: stop the run, tell the calling thread
                    self._error = e
                    self._stop.set()
                    return

    # ---- stage 2: pack and denoise (the calling thread) --------------------------------------------------------
    def _packs(self, decoded: queue.Queue) -> Iterable[list[_Decoded]]:
        """Consecutive decoded images grouped while their patches fit one batch (decided by order and size only)."""
        budget = self.rec.tiles.batch_size
        pack: list[_Decoded] = []
        used = 0
        while True:
            item = decoded.get()
            if self._error is not None:
                raise self._error
            if item is _DONE:
                break
            if item.error is not None:
                self._fail(item.job, item.error)
                continue
            n = self.rec.patches_for(*item.pixels.shape[:2])
            if pack and (len(pack) >= self.max_pack or used + n > budget):
                yield pack
                pack, used = [], 0
            pack.append(item)
            used += n
        if pack:
            yield pack

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Process every job; returns the outcomes (also reported through ``on_outcome`` as they happen)."""
        start = time.perf_counter()
        decoded: queue.Queue = queue.Queue(maxsize=self.prefetch)
        to_write: queue.Queue = queue.Queue(maxsize=2)
        dec = threading.Thread(target=self._decoder, args=(jobs, decoded), name="rawdiff-decode", daemon=True)
        wri = threading.Thread(target=self._writer, args=(to_write,), name="rawdiff-write")
        dec.start()
        wri.start()
        try:
            for pack in self._packs(decoded):
                self._denoise(pack, to_write)
                if self._error is not None:
                    raise self._error
            self._put(to_write, _DONE)
            wri.join()
            if self._error is not None:
                raise self._error
        except BaseException:
            self._stop.set()
            wri.join(timeout=10)  # the write in progress completes (atomic); later ones are dropped
            raise
        finally:
            self._stop.set()
            dec.join(timeout=5)
            self.stats.wall_s = time.perf_counter() - start
        return list(self._outcomes)

    def _denoise(self, pack: list[_Decoded], to_write: queue.Queue) -> None:
        jobs = [d.job for d in pack]
        self.current = jobs[0].source
        cb, close = self.progress(jobs, self.rec.sampler.num_steps) if self.progress else (None, lambda: None)
        t0 = time.perf_counter()
        try:
            images = [self.transfer.upload(d.staged) for d in pack]
            outs = self.rec.denoise_many(images, seeds=[self.seed] * len(pack), progress=cb,
                                         bands=[d.band for d in pack])
        except self.fail_on as e:
            for d in pack:
                self._fail(d.job, e)
            return
        finally:
            close()
        pending: list[PendingHost] = [self.transfer.download(o) for o in outs]
        seconds = time.perf_counter() - t0
        self.stats.denoise_s += seconds
        self.stats.packs += 1
        self.stats.images += len(pack)
        self.stats.pack_sizes.append(len(pack))
        self._put(to_write, ([(d.job, d.pixels) for d in pack], pending, seconds, dict(self.rec.last_stats)))


def _with_band(decoded: np.ndarray | tuple[np.ndarray, Band | None]) -> tuple[np.ndarray, Band | None]:
    """A decoder's result as (pixels, band or None)."""
    return decoded if isinstance(decoded, tuple) else (decoded, None)


def default_progress(enabled: bool, file: Any) -> Callable[[Sequence[Job], int], tuple[Any, Callable[[], None]]]:
    """A tqdm bar per pack (when ``enabled``), labelled with the first image's name."""

    def make(jobs: Sequence[Job], total: int) -> tuple[Any, Callable[[], None]]:
        if not enabled:
            return None, lambda: None
        from tqdm import tqdm

        name = jobs[0].source.name + (f" +{len(jobs) - 1}" if len(jobs) > 1 else "")
        bar = tqdm(total=total, desc=name, unit="step", leave=False, file=file)

        def cb(n: int, tot: int) -> None:
            bar.total = tot
            bar.n = n
            bar.refresh()

        return cb, bar.close

    return make

