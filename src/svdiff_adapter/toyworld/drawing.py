"""Drawing the toy world's shapes and patterns with PIL on a supersampled canvas (reduced to 64x64 afterwards)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


IMAGE_SIZE = 64
SUPERSAMPLING = 4
CANVAS = IMAGE_SIZE * SUPERSAMPLING


def _rot(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _polygon(kind: str, r: float) -> np.ndarray:
    """Polygon vertices (x, y) centred on 0 for a shape of nominal radius ``r`` (y grows downwards)."""
    if kind == "square":
        h = 0.84 * r
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if kind == "triangle":
        R = 1.12 * r
        ang = np.deg2rad([-90, 30, 150])
        pts = np.stack([R * np.cos(ang), R * np.sin(ang)], 1)
        return pts + np.array([0.0, 0.18 * r])  # centre the bounding box vertically
    if kind == "star":
        R, rin = 1.08 * r, 0.45 * r
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, R, rin)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1) + np.array([0.0, 0.08 * r])
    if kind == "cross":
        a, w = 0.98 * r, 0.34 * r
        return np.array(
            [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]]
        )
    raise ValueError(kind)


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """The shape's mask on the supersampled canvas: centre (cx, cy), nominal radius r, rotated by `angle`."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        R = 0.95 * r
        draw.ellipse([cx - R, cy - R, cx + R, cy + R], fill=255)
    elif shape == "ring":
        R, rin = 1.0 * r, 0.56 * r
        draw.ellipse([cx - R, cy - R, cx + R, cy + R], fill=255)
        draw.ellipse([cx - rin, cy - rin, cx + rin, cy + rin], fill=0)
    else:
        pts = _rot(_polygon(shape, r), angle) + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return mask


def pattern_fill(
    pattern: str, c1: np.ndarray, c2: np.ndarray, cx: float, cy: float, r: float, angle: float, phase: float
) -> Image.Image:
    """A full-canvas RGB fill carrying the pattern in the shape's rotated frame (drawn with PIL: fast)."""
    fill = Image.new("RGB", (CANVAS, CANVAS), tuple(int(x) for x in c1))
    draw = ImageDraw.Draw(fill)
    col = tuple(int(x) for x in c2)
    ext = 1.6 * r
    centre = np.array([cx, cy])

    def poly(pts_uv: np.ndarray) -> None:
        pts = _rot(pts_uv, angle) + centre
        draw.polygon([tuple(p) for p in pts.tolist()], fill=col)

    if pattern == "stripes":
        # width of one stripe: two stripe pairs across the object (about 9 px at 64x64, i.e. more than two latent
        # pixels of a 4x-downsampling VAE, so that the VAE can represent stripes)
        half = 2.1 * r / 4.0
        k0 = math.floor(-ext / half - phase) - 1
        for k in range(k0, k0 + int(2 * ext / half) + 4):
            if k % 2:
                v0 = (k + phase) * half
                poly(np.array([[-ext, v0], [ext, v0], [ext, v0 + half], [-ext, v0 + half]]))
    elif pattern == "split":
        poly(np.array([[0.0, -ext], [ext, -ext], [ext, ext], [0.0, ext]]))
    elif pattern == "dots":
        period = 0.9 * r  # dots about 9 px wide at 64x64
        rad = 0.3 * period
        n = int(ext / period) + 2
        g = (np.arange(-n, n + 1) + phase - 0.5) * period
        uu, vv = np.meshgrid(g, g)
        pts = _rot(np.stack([uu.ravel(), vv.ravel()], 1), angle) + centre
        for x, y in pts.tolist():
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=col)
    else:
        raise ValueError(pattern)
    return fill
