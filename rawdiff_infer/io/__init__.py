"""Image input and RAW output: decode sRGB photos, write DNG / 16-bit TIFF / ``.npy`` atomically.

Input (``read_image``): JPEG (incl. MPO), PNG, TIFF and WebP, 8 or 16 bits per channel, decoded in full (a
truncated file is an error, never a grey-filled picture), EXIF orientation applied, alpha dropped, grey /
palette / CMYK / LAB expanded to RGB, an embedded non-sRGB ICC profile converted to sRGB. Every problem with
the input file raises :class:`ImageError` with a one-line message ``"<path>: <problem>"``; camera RAW files
are refused (this tool makes RAW, it does not read it). A JPEG's quality is estimated from its quantisation tables
(``DecodedImage.jpeg_quality``, :func:`rawdiff_infer.io.jpeg.estimate_jpeg_quality`).

Output: the RAW convention of DESIGN.md. ``linear`` is float32 H x W x 3 in [0, 1]: demosaiced camera RGB,
black-subtracted, white-balanced, divided by (white - black). ``write_dng`` stores its Bayer mosaic
``round(black + linear * (white - black))`` as uint16 with the camera's colour matrix and AsShotNeutral =
(1, 1, 1) (the data is already white-balanced), so LibRaw / darktable / Lightroom render it. Every writer goes
through :func:`rawdiff_infer.fsio.atomic_write`: a temporary file in the target's directory, fsync, then a
rename that refuses to replace a file existing at that moment (unless ``overwrite=True``); a failure leaves
neither a partial file nor a damaged previous one.
"""

from ..bayer import demosaic_bilinear, mosaic
from .decode import RAW_SUFFIXES, SUPPORTED_INPUT_SUFFIXES, DecodedImage, ImageError, is_supported_image, read_image
from ..fsio import atomic_write
from .writers import render_srgb_preview, write_dng, write_npy, write_tiff

__all__ = [
    "ImageError",
    "DecodedImage",
    "read_image",
    "is_supported_image",
    "SUPPORTED_INPUT_SUFFIXES",
    "RAW_SUFFIXES",
    "atomic_write",
    "write_dng",
    "write_tiff",
    "write_npy",
    "mosaic",
    "demosaic_bilinear",
    "render_srgb_preview",
]
