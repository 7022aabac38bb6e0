"""Shared fixtures and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rawdiff_infer.model import UNetConfig

SHARED_DATA = Path(os.environ.get("RAWDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

#: a small U-Net for fast CPU tests (same topology as the paper's, fewer channels)
TINY_CONFIG = UNetConfig.tiny()


def perturbed_tiny_model(seed: int = 0):
    """TINY_CONFIG with every parameter perturbed (GroupNorm affines too, so no two norms share weights)."""
    from rawdiff_infer.model import UNet

    torch.manual_seed(seed)
    m = UNet(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def generated_photos(folder: Path, count: int) -> Path:
    """``count`` small generated photos (96 x 96 smooth colour fields with noise, no held-out names) in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 95.0
    for i in range(count):
        base = np.stack([yy, xx, 1 - 0.5 * (yy + xx)], -1) * rng.uniform(0.3, 1.0, 3)
        img = np.clip(base + 0.1 * rng.standard_normal(base.shape), 0, 1)
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)"))
