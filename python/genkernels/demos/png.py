"""PNG images without an imaging library: a PNG writer (zlib + struct), grids of images, and a
line plot drawn into a pixel array, with a 3x5 pixel font for its axis labels."""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def write_png(path: str, pixels: np.ndarray) -> None:
    """Writes ``pixels`` (``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8) as an 8-bit PNG."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_grid(images: Tensor, columns: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Images ``(N, 1, H, W)`` in [0, 1] tiled ``columns`` per row, each pixel enlarged to a
    ``scale`` x ``scale`` square, with ``pad`` grey pixels between tiles: a ``uint8`` array."""
    images = images.detach().float().cpu().clamp(0, 1)[:, 0]
    n, height, width = images.shape
    rows = -(-n // columns)
    tile_h, tile_w = height * scale + pad, width * scale + pad
    grid = np.full((rows * tile_h + pad, columns * tile_w + pad), 128, np.uint8)
    big = (images.repeat_interleave(scale, 1).repeat_interleave(scale, 2) * 255).round().to(torch.uint8).numpy()
    for i in range(n):
        top, left = pad + (i // columns) * tile_h, pad + (i % columns) * tile_w
        grid[top : top + height * scale, left : left + width * scale] = big[i]
    return grid


# 3x5 glyphs, rows top to bottom as 3-bit masks
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "k": (4, 5, 6, 5, 5), "e": (7, 5, 7, 4, 7), "+": (0, 2, 7, 2, 0),
}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _text(canvas: np.ndarray, text: str, top: int, left: int, scale: int = 2) -> None:
    for i, char in enumerate(text):
        for r, bits in enumerate(_FONT.get(char, (0,) * 5)):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    y, x = top + r * scale, left + (i * 4 + c) * scale
                    canvas[y : y + scale, x : x + scale] = 0


def _label(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:.3g}"


def plot_lines(series: Sequence[tuple[Sequence[float], Sequence[float]]], width: int = 640, height: int = 360) -> np.ndarray:
    """Line plot of ``(xs, ys)`` series on shared axes (colours in `COLOURS` order), with the
    x and y ranges written at the axes' ends: an RGB ``uint8`` array."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 15, 15, height - 30
    xs_all = [x for xs, _ in series for x in xs]
    ys_all = [y for _, ys in series for y in ys if np.isfinite(y)]
    if not xs_all or not ys_all:
        return canvas
    x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
    y0, y1 = min(ys_all), max(ys_all)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 == y0 else (y0, y1)
    canvas[top:bottom + 1, left] = 0
    canvas[bottom, left:right + 1] = 0
    _text(canvas, _label(y1), top, 4)
    _text(canvas, _label(y0), bottom - 10, 4)
    _text(canvas, _label(x0), bottom + 8, left)
    _text(canvas, _label(x1), bottom + 8, right - 8 * len(_label(x1)))

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for (xs, ys), colour in zip(series, COLOURS):
        points = [to_pixel(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
            n = int(max(abs(bx - ax), abs(by - ay))) + 1
            px = np.linspace(ax, bx, n + 1).round().astype(int)
            py = np.linspace(ay, by, n + 1).round().astype(int)
            canvas[py, px] = colour
        if len(points) == 1:
            canvas[int(points[0][1]), int(points[0][0])] = colour
    return canvas
