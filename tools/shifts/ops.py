"""Image shifts that albumentations 2.0.8 lacks or cannot hold at a fixed severity.

Every function takes a uint8 image of shape (H, W, C) with C = 1 or 3 and returns a new uint8
image of the same shape. Random draws come from the generator passed in. Each function draws the
same sequence at every severity, so a higher severity strengthens the same artefact (more of the
same hairs, the same stain direction) instead of drawing a new one.
"""

from __future__ import annotations

import numpy as np

# Dark brown of scalp and body hair on dermoscopy images (RGB).
HAIR_RGB = (45, 30, 22)
# Gentian violet of surgical skin markers (RGB).
INK_RGB = (95, 45, 140)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _colour_for(image: np.ndarray, rgb: tuple[int, int, int]) -> tuple[float, ...]:
    """Return rgb for a colour image, or its Rec. 601 luma for a one-channel image."""
    if image.shape[2] == 1:
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2],)
    return tuple(float(c) for c in rgb)


def _bezier_points(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, steps: int = 24) -> np.ndarray:
    """Sample a quadratic Bezier curve, returned as cv2 fixed-point coordinates (4 fraction bits)."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return np.rint(points * 16).astype(np.int32)


def _draw_polylines(image: np.ndarray, curves: list[np.ndarray], colour: tuple[float, ...],
                    thickness: int) -> np.ndarray:
    import cv2

    canvas = np.ascontiguousarray(image)
    if canvas.shape[2] == 1:
        flat = np.ascontiguousarray(canvas[:, :, 0])
        cv2.polylines(flat, curves, False, colour[0], thickness, cv2.LINE_AA, 4)
        return flat[:, :, None]
    cv2.polylines(canvas, curves, False, colour, thickness, cv2.LINE_AA, 4)
    return canvas


def disk_kernel(radius: float) -> np.ndarray:
    """Build a normalised disk (pillbox) kernel with an anti-aliased edge for a sub-pixel radius."""
    half = int(np.ceil(radius))
    size = 2 * half + 1
    supersample = 8
    coords = (np.arange(size * supersample) + 0.5) / supersample - half - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    inside = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    kernel = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return kernel / kernel.sum()


def defocus(image: np.ndarray, radius_px: float) -> np.ndarray:
    """Blur with a disk of radius_px pixels, the point spread function of an out-of-focus lens.

    Written here because albumentations' Defocus takes whole-pixel radii, which at 64 px
    collapses neighbouring severities onto the same kernel.
    """
    import cv2

    kernel = disk_kernel(radius_px)
    out = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


def white_balance(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Scale red by 1 + s and blue by 1 - s (warm) or the reverse (cool), s = strength.

    Written here because albumentations' PlanckianJitter samples from a temperature range that
    must contain its white point, so it cannot hold one fixed temperature per severity.
    """
    sign = 1.0 if rng.random() < 0.5 else -1.0
    gains = np.array([1.0 + sign * strength, 1.0, 1.0 - sign * strength])
    return _to_uint8(image.astype(np.float64) * gains)


