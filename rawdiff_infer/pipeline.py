"""RawReconstructor: sRGB images in, camera RAW out.

Holds a backend, the model's schedule and RAW encoding, sampler settings and tiling options; maps sRGB arrays
(H x W x 3, uint8 / uint16 / float) to the reconstructed RAW (H x W x 3 float32, linear and gamma-encoded).

Several images can be reconstructed together (``reconstruct_many``): their canvases are packed into one tensor that
the sampler advances at once, and their patches share backend calls, which fills the batches of small images. Each
image keeps its own seed, its own starting noise and its own noise stream, and every backend call has one shape
(``TileConfig.chunk``), so its result is the one it gets alone, bit for bit.

Memory stays bounded for large images: patches are streamed through the backend in batches, the canvas (state, eps
and the solver history) is kept once in fp32 on the backend's device, and the sRGB condition is unfolded once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends.base import Backend
from .consistency import Band, ConsistencyConfig, ConsistencySet, pack_projector
from .formulation import FormulatedEps
from .rawspace import RawEncoding, model_to_unit, srgb_to_model
from .samplers import DEFAULT_METHOD, SPECS, NoiseSampler, check_options, sample
from .schedule import Schedule
from .tiling import (CanvasPack, GraphedDenoiser, NonFiniteOutputError, PatchGrid, TileConfig, TiledDenoiser,
                     sample_independent)

__all__ = ["ConsistencyConfig", "SamplerConfig", "RawReconstructor", "Reconstruction", "band_of"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler choice (see ``samplers.SPECS`` for the methods and their defaults).

    Attributes:
        method: one of ``samplers.SAMPLERS`` (default ``samplers.DEFAULT_METHOD``).
        steps: model evaluations, 1..1000 (None: the method's default).
        eta: stochasticity in [0, 1] for ddim, dpm and dpm-sde (None: the method's default).
        order: solver order (None: the method's default).
        spacing: timestep grid (None: the method's default).
        clip_x0: static clamp of the x0 prediction in model space (None: off).
    """

    method: str = DEFAULT_METHOD
    steps: int | None = None
    eta: float | None = None
    order: int | None = None
    spacing: str | None = None
    clip_x0: float | None = 1.0

    def __post_init__(self) -> None:
        check_options(self.method, steps=self.steps, eta=self.eta, order=self.order, spacing=self.spacing,
                      clip_x0=self.clip_x0)

    @property
    def num_steps(self) -> int:
        """Model evaluations this configuration makes."""
        return self.steps or SPECS[self.method].default_steps

    def kwargs(self) -> dict:
        """Keyword arguments for ``samplers.sample``."""
        kw: dict = {"method": self.method, "steps": self.num_steps, "clip_x0": self.clip_x0}
        for name in ("eta", "order", "spacing"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    @classmethod
    def from_spec(cls, spec: str) -> "SamplerConfig":
        """Parse ``METHOD[:STEPS][:key=value,...]``, e.g. ``dpm-sde:10``, ``dpm:20:order=3,spacing=karras``,
        ``ddim:50:eta=1``. Raises ValueError naming the problem."""
        parts = spec.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"sampler spec {spec!r}: write METHOD[:STEPS][:key=value,...]")
        kw: dict = {"method": parts[0]}
        if len(parts) > 1 and parts[1]:
            try:
                kw["steps"] = int(parts[1])
            except ValueError:
                raise ValueError(f"sampler spec {spec!r}: steps {parts[1]!r} is not an integer") from None
        if len(parts) > 2 and parts[2]:
            for item in parts[2].split(","):
                key, _, value = item.partition("=")
                if key not in _SPEC_OPTIONS or not value:
                    raise ValueError(f"sampler spec {spec!r}: unknown option {item!r} (known: "
                                     f"{', '.join(_SPEC_OPTIONS)})")
                try:
                    kw[key] = _SPEC_OPTIONS[key](value)
                except ValueError:
                    raise ValueError(f"sampler spec {spec!r}: bad value for {key}: {value!r}") from None
        return cls(**kw)

    def label(self) -> str:
        """Short description for logs and tables, e.g. ``dpm-sde 20``."""
        extra = [f"{k}={getattr(self, k)}" for k in ("eta", "order", "spacing") if getattr(self, k) is not None]
        return f"{self.method} {self.num_steps}" + (f" ({', '.join(extra)})" if extra else "")


def _none_or_float(v: str) -> float | None:
    return None if v.lower() == "none" else float(v)


