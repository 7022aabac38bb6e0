"""Training data: full-image pair sources, an on-disk pair cache, and random crops on the device.

Two sources give full images as :class:`ImagePair` (sRGB float32 H x W x 3 in [0, 1], RAW *linear* float32
H x W x 3 in [0, 1], the RAW convention of ``rawdiff_infer.rawspace``):

* :class:`PhotoPairSource` -- the synthetic camera (``camera_isp``) over a folder of photos; a fresh random ISP
  draw (and, optionally, scene augmentation, ``scene_aug``) per image and epoch, reproducible from
  ``(seed, epoch, index)``.
* :class:`RawPairSource` -- real RAW files with the InvISP protocol (``fivek.load_raw_pair``), decoded once and
  then served from a :class:`PairCache`.

:func:`random_crops` turns full images (tensors, on any device) into training batches in model space: patches
with random position, flips and 90-degree rotations (the same for sRGB and RAW), sRGB mapped ``x * 2 - 1`` and
the RAW gamma-encoded with ``RawEncoding`` and mapped the same way, both in [-1, 1]. :func:`synthetic_crops`
does the same for photos, cropping first and running the synthetic ISP on the crops (on the GPU if the photos
are there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch

from rawdiff_infer.camera import Camera
from rawdiff_infer.fsio import atomic_write
from rawdiff_infer.io import SUPPORTED_INPUT_SUFFIXES, ImageError, read_image
from rawdiff_infer.messages import show_path
from rawdiff_infer.rawspace import RawEncoding

from . import fivek
from .camera_isp import IspRandomization, SyntheticCamera
from .scene_aug import SceneAugmentation

__all__ = [
    "ImagePair",
    "PairCache",
    "PhotoPairSource",
    "RawPairSource",
    "CropPlan",
    "plan_crops",
    "gather_crops",
    "random_crops",
    "synthetic_crops",
    "to_model_space",
    "load_photo",
    "list_files",
    "list_photos",
    "PhotoError",
    "PHOTO_EXTENSIONS",
    "BUNDLED_PHOTOS_DIR",
]

log = logging.getLogger(__name__)

#: what the decoder reads (``rawdiff_infer.io.SUPPORTED_INPUT_SUFFIXES``): training reads what inference reads
PHOTO_EXTENSIONS = tuple(sorted(SUPPORTED_INPUT_SUFFIXES))

#: photos shipped with the package (licences in its SOURCES.md; grace_hopper.jpg there is held out)
BUNDLED_PHOTOS_DIR = Path(__file__).resolve().parent / "photos"


class PhotoError(ValueError):
    """A photo that cannot be read or used (the message is one line and names the file)."""


@dataclass(frozen=True, eq=False)
class ImagePair:
    """A full-image training pair: ``srgb`` float32 H x W x 3 in [0, 1], ``raw`` linear float32 H x W x 3 in
    [0, 1], ``name`` (file stem) and ``meta`` (what made it)."""

    srgb: np.ndarray
    raw: np.ndarray
    name: str
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------

def list_files(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
               extensions: Sequence[str] | None = None) -> list[Path]:
    """A folder (not recursive, sorted; files with one of ``extensions``, any case, or with ``None`` every file
    whose name does not start with '.') or an explicit list of files (returned as given)."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: not a folder")
        exts = None if extensions is None else {e.lower() for e in extensions}
        return sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith(".")
                      and (exts is None or q.suffix.lower() in exts))
    return [Path(q) for q in source]