def stain_variation(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Change the amount of each stain in haematoxylin-eosin-DAB (HED) optical density space.

    Each stain channel c becomes c * (1 + a_c) + b_c, with |a_c| = strength and
    |b_c| = strength / 20 optical density units and their signs drawn per image. The HED space
    is scikit-image's rgb2hed and hed2rgb (colour deconvolution of Ruifrok and Johnston, 2001).
    """
    from skimage.color import hed2rgb, rgb2hed

    scale_signs = rng.choice([-1.0, 1.0], size=3)
    offset_signs = rng.choice([-1.0, 1.0], size=3)
    hed = rgb2hed(image)
    hed = hed * (1.0 + scale_signs * strength) + offset_signs * strength / 20.0
    return _to_uint8(hed2rgb(hed) * 255.0)


def vignetting(image: np.ndarray, strength: float) -> np.ndarray:
    """Darken towards the corners: gain 1 - strength * (r / r_corner)^2 from the image centre."""
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (cy**2 + cx**2)
    gain = 1.0 - strength * r2
    return _to_uint8(image.astype(np.float64) * gain[:, :, None])


def specular_glare(image: np.ndarray, rng: np.random.Generator, count: int,
                   max_count: int) -> np.ndarray:
    """Paint count saturated white highlights with soft edges, each 3-7 % of the image side."""
    height, width = image.shape[:2]
    side = min(height, width)
    centres = rng.random((max_count, 2)) * [height, width]
    radii = rng.uniform(0.03, 0.07, size=(max_count, 2)) * side
    yy, xx = np.mgrid[0:height, 0:width]
    alpha = np.zeros((height, width))
    for (cy, cx), (ry, rx) in zip(centres[:count], radii[:count], strict=True):
        distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        # Fully white inside 70 % of the radius, fading to nothing at the radius.
        alpha = np.maximum(alpha, np.clip((1.0 - distance) / 0.3, 0.0, 1.0))
    out = image.astype(np.float64) * (1 - alpha[:, :, None]) + 255.0 * alpha[:, :, None]
    return _to_uint8(out)


def hair(image: np.ndarray, rng: np.random.Generator, count: int, max_count: int) -> np.ndarray:
    """Draw count dark curved hairs, 30-90 % of the side long, about 1 % of the side thick."""
    height, width = image.shape[:2]
    side = min(height, width)
    starts = rng.random((max_count, 2)) * [width, height]
    angles = rng.uniform(0, 2 * np.pi, max_count)
    lengths = rng.uniform(0.3, 0.9, max_count) * side
    bends = rng.normal(0, 0.15, (max_count, 2)) * side
    widths = rng.uniform(0.7, 1.4, max_count)
    shades = rng.uniform(0, 30, max_count)

    out = image.copy()
    for i in range(count):
        direction = np.array([np.cos(angles[i]), np.sin(angles[i])])
        end = starts[i] + direction * lengths[i]
        middle = (starts[i] + end) / 2 + bends[i]
        curve = _bezier_points(starts[i], middle, end)
        thickness = max(1, round(widths[i] * side / 100))
        rgb = tuple(int(c + shades[i]) for c in HAIR_RGB)
        out = _draw_polylines(out, [curve], _colour_for(out, rgb), thickness)
    return out


def ink_marks(image: np.ndarray, rng: np.random.Generator, count: int,
              max_count: int) -> np.ndarray:
    """Draw count violet skin-marker arcs around the centre, about 2.5 % of the side thick."""
    height, width = image.shape[:2]
    side = min(height, width)
    radii = rng.uniform(0.3, 0.47, max_count) * side
    starts = rng.uniform(0, 2 * np.pi, max_count)
    spans = rng.uniform(np.pi / 5, 2 * np.pi / 3, max_count)

    overlay = image.copy()
    centre = np.array([width / 2.0, height / 2.0])
    thickness = max(1, round(0.025 * side))
    for i in range(count):
        theta = np.linspace(starts[i], starts[i] + spans[i], 32)[:, None]
        points = centre + radii[i] * np.hstack([np.cos(theta), np.sin(theta)])
        curve = np.rint(points * 16).astype(np.int32)
        overlay = _draw_polylines(overlay, [curve], _colour_for(overlay, INK_RGB), thickness)

    # Marker ink is translucent: blend it at 75 % opacity where it was drawn.
    blended = 0.25 * image.astype(np.float64) + 0.75 * overlay.astype(np.float64)
    return np.where(overlay != image, _to_uint8(blended), image)


def ruler(image: np.ndarray, rng: np.random.Generator, depth: float) -> np.ndarray:
    """Overlay a translucent ruler with tick marks along one edge, depth a fraction of the side."""
    turns = int(rng.integers(4))
    rotated = np.ascontiguousarray(np.rot90(image, turns))
    height, width = rotated.shape[:2]
    band = max(2, round(depth * height))

    out = rotated.astype(np.float64)
    out[:band] = 0.4 * out[:band] + 0.6 * 235.0
    out = _to_uint8(out)

    spacing = max(2.0, width / 24.0)
    colour = _colour_for(out, (20, 20, 20))
    ticks = np.arange(spacing / 2, width, spacing)
    for k, x in enumerate(ticks):
        length = band * (0.8 if k % 4 == 0 else 0.45)
        line = np.rint(np.array([[x, 0.0], [x, length]]) * 16).astype(np.int32)
        out = _draw_polylines(out, [line], colour, 1)
    return np.ascontiguousarray(np.rot90(out, -turns))


def grid_lines(image: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Multiply by the shadow of an anti-scatter grid: 1 - a * (1 + cos(2 pi x / p)) / 2.

    The period p is 2.5 % of the side and at least 2.2 px, so at 64 px the lines are about two
    pixels apart, as fine as the image allows.
    """
    height, width = image.shape[:2]
    vertical = rng.random() < 0.5
    phase = rng.uniform(0, 2 * np.pi)
    period = max(2.2, 0.025 * min(height, width))
    positions = np.arange(width if vertical else height)
    profile = 1.0 - amplitude * (1.0 + np.cos(2 * np.pi * positions / period + phase)) / 2.0
    gain = profile[None, :] if vertical else profile[:, None]
    return _to_uint8(image.astype(np.float64) * gain[:, :, None])
