"""Look up, validate and apply image shifts by name and severity."""

from __future__ import annotations

import operator
import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from tools.shifts.base import SEVERITIES, ImageFn, ShiftError, ShiftInfo
from tools.shifts.catalogue import RECIPES

SHIFTS: dict[str, ShiftInfo] = {name: recipe.info for name, recipe in RECIPES.items()}


def validate_shift(name: str, severity: int, greyscale: bool = False) -> None:
    """Raise ShiftError unless name is a known shift, severity is in 1..5 and the pair fits.

    greyscale=True marks the source images as grey-scale. Colour shifts are then rejected, even
    when the model sees three channels.
    """
    if name not in SHIFTS:
        known = ", ".join(sorted(SHIFTS))
        raise ShiftError(f"unknown shift {name!r}; known shifts: {known}")

    if isinstance(severity, bool):
        raise ShiftError(f"severity for shift {name!r} must be an integer in 1..5, got {severity!r}")
    try:
        level = operator.index(severity)
    except TypeError:
        raise ShiftError(
            f"severity for shift {name!r} must be an integer in 1..5, got {severity!r}") from None
    if level not in SEVERITIES:
        raise ShiftError(f"severity {level} for shift {name!r} is outside 1..5")

    if greyscale and SHIFTS[name].colour:
        raise ShiftError(
            f"shift {name!r} changes colour, but the source images are grey-scale; "
            "choose a shift whose colour flag is false")


def _check_seed(seed: int) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        raise ShiftError(f"seed must be a non-negative integer, got {seed!r}") from None
    if value < 0:
        raise ShiftError(f"seed must be a non-negative integer, got {value}")
    return value


def _check_image(image: np.ndarray, argument: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ShiftError(f"{argument} must be a uint8 numpy array, got {dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShiftError(f"{argument} must have shape (H, W, 3), got {image.shape}")


@lru_cache(maxsize=512)
def _built(name: str, severity: int, side: int) -> ImageFn:
    recipe = RECIPES[name]
    return recipe.build(recipe.levels[severity - 1], side)


def prepare_shift(name: str, severity: int, side: int) -> None:
    """Build and cache a shift for images of the given side, so later calls start at once."""
    _built(name, severity, side)


def _image_rng(seed: int, row: int, name: str) -> np.random.Generator:
    # Severity is left out on purpose: every severity of a shift draws the same random numbers for
    # an image, so severity 4 is a stronger version of the same artefact as severity 3.
    return np.random.default_rng([seed, row, zlib.crc32(name.encode())])


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[:, :, 0], image[:, :, 1])
                and np.array_equal(image[:, :, 0], image[:, :, 2]))


def _apply_checked(image: np.ndarray, name: str, severity: int, seed: int, row: int) -> np.ndarray:
    side = min(image.shape[0], image.shape[1])
    shift = _built(name, severity, side)
    rng = _image_rng(seed, row, name)

    # A grey image (three equal channels) is shifted as one channel, so noise and marks stay grey.
    if not SHIFTS[name].colour and _is_grey(image):
        single = np.ascontiguousarray(image[:, :, :1])
        return np.repeat(shift(single, rng), 3, axis=2)
    return shift(np.ascontiguousarray(image), rng)


def apply_shift(image: np.ndarray, name: str, severity: int, seed: int, row: int = 0) -> np.ndarray:
    """Apply one shift at one severity to an image.

    Parameters
    ----------
    image : uint8 array (H, W, 3), already at the model's input size.
    name, severity : a key of SHIFTS and an integer in 1..5.
    seed, row : the random draws depend only on (seed, row, name), so the output is the same on
        every call; ``shift_images(images, ...)[i]`` equals ``apply_shift(images[i], ..., row=i)``.

    Returns
    -------
    uint8 array (H, W, 3), a new array.
    """
    validate_shift(name, severity)
    _check_image(image, "image")
    return _apply_checked(image, name, int(severity), _check_seed(seed), int(row))


def shift_rows(images: np.ndarray, name: str, severity: int, seed: int, first_row: int,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Shift a block of images whose first row has index first_row in the whole set, unchecked."""
    out = np.empty_like(images)
    total = len(images)
    for i in range(total):
        out[i] = _apply_checked(images[i], name, severity, seed, first_row + i)
        if progress is not None and ((i + 1) % 64 == 0 or i + 1 == total):
            progress(i + 1, total)
    return out


def shift_images(images: np.ndarray, name: str, severity: int, seed: int,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Apply one shift at one severity to every image of a batch.

    images is uint8 (n, H, W, 3); the result has the same shape. Row i is deterministic in
    (row i's pixels, name, severity, seed, i). progress(done, total) is called every 64 images.
    """
    validate_shift(name, severity)
    seed = _check_seed(seed)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ShiftError(f"images must be a uint8 array of shape (n, H, W, 3), got {dtype} {shape}")
    return shift_rows(images, name, int(severity), seed, 0, progress)