def list_photos(folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The photos (``PHOTO_EXTENSIONS``) of one or several folders, sorted by file name.

    Raises:
        NotADirectoryError: a folder that is not one.
        PhotoError: two folders hold photos of the same file name (a pair's name must say which photo it is).
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    seen: dict[str, Path] = {}
    for folder in folders:
        for f in list_files(folder, PHOTO_EXTENSIONS):
            other = seen.get(f.name)
            if other is not None and other.resolve() != f.resolve():  # the same file twice is harmless
                raise PhotoError(f"two photos named {show_path(f.name)}: {show_path(other)} and {show_path(f)}")
            seen.setdefault(f.name, f)
    return [seen[k] for k in sorted(seen)]


def load_photo(path: str | os.PathLike[str]) -> np.ndarray:
    """An sRGB photo as H x W x 3 uint8, decoded by rawdiff-infer's decoder (``rawdiff_infer.io.read_image``: one
    policy for formats, 16-bit files, ICC profiles, orientation and alpha in both commands); 16 bits are rounded to
    8 (``round(v * 255 / 65535)``).

    Raises:
        PhotoError: the file is missing, unreadable or refused by the decoder (one-line message naming the file).
    """
    try:
        pixels = read_image(path).pixels
    except ImageError as e:
        why = str(e).removeprefix(f"{show_path(path)}: ")
        raise PhotoError(f"{show_path(path)}: cannot read the photo ({why})") from None
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return pixels


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------

class PairCache:
    """Preprocessed pairs on disk, one ``.npz`` per (file, protocol): ``srgb`` uint8 H x W x 3, ``raw`` the
    gamma-ENCODED RAW as uint16 H x W x 3 (``round(65535 * encoding.encode(linear))``: the quantisation step is
    1.5e-5 on the scale PSNR is measured on, finer than 16-bit linear in the shadows), ``meta`` JSON.

    The key hashes the file's resolved path, mtime (ns) and size with the protocol parameters and the encoding,
    so a changed file or protocol is a miss (old entries stay until :meth:`clear`). Writes go to a temporary
    file in the cache folder and are renamed into place, so readers never see half a file; an unreadable entry
    counts as a miss and is rewritten. ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, encoding: RawEncoding | None = None) -> None:
        self.dir = Path(cache_dir)
        self.encoding = encoding or RawEncoding()
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike[str], params: dict[str, Any]) -> str:
        p = Path(path).resolve()
        st = p.stat()
        blob = json.dumps({"path": str(p), "mtime_ns": st.st_mtime_ns, "size": st.st_size, "params": params,
                           "encoding": self.encoding.to_dict(), "format": 1}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def entry(self, path: str | os.PathLike[str], params: dict[str, Any]) -> Path:
        k = self.key(path, params)
        return self.dir / k[:2] / f"{k}.npz"

    def get(self, path: str | os.PathLike[str], params: dict[str, Any],
            compute: Callable[[], tuple[np.ndarray, np.ndarray, dict[str, Any]]]
            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(srgb uint8, raw encoded uint16, meta) for ``path``; ``compute()`` -> (srgb uint8, raw LINEAR float,
        meta) runs only on a miss."""
        target = self.entry(path, params)
        if target.is_file():
            try:
                with np.load(target, allow_pickle=False) as z:
                    out = (z["srgb"], z["raw"], json.loads(str(z["meta"])))
                self.hits += 1
                return out
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                log.warning("cache entry %s unreadable (%s); recomputing", target, e)
        self.misses += 1
        srgb, raw_linear, meta = compute()
        raw_enc = np.round(np.asarray(self.encoding.encode(np.asarray(raw_linear, np.float32)), np.float32)
                           * 65535.0).astype(np.uint16)
        srgb = np.ascontiguousarray(srgb, dtype=np.uint8)
        target.parent.mkdir(parents=True, exist_ok=True)
        # content-addressed: a concurrent writer of the same entry writes the same bytes, so replacing is fine
        with atomic_write(target, overwrite=True) as f:
            np.savez(f, srgb=srgb, raw=raw_enc, meta=np.array(json.dumps(meta, default=str)))
        return srgb, raw_enc, meta

    def clear(self) -> None:
        """Delete every entry (the folder itself stays)."""
        for q in self.dir.glob("*/*.npz"):
            q.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------

class RawPairSource:
    """Real (sRGB, RAW) pairs from RAW files, InvISP protocol (see ``fivek``), full images.

    ``source``: a folder (files with ``fivek.RAW_EXTENSIONS``) or a list of files. ``cache``: a
    :class:`PairCache` or a folder for one (``cache_dir`` is the same, for callers that name it so); None decodes
    every time. A file that does not give a pair raises ``fivek.RawFileError``. ``meta`` of an item is
    ``fivek.RawPair.metadata()``, including ``camera_description`` (a ``Camera.to_dict()``).
    """

    def __init__(self, source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 wb: Literal["camera", "daylight"] = "camera", jpeg_quality: int | None = 90,
                 jpeg_subsampling: int = 1, cache: PairCache | str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, encoding: RawEncoding | None = None) -> None:
        if cache is not None and cache_dir is not None:
            raise ValueError("give cache or cache_dir, not both")
        cache = cache if cache is not None else cache_dir
        self.files = list_files(source, fivek.RAW_EXTENSIONS)
        self.wb = wb
        self.jpeg_quality = jpeg_quality
        self.jpeg_subsampling = jpeg_subsampling
        self.encoding = encoding or (cache.encoding if isinstance(cache, PairCache) else RawEncoding())
        if cache is not None and not isinstance(cache, PairCache):
            cache = PairCache(cache, encoding=self.encoding)
        if isinstance(cache, PairCache) and cache.encoding != self.encoding:
            raise ValueError("the cache and the source use different RAW encodings")
        self.cache = cache

    @property
    def params(self) -> dict[str, Any]:
        """The protocol parameters (part of the cache key)."""
        return {"protocol": "invisp-fivek", "version": fivek.PROTOCOL_VERSION, "wb": self.wb,
                "jpeg_quality": self.jpeg_quality, "jpeg_subsampling": self.jpeg_subsampling}

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        pair = fivek.load_raw_pair(path, wb=self.wb, jpeg_quality=self.jpeg_quality,
                                   jpeg_subsampling=self.jpeg_subsampling)
        return pair.srgb, pair.raw_linear, pair.metadata()

    def load_encoded(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(srgb uint8 H x W x 3, raw ENCODED uint16 H x W x 3, meta): the compact form, e.g. to keep a whole
        data set on the GPU and crop it with ``random_crops(..., raw_space="encoded")``."""
        path = self.files[index]
        if self.cache is not None:
            return self.cache.get(path, self.params, lambda: self._decode(path))
        srgb, lin, meta = self._decode(path)
        enc = np.round(np.asarray(self.encoding.encode(lin), np.float32) * 65535.0).astype(np.uint16)
        return srgb, enc, meta

    def __getitem__(self, index: int) -> ImagePair:
        path = self.files[index]
        if self.cache is None:
            srgb, lin, meta = self._decode(path)
        else:
            srgb, enc, meta = self.load_encoded(index)
            lin = np.asarray(self.encoding.decode(enc.astype(np.float32) / 65535.0), np.float32)
        return ImagePair(srgb=srgb.astype(np.float32) / 255.0, raw=lin.astype(np.float32, copy=False),
                         name=path.stem, meta=meta)


class PhotoPairSource:
    """Synthetic pairs: the synthetic camera applied to sRGB photos, full images.

    Each ``__getitem__(i)`` draws ISP parameters from a generator seeded by ``(seed, epoch, i)`` (see
    :meth:`set_epoch`), so a data set is reproducible and still different every epoch. ``jpeg`` applies the
    randomised JPEG step (CPU). ``augmentation`` (``scene_aug.SceneAugmentation``) also changes each image's
    scene (exposure, illuminant, hue, saturation, colour matrix) before the ISP, drawn after the ISP parameters
    from the same generator; None (the default) gives exactly the unaugmented pairs. The photo is read on every
    call (PNG/JPEG decoding is cheap next to RAW).

    ``meta`` of an item: the photo's path, the camera, the ISP draw, and ``scene`` (the scene draw, or None).
    """

    def __init__(self, source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 camera: SyntheticCamera | Camera | None = None, randomization: IspRandomization | None = None,
                 seed: int = 0, jpeg: bool = True, augmentation: SceneAugmentation | None = None) -> None:
        self.files = list_files(source, PHOTO_EXTENSIONS)
        self.camera = camera if isinstance(camera, SyntheticCamera) else (
            SyntheticCamera(camera) if camera is not None else SyntheticCamera())
        self.randomization = randomization or IspRandomization()
        self.seed = int(seed)
        self.epoch = 0
        self.jpeg = jpeg
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        """The CPU generator for image ``index`` in the current epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def photo(self, index: int) -> np.ndarray:
        """The photo itself, H x W x 3 uint8 (for ``synthetic_crops`` on the GPU)."""
        return load_photo(self.files[index])

    def __getitem__(self, index: int) -> ImagePair:
        photo = self.photo(index)
        srgb, raw, params = self.camera.make_pair(photo, self.generator(index), randomization=self.randomization,
                                                  jpeg=self.jpeg, return_params=True, augmentation=self.augmentation)
        meta = {"path": str(self.files[index]), "camera": self.camera.camera.unique_model,
                "exposure": float(params.exposure[0]), "raw_white": float(params.raw_white[0]),
                "tone": float(params.tone[0]), "jpeg_quality": params.jpeg_quality[0] if self.jpeg else None,
                "overexposure": float(params.overexposure[0]),
                "scene": params.scene.record(0) if params.scene is not None else None}
        return ImagePair(srgb=srgb, raw=raw, name=self.files[index].stem, meta=meta)


# --------------------------------------------------------------------------------------------------------------
# Crops (torch, any device)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class CropPlan:
    """Where n patches come from and how each is turned (CPU int64 / bool tensors of shape [n]).

    Patch k reads image ``image[k]`` at rows ``top[k] + a``, columns ``left[k] + b``: output pixel (i, j) takes
    (a, b) = (j, i) if ``transpose[k]`` else (i, j), then a -> p-1-a if ``flip_rows[k]``, b -> p-1-b if
    ``flip_cols[k]``. Together these are the 8 flips / 90-degree rotations of a square.
    """

    patch: int
    image: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    transpose: torch.Tensor
    flip_rows: torch.Tensor
    flip_cols: torch.Tensor


def plan_crops(batch: int, height: int, width: int, n: int, *, patch: int = 64,
               generator: torch.Generator | None = None, augment: bool = True) -> CropPlan:
    """Draw n crops uniformly over ``batch`` images of ``height`` x ``width`` (CPU generator or None)."""
    if height < patch or width < patch:
        raise ValueError(f"image {height} x {width} is smaller than the patch {patch}")
    if n < 1 or batch < 1:
        raise ValueError("need n >= 1 and at least one image")
    image = torch.randint(0, batch, (n,), generator=generator)
    top = torch.randint(0, height - patch + 1, (n,), generator=generator)
    left = torch.randint(0, width - patch + 1, (n,), generator=generator)
    if augment:
        bits = torch.randint(0, 2, (3, n), generator=generator).to(torch.bool)
    else:
        bits = torch.zeros(3, n, dtype=torch.bool)
    return CropPlan(patch, image, top, left, bits[0], bits[1], bits[2])


def gather_crops(images: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """Cut the planned patches out of ``images`` [B, C, H, W] (or [C, H, W]) -> [n, C, p, p], same dtype and
    device, with one gather on the device."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got {tuple(images.shape)}")
    dev, p = images.device, plan.patch
    ar = torch.arange(p, device=dev)
    i = ar.view(1, p, 1).expand(1, p, p)
    j = ar.view(1, 1, p).expand(1, p, p)
    tr = plan.transpose.to(dev).view(-1, 1, 1)
    a = torch.where(tr, j, i)
    b = torch.where(tr, i, j)
    a = torch.where(plan.flip_rows.to(dev).view(-1, 1, 1), p - 1 - a, a)
    b = torch.where(plan.flip_cols.to(dev).view(-1, 1, 1), p - 1 - b, b)
    rows = plan.top.to(dev).view(-1, 1, 1) + a
    cols = plan.left.to(dev).view(-1, 1, 1) + b
    idx = plan.image.to(dev).view(-1, 1, 1)
    # CUDA has no indexing kernels for the unsigned 16/32/64-bit types: gather their bits as the signed type.
    signed = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}.get(images.dtype)
    src = images.view(signed) if signed is not None else images
    out = src.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()
    return out.view(images.dtype) if signed is not None else out


def _as_chw_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise ValueError(f"a numpy image must be H x W x C, got {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    return x


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if x.dtype == torch.uint16:  # via int32: casts from uint16 are not implemented everywhere (CUDA)
        return (x.view(torch.int16).to(torch.int32) & 0xFFFF).to(torch.float32) / 65535.0
    return x.to(torch.float32).clamp(0.0, 1.0)


def to_model_space(srgb: torch.Tensor, raw: torch.Tensor, *, raw_space: Literal["linear", "encoded"] = "linear",
                   encoding: RawEncoding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sRGB [0, 1] and RAW (linear or already encoded, [0, 1]; uint8 / uint16 scaled) -> both in [-1, 1]."""
    s = _unit(srgb)
    r = _unit(raw)
    if raw_space == "linear":
        r = (encoding or RawEncoding()).encode(r)
    elif raw_space != "encoded":
        raise ValueError(f"raw_space must be 'linear' or 'encoded', got {raw_space!r}")
    return s * 2.0 - 1.0, r * 2.0 - 1.0


def random_crops(srgb: torch.Tensor | np.ndarray, raw: torch.Tensor | np.ndarray, n: int, *, patch: int = 64,
                 generator: torch.Generator | None = None, augment: bool = True,
                 raw_space: Literal["linear", "encoded"] = "linear",
                 encoding: RawEncoding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n random patches of an aligned pair, the same crop / flip / rotation for both, in model space.

    ``srgb``, ``raw``: [C, H, W] or [B, C, H, W] tensors on any device (crops are gathered there), or H x W x C
    numpy arrays; uint8 is read as /255, uint16 as /65535, floats as [0, 1]. ``raw`` is linear RAW unless
    ``raw_space="encoded"`` (e.g. uint16 from :meth:`RawPairSource.load_encoded`). ``generator``: CPU
    ``torch.Generator`` (positions and transforms are drawn on the CPU, so a seed gives the same crops on every
    device). Returns (srgb, raw), float32 [n, 3, patch, patch] in [-1, 1] on the images' device; the RAW is
    gamma-encoded with ``encoding`` (default ``RawEncoding()``, 1/2.2).
    """
    s = _as_chw_tensor(srgb)
    r = _as_chw_tensor(raw)
    if s.shape[-2:] != r.shape[-2:] or s.ndim != r.ndim or (s.ndim == 4 and s.shape[0] != r.shape[0]):
        raise ValueError(f"sRGB {tuple(s.shape)} and RAW {tuple(r.shape)} are not aligned")
    if s.device != r.device:
        raise ValueError(f"sRGB is on {s.device}, RAW on {r.device}")
    batch = s.shape[0] if s.ndim == 4 else 1
    plan = plan_crops(batch, s.shape[-2], s.shape[-1], n, patch=patch, generator=generator, augment=augment)
    return to_model_space(gather_crops(s, plan), gather_crops(r, plan), raw_space=raw_space, encoding=encoding)


def synthetic_crops(photos: torch.Tensor | np.ndarray, n: int, *, camera: SyntheticCamera | None = None,
                    patch: int = 64, generator: torch.Generator | None = None,
                    randomization: IspRandomization | None = None, augment: bool = True, jpeg: bool = False,
                    encoding: RawEncoding | None = None,
                    augmentation: SceneAugmentation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic training patches from photos [B, 3, H, W] / [3, H, W] (uint8 or [0, 1] float, any device),
    in model space [-1, 1].

    The photos are cropped (and flipped / rotated) first, then each crop gets its own ISP draw
    (``SyntheticCamera.make_pair``), all on the photos' device. The ISP is pointwise, so cropping first is the
    same as cropping a full-image pair, except that the over-exposure gain is set from the crop's own
    brightness and JPEG (``jpeg=True``; it runs on the CPU) compresses the patch alone.

    ``augmentation`` (``scene_aug.SceneAugmentation``): a scene change per crop, drawn from ``generator`` after
    the crop plan and the ISP parameters; None (the default) draws nothing more.
    """
    cam = camera or SyntheticCamera()
    x = _as_chw_tensor(photos)
    batch = x.shape[0] if x.ndim == 4 else 1
    plan = plan_crops(batch, x.shape[-2], x.shape[-1], n, patch=patch, generator=generator, augment=augment)
    crops = gather_crops(x, plan)
    srgb, raw = cam.make_pair(crops, generator, randomization=randomization, jpeg=jpeg, augmentation=augmentation)
    return to_model_space(srgb, raw, raw_space="linear", encoding=encoding)