#: options a sampler spec may set, with their parsers
_SPEC_OPTIONS: dict[str, Callable[[str], object]] = {"eta": float, "order": int, "spacing": str,
                                                      "clip_x0": _none_or_float}


@dataclass
class Reconstruction:
    """Result for one image: RAW in the model's gamma-encoded space and linear, both H x W x 3 float32 in [0, 1].

    Attributes:
        encoded: the gamma-encoded RAW (what PSNR is measured on).
        patches: patches per model evaluation for this image.
        steps: model evaluations.
        seconds: wall time of the reconstruction (of the whole pack when several images shared it).
        gamma: the model's RAW encoding gamma.
        extra: details (``step_graph``, ``pack_size``).
    """

    encoded: np.ndarray
    patches: int
    steps: int
    seconds: float
    gamma: float = 2.2
    extra: dict = field(default_factory=dict)

    @property
    def linear(self) -> np.ndarray:
        return RawEncoding(self.gamma).decode(self.encoded)


def packed_noise(pack: CanvasPack, generators: Sequence[torch.Generator]) -> NoiseSampler:
    """A noise sampler over a pack: every canvas draws its own noise from its own generator, in its own shape, as
    it would alone; the draws are packed like the canvases."""

    def draw(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32).to(x.device, x.dtype)
                 for shape, g in zip(pack.shapes, generators)]
        return pack.pack(parts)

    return draw


def band_of(image: np.ndarray | torch.Tensor, width_8bit: float | None = None) -> Band:
    """The band of an image from its sample type alone (uint8: 255 levels; uint16 and its int32 host form, and
    floats: 65535), lossless unless ``width_8bit`` says otherwise. A JPEG's band comes from its quantisation
    tables instead (``Band.for_input`` with the quality the decoder estimated)."""
    eight = image.dtype in (np.uint8, torch.uint8)
    return Band.for_input(255 if eight else 65535, width_8bit=width_8bit)


