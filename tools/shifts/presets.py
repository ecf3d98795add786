"""Domain presets: which shifts matter for a clinical domain, at which severities, and why.

Planners read these tables to propose shifts. Each entry gives one plain sentence on where the
shift happens in deployment, which the plan can quote as its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PresetShift:
    """One shift of a preset: registry name, severities to run, and where it occurs."""

    name: str
    severities: tuple[int, ...]
    where: str


@dataclass(frozen=True)
class DomainPreset:
    """Shifts and subgroup columns suggested for one clinical imaging domain."""

    domain: str
    # Lower-case words that name this domain in free text ("fundus" for ophthalmology); they
    # match at the start of a word, so "dermatologist" also matches "dermatologists".
    aliases: tuple[str, ...]
    shifts: tuple[PresetShift, ...]
    # Metadata columns worth a subgroup analysis when the dataset has them.
    subgroup_columns: tuple[str, ...]


def _shift(name: str, severities: str, where: str) -> PresetShift:
    """Parse severities written as "1-5" or "1,3,5"."""
    if "-" in severities:
        first, last = (int(part) for part in severities.split("-"))
        levels = tuple(range(first, last + 1))
    else:
        levels = tuple(int(part) for part in severities.split(","))
    return PresetShift(name=name, severities=levels, where=where)


_DERMATOLOGY = DomainPreset(
    domain="dermatology",
    aliases=("dermatology", "dermatologist", "dermoscopy", "dermatoscopy", "skin", "skin lesion",
             "melanoma", "teledermatology"),
    shifts=(
        _shift("defocus_blur", "1-4", "A hand-held dermatoscope held slightly off the skin gives "
               "an out-of-focus image."),
        _shift("motion_blur", "1-3", "Hand or patient movement during a hand-held capture smears "
               "the lesion."),
        _shift("gaussian_noise", "1-3", "Phone-mounted dermatoscopes in dim rooms add sensor "
               "noise."),
        _shift("brightness", "1-4", "Another dermatoscope model or light setting changes the "
               "exposure."),
        _shift("contrast", "1-3", "Cameras differ in how much contrast their processing keeps."),
        _shift("white_balance", "1-4", "Each dermatoscope and phone camera applies its own white "
               "balance, so skin and lesion colours differ between devices."),
        _shift("hue", "1-3", "Colour processing differs between dermatoscope brands."),
        _shift("saturation", "1-4", "Colour processing differs between dermatoscope brands."),
        _shift("jpeg", "1-5", "Images sent through teledermatology portals or messaging apps are "
               "recompressed as JPEG."),
        _shift("downsample", "1-4", "Older cameras and teledermatology uploads have lower "
               "resolution."),
        _shift("rotation", "1-5", "Dermoscopy has no fixed orientation, so lesions appear at "
               "any angle."),
        _shift("zoom", "1-4", "Dermatoscope lenses and working distances differ in "
               "magnification."),
        _shift("elastic", "1-3", "Pressing a contact dermatoscope onto the skin stretches the "
               "lesion."),
        _shift("hair", "1-5", "Hair covers lesions on the scalp, arms, legs and trunk."),
        _shift("ink_marks", "1-4", "Clinicians mark lesions planned for excision with a skin "
               "marker before imaging."),
        _shift("ruler", "1-5", "A ruler is placed beside the lesion to document its size."),
        _shift("vignetting", "1-5", "Contact dermatoscopes leave dark corners outside their round "
               "field of view."),
        _shift("specular_glare", "1-5", "Non-polarised contact dermoscopy with gel or alcohol "
               "reflects light into bright spots."),
        _shift("occlusion", "1-3", "Dressings, plasters or a finger partly cover the lesion."),
    ),
    subgroup_columns=("dataset", "site", "sex", "age", "localization", "fitzpatrick_skin_type"),
)

_HISTOPATHOLOGY = DomainPreset(
    domain="histopathology",
    aliases=("histopathology", "pathology", "pathologist", "histology", "h&e", "whole slide",
             "wsi", "digital pathology"),
    shifts=(
        _shift("stain_variation", "1-5", "Staining protocols, reagent batches and section "
               "thickness differ between laboratories, which moves the H&E colours."),
        _shift("white_balance", "1-3", "Slide scanners from different vendors calibrate colour "
               "differently."),
        _shift("saturation", "1-4", "Stained slides fade with storage, lowering colour "
               "saturation."),
        _shift("defocus_blur", "1-5", "Whole-slide scanners leave out-of-focus regions where the "
               "tissue is not flat."),
        _shift("jpeg", "1-5", "Whole-slide images are stored as JPEG tiles at a "
               "scanner-specific quality."),
        _shift("downsample", "1-4", "Scanning at 20x instead of 40x magnification halves the "
               "resolution."),
        _shift("gaussian_noise", "1-3", "Scanner cameras add sensor noise at short exposures."),
        _shift("brightness", "1-3", "Scanner exposure settings differ between sites."),
        _shift("uneven_illumination", "1-4", "A misaligned scanner or microscope lamp lights "
               "one side of the field more than the other."),
        _shift("vignetting", "1-3", "Microscope optics darken the edges of each captured "
               "field."),
        _shift("rotation", "1-5", "Tissue sections lie on the slide at any orientation."),
        _shift("elastic", "1-3", "Sectioning stretches and folds the tissue."),
        _shift("occlusion", "1-3", "Pen marks, air bubbles and debris under the coverslip hide "
               "parts of the tissue."),
    ),
    subgroup_columns=("site", "centre", "hospital", "scanner", "stain_batch", "sex", "age"),
)

_CHEST_RADIOGRAPHY = DomainPreset(
    domain="chest_radiography",
    aliases=("chest_radiography", "chest radiography", "chest x-ray", "chest xray", "cxr",
             "radiograph", "radiologist", "x-ray", "pneumonia"),
    shifts=(
        _shift("gaussian_noise", "1-5", "Portable bedside and low-dose radiographs are noisier."),
        _shift("shot_noise", "1-5", "Quantum noise rises as the X-ray dose falls."),
        _shift("contrast", "1-5", "Detectors and post-processing pipelines compress the grey "
               "range differently."),
        _shift("brightness", "1-4", "Under- or over-exposure shifts the overall brightness."),
        _shift("gamma", "1-5", "Vendors apply different tone curves before export."),
        _shift("motion_blur", "1-3", "Breathing or patient movement during the exposure blurs "
               "the image."),
        _shift("jpeg", "1-4", "Images exported from PACS or shared for teleradiology are "
               "JPEG-compressed."),
        _shift("downsample", "1-4", "Older detectors and downsampled exports have lower "
               "resolution."),
        _shift("bit_depth", "1-5", "Exporting 12- to 16-bit DICOM images to 8 bits or fewer "
               "discards grey levels."),
        _shift("grid_lines", "1-5", "A stationary anti-scatter grid leaves line patterns, "
               "mostly on portable units."),
        _shift("rotation", "1-3", "Patients who cannot stand straight, as in bedside films, "
               "are imaged at an angle."),
        _shift("zoom", "1-3", "Collimation and patient distance change the field of view."),
        _shift("occlusion", "1-4", "ECG leads, tubes, pacemakers and text labels cover parts "
               "of the chest."),
        _shift("dead_pixels", "1-3", "Ageing flat-panel detectors develop dead pixels."),
    ),
    subgroup_columns=("site", "hospital", "view", "projection", "sex", "age", "scanner"),
)

_OPHTHALMOLOGY = DomainPreset(
    domain="ophthalmology",
    aliases=("ophthalmology", "ophthalmologist", "fundus", "retina", "retinal",
             "diabetic retinopathy", "eye"),
    shifts=(
        _shift("uneven_illumination", "1-5", "Poor pupil dilation and camera misalignment light "
               "the fundus unevenly."),
        _shift("vignetting", "1-5", "Small pupils darken the periphery of the image."),
        _shift("defocus_blur", "1-5", "Cataract and uncorrected refraction leave fundus images "
               "out of focus."),
        _shift("motion_blur", "1-3", "Eye movement during capture blurs the image."),
        _shift("brightness", "1-4", "Flash intensity differs between cameras and settings."),
        _shift("contrast", "1-4", "Media opacities such as cataract lower image contrast."),
        _shift("white_balance", "1-4", "Fundus cameras from different vendors render the retina "
               "in different colours."),
        _shift("hue", "1-3", "Fundus cameras from different vendors render the retina in "
               "different colours."),
        _shift("specular_glare", "1-4", "Reflections from the cornea and the retinal surface "
               "appear as bright spots, mostly in young patients."),
        _shift("jpeg", "1-4", "Screening programmes store and transmit compressed images."),
        _shift("downsample", "1-4", "Hand-held and smartphone fundus cameras have lower "
               "resolution."),
        _shift("gaussian_noise", "1-3", "Low-light smartphone fundus capture adds sensor noise."),
        _shift("rotation", "1-2", "A tilted head rotates the fundus image slightly."),
    ),
    subgroup_columns=("site", "camera", "device", "sex", "age", "ethnicity", "diabetes_type"),
)

# NOTE: the stain_variation shift deconvolves H&E (plus DAB); on Romanowsky-stained smears it
# approximates stain variation rather than modelling those dyes.
_HAEMATOLOGY = DomainPreset(
    domain="haematology",
    aliases=("haematology", "hematology", "haematologist", "hematologist", "blood smear",
             "blood film", "blood cell", "peripheral blood", "leukaemia", "leukemia"),
    shifts=(
        _shift("stain_variation", "1-5", "Staining time, buffer pH and reagent batches change "
               "the colour of stained smears between laboratories."),
        _shift("white_balance", "1-4", "Microscope lamps and camera white balance differ "
               "between analysers and sites."),
        _shift("saturation", "1-3", "Weak or faded staining lowers colour saturation."),
        _shift("defocus_blur", "1-5", "Analysers and manual microscopes focus at different "
               "depths of the smear."),
        _shift("uneven_illumination", "1-4", "A misaligned microscope lamp lights one side of "
               "the field more than the other."),
        _shift("brightness", "1-3", "Lamp intensity and camera exposure differ between "
               "microscopes."),
        _shift("gaussian_noise", "1-3", "Microscope cameras add sensor noise at short "
               "exposures."),
        _shift("jpeg", "1-3", "Analysers and image archives store cells as JPEG."),
        _shift("downsample", "1-4", "A lower-magnification objective or camera gives fewer "
               "pixels per cell."),
        _shift("rotation", "1-5", "Cells lie on the slide at any orientation."),
        _shift("zoom", "1-3", "Objectives and camera adapters differ in magnification between "
               "sites."),
        _shift("occlusion", "1-2", "Stain precipitate and debris cover parts of a cell."),
    ),
    subgroup_columns=("site", "analyser", "microscope", "sex", "age"),
)

DOMAIN_PRESETS: dict[str, DomainPreset] = {
    preset.domain: preset
    for preset in (_DERMATOLOGY, _HISTOPATHOLOGY, _CHEST_RADIOGRAPHY, _OPHTHALMOLOGY,
                   _HAEMATOLOGY)
}


def find_domain_preset(text: str | None) -> DomainPreset | None:
    """Find the preset whose domain or an alias starts a word of text (case-insensitive).

    Returns None when nothing matches. When aliases of several presets match, the longest
    matching alias decides.
    """
    if not text:
        return None
    lowered = text.lower().replace("_", " ")
    best: tuple[int, DomainPreset] | None = None
    for preset in DOMAIN_PRESETS.values():
        for alias in (preset.domain, *preset.aliases):
            alias = alias.replace("_", " ")
            found = re.search(r"(?<![\w&])" + re.escape(alias), lowered) is not None
            if found and (best is None or len(alias) > best[0]):
                best = (len(alias), preset)
    return None if best is None else best[1]
