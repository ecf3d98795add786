"""The catalogue of image shifts: family, meaning of each severity, and how each is built.

Severities are physical quantities, so "severity 3" means the same thing on every dataset.
Sizes (blur radii, displacements, mark widths) are fractions of the image side min(H, W),
because shifts apply at the model's input size, after resizing.
Built with albumentations 2.0.8 where it has the transform; the rest are in ``ops``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np

from tools.shifts import ops
from tools.shifts.base import ImageFn, Recipe, ShiftInfo

ALL_DOMAINS = ("dermatology", "histopathology", "chest_radiography", "ophthalmology",
               "haematology")
MICROSCOPY = ("histopathology", "haematology")
# Colour shifts make no sense on grey-scale radiographs.
COLOUR_DOMAINS = tuple(d for d in ALL_DOMAINS if d != "chest_radiography")


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**32))


def _albumentations(factory: Callable) -> ImageFn:
    """Build factory(A, cv2) into an ImageFn that reseeds the transform for every image.

    albumentations 2.x only warns about argument names it does not know (1.x names among them)
    and then uses its defaults, so any warning while building is raised as an error here.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations
    import cv2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform = factory(albumentations, cv2)

    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        transform.set_random_seed(_draw_seed(rng))
        return transform(image=image)["image"].reshape(image.shape)

    return run


def _either(first: ImageFn, second: ImageFn) -> ImageFn:
    """Apply first or second with equal probability, for shifts that go both ways."""

    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        chosen = first if rng.random() < 0.5 else second
        return chosen(image, rng)

    return run


def _meanings(template: str, levels: tuple) -> tuple[str, str, str, str, str]:
    return tuple(template.format(level) for level in levels)  # type: ignore[return-value]


def _odd_lengths(fractions: tuple[float, ...], side: int) -> list[int]:
    """Kernel lengths fraction * side rounded to odd integers >= 3, strictly increasing."""
    lengths: list[int] = []
    for fraction in fractions:
        length = max(3, 2 * round(fraction * side / 2) + 1)
        if lengths and length <= lengths[-1]:
            length = lengths[-1] + 2
        lengths.append(length)
    return lengths


# ---- builders: (level, side) -> ImageFn ------------------------------------------------------

def _gaussian_noise(sigma: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.GaussNoise(
        std_range=(sigma / 255, sigma / 255), mean_range=(0.0, 0.0), per_channel=True, p=1.0))


def _shot_noise(photons: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.ShotNoise(
        scale_range=(1.0 / photons, 1.0 / photons), p=1.0))


def _speckle_noise(half_width: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.MultiplicativeNoise(
        multiplier=(1 - half_width, 1 + half_width), per_channel=True, elementwise=True, p=1.0))


def _gaussian_blur(fraction: float, side: int) -> ImageFn:
    sigma = fraction * side
    # The kernel reaches 3 sigma on each side and is at least 3 px wide.
    size = max(3, 2 * int(np.ceil(3 * sigma)) + 1)
    return _albumentations(lambda A, cv2: A.GaussianBlur(
        blur_limit=(size, size), sigma_limit=(sigma, sigma), p=1.0))


def _defocus_blur(fraction: float, side: int) -> ImageFn:
    radius = fraction * side
    return lambda image, rng: ops.defocus(image, radius)


_MOTION_FRACTIONS = (0.04, 0.07, 0.1, 0.14, 0.19)


def _motion_blur(fraction: float, side: int) -> ImageFn:
    length = _odd_lengths(_MOTION_FRACTIONS, side)[_MOTION_FRACTIONS.index(fraction)]
    return _albumentations(lambda A, cv2: A.MotionBlur(
        blur_limit=(length, length), allow_shifted=False, direction_range=(0.0, 0.0), p=1.0))


def _brightness(delta: float, side: int) -> ImageFn:
    def build(sign: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.RandomBrightnessContrast(
            brightness_limit=(sign * delta, sign * delta), contrast_limit=(0.0, 0.0), p=1.0))

    return _either(build(1.0), build(-1.0))


