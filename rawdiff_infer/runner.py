"""The folder runner: decode, denoise and write overlapped, small images packed into shared backend calls.

Three stages run side by side:

1. a decode thread (``Prefetch``) reads the next images (and, on CUDA, stages them in page-locked memory), at most
   ``prefetch`` ahead; an unexpected error there is raised again in the calling thread;
2. the calling thread groups consecutive images (``pack``: while their patches fit one backend batch, decided by
   order and size only, so a run is reproducible), runs the sampler on each pack, and starts the copy of the
   results to the host (``transfer.DeviceTransfer``, its own CUDA stream per direction);
3. a one-worker executor waits for each copy and writes the outputs atomically; its futures carry an unexpected
   write error back to the calling thread, which ends the run with it.

So the GPU computes the next pack while the CPU decodes and writes around it. Memory stays bounded: at most
``prefetch`` decoded images wait, at most two packs wait to be written, and outcomes are not kept: each is handed
to ``on_outcome`` as soon as it is known (a result copied out of page-locked memory) and only its verdict is
kept. Each image keeps its own seed and noise, and the tiler's fixed backend-call shape makes its result exactly
the one it gets alone.

Errors stay per image: a file that cannot be decoded or written, a copy to the host that fails, a model output
with NaN (the other images of its pack are computed again without it) are reported in one line naming the file
and counted, and the others go on. Anything else is a bug and ends the run, as does an interrupt; the write in
progress completes or leaves nothing (``fsio``), later ones are dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from .consistency import Band
from .messages import show_path
from .pipeline import RawReconstructor, Reconstruction
from .plan import Job
from .tiling import NonFiniteOutputError
from .transfer import DeviceTransfer, PendingHost

__all__ = ["FolderRunner", "Outcome", "Prefetch", "RunStats", "default_progress", "pack"]

T = TypeVar("T")
#: packs that may wait to be written while the next one is computed
_WRITE_WINDOW = 2


@dataclass(frozen=True)
class Outcome:
    """What happened to one input: ok (with its reconstruction), or the one-line reason it failed."""

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


@dataclass(eq=False)
class _Decoded:
    """A decoded input (pixels, staged host tensor, band), or the one-line reason it was refused."""

    job: Job
    pixels: np.ndarray | None = None
    staged: Any = None
    band: Band | None = None
    error: str | None = None


def pack(items: Iterable[T], cost: Callable[[T], int | None], *, budget: int, max_pack: int) -> Iterator[list[T]]:
    """Consecutive items grouped while their costs sum to at most ``budget`` and they are at most ``max_pack``
    (an item costing more than ``budget`` goes alone). Depends on the order and the costs only. An item whose cost
    is None (a failed input) is passed on at once, alone, without closing the group being filled."""
    group: list[T] = []
    used = 0
    for item in items:
        n = cost(item)
        if n is None:
            yield [item]
            continue
        if group and (len(group) >= max_pack or used + n > budget):
            yield group
            group, used = [], 0
        group.append(item)
        used += n
    if group:
        yield group


class _Raised:
    """An exception of the producer thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class Prefetch(Generic[T]):
    """Iterates ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    The producer's exception is raised again by ``next`` in the consumer, after the items before it. ``close`` (or
    leaving the ``with`` block) stops the producer after the item in progress and drops the waiting ones.
    """

    def __init__(self, source: Iterable[T], depth: int, name: str = "rawdiff-prefetch") -> None:
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._produce, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                if not self._offer(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._offer(_Raised(e))
            return
        self._offer(_END)

    def _offer(self, item: object) -> bool:
        """Put ``item`` when there is room; False (dropped) once closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetch[T]":
        return self

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Raised):
            self._ended = True
            if isinstance(item, _Raised):
                raise item.error
            raise StopIteration
        return item

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer and drop what waits; waits up to ``timeout`` seconds for the item in progress."""
        self._closed.set()
        self._ended = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Report = Callable[[Outcome], None]
Progress = Callable[[Sequence[Job], int], tuple[Any, Callable[[], None]]]


class FolderRunner:
    """Runs jobs through a RawReconstructor with decode / compute / write overlapped (see the module docstring).

    Args:
        rec: the reconstructor (backend, sampler, tiles).
        decode: job -> H x W x 3 sRGB array, or (array, its consistency Band); raises ``fail_on`` exceptions for a
            bad input (message = one line naming the file).
        write: (job, reconstruction, srgb) -> None; raises ``fail_on`` exceptions for an output that failed
            (message = one line naming the file).
        seed: the seed of every image (0 <= seed < 2**64).
        fail_on: exception types that fail one image (anything else is a bug and stops the run).
        max_pack: most images per pack (1 disables packing).
        prefetch: decoded images that may wait for the sampler (>= 1).
        check: job, srgb -> a one-line reason to refuse the image before compute, or None.
        on_outcome: called with each outcome as soon as it is known, one call at a time (from the write worker for
            written images, from the calling thread otherwise); an exception there ends the run.
        progress: factory (job names, evaluations total) -> callback(done, total) | None, and a close function.
    """

    def __init__(self, rec: RawReconstructor, *, decode: Callable[[Job], np.ndarray | tuple[np.ndarray, Band]],
                 write: Callable[[Job, Reconstruction, np.ndarray], None], seed: int,
                 fail_on: tuple[type[BaseException], ...], max_pack: int = 8, prefetch: int = 4,
                 check: Callable[[Job, np.ndarray], str | None] | None = None,
                 on_outcome: Report | None = None, progress: Progress | None = None) -> None:
        if max_pack < 1 or prefetch < 1:
            raise ValueError("max_pack and prefetch must be >= 1")
        self.rec, self.decode, self.write, self.seed = rec, decode, write, int(seed)
        self.fail_on, self.max_pack, self.prefetch = fail_on, max_pack, prefetch
        self.check, self.on_outcome, self.progress = check, on_outcome, progress
        self.transfer = DeviceTransfer(rec.backend.device)
        self.stats = RunStats()
        #: the input being denoised now (the first of its pack), for an interrupt message (calling thread only)
        self.current = None

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Process every job. Each outcome goes to ``on_outcome`` as it is known; returns the verdicts (outcomes
        without their reconstructions, which are not kept)."""
        start = time.perf_counter()
        verdicts: list[Outcome] = []
        report = self._reporter(verdicts)
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rawdiff-write")
        try:
            with Prefetch(map(self._decode_one, jobs), self.prefetch, "rawdiff-decode") as decoded:
                waiting: deque[list[Future[None]]] = deque()
                for group in pack(decoded, self._cost, budget=self.rec.tiles.batch_size, max_pack=self.max_pack):
                    if group[0].error is not None:
                        report(Outcome(group[0].job, False, group[0].error))
                        continue
                    waiting.append(self._denoise(group, writer, report))
                    _settle(waiting, keep=_WRITE_WINDOW)
                _settle(waiting, keep=0)
        finally:
            writer.shutdown(wait=True, cancel_futures=True)  # the write in progress completes; later ones dropped
            self.stats.wall_s = time.perf_counter() - start
        return verdicts

    def _reporter(self, verdicts: list[Outcome]) -> Report:
        """Hands each outcome to ``on_outcome`` (one at a time) and keeps its verdict only."""
        lock = threading.Lock()

        def report(outcome: Outcome) -> None:
            with lock:
                verdicts.append(replace(outcome, result=None))
                if self.on_outcome is not None:
                    self.on_outcome(outcome)

        return report

    # ---- stage 1: decode (the prefetch thread) -------------------------------------------------------------
    def _decode_one(self, job: Job) -> _Decoded:
        try:
            px, band = _with_band(self.decode(job))
            reason = self.check(job, px) if self.check is not None else None
            if reason:
                return _Decoded(job, error=reason)
            return _Decoded(job, px, self.transfer.stage(px), band)
        except self.fail_on as e:
            return _Decoded(job, error=_one_line(e))

    def _cost(self, item: _Decoded) -> int | None:
        """Patches per model evaluation of a decoded image (None: it failed)."""
        return None if item.pixels is None else self.rec.patches_for(*item.pixels.shape[:2])

    # ---- stage 2: denoise (the calling thread) --------------------------------------------------------------
    def _denoise(self, group: list[_Decoded], writer: ThreadPoolExecutor, report: Report) -> list[Future[None]]:
        """Denoise a pack, start each result's copy to the host and queue its write; the write futures."""
        jobs = [d.job for d in group]
        self.current = jobs[0].source
        cb, close = self.progress(jobs, self.rec.sampler.num_steps) if self.progress else (None, lambda: None)
        t0 = time.perf_counter()
        try:
            done, failed = self._compute(group, cb)
        finally:
            close()
        for d, e in failed:
            report(_computation_failed(d.job, e))
        seconds = time.perf_counter() - t0
        self.stats.denoise_s += seconds
        self.stats.packs += 1
        self.stats.images += len(group)
        self.stats.pack_sizes.append(len(group))
        stats = dict(self.rec.last_stats)
        futures = []
        for d, out in done:
            try:
                pending = self.transfer.download(out)
            except self.fail_on as e:
                report(_computation_failed(d.job, e))
                continue
            futures.append(writer.submit(self._write_one, d, pending, seconds, len(group), stats, report))
        return futures

    def _compute(self, group: list[_Decoded], cb: Any) -> tuple[list[tuple[_Decoded, torch.Tensor]],
                                                                  list[tuple[_Decoded, BaseException]]]:
        """(image, encoded RAW on the device) for the images that succeeded, (image, error) for the others. When
        the model gives NaN for some images of a pack, they fail alone and the others are computed again."""
        try:
            outs = self.rec.denoise_many([self.transfer.upload(d.staged) for d in group],
                                         seeds=[self.seed] * len(group), progress=cb,
                                         bands=[d.band for d in group])
            return list(zip(group, outs)), []
        except self.fail_on as e:
            if not isinstance(e, NonFiniteOutputError) or len(group) == 1:
                return [], [(d, e) for d in group]
            bad = {i for i in e.bad if 0 <= i < len(group)}
            # the culprits fail; the others again without them (one by one when the culprits are unknown)
            rest = [d for i, d in enumerate(group) if i not in bad]
            parts = [rest] if bad else [[d] for d in group]
            done: list[tuple[_Decoded, torch.Tensor]] = []
            failed: list[tuple[_Decoded, BaseException]] = [(group[i], e) for i in sorted(bad)]
            for part in parts:
                if part:
                    ok, ko = self._compute(part, cb)
                    done += ok
                    failed += ko
            return done, failed

    # ---- stage 3: write (the write worker) ---------------------------------------------------------------
    def _write_one(self, d: _Decoded, pending: PendingHost, seconds: float, pack_size: int, stats: dict,
                   report: Report) -> None:
        assert d.pixels is not None
        try:
            encoded = pending.result()
        except self.fail_on as e:
            report(_computation_failed(d.job, e))
            return
        rec = self.rec.result(encoded, seconds=seconds, pack_size=pack_size, stats=stats)
        try:
            self.write(d.job, rec, d.pixels)
        except self.fail_on as e:
            report(Outcome(d.job, False, _one_line(e)))
            return
        report(Outcome(d.job, True, result=rec))


def _settle(waiting: deque[list[Future[None]]], keep: int) -> None:
    """Wait for the oldest packs' writes until at most ``keep`` packs wait, and raise the first unexpected error of
    any write that has ended."""
    while len(waiting) > keep:
        for f in waiting.popleft():
            f.result()
    for futures in waiting:
        for f in futures:
            if f.done():
                f.result()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _computation_failed(job: Job, e: BaseException) -> Outcome:
    """A failure of the computation (not of the job's own decode or write callbacks): the line names the input."""
    return Outcome(job, False, f"{show_path(job.source)}: {_one_line(e)}")


def _with_band(decoded: np.ndarray | tuple[np.ndarray, Band | None]) -> tuple[np.ndarray, Band | None]:
    """A decoder's result as (pixels, band or None)."""
    return decoded if isinstance(decoded, tuple) else (decoded, None)


def default_progress(enabled: bool, file: Any) -> Progress:
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
