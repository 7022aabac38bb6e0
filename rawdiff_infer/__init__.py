"""rawdiff: invert a camera's ISP (sRGB photo -> camera RAW) with a conditional diffusion model."""

__version__ = "0.2.0"