def _contrast(factor: float, side: int) -> ImageFn:
    # ColorJitter blends towards the mean grey level (torchvision's definition), so lower contrast
    # keeps mean brightness; RandomBrightnessContrast would scale every pixel and darken instead.
    return _albumentations(lambda A, cv2: A.ColorJitter(
        brightness=(1.0, 1.0), contrast=(factor, factor), saturation=(1.0, 1.0), hue=(0.0, 0.0),
        p=1.0))


def _gamma(gamma: float, side: int) -> ImageFn:
    def build(value: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.RandomGamma(
            gamma_limit=(100 * value, 100 * value), p=1.0))

    return _either(build(gamma), build(1.0 / gamma))


def _saturation(change: float, side: int) -> ImageFn:
    def build(factor: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.ColorJitter(
            brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(factor, factor),
            hue=(0.0, 0.0), p=1.0))

    return _either(build(1.0 + change), build(1.0 - change))


def _hue(degrees: float, side: int) -> ImageFn:
    def build(shift: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.HueSaturationValue(
            hue_shift_limit=(shift, shift), sat_shift_limit=(0.0, 0.0),
            val_shift_limit=(0.0, 0.0), p=1.0))

    return _either(build(degrees), build(-degrees))


def _white_balance(strength: float, side: int) -> ImageFn:
    return lambda image, rng: ops.white_balance(image, rng, strength)


def _stain_variation(strength: float, side: int) -> ImageFn:
    return lambda image, rng: ops.stain_variation(image, rng, strength)


def _jpeg(quality: int, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.ImageCompression(
        compression_type="jpeg", quality_range=(quality, quality), p=1.0))


def _downsample(scale: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.Downscale(
        scale_range=(scale, scale),
        interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}, p=1.0))


def _bit_depth(bits: int, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.Posterize(num_bits=bits, p=1.0))


def _rotation(degrees: float, side: int) -> ImageFn:
    def build(angle: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.Rotate(
            limit=(angle, angle), border_mode=cv2.BORDER_REFLECT_101, p=1.0))

    return _either(build(degrees), build(-degrees))


def _zoom(scale: float, side: int) -> ImageFn:
    def build(value: float) -> ImageFn:
        return _albumentations(lambda A, cv2: A.Affine(
            scale=(value, value), border_mode=cv2.BORDER_REFLECT_101, p=1.0))

    return _either(build(scale), build(1.0 / scale))


def _perspective(scale: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.Perspective(
        scale=(scale, scale), keep_size=True, border_mode=cv2.BORDER_REFLECT_101, p=1.0))


# Measured with albumentations 2.0.8 at 64 and 224 px: the RMS displacement of ElasticTransform
# is about 0.09-0.10 * alpha / sigma pixels, so alpha = rms * sigma / 0.1 aims at a target RMS.
_ELASTIC_SIGMA_FRACTION = 0.08


def _elastic(rms_fraction: float, side: int) -> ImageFn:
    sigma = _ELASTIC_SIGMA_FRACTION * side
    alpha = rms_fraction * side * sigma / 0.1
    return _albumentations(lambda A, cv2: A.ElasticTransform(
        alpha=alpha, sigma=sigma, border_mode=cv2.BORDER_REFLECT_101, p=1.0))


_HAIR_COUNTS = (2, 4, 7, 11, 16)


def _hair(count: int, side: int) -> ImageFn:
    return lambda image, rng: ops.hair(image, rng, count, max(_HAIR_COUNTS))


_INK_COUNTS = (1, 2, 3, 4, 6)


def _ink_marks(count: int, side: int) -> ImageFn:
    return lambda image, rng: ops.ink_marks(image, rng, count, max(_INK_COUNTS))


def _ruler(depth: float, side: int) -> ImageFn:
    return lambda image, rng: ops.ruler(image, rng, depth)


def _vignetting(strength: float, side: int) -> ImageFn:
    return lambda image, rng: ops.vignetting(image, strength)


_GLARE_COUNTS = (1, 2, 3, 5, 8)


def _specular_glare(count: int, side: int) -> ImageFn:
    return lambda image, rng: ops.specular_glare(image, rng, count, max(_GLARE_COUNTS))


def _grid_lines(amplitude: float, side: int) -> ImageFn:
    return lambda image, rng: ops.grid_lines(image, rng, amplitude)


def _uneven_illumination(intensity: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.Illumination(
        mode="linear", intensity_range=(intensity, intensity), effect_type="both",
        angle_range=(0.0, 360.0), p=1.0))


