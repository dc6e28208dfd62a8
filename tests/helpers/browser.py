"""A page as a browser draws it: Debian's chromium, headless, and what its screenshot shows.

Chromium runs with no network of its own use (no updates, sync or safe
browsing) and a profile folder made for the call; the page is a local file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

__all__ = ["bands_of", "chromium", "screenshot"]

_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
)


def chromium() -> str:
    """The chromium binary; the test is skipped where there is none (``make setup`` installs it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (run `make setup`)")


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1280, 4000)) -> Image.Image:
    """``page`` drawn by headless chromium at ``size`` (width, height), as an RGB image."""
    with tempfile.TemporaryDirectory(prefix="lockstep-chromium-") as profile:
        subprocess.run(
            [
                chromium(),
                *_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return Image.open(out).convert("RGB")


def bands_of(image: Image.Image, colours: Iterable[str], min_pixels: int = 50) -> list[range]:
    """The horizontal bands of ``image`` (row ranges) where any of ``colours`` is drawn.

    A row counts when it holds at least one pixel of exactly such a colour (a
    hex string like ``#2b7bba``); rows within 20 pixels of each other make one
    band, and a band with under ``min_pixels`` of them is dropped (a stray).
    """
    rgb = np.asarray(image)
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    for c in colours:
        mask |= np.all(rgb == [int(c[i : i + 2], 16) for i in (1, 3, 5)], axis=2)
    counts = [int(n) for n in mask.sum(axis=1)]
    bands: list[range] = []
    start = last = None
    for y, n in enumerate(counts):
        if not n:
            continue
        if last is not None and y - last > 20:
            bands.append(range(start or 0, last + 1))
            start = y
        start = y if start is None else start
        last = y
    if last is not None:
        bands.append(range(start or 0, last + 1))
    return [b for b in bands if sum(counts[y] for y in b) >= min_pixels]
