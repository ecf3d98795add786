"""Contact sheet: one image under several shifts at every severity, as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from tools.shifts.base import SEVERITIES, ShiftError
from tools.shifts.registry import apply_shift, validate_shift

# Tiles are enlarged by a whole factor (nearest neighbour) to at least this many pixels.
_MIN_TILE = 96
_LABEL_WIDTH = 130
_HEADER_HEIGHT = 20
_GAP = 2


def contact_sheet(image: np.ndarray, names: Sequence[str],
                  severities: Sequence[int] = SEVERITIES, seed: int = 0) -> bytes:
    """Draw image clean and under each named shift at each severity; return PNG bytes.

    One row per shift, labelled with its name; the first column is the clean image and the rest
    are the severities in the order given. Tiles are enlarged by an integer factor with nearest
    neighbour sampling, so each tile shows the shifted pixels exactly.
    """
    from PIL import Image, ImageDraw

    if not names:
        raise ShiftError("names is empty; give at least one shift for the contact sheet")
    if not severities:
        raise ShiftError("severities is empty; give at least one severity in 1..5")
    for name in names:
        for severity in severities:
            validate_shift(name, severity)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ShiftError(f"image must be a uint8 array of shape (H, W, 3), got shape {shape}")

    height, width = image.shape[:2]
    factor = max(1, -(-_MIN_TILE // min(height, width)))
    tile_h, tile_w = height * factor, width * factor
    columns = 1 + len(severities)
    sheet = Image.new("RGB", (_LABEL_WIDTH + columns * (tile_w + _GAP),
                              _HEADER_HEIGHT + len(names) * (tile_h + _GAP)), "white")
    draw = ImageDraw.Draw(sheet)

    headers = ["clean", *(f"severity {s}" for s in severities)]
    for column, header in enumerate(headers):
        draw.text((_LABEL_WIDTH + column * (tile_w + _GAP) + 2, 4), header, fill="black")

    for row, name in enumerate(names):
        top = _HEADER_HEIGHT + row * (tile_h + _GAP)
        draw.text((4, top + tile_h // 2 - 6), name, fill="black")
        tiles = [image] + [apply_shift(image, name, severity, seed) for severity in severities]
        for column, tile in enumerate(tiles):
            enlarged = np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)
            sheet.paste(Image.fromarray(enlarged), (_LABEL_WIDTH + column * (tile_w + _GAP), top))

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
