"""Types shared by the shift registry, its catalogue and the population shifts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)

# A built shift: (image uint8 (H, W, C), per-image generator) -> uint8 (H, W, C).
ImageFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class ShiftError(ValueError):
    """Invalid shift request: unknown name, severity, column, or an image of the wrong form."""


@dataclass(frozen=True)
class ShiftInfo:
    """Catalogue entry of one image shift, as planners and reports read it."""

    name: str
    family: str
    description: str
    # Physical meaning of severities 1..5, in order.
    severity_meaning: tuple[str, str, str, str, str]
    # True when the shift alters hue or colour balance, so it is rejected on grey-scale sources.
    colour: bool
    domains: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    """How to build one shift: its public entry, its five parameter levels and a builder."""

    info: ShiftInfo
    levels: tuple
    # build(level, side) -> ImageFn, where side is min(H, W) of the images it will shift.
    build: Callable[[object, int], ImageFn]