class RawReconstructor:
    """Maps sRGB photos to camera RAW with a diffusion backend.

    Args:
        backend: any Backend (torch, onnx, trt, aoti); its ``meta`` supplies the schedule, encoding and camera.
        sampler: SamplerConfig.
        tiles: TileConfig (patch size must match the model's training patch unless you know better).
        step_graph: record the whole model evaluation of a sampler step (every patch batch and the fusion) as one
            CUDA graph and replay it (``tiling.GraphedDenoiser``); needs step fusion on the overlap grid and a
            capturable backend on CUDA. The graph is kept for the last image size, so a run of same-sized photos
            records it once. Used for a lone image whose patches are all evaluated: where consistency skips
            patches (the default), skipping halves the work and wins; packed images run the backend's own calls.
            Off by default: on an H200 at 2048x2048 (batches of 1024 patches) it measured no faster than per-batch
            launches, and its memory pool holds the U-Net's intermediates (+3.5 GiB there).
        consistency: ConsistencyConfig. When the model describes its ISP (``meta.isp``) and the mode is not "off",
            every x0 prediction is projected onto the RAWs that the ISP renders to the input (``consistency.py``),
            and so is the output. ``consistent`` says whether this reconstructor does it.

    The model's formulation (``meta.formulation``: eps or x0 prediction, over the RAW or its residual over the
    closed form) is applied by ``formulation.FormulatedEps`` between the tiler and the sampler; a model of the
    default formulation (eps over the RAW) without consistency runs the tiler's output as it is.

    Raises:
        ValueError: an impossible combination (step_graph without its requirements, consistency "on" for a model
            without an ISP, merge "end" for a model whose formulation is not eps over the RAW).
    """

    def __init__(self, backend: Backend, *, sampler: SamplerConfig | None = None,
                 tiles: TileConfig | None = None, step_graph: bool = False,
                 consistency: ConsistencyConfig | None = None) -> None:
        self.backend = backend
        self.sampler = sampler or SamplerConfig()
        self.tiles = tiles or TileConfig(patch_size=backend.patch_size)
        self.schedule = Schedule(backend.meta.schedule)
        self.meta = backend.meta
        if step_graph and not (backend.capturable and backend.device.type == "cuda" and self.tiles.merge == "step"
                               and self.tiles.grid == "overlap"):
            raise ValueError("step_graph needs step fusion on the overlap grid and a capturable backend on CUDA "
                             "(the torch backend)")
        self.step_graph = step_graph
        self._graphed: GraphedDenoiser | None = None
        self.consistency = consistency or ConsistencyConfig()
        self.formulation = self.meta.formulation
        if self.tiles.merge == "end" and not self.formulation.is_default:
            raise ValueError(f"merge 'end' (the paper's independent patches) runs eps models over the RAW only; this "
                             f"model is {self.formulation.label()}: use merge 'step'")
        if self.consistency.mode == "on" and self.meta.isp is None:
            raise ValueError("consistency 'on' needs a model that describes its ISP (its description has no 'isp')")
        #: whether x0 predictions and outputs are projected onto the input's consistent set
        self.consistent = self.meta.isp is not None and self.consistency.mode != "off"
        self._graph_set: ConsistencySet | None = None
        self._graph_eps: FormulatedEps | None = None
        #: details of the last denoise_many call (see there)
        self.last_stats: dict = {}

    def close(self) -> None:
        """Drop the recorded step graph (the backend stays open; it belongs to the caller)."""
        if self._graphed is not None:
            self._graphed.close()
            self._graphed = None
        self._graph_set = self._graph_eps = None

    def patches_for(self, height: int, width: int) -> int:
        """Patches per model evaluation for an image of this size (pixels)."""
        if self.tiles.grid == "shifted":
            P = self.tiles.patch_size
            return -(-height // P) * -(-width // P)
        return PatchGrid(height, width, self.tiles, "cpu").num_patches

    def reconstruct(self, srgb: np.ndarray, *, seed: int = 0, progress: Progress | None = None,
                    band: Band | None = None) -> Reconstruction:
        """sRGB H x W x 3 (uint8, uint16 or float in [0, 1]) -> Reconstruction. Same seed, same output (per device
        and backend). ``band``: the input's quantisation band (None: ``band_of`` the image)."""
        return self.reconstruct_many([srgb], seeds=[seed], progress=progress, bands=[band])[0]

    def reconstruct_many(self, images: Sequence[np.ndarray], *, seeds: Sequence[int],
                         progress: Progress | None = None,
                         bands: Sequence[Band | None] | None = None) -> list[Reconstruction]:
        """Several images at once, their patches sharing backend calls (see the module docstring).

        Args:
            images: sRGB H_i x W_i x 3 arrays (uint8, uint16 or float in [0, 1]).
            seeds: one seed per image, 0 <= seed < 2**64.
            progress: called as progress(evaluations_done, evaluations_total).
            bands: per image its quantisation band, or None for ``band_of`` the image (used when consistent).
        """
        start = time.perf_counter()
        outs = self.denoise_many(images, seeds=seeds, progress=progress, bands=bands)
        encoded = [o.cpu().numpy() for o in outs]
        seconds = time.perf_counter() - start
        return [self.result(e, seconds=seconds, pack_size=len(images)) for e in encoded]

    def result(self, encoded: np.ndarray, *, seconds: float, pack_size: int = 1,
               stats: dict | None = None) -> Reconstruction:
        """Wrap an encoded H x W x 3 RAW from ``denoise_many`` (copied to the host) as a Reconstruction; ``stats``:
        that call's ``last_stats`` (default: the latest call's)."""
        extra = {"step_graph": False, "pack_size": pack_size, "consistent": self.consistent,
                 **(self.last_stats if stats is None else stats)}
        return Reconstruction(encoded=encoded, patches=self.patches_for(*encoded.shape[:2]),
                              steps=self.sampler.num_steps, seconds=seconds, gamma=self.meta.encoding.gamma,
                              extra=extra)

    def denoise_many(self, images: Sequence[np.ndarray | torch.Tensor], *, seeds: Sequence[int],
                     progress: Progress | None = None,
                     bands: Sequence[Band | None] | None = None) -> list[torch.Tensor]:
        """The device half of ``reconstruct_many``: the encoded RAW of each image as an H x W x 3 float32 tensor
        in [0, 1] on the backend's device (the caller copies it to the host, e.g. asynchronously).

        ``images`` may also be tensors prepared by ``rawspace.host_srgb`` (pinned, or already on the device).
        ``bands`` as for ``reconstruct_many``. After the call ``last_stats`` holds ``evaluated_patches`` (per model
        evaluation, all images), ``inconsistent_pixels`` (pixels no RAW of the ISP renders to; 0 when off) and
        ``step_graph`` (whether the whole-step CUDA graph ran)."""
        if len(images) != len(seeds) or not images:
            raise ValueError("give one seed per image (and at least one image)")
        if bands is not None and len(bands) != len(images):
            raise ValueError("give one band per image (or none)")
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                raise ValueError(f"expected an H x W x 3 image, got shape {tuple(img.shape)}")
        dev = self.backend.device
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        bands = [b if b is not None else band_of(img, self.consistency.band)
                 for img, b in zip(images, bands or [None] * len(images))]
        with torch.inference_mode():
            if self.tiles.merge == "end":
                outs = [self._independent(img, g, progress, band) for img, g, band in zip(images, gens, bands)]
            else:
                outs = self._fused(images, gens, progress, bands)
            # H x W x 3 laid out on the device, so the copy to the host is the only host-side work
            encoded = [model_to_unit(x0).permute(1, 2, 0).float().contiguous() for x0 in outs]
            bad = [i for i, e in enumerate(encoded) if not bool(torch.isfinite(e).all())]
            if bad:  # named, so that a folder run fails these images alone
                raise NonFiniteOutputError("the reconstruction holds NaN values (the model returned non-finite "
                                           "values)", bad=bad)
        return encoded

    # ---- consistency -----------------------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        return self.meta.encoding.gamma

    def _sets(self, conds: Sequence[torch.Tensor], bands: Sequence[Band]) -> list[ConsistencySet]:
        """Each image's consistent set (empty when neither consistent nor residual); conds are [3, H, W] in
        [-1, 1]."""
        if not (self.consistent or self.formulation.residual):
            return []
        assert self.meta.isp is not None
        sets = [ConsistencySet(self.meta.isp, (c.float() + 1.0) * 0.5, b) for c, b in zip(conds, bands)]
        bad = sum(cs.inconsistent for cs in sets)
        self.last_stats["inconsistent_pixels"] = bad
        if bad:
            log.info("%d pixels have no RAW that the model's ISP renders to them: kept at the nearest point", bad)
        return sets

    def _project_output(self, sets: Sequence[ConsistencySet], x0s: list[torch.Tensor]) -> list[torch.Tensor]:
        """The sampler's states as RAWs: the closed form added back to a residual, then the final projection
        (exact: the sampler's last x0 is recovered from eps up to fp32 rounding) or the clamp to [-1, 1]."""
        x0s = [x.reshape(x.shape[-3:]) for x in x0s]
        if self.formulation.residual:
            x0s = [x + cs.q_model(self.gamma) for cs, x in zip(sets, x0s)]
        if self.consistent:
            return [cs.project_model(x, self.gamma) for cs, x in zip(sets, x0s)]
        return x0s if self.formulation.is_default else [x.clamp(-1.0, 1.0) for x in x0s]

    def _sampler_kwargs(self) -> dict:
        """The sampler's options; for a formulation other than eps over the RAW, the static x0 clamp is done by
        ``FormulatedEps`` in RAW space (the sampler would clamp the residual)."""
        kw = self.sampler.kwargs()
        if not self.formulation.is_default:
            kw["clip_x0"] = None
        return kw

    def _transform(self, sets: Sequence[ConsistencySet], unpack: Callable, pack: Callable) -> Callable | None:
        """What every x0 prediction (RAW, model space) goes through: the projection, or the sampler's clamp."""
        if self.consistent:
            return pack_projector(sets, self.gamma, unpack, pack)
        c = self.sampler.clip_x0
        if self.formulation.is_default or c is None:
            return None
        return lambda x0: x0.clamp(-c, c)

    def _formulated(self, denoiser: TiledDenoiser, sets: Sequence[ConsistencySet], unpack: Callable,
                    pack: Callable) -> TiledDenoiser | FormulatedEps:
        """The denoiser as the sampler's eps model (``formulation.FormulatedEps``); itself when nothing is to do."""
        transform = self._transform(sets, unpack, pack)
        if transform is None and self.formulation.is_default:
            return denoiser
        # q (one full canvas) only where it is used: the residual's offset, or the x0 of skipped pixels
        q = pack([cs.q_model(self.gamma) for cs in sets]) if self.formulation.residual or denoiser.skipping else None
        offset = q if self.formulation.residual else None
        fill = None
        if denoiser.skipping:  # skipped pixels take the closed form: a residual of 0
            assert q is not None
            cover = pack([w.expand(3, -1, -1) for w in denoiser.coverage()])
            fill = (cover, torch.zeros_like(q) if self.formulation.residual else q)
        return FormulatedEps(denoiser, self.schedule, prediction=self.formulation.prediction,
                             device=self.backend.device, transform=transform, offset=offset, fill=fill)

    # ---- the two ways to run the sampler ----------------------------------------------------------------------
    def _independent(self, img: np.ndarray | torch.Tensor, gen: torch.Generator, progress: Progress | None,
                     band: Band) -> torch.Tensor:
        """The paper's protocol; with consistency, its merged output is projected (patches run unprojected)."""
        cond = srgb_to_model(img, self.backend.device)
        self.last_stats = {"evaluated_patches": self.patches_for(*img.shape[:2]), "inconsistent_pixels": 0}
        sets = self._sets([cond[0]], [band])
        chunks = -(-self.patches_for(*img.shape[:2]) // self.tiles.batch_size)  # each chunk runs the whole sampler
        x0 = sample_independent(self.backend, cond, self.schedule, self.tiles, generator=gen,
                                callback=_chunked_progress(progress, chunks), **self.sampler.kwargs())
        return self._project_output(sets, [x0[0]])[0]

    def _fused(self, images: Sequence[np.ndarray | torch.Tensor], gens: Sequence[torch.Generator],
               progress: Progress | None, bands: Sequence[Band]) -> list[torch.Tensor]:
        dev = self.backend.device
        conds = [srgb_to_model(img, dev)[0] for img in images]
        self.last_stats = {"inconsistent_pixels": 0}
        sets = self._sets(conds, bands)
        x_T = [torch.randn((1, *c.shape), generator=g, device=dev) for c, g in zip(conds, gens)]
        skip = self.consistency.skip and self.consistent and self.tiles.grid == "overlap"
        self.last_stats["step_graph"] = self.step_graph and len(images) == 1 and not skip
        if self.last_stats["step_graph"]:  # where patches are skipped, skipping halves the work: it wins
            self.last_stats["evaluated_patches"] = self.patches_for(*images[0].shape[:2])
            eps_fn: GraphedDenoiser = self._graphed_for(conds[0][None], sets[0] if sets else None)
            x0 = sample(eps_fn, x_T[0], self.schedule, generator=gens[0], callback=progress, **self._sampler_kwargs())
            eps_fn.check_finite()
            return self._project_output(sets, [x0[0]])
        needed = [cs.needs_model() for cs in sets] if skip else None
        denoiser = TiledDenoiser(self.backend, conds, self.tiles, steps=self.sampler.num_steps, needed=needed)
        self.last_stats["evaluated_patches"] = denoiser.num_patches
        del conds
        if skip and denoiser.num_patches == 0:  # nothing was lost: the answer is the closed form, no sampling
            if progress is not None:
                progress(self.sampler.num_steps, self.sampler.num_steps)
            return [cs.q_model(self.gamma) for cs in sets]
        pack = denoiser.pack
        eps_fn_any = self._formulated(denoiser, sets, pack.unpack, pack.pack)
        x0 = sample(eps_fn_any, pack.pack(x_T), self.schedule, noise=packed_noise(pack, gens), callback=progress,
                    **self._sampler_kwargs())
        denoiser.check_finite()
        return self._project_output(sets, pack.unpack(x0))

    def _graphed_for(self, cond: torch.Tensor, cs: ConsistencySet | None) -> GraphedDenoiser:
        """The recorded graph for this image size (recorded again when the size changes or consistency starts);
        the formulation and the projection are recorded in the same graph and read the set's tensors (and the
        residual's offset) in place."""
        same = self._graphed is not None and self._graphed.canvas_shape == tuple(cond.shape)
        if same and (cs is None) == (self._graph_set is None):
            assert self._graphed is not None
            self._graphed.set_condition(cond)
            if cs is not None and self._graph_set is not None:
                self._graph_set.load_(cs)
                offset = self._graph_eps.offset if self._graph_eps is not None else None
                if offset is not None:
                    offset.copy_(cs.q_model(self.gamma)[None])
            return self._graphed
        self.close()
        denoiser = TiledDenoiser(self.backend, cond, self.tiles, steps=self.sampler.num_steps)
        wrapped = self._formulated(denoiser, [cs] if cs is not None else [], lambda x: list(x.unbind(0)),
                                   torch.stack)
        self._graph_set = cs
        self._graph_eps = wrapped if isinstance(wrapped, FormulatedEps) else None
        self._graphed = GraphedDenoiser(denoiser, eps_fn=self._graph_eps)
        return self._graphed


def _chunked_progress(progress: Progress | None, chunks: int) -> Progress | None:
    """Progress over ``chunks`` consecutive sampler runs as one count (done, chunks * evaluations per run)."""
    if progress is None:
        return None
    calls = 0

    def cb(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        progress(calls, chunks * total)

    return cb
