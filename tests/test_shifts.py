"""Image shift registry: determinism, severity ordering, and rejection of bad requests."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from tools.shifts import SHIFTS, ShiftError, apply_shift, shift_images, validate_shift

FIRST_SLICE = ["gaussian_noise", "gaussian_blur", "brightness", "contrast", "jpeg", "rotation"]
FAMILIES = {"noise", "blur", "exposure", "colour", "compression", "geometry", "artefact"}


def lesion_like_images(n: int = 3, side: int = 64, seed: int = 7) -> np.ndarray:
    """Synthetic dermoscopy-like images: skin-tone gradient, a textured dark blob, fine lines."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(n):
        skin = np.array([205, 150, 125]) + rng.normal(0, 8, 3)
        base = skin[None, None, :] * (0.85 + 0.15 * xx[:, :, None])
        cy, cx = rng.uniform(0.35, 0.65, 2)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        blob = np.clip(1.4 - r / 0.22, 0, 1)[:, :, None]
        lesion = np.array([110, 60, 45]) + rng.normal(0, 10, (side, side, 3))
        image = base * (1 - blob) + lesion * blob
        image[::7, :, 1] -= 25  # fine periodic structure, so blur and resampling show up
        images.append(np.clip(image + rng.normal(0, 3, image.shape), 0, 255))
    return np.stack(images).astype(np.uint8)


def psnr(clean: np.ndarray, shifted: np.ndarray) -> float:
    mse = np.mean((clean.astype(np.float64) - shifted.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_registry_has_25_shifts_in_families():
    assert len(SHIFTS) >= 25
    assert {info.family for info in SHIFTS.values()} == FAMILIES
    for name in FIRST_SLICE:
        assert name in SHIFTS


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_registry_entry_documents_five_severities(name):
    info = SHIFTS[name]
    assert info.name == name
    assert len(info.severity_meaning) == 5
    assert len(set(info.severity_meaning)) == 5
    assert info.description
    assert info.domains


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_shift_builds_without_albumentations_warnings(name):
    # albumentations 2.x warns and falls back to defaults on argument names it does not know.
    from tools.shifts.registry import _built

    _built.cache_clear()
    image = lesion_like_images(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for severity in range(1, 6):
            apply_shift(image, name, severity, seed=0)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_shift_is_deterministic(name):
    images = lesion_like_images(3)
    for severity in (1, 3, 5):
        first = shift_images(images, name, severity, seed=11)
        second = shift_images(images.copy(), name, severity, seed=11)
        assert first.dtype == np.uint8
        assert first.shape == images.shape
        np.testing.assert_array_equal(first, second)
        # Row i of a batch equals the single-image call for that row.
        np.testing.assert_array_equal(first[2], apply_shift(images[2], name, severity, 11, row=2))


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_shift_changes_image_and_depends_on_seed(name):
    # Eight images, because a shift whose only draw is a sign per image (brightness, gamma)
    # repeats for another seed with probability 1/2 per image.
    images = lesion_like_images(8)
    shifted = shift_images(images, name, 5, seed=1)
    assert not np.array_equal(shifted, images)
    if name not in {"vignetting", "contrast", "bit_depth", "defocus_blur", "gaussian_blur",
                    "downsample", "jpeg"}:
        # Shifts with random draws give other pixels for another seed.
        assert not np.array_equal(shifted, shift_images(images, name, 5, seed=2))


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_severity_lowers_psnr_monotonically(name):
    images = lesion_like_images(4)
    values = [psnr(images, shift_images(images, name, severity, seed=3))
              for severity in range(1, 6)]
    assert values[0] < float("inf"), f"{name}: severity 1 leaves the images unchanged"
    for lower, higher in itertools.pairwise(values):
        assert higher < lower, f"{name}: PSNR by severity {np.round(values, 2).tolist()}"


@pytest.mark.parametrize("name", sorted(n for n in SHIFTS if not SHIFTS[n].colour))
def test_grey_image_stays_grey(name):
    grey = np.repeat(lesion_like_images(2)[:, :, :, :1], 3, axis=3)
    shifted = shift_images(grey, name, 4, seed=0)
    np.testing.assert_array_equal(shifted[..., 0], shifted[..., 1])
    np.testing.assert_array_equal(shifted[..., 0], shifted[..., 2])


def test_gaussian_noise_sigma_matches_documented_grey_levels():
    flat = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    for severity, sigma in zip(range(1, 6), (4, 8, 13, 20, 30), strict=True):
        noisy = shift_images(flat, "gaussian_noise", severity, seed=0).astype(np.float64)
        assert abs(noisy.std() - sigma) < 0.1 * sigma
        assert str(sigma) in SHIFTS["gaussian_noise"].severity_meaning[severity - 1]


def test_colour_shift_rejected_on_greyscale_source():
    colour_shifts = [name for name, info in SHIFTS.items() if info.colour]
    assert {"hue", "saturation", "white_balance", "stain_variation"} <= set(colour_shifts)
    for name in colour_shifts:
        with pytest.raises(ShiftError, match=name):
            validate_shift(name, 2, greyscale=True)
    validate_shift("gaussian_noise", 2, greyscale=True)


def test_unknown_shift_name_rejected():
    with pytest.raises(ShiftError, match="'snow'"):
        validate_shift("snow", 1)
    with pytest.raises(ShiftError, match="'snow'"):
        apply_shift(lesion_like_images(1)[0], "snow", 1, seed=0)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, "3", True])
def test_severity_outside_range_rejected(severity):
    with pytest.raises(ShiftError, match="severity") as error:
        validate_shift("jpeg", severity)
    assert repr(severity) in str(error.value) or str(severity) in str(error.value)


def test_bad_images_rejected():
    with pytest.raises(ShiftError, match="uint8"):
        shift_images(np.zeros((2, 8, 8, 3), dtype=np.float32), "jpeg", 1, seed=0)
    with pytest.raises(ShiftError, match=r"\(8, 8\)"):
        apply_shift(np.zeros((8, 8), dtype=np.uint8), "jpeg", 1, seed=0)
    with pytest.raises(ShiftError, match="seed"):
        apply_shift(np.zeros((8, 8, 3), dtype=np.uint8), "jpeg", 1, seed=-4)


def test_shift_images_reports_progress():
    calls = []
    shift_images(lesion_like_images(70, side=16), "jpeg", 2, seed=0,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(64, 70), (70, 70)]
