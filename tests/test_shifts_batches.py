"""Shifted batches from the worker process, contact sheets, and domain presets."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tools.shifts import (
    DOMAIN_PRESETS,
    SHIFTS,
    ShiftError,
    apply_shift,
    contact_sheet,
    find_domain_preset,
    iter_shifted_batches,
    shift_images,
)

DOMAINS = {"dermatology", "histopathology", "chest_radiography", "ophthalmology", "haematology"}


def random_images(n: int = 20, side: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_batches_match_shift_images():
    images = random_images(20)
    jobs = [("jpeg", 2), ("gaussian_noise", 4), ("rotation", 1)]
    batches = list(iter_shifted_batches(images, jobs, seed=5, batch_size=8))

    assert [(name, severity, start) for name, severity, start, _ in batches] == [
        (name, severity, start) for name, severity in jobs for start in (0, 8, 16)]
    assert [len(batch) for *_, batch in batches] == [8, 8, 4] * 3
    for name, severity in jobs:
        joined = np.concatenate([b for n, s, _, b in batches if (n, s) == (name, severity)])
        np.testing.assert_array_equal(joined, shift_images(images, name, severity, seed=5))


def test_consumer_stopping_early_does_not_hang():
    images = random_images(64)
    jobs = [("gaussian_noise", s) for s in range(1, 6)] * 4
    started = time.perf_counter()
    batches = iter_shifted_batches(images, jobs, seed=0, batch_size=4, prefetch=2)
    for i, _ in enumerate(batches):
        if i == 1:
            break
    batches.close()
    assert time.perf_counter() - started < 10


def test_consumer_error_stops_worker():
    images = random_images(32)
    with pytest.raises(KeyError):
        for _ in iter_shifted_batches(images, [("jpeg", 1)] * 8, seed=0, batch_size=4):
            raise KeyError("consumer failed")


def test_bad_job_rejected_before_worker_starts():
    images = random_images(4)
    with pytest.raises(ShiftError, match="'fog'"):
        iter_shifted_batches(images, [("jpeg", 1), ("fog", 2)], seed=0, batch_size=2)
    with pytest.raises(ShiftError, match="severity 9"):
        iter_shifted_batches(images, [("jpeg", 9)], seed=0, batch_size=2)
    with pytest.raises(ShiftError, match="batch_size"):
        iter_shifted_batches(images, [("jpeg", 1)], seed=0, batch_size=0)


def test_contact_sheet_tiles_show_shifted_pixels():
    image = random_images(1, side=24)[0]
    names = ["jpeg", "hair"]
    png = contact_sheet(image, names, severities=(1, 5), seed=3)
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    # 24 px tiles are enlarged 4x to reach 96 px; layout: 130 px labels, 20 px header, 2 px gaps.
    factor, tile, gap = 4, 96, 2
    assert sheet.shape == (20 + 2 * (tile + gap), 130 + 3 * (tile + gap), 3)
    top = 20 + 1 * (tile + gap)
    left = 130 + 2 * (tile + gap)
    hair_severity_5 = sheet[top:top + tile:factor, left:left + tile:factor]
    np.testing.assert_array_equal(hair_severity_5, apply_shift(image, "hair", 5, seed=3))
    clean = sheet[20:20 + tile:factor, 130:130 + tile:factor]
    np.testing.assert_array_equal(clean, image)


def test_contact_sheet_rejects_unknown_shift():
    with pytest.raises(ShiftError, match="'smudge'"):
        contact_sheet(random_images(1)[0], ["jpeg", "smudge"])


def test_presets_cover_five_domains():
    assert set(DOMAIN_PRESETS) == DOMAINS
    for domain, preset in DOMAIN_PRESETS.items():
        assert preset.domain == domain
        assert len(preset.shifts) >= 8
        assert preset.subgroup_columns


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_preset_shifts_are_valid(domain):
    preset = DOMAIN_PRESETS[domain]
    names = [shift.name for shift in preset.shifts]
    assert len(names) == len(set(names))
    for shift in preset.shifts:
        assert shift.name in SHIFTS
        assert domain in SHIFTS[shift.name].domains
        assert shift.severities
        assert set(shift.severities) <= {1, 2, 3, 4, 5}
        assert shift.where.endswith(".")
        assert shift.where[0].isupper()


def test_chest_radiography_preset_has_no_colour_shift():
    for shift in DOMAIN_PRESETS["chest_radiography"].shifts:
        assert not SHIFTS[shift.name].colour, shift.name


def test_stain_variation_in_histopathology_preset():
    names = [shift.name for shift in DOMAIN_PRESETS["histopathology"].shifts]
    assert "stain_variation" in names


@pytest.mark.parametrize(("text", "domain"), [
    ("second opinion for dermatologists", "dermatology"),
    ("Chest X-ray triage in the emergency department", "chest_radiography"),
    ("diabetic retinopathy screening from fundus photos", "ophthalmology"),
    ("H&E slides of colon biopsies", "histopathology"),
    ("white blood cell classification on blood smears", "haematology"),
    ("chest_radiography", "chest_radiography"),
])
def test_find_domain_preset_from_free_text(text, domain):
    preset = find_domain_preset(text)
    assert preset is not None
    assert preset.domain == domain


def test_find_domain_preset_without_match():
    assert find_domain_preset("sorting holiday photos") is None
    assert find_domain_preset(None) is None


def test_worker_failure_is_sent_to_consumer():
    import queue
    import threading

    import cv2

    from tools.shifts.worker import produce

    threads = cv2.getNumThreads()
    results: queue.Queue = queue.Queue()
    try:
        produce("clinaudit_missing_block", (2, 8, 8, 3), [("jpeg", 1)], 0, 2, results,
                threading.Event())
    finally:
        cv2.setNumThreads(threads)
    kind, message = results.get_nowait()
    assert kind == "error"
    assert "FileNotFoundError" in message