def _occlusion(area: float, side: int) -> ImageFn:
    edge = float(np.sqrt(area))
    return _albumentations(lambda A, cv2: A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(edge, edge), hole_width_range=(edge, edge),
        fill=0, p=1.0))


def _dead_pixels(fraction: float, side: int) -> ImageFn:
    return _albumentations(lambda A, cv2: A.PixelDropout(
        dropout_prob=fraction, per_channel=False, drop_value=0, p=1.0))


# ---- the catalogue ---------------------------------------------------------------------------

def _recipe(name: str, family: str, description: str, template: str, levels: tuple,
            build: Callable, *, colour: bool = False,
            domains: tuple[str, ...] = ALL_DOMAINS) -> Recipe:
    info = ShiftInfo(name=name, family=family, description=description,
                     severity_meaning=_meanings(template, levels), colour=colour, domains=domains)
    return Recipe(info=info, levels=levels, build=build)


_RECIPES = [
    # noise
    _recipe("gaussian_noise", "noise", "Additive Gaussian sensor noise, independent per channel.",
            "noise sigma {} grey levels of 255", (4, 8, 13, 20, 30), _gaussian_noise),
    _recipe("shot_noise", "noise",
            "Poisson (photon counting) noise, stronger in relative terms in dark regions.",
            "{} photons per unit intensity at full white", (300, 120, 50, 22, 10), _shot_noise),
    _recipe("speckle_noise", "noise",
            "Multiplicative noise: each pixel scaled by a uniform random gain.",
            "per-pixel gain uniform in 1 +/- {}", (0.05, 0.1, 0.15, 0.22, 0.3),
            _speckle_noise),
    # blur
    _recipe("gaussian_blur", "blur", "Gaussian blur, as from a soft or poorly focused optic.",
            "Gaussian sigma {:.1%} of the image side", (0.006, 0.01, 0.015, 0.021, 0.03),
            _gaussian_blur),
    _recipe("defocus_blur", "blur", "Disk blur of an out-of-focus lens.",
            "disk radius {:.1%} of the image side", (0.01, 0.016, 0.024, 0.034, 0.045),
            _defocus_blur),
    _recipe("motion_blur", "blur",
            "Linear motion blur in a random direction, from patient or camera movement.",
            "blur length {:.0%} of the image side (rounded to an odd pixel count >= 3)",
            _MOTION_FRACTIONS, _motion_blur),
    # exposure
    _recipe("brightness", "exposure",
            "Over- or under-exposure: a constant added to every pixel, sign random per image.",
            "brightness +/- {:.0%} of the full grey range", (0.05, 0.1, 0.16, 0.23, 0.3),
            _brightness),
    _recipe("contrast", "exposure",
            "Reduced contrast: pixels pulled towards the mean grey level of the image.",
            "contrast factor {} (1 = unchanged)", (0.8, 0.65, 0.5, 0.35, 0.2), _contrast),
    _recipe("gamma", "exposure",
            "Gamma (tone curve) change from another display or detector calibration.",
            "gamma {} or its reciprocal, chosen per image", (1.15, 1.3, 1.5, 1.8, 2.2), _gamma),
    # colour
    _recipe("saturation", "colour", "Colour saturation raised or lowered, chosen per image.",
            "saturation factor 1 +/- {}", (0.15, 0.3, 0.45, 0.6, 0.75), _saturation,
            colour=True, domains=COLOUR_DOMAINS),
    _recipe("hue", "colour", "Hue rotation, as from another sensor's colour processing.",
            "hue rotated by +/- {} degrees", (4, 8, 14, 22, 32), _hue, colour=True,
            domains=COLOUR_DOMAINS),
    _recipe("white_balance", "colour",
            "White-balance error: red and blue gains moved in opposite directions (warm or cool).",
            "red and blue gains 1 +/- {}", (0.04, 0.08, 0.13, 0.19, 0.26), _white_balance,
            colour=True, domains=COLOUR_DOMAINS),
    _recipe("stain_variation", "colour",
            "H&E stain variation in haematoxylin-eosin-DAB space (scikit-image rgb2hed).",
            "each stain amount scaled by 1 +/- {0} and offset by {0}/20 optical density",
            (0.04, 0.08, 0.12, 0.17, 0.23), _stain_variation, colour=True, domains=MICROSCOPY),
    # compression and resolution
    _recipe("jpeg", "compression", "Lossy JPEG compression, as by PACS or messaging apps.",
            "JPEG quality {}", (70, 50, 35, 22, 12), _jpeg),
    _recipe("downsample", "compression",
            "Lower acquisition resolution: downsampled (area) then upsampled (bilinear).",
            "downsampled to {:.0%} of the side, then upsampled", (0.75, 0.6, 0.45, 0.33, 0.25),
            _downsample),
    _recipe("bit_depth", "compression",
            "Lower bit depth: grey levels quantised, as on older detectors or 8-bit exports.",
            "{} bits per channel", (6, 5, 4, 3, 2), _bit_depth),
    # geometry
    _recipe("rotation", "geometry",
            "Rotation by a fixed angle, sign random per image, borders mirrored.",
            "rotation +/- {} degrees", (5, 10, 20, 30, 45), _rotation),
    _recipe("zoom", "geometry",
            "Magnification change: zoomed in or out, chosen per image, borders mirrored.",
            "scale {} or its reciprocal", (1.08, 1.16, 1.27, 1.4, 1.6), _zoom),
    _recipe("perspective", "geometry",
            "Perspective distortion from an oblique camera angle.",
            "corner offsets drawn with standard deviation {:.0%} of the side",
            (0.02, 0.04, 0.06, 0.09, 0.12), _perspective),
    _recipe("elastic", "geometry",
            "Smooth random elastic deformation, as of skin or tissue stretched under the lens.",
            "RMS displacement about {:.1%} of the side (smoothing sigma 8 % of the side)",
            (0.005, 0.01, 0.015, 0.022, 0.03), _elastic),
    # artefacts
    _recipe("hair", "artefact", "Dark curved hairs across the image (dermoscopy).",
            "{} hairs", _HAIR_COUNTS, _hair, domains=("dermatology",)),
    _recipe("ink_marks", "artefact",
            "Violet surgical-marker arcs drawn around the lesion (dermoscopy).",
            "{} marker arcs", _INK_COUNTS, _ink_marks, colour=True, domains=("dermatology",)),
    _recipe("ruler", "artefact",
            "Translucent ruler with tick marks along one edge (dermoscopy, clinical photos).",
            "ruler band {:.0%} of the side deep", (0.05, 0.08, 0.11, 0.15, 0.2), _ruler,
            domains=("dermatology",)),
    _recipe("vignetting", "artefact",
            "Darkening towards the corners, as by a dermatoscope or fundus camera field stop.",
            "corner brightness reduced by {:.0%}", (0.15, 0.3, 0.45, 0.6, 0.75), _vignetting,
            domains=("dermatology", "ophthalmology", "histopathology", "haematology")),
    _recipe("specular_glare", "artefact",
            "Saturated white highlights from reflections off skin, gel or the cornea.",
            "{} highlights", _GLARE_COUNTS, _specular_glare,
            domains=("dermatology", "ophthalmology")),
    _recipe("grid_lines", "artefact",
            "Anti-scatter grid shadow lines (radiography).",
            "line depth {:.0%} of the local brightness", (0.04, 0.08, 0.12, 0.18, 0.25),
            _grid_lines, domains=("chest_radiography",)),
    _recipe("uneven_illumination", "artefact",
            "Linear illumination gradient in a random direction (microscope or fundus lamp).",
            "brightness gradient intensity {}", (0.04, 0.08, 0.12, 0.16, 0.2),
            _uneven_illumination,
            domains=("histopathology", "haematology", "ophthalmology", "dermatology")),
    _recipe("occlusion", "artefact",
            "One black rectangle hiding part of the image (dressing, label, finger, implant).",
            "square covering {:.0%} of the image", (0.02, 0.05, 0.1, 0.16, 0.25), _occlusion),
    _recipe("dead_pixels", "artefact", "Dead (black) detector pixels scattered over the image.",
            "{:.1%} of pixels dead", (0.002, 0.005, 0.01, 0.02, 0.04), _dead_pixels),
]

RECIPES: dict[str, Recipe] = {recipe.info.name: recipe for recipe in _RECIPES}
