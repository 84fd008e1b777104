"""Decoding one image file into uint8 (C, H, W): the single decoder of readers, stores and the server.

`decode(src, size_hw, channels, box)`:
- `src`: a path, bytes or a binary file object;
- `box`: None for the whole image, else a function (width, height) -> (left, top, right, bottom) in
  the file's own pixels, called once the header is read (random-resized-crop draws its box there);
- `size_hw`: (height, width) to resize the box to (PIL bilinear, antialiased), or None to keep it;
- `channels`: 1 or 3 forces grayscale or RGB; None keeps grayscale files at 1 channel.

JPEG files are decoded at a reduced scale (PIL's `draft`: libjpeg's DCT scaling by 1/2, 1/4 or
1/8) whenever the box still covers the target size at that scale, which is several times faster
for the common case of a large photo read at a small input size. Binary 8-bit PGM/PPM (ORL, GTSRB)
take a numpy fast path, about 20x faster than PIL on tiny files.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
BoxFn = Callable[[int, int], Box]

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_PNM_HEADER = re.compile(rb"\A(P[56])\s+(?:#[^\n]*\n\s*)*(\d+)\s+(?:#[^\n]*\n\s*)*(\d+)\s+(?:#[^\n]*\n\s*)*(\d+)\s")


def _whole_pixels(b: Box) -> tuple[int, int, int, int]:
    """A crop box rounded to whole pixels."""
    left, top, right, bottom = (round(v) for v in b)
    return left, top, right, bottom


def to_chw(arr: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> contiguous (C, H, W) with the channels forced when asked."""
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif channels == 1 and arr.shape[0] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        arr = np.round(arr.astype(np.float32).transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114], np.float32))
        arr = np.clip(arr, 0, 255).astype(np.uint8)[None]
    return np.ascontiguousarray(arr)


def adapt(
    arr: np.ndarray, size_hw: tuple[int, int] | None, channels: int | None, box: BoxFn | None = None
) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> (C, H', W'): the box cut out and resized (PIL bilinear), channels forced."""
    h, w = arr.shape[:2]
    b = None if box is None else box(w, h)
    if b is not None and tuple(b) == (0, 0, w, h):
        b = None
    if b is not None or (size_hw is not None and (h, w) != tuple(size_hw)):
        im = Image.fromarray(arr)
        if size_hw is None:
            assert b is not None  # no resize asked: the box is why we are here
            im = im.crop(_whole_pixels(b))
        else:
            im = im.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR, box=b)
        arr = np.asarray(im)
    return to_chw(arr, channels)


def decode_pnm(data: bytes) -> np.ndarray | None:
    """8-bit binary PGM/PPM (P5/P6) -> uint8 (H, W) or (H, W, 3); None for anything else."""
    m = _PNM_HEADER.match(data)
    if m is None or int(m.group(4)) != 255:
        return None
    w, h, c = int(m.group(2)), int(m.group(3)), 1 if m.group(1) == b"P5" else 3
    need = w * h * c
    body = memoryview(data)[m.end() : m.end() + need]
    if len(body) < need:
        raise OSError(f"image file is truncated ({len(body)} of {need} pixel bytes)")
    arr = np.frombuffer(body, dtype=np.uint8)
    return arr.reshape(h, w) if c == 1 else arr.reshape(h, w, 3)


def _draft(im: Image.Image, gray: bool, b: Box, size_hw: tuple[int, int]) -> Box:
    """Ask libjpeg for the smallest DCT scale at which the box still covers `size_hw`; returns the
    box in the reduced image's pixels."""
    w0, h0 = im.size
    bw, bh = max(b[2] - b[0], 1e-6), max(b[3] - b[1], 1e-6)
    need = (math.ceil(w0 * size_hw[1] / bw), math.ceil(h0 * size_hw[0] / bh))
    im.draft("L" if gray else "RGB", need)
    sx, sy = im.size[0] / w0, im.size[1] / h0
    return (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)


def decode(
    src: Any, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
) -> np.ndarray:
    """Decode one image (path, bytes or file object) to uint8 (C, H, W); see the module docstring."""
    if isinstance(src, Path) and src.suffix.lower() in (".pgm", ".ppm", ".pnm"):
        src = src.read_bytes()
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = bytes(src)
        arr = decode_pnm(src) if src[:2] in (b"P5", b"P6") else None
        if arr is not None:
            keep = channels is None or channels == (1 if arr.ndim == 2 else 3)
            return adapt(arr, size_hw, None if keep else channels, box)
        src = io.BytesIO(src)
    with Image.open(src) as im:
        return from_pil(im, size_hw, channels, box, draft=True)


def from_pil(
    im: Image.Image,
    size_hw: tuple[int, int] | None = None,
    channels: int | None = None,
    box: BoxFn | None = None,
    draft: bool = False,
) -> np.ndarray:
    """A PIL image -> uint8 (C, H, W), as `decode` reads files (it calls this on the opened file).
    `draft`: an opened JPEG not yet loaded may decode at a reduced DCT scale (this changes `im`)."""
    gray = channels == 1 or (channels is None and im.mode in GRAY_MODES)
    w, h = im.size
    b = box(w, h) if box is not None else (0, 0, w, h)
    if draft and size_hw is not None and im.format == "JPEG":
        b = _draft(im, gray, b, size_hw)
    im.load()
    if im.mode in _WIDE_MODES and gray:
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a * (255.0 / 65535.0) if a.max() > 255 else a, 0, 255).astype(np.uint8)
        return adapt(a, size_hw, channels, None if box is None else lambda *_: b)
    im = im.convert("L" if gray else "RGB")
    full = tuple(b) == (0, 0, im.size[0], im.size[1])
    if size_hw is not None and (not full or im.size != (size_hw[1], size_hw[0])):
        im = im.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR, box=None if full else b)
    elif not full:
        im = im.crop(_whole_pixels(b))
    return to_chw(np.asarray(im), channels)
