"""Label-free monitoring: estimators on synthetic arrays with known values, then the `monitor`
command on a tiny real audit of ham10000_subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from tools.monitor import (
    MonitorError,
    MonitorThresholds,
    atc_threshold,
    bbse_prevalence,
    check_alerts,
    confidence_scores,
    confusion_joint,
    em_prevalence,
    estimate_batch,
    fit_estimator,
    image_statistics,
    input_drift,
    nearest_condition,
    output_drift,
    standardized_mean_difference,
)

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


# ----------------------------------------------------------------------------------------------
# Synthetic data: three classes with Gaussian features in 1-D, Bayes posteriors under a prior.

MEANS = np.array([-2.0, 0.0, 2.0])


def sample_classes(prior: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.choice(len(prior), size=n, p=prior)
    features = rng.normal(MEANS[labels], 1.0)
    return features, labels


def bayes_posteriors(features: np.ndarray, prior: np.ndarray) -> np.ndarray:
    likelihood = np.exp(-0.5 * (features[:, None] - MEANS[None, :]) ** 2)
    joint = likelihood * prior
    return joint / joint.sum(axis=1, keepdims=True)


SOURCE_PRIOR = np.array([0.6, 0.3, 0.1])
TARGET_PRIOR = np.array([0.2, 0.3, 0.5])


def test_confusion_joint_counts_by_hand():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # predicted 0,1,0,1 against true 0,1,1,1: C[pred, true] / 4
    expected = np.array([[1, 1], [0, 2]]) / 4
    assert np.allclose(confusion_joint(probs, labels), expected)


def test_bbse_recovers_known_prior_shift():
    rng = np.random.default_rng(0)
    cal_x, cal_y = sample_classes(SOURCE_PRIOR, 20000, rng)
    batch_x, _ = sample_classes(TARGET_PRIOR, 20000, rng)
    estimate = bbse_prevalence(bayes_posteriors(cal_x, SOURCE_PRIOR), cal_y,
                               bayes_posteriors(batch_x, SOURCE_PRIOR))
    assert estimate.sum() == pytest.approx(1.0)
    assert np.abs(estimate - TARGET_PRIOR).max() < 0.03


def test_bbse_exact_on_population_confusion():
    # The calibration rows are one-hot predictions counted in proportion to a known C, and the
    # batch's predicted mix is C w rounded, so BBSE must return the target prior up to rounding.
    joint = np.array([[0.4, 0.1, 0.0], [0.1, 0.1, 0.1], [0.1, 0.1, 0.0]])
    joint[2, 2] = 1 - joint.sum()
    rows, labels = [], []
    for predicted in range(3):
        for true in range(3):
            count = round(joint[predicted, true] * 1000)
            rows += [np.eye(3)[predicted]] * count
            labels += [true] * count
    cal_probs, cal_labels = np.array(rows), np.array(labels)
    source = joint.sum(axis=0)
    target = np.array([0.1, 0.2, 0.7])
    mu = joint @ (target / source)
    counts = np.round(mu * 10000).astype(int)
    batch = np.repeat(np.eye(3), counts, axis=0)
    assert np.allclose(bbse_prevalence(cal_probs, cal_labels, batch), target, atol=2e-3)


def test_em_recovers_known_prior_shift():
    rng = np.random.default_rng(1)
    batch_x, _ = sample_classes(TARGET_PRIOR, 20000, rng)
    prevalence, adjusted = em_prevalence(bayes_posteriors(batch_x, SOURCE_PRIOR), SOURCE_PRIOR)
    assert np.abs(prevalence - TARGET_PRIOR).max() < 0.03
    assert np.allclose(adjusted.sum(axis=1), 1.0)


def test_em_keeps_prior_without_shift():
    rng = np.random.default_rng(2)
    batch_x, _ = sample_classes(SOURCE_PRIOR, 20000, rng)
    prevalence, _ = em_prevalence(bayes_posteriors(batch_x, SOURCE_PRIOR), SOURCE_PRIOR)
    assert np.abs(prevalence - SOURCE_PRIOR).max() < 0.03


def test_em_rejects_prior_of_wrong_length():
    with pytest.raises(MonitorError, match="source_prior"):
        em_prevalence(np.full((4, 3), 1 / 3), np.array([0.5, 0.5]))


def test_atc_threshold_matches_definition_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    # accuracy 3/5, so 3 scores must lie above t: t is the 4th largest score, 0.6
    threshold = atc_threshold(scores, correct)
    assert threshold == 0.6
    assert np.mean(scores > threshold) == np.mean(correct)


def test_atc_threshold_unsorted_scores():
    scores = np.array([0.2, 0.95, 0.4, 0.85, 0.3, 0.6, 0.75, 0.5])
    correct = np.array([0, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    # 4 of 8 correct; sorted descending 0.95 0.85 0.75 0.6 | 0.5 ... so t = 0.5
    assert atc_threshold(scores, correct) == 0.5


def test_atc_threshold_extremes():
    scores = np.array([0.3, 0.6, 0.9])
    assert atc_threshold(scores, np.ones(3, bool)) == -math.inf
    assert atc_threshold(scores, np.zeros(3, bool)) == 0.9


def test_confidence_scores_negative_entropy_by_hand():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert np.allclose(confidence_scores(probs, "negative_entropy"), [math.log(0.5), 0.0])
    with pytest.raises(MonitorError, match="score"):
        confidence_scores(probs, "margin")


def calibrated_setup(prior: np.ndarray, n: int, seed: int):
    """Bayes posteriors under the source prior are calibrated on source data."""
    rng = np.random.default_rng(seed)
    x, y = sample_classes(prior, n, rng)
    return bayes_posteriors(x, SOURCE_PRIOR), y


def test_estimators_match_true_accuracy_without_shift():
    cal_probs, cal_labels = calibrated_setup(SOURCE_PRIOR, 5000, 3)
    batch_probs, batch_labels = calibrated_setup(SOURCE_PRIOR, 5000, 4)
    estimator = fit_estimator(cal_probs, cal_labels, recalibration="temperature")
    estimates = estimator.point_estimates(batch_probs)
    predicted = batch_probs.argmax(axis=1)
    true_accuracy = np.mean(predicted == batch_labels)
    recalls = [np.mean(predicted[batch_labels == k] == k) for k in range(3)]
    assert estimator.scaler.temperature == pytest.approx(1.0, abs=0.1)
    assert estimates["accuracy_atc"] == pytest.approx(true_accuracy, abs=0.03)
    assert estimates["accuracy_confidence"] == pytest.approx(true_accuracy, abs=0.03)
    assert estimates["balanced_accuracy_atc"] == pytest.approx(np.mean(recalls), abs=0.05)
    assert estimates["balanced_accuracy_confidence"] == pytest.approx(np.mean(recalls), abs=0.05)


def test_fit_estimator_recovers_overconfidence():
    cal_probs, cal_labels = calibrated_setup(SOURCE_PRIOR, 5000, 5)
    sharpened = cal_probs ** 3
    sharpened /= sharpened.sum(axis=1, keepdims=True)
    estimator = fit_estimator(sharpened, cal_labels, recalibration="temperature")
    # p^3 renormalised is softmax(3 log p), so temperature 3 undoes it
    assert estimator.scaler.temperature == pytest.approx(3.0, rel=0.1)


def test_vector_recalibration_removes_prior_bias():
    # Posteriors computed under a wrong prior are off by a per-class bias in log space, which
    # vector scaling can undo and a single temperature cannot.
    rng = np.random.default_rng(8)
    x, y = sample_classes(SOURCE_PRIOR, 5000, rng)
    biased = bayes_posteriors(x, np.array([1 / 3, 1 / 3, 1 / 3]))
    truth = bayes_posteriors(x, SOURCE_PRIOR)
    vector = fit_estimator(biased, y, recalibration="vector").recalibrate(biased)
    temperature = fit_estimator(biased, y, recalibration="temperature").recalibrate(biased)
    assert np.abs(vector - truth).mean() < 0.01
    assert np.abs(temperature - truth).mean() > 2 * np.abs(vector - truth).mean()
    with pytest.raises(MonitorError, match="recalibration"):
        fit_estimator(biased, y, recalibration="isotonic")


def test_estimates_score_model_predictions_not_recalibrated_ones():
    # Vector scaling moves the top class of a prior-biased model; the estimates must still be
    # about the model's own argmax predictions.
    uniform = np.array([1 / 3, 1 / 3, 1 / 3])
    rng = np.random.default_rng(9)
    cal_x, cal_y = sample_classes(SOURCE_PRIOR, 5000, rng)
    batch_x, batch_y = sample_classes(SOURCE_PRIOR, 5000, rng)
    estimator = fit_estimator(bayes_posteriors(cal_x, uniform), cal_y, recalibration="vector")
    batch = bayes_posteriors(batch_x, uniform)
    true_accuracy = np.mean(batch.argmax(axis=1) == batch_y)
    moved = np.mean(estimator.recalibrate(batch).argmax(axis=1) != batch.argmax(axis=1))
    assert moved > 0.02
    estimates = estimator.point_estimates(batch)
    assert estimates["accuracy_atc"] == pytest.approx(true_accuracy, abs=0.03)
    assert estimates["accuracy_confidence"] == pytest.approx(true_accuracy, abs=0.03)


def test_estimate_batch_intervals_contain_point():
    cal_probs, cal_labels = calibrated_setup(SOURCE_PRIOR, 2000, 6)
    batch_probs, _ = calibrated_setup(SOURCE_PRIOR, 300, 7)
    result = estimate_batch(fit_estimator(cal_probs, cal_labels), batch_probs, n_boot=100, seed=0)
    for name, entry in result["performance"].items():
        assert entry["low"] <= entry["value"] <= entry["high"], name
    em = result["prevalence"]["em"]
    assert len(em["value"]) == 3
    assert all(lo <= v <= hi for lo, v, hi in zip(em["low"], em["value"], em["high"]))


def test_degenerate_atc_estimate_gets_note():
    from agent.monitor_cli import degenerate_notes

    cal_probs, cal_labels = calibrated_setup(SOURCE_PRIOR, 2000, 6)
    batch_probs, _ = calibrated_setup(SOURCE_PRIOR, 40, 7)
    estimator = fit_estimator(cal_probs, cal_labels)
    # No probability exceeds 1, so no batch image can pass this threshold.
    estimator.threshold = 1.5
    result = estimate_batch(estimator, batch_probs, n_boot=20, seed=0)
    assert result["atc_images_above"] == 0
    assert result["performance"]["accuracy_atc"] == {"value": 0.0, "low": 0.0, "high": 0.0}

    record = {"batch": {"n": 40}, "performance": result["performance"],
              "estimator": {key: result[key] for key in ("atc_threshold", "atc_images_above")}}
    notes = degenerate_notes(record)
    assert notes[0] == ("the ATC accuracy estimate 0.000 has a zero-width interval because 0 of 40 "
                        "batch images score above the ATC threshold 1.5; the estimate is "
                        "degenerate and should not be trusted.")
    assert notes[1].startswith("the ATC balanced accuracy estimate 0.000 has a zero-width interval "
                               "because 0 of 40 batch images")
    # The mean-confidence estimates vary across replicates, so they get no note.
    assert len(notes) == 2


def test_degenerate_notes_skip_intervals_with_width():
    from agent.monitor_cli import degenerate_notes

    entry = {"value": 0.5, "low": 0.4, "high": 0.6}
    no_bootstrap = {"value": 0.5, "low": None, "high": None}
    record = {"batch": {"n": 10}, "estimator": {"atc_threshold": 0.9, "atc_images_above": 5},
              "performance": {"accuracy_atc": entry, "balanced_accuracy_atc": no_bootstrap,
                              "accuracy_confidence": entry,
                              "balanced_accuracy_confidence": {"value": 0.7, "low": 0.7,
                                                               "high": 0.7}}}
    assert degenerate_notes(record) == [
        ("the mean-confidence balanced accuracy estimate 0.700 has a zero-width interval because "
        "every bootstrap replicate gave the same value; the estimate is degenerate and should "
        "not be trusted.")]


def test_load_batch_rejects_colour_for_greyscale_model(tmp_path):
    from PIL import Image

    from tools.monitor import load_batch

    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "red.png")
    Image.fromarray(np.full((16, 16), 90, dtype=np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(MonitorError, match="red.png is a colour image"):
        load_batch(tmp_path, 8, greyscale_model=True)
    (tmp_path / "red.png").unlink()
    batch = load_batch(tmp_path, 8, greyscale_model=True)
    assert batch.images.shape == (1, 8, 8, 3)
    assert batch.original_sizes.tolist() == [[16, 16]]


def test_fit_estimator_rejects_single_class():
    with pytest.raises(MonitorError, match="single class"):
        fit_estimator(np.full((5, 2), 0.5), np.zeros(5, int))


# ----------------------------------------------------------------------------------------------
# Image statistics and drift tests


def test_image_statistics_on_constant_images():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    images[0] = (255, 0, 0)
    images[1] = (51, 51, 51)
    stats = image_statistics(images, np.array([[600, 450], [100, 100]]))
    # luma of pure red is 0.299; grey 51 is 0.2
    assert stats["brightness"] == pytest.approx([0.299, 0.2], abs=1e-6)
    assert stats["contrast"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert stats["saturation"] == pytest.approx([1.0, 0.0])
    assert stats["red"] == pytest.approx([1.0, 0.2])
    assert stats["noise"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert stats["sharpness"] == pytest.approx([-6.0, -6.0], abs=1e-3)
    assert stats["original_size"] == pytest.approx([math.sqrt(600 * 450), 100.0])


def test_noise_estimate_tracks_added_gaussian_noise():
    rng = np.random.default_rng(0)
    base = np.full((20, 64, 64, 3), 128.0)
    for sigma in (5.0, 20.0):
        noisy = np.clip(base + rng.normal(0, sigma, (20, 64, 64, 1)), 0, 255).astype(np.uint8)
        estimate = image_statistics(noisy)["noise"].mean() * 255
        assert estimate == pytest.approx(sigma, rel=0.1)


def test_sharpness_drops_under_blur():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    blurred = gaussian_filter(sharp.astype(float), sigma=(0, 2, 2, 0)).astype(np.uint8)
    assert (image_statistics(blurred)["sharpness"] < image_statistics(sharp)["sharpness"] - 1).all()


def test_standardized_mean_difference_by_hand():
    reference = np.array([1.0, 2.0, 3.0])
    batch = np.array([3.0, 4.0, 5.0])
    # both sample variances are 1, so d = (4 - 2) / 1
    assert standardized_mean_difference(reference, batch) == pytest.approx(2.0)


def test_input_drift_matches_scipy_ks():
    rng = np.random.default_rng(0)
    reference = {"brightness": rng.normal(0.5, 0.1, 300), "contrast": rng.normal(0.2, 0.05, 300)}
    batch = {"brightness": rng.normal(0.6, 0.1, 100), "contrast": rng.normal(0.2, 0.05, 100)}
    rows = {row["statistic"]: row for row in input_drift(reference, batch)}
    expected = ks_2samp(reference["brightness"], batch["brightness"])
    assert rows["brightness"]["ks_statistic"] == pytest.approx(expected.statistic)
    assert rows["brightness"]["p_value"] == pytest.approx(expected.pvalue)
    assert rows["brightness"]["q_value"] < 1e-6
    assert rows["contrast"]["q_value"] > 0.01
    assert set(rows) == {"brightness", "contrast"}


def test_output_drift_class_mix_by_hand():
    from scipy.stats import chi2_contingency

    reference = np.repeat(np.eye(3), [50, 30, 20], axis=0) * 0.6 + 0.4 / 3
    batch = np.repeat(np.eye(3), [10, 30, 60], axis=0) * 0.6 + 0.4 / 3
    result = output_drift(reference, batch, ["a", "b", "c"])
    chi2, p = chi2_contingency(np.array([[50, 30, 20], [10, 30, 60]]))[:2]
    assert result["class_mix"]["chi2"] == pytest.approx(chi2)
    assert result["class_mix"]["p_value"] == pytest.approx(p)
    assert result["class_mix"]["total_variation"] == pytest.approx(0.4)
    assert result["confidence"]["ks_statistic"] == pytest.approx(0.0)


def test_nearest_condition_picks_matching_shift():
    rng = np.random.default_rng(0)

    def profile(brightness: float, noise: float) -> dict[str, np.ndarray]:
        return {"brightness": rng.normal(brightness, 0.05, 200), "noise": rng.normal(noise, 0.01, 200),
                "confidence": rng.uniform(0.5, 1.0, 200)}

    profiles = {"clean": profile(0.5, 0.02), "shift:brightness:3": profile(0.7, 0.02),
                "shift:gaussian_noise:3": profile(0.5, 0.08)}
    batch = profile(0.5, 0.075)
    result = nearest_condition(profiles, batch)
    assert result["condition"] == "shift:gaussian_noise:3"
    assert [row["condition"] for row in result["ranking"]][-1] == "shift:brightness:3"


def test_nearest_condition_prefers_clean_on_tie():
    rng = np.random.default_rng(0)
    clean = {"brightness": rng.normal(0.5, 0.05, 200), "confidence": rng.uniform(0.5, 1.0, 200)}
    # A hue shift leaves grey-scale images unchanged, so its profile equals clean's.
    profiles = {"shift:hue:1": {name: values.copy() for name, values in clean.items()},
                "clean": clean,
                "shift:brightness:3": {"brightness": clean["brightness"] + 0.2,
                                       "confidence": clean["confidence"]}}
    batch = {"brightness": rng.normal(0.52, 0.05, 100), "confidence": rng.uniform(0.5, 1.0, 100)}
    result = nearest_condition(profiles, batch)
    ranked = [row["condition"] for row in result["ranking"]]
    assert ranked == ["clean", "shift:hue:1", "shift:brightness:3"]
    assert result["condition"] == "clean"


@pytest.mark.parametrize(("shift_distance", "expected_first"), [
    (0.13, "clean"),  # exact tie
    (0.13 - 1e-10, "clean"),  # within 1e-9 absolute
    (0.13 * (1 - 1e-7), "clean"),  # within 1e-6 relative
    (0.129, "shift:hue:1"),  # a real difference in the third digit
])
def test_nearest_tie_tolerance(shift_distance, expected_first):
    from tools.monitor import _rank_reference_first_on_ties

    ranking = [{"condition": "shift:hue:1", "distance": shift_distance},
               {"condition": "clean", "distance": 0.13},
               {"condition": "shift:blur:2", "distance": 0.5}]
    _rank_reference_first_on_ties(ranking, "clean")
    assert ranking[0]["condition"] == expected_first
    assert ranking[2]["condition"] == "shift:blur:2"


def test_check_alerts_on_accuracy_drop_and_drift():
    record = {
        "audited_clean": {"accuracy": 0.80, "balanced_accuracy": 0.60},
        "performance": {"accuracy_atc": {"value": 0.70}, "balanced_accuracy_atc": {"value": 0.58}},
        "input_drift": [{"statistic": "noise", "q_value": 0.001, "smd": 1.5},
                        {"statistic": "brightness", "q_value": 0.5, "smd": 0.1}],
        "output_drift": {"confidence": {"p_value": 0.2}, "class_mix": {"p_value": 0.3}},
    }
    alerts = check_alerts(record, MonitorThresholds(max_accuracy_drop=0.05,
                                                    max_balanced_accuracy_drop=0.05,
                                                    max_drift_p=0.01))
    assert len(alerts) == 2
    assert alerts[0].startswith("accuracy:")
    assert "noise" in alerts[1]
    assert check_alerts(record, MonitorThresholds()) == []


# ----------------------------------------------------------------------------------------------
# The `monitor` command on a tiny real audit


def monitor_app():
    import typer

    from agent.monitor_cli import monitor

    app = typer.Typer()
    app.command()(monitor)
    return app


REDUCED_PLAN = {
    "metrics": [{"id": "accuracy"}, {"id": "balanced_accuracy"}],
    "primary_metric": "balanced_accuracy",
    "shifts": [{"name": "gaussian_noise", "severities": [4]},
               {"name": "brightness", "severities": [4]}],
    "subgroups": [],
    "site_column": "dataset",
}


def red_tinted(ham_dir: Path, ids: list[str]) -> np.ndarray:
    """Load images at 32 px with green and blue halved, as from a camera with a strong red cast."""
    from PIL import Image

    images = np.stack([
        np.asarray(Image.open(ham_dir / "images" / f"{i}.jpg").convert("RGB")
                   .resize((32, 32), Image.Resampling.BILINEAR))
        for i in ids]).astype(np.float64)
    images[..., 1:] *= 0.5
    return images.astype(np.uint8)


def write_red_clinic(folder: Path, ham_dir: Path, manifest: Path) -> tuple[Path, Path]:
    """Write a labelled external set of 60 red-tinted images; return its manifest and folder."""
    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(manifest).tail(60)
    images_dir = folder / "red_clinic"
    images_dir.mkdir()
    for image_id, image in zip(rows["image_id"], red_tinted(ham_dir, list(rows["image_id"]))):
        Image.fromarray(image).save(images_dir / f"{image_id}.png")
    external_manifest = folder / "red_clinic.csv"
    rows[["image_id", "dx"]].to_csv(external_manifest, index=False)
    return external_manifest, images_dir


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory, ham_dir, small_ham_manifest, tiny_model):
    """Run a reduced audit of the shared tiny model with AuditRunner.

    The plan has two shifts and a red-tinted external set, with 50 bootstrap replicates.
    Returns (store path, audit id, test image ids, folder).
    """
    from tools.data import load_dataset, load_external
    from tools.models import load_classifier
    from tools.runner import AuditInputs, AuditRunner
    from tools.spec import AuditPlan, spec_from_dict
    from tools.store import Store

    folder = tmp_path_factory.mktemp("monitor")
    external_manifest, external_images = write_red_clinic(folder, ham_dir, small_ham_manifest)
    raw = {
        "model": {"arch": "mobilenetv3_small_050", "checkpoint": str(tiny_model),
                  "classes": HAM_CLASSES, "input_size": 32},
        "data": {"manifest": str(small_ham_manifest), "images": str(ham_dir / "images"),
                 "id_column": "image_id", "label_column": "dx",
                 "metadata": ["dataset", "sex", "age", "localization"],
                 "group_column": "lesion_id",
                 "external": [{"name": "red_clinic", "manifest": str(external_manifest),
                               "images": str(external_images)}]},
        "context": {"domain": "dermatology"},
        "plan": REDUCED_PLAN,
        "audit": {"bootstrap": 50, "seed": 0, "device": "cpu"},
        "report": {"include_images": False},
    }
    spec = spec_from_dict(raw, folder)
    classifier = load_classifier(spec.model, device="cpu")
    test = load_dataset(spec.data, classifier.classes).part("test")
    externals = {"red_clinic": load_external(spec.data.external[0], spec.data, classifier.classes)}
    store = folder / "audits.duckdb"
    with Store(store) as db:
        audit_id = db.create_audit("scripted", spec.model_dump(mode="json"),
                                   spec.plan.model_dump(mode="json"))
        AuditRunner(spec, AuditPlan.model_validate(REDUCED_PLAN), db, audit_id,
                    AuditInputs(classifier, test, externals)).run()
        db.update_audit(audit_id, status="finished")
    return store, audit_id, list(test.ids), folder


def write_batch(folder: Path, ham_dir: Path, ids: list[str], shift: tuple[str, int] | None) -> Path:
    """Write test images as 32 px PNG files, optionally shifted at that size.

    The audit shifts images at the model's input size, so the batch is shifted there too: noise
    added at 224 px would mostly average out when the image is reduced to 32 px.
    """
    from PIL import Image

    from tools.shifts import shift_images

    folder.mkdir(parents=True, exist_ok=True)
    images = np.stack([
        np.asarray(Image.open(ham_dir / "images" / f"{i}.jpg").convert("RGB")
                   .resize((32, 32), Image.Resampling.BILINEAR))
        for i in ids])
    if shift is not None:
        images = shift_images(images, shift[0], shift[1], seed=1)
    for image_id, image in zip(ids, images):
        Image.fromarray(image).save(folder / f"{image_id}.png")
    return folder


def test_monitor_names_applied_shift(tiny_audit, ham_dir):
    from typer.testing import CliRunner

    from tools.store import Store

    store, audit_id, test_ids, folder = tiny_audit
    batch = write_batch(folder / "noisy", ham_dir, test_ids[:80], ("gaussian_noise", 4))
    out = folder / "monitor_out"
    result = CliRunner().invoke(monitor_app(), ["--audit", audit_id, "--data", str(batch),
                                                "--store", str(store), "--out", str(out),
                                                "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "shift:gaussian_noise:4" in result.output

    with Store(store) as db:
        from tools.monitor import monitor_history

        history = monitor_history(db, audit_id)
    assert len(history) == 1
    record = history[0]
    assert record["nearest"]["condition"] == "shift:gaussian_noise:4"
    assert record["nearest"]["measured"], "the audit's results at the nearest condition"
    noise = next(row for row in record["input_drift"] if row["statistic"] == "noise")
    assert noise["smd"] > 1
    assert (out / "monitor_trend.svg").is_file()


def test_monitor_names_external_set(tiny_audit, ham_dir):
    from PIL import Image
    from typer.testing import CliRunner

    store, audit_id, test_ids, folder = tiny_audit
    batch = folder / "red_batch"
    batch.mkdir()
    for image_id, image in zip(test_ids[:60], red_tinted(ham_dir, test_ids[:60])):
        Image.fromarray(image).save(batch / f"{image_id}.png")
    out = folder / "red_out"

    result = CliRunner().invoke(monitor_app(), ["--audit", audit_id, "--data", str(batch),
                                                "--store", str(store), "--out", str(out),
                                                "--bootstrap", "0"])

    assert result.exit_code == 0, result.output
    record = json.loads(next(out.glob("monitor-*.json")).read_text())
    assert record["nearest"]["condition"] == "external:red_clinic"
    ranking = {row["condition"]: row["distance"] for row in record["nearest"]["ranking"]}
    assert ranking["external:red_clinic"] < ranking["clean"]
    assert record["nearest"]["measured"]


def test_monitor_alert_exits_1_and_trend_grows(tiny_audit, ham_dir):
    from typer.testing import CliRunner

    from tools.monitor import monitor_history
    from tools.store import Store

    store, audit_id, test_ids, folder = tiny_audit
    batch = write_batch(folder / "bright", ham_dir, test_ids[:60], ("brightness", 4))
    with Store(store) as db:
        before = len(monitor_history(db, audit_id))
    result = CliRunner().invoke(monitor_app(), ["--audit", audit_id, "--data", str(batch),
                                                "--store", str(store), "--out", str(folder / "m2"),
                                                "--bootstrap", "20", "--max-drift-p", "0.01"])
    assert result.exit_code == 1, result.output
    assert "brightness" in result.output
    with Store(store) as db:
        history = monitor_history(db, audit_id)
    assert len(history) == before + 1
    assert history[-1]["nearest"]["condition"] == "shift:brightness:4"
    assert history[-1]["alerts"]


def test_monitor_manifest_batch_matches_folder(tiny_audit, ham_dir):
    import pandas as pd
    from typer.testing import CliRunner

    store, audit_id, test_ids, folder = tiny_audit
    manifest = folder / "clean_batch.csv"
    pd.DataFrame({"image_id": test_ids[:40], "site": "clinic_a"}).to_csv(manifest, index=False)
    out = folder / "m3"
    result = CliRunner().invoke(monitor_app(), ["--audit", audit_id, "--data", str(manifest),
                                                "--images", str(ham_dir / "images"),
                                                "--store", str(store), "--out", str(out),
                                                "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    records = sorted(out.glob("monitor-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["batch"]["n"] == 40
    assert record["batch"]["metadata_columns"] == ["site"]
    assert record["nearest"]["condition"] == "clean"


@pytest.mark.parametrize("case", ["unknown_audit", "missing_store", "empty_folder",
                                  "unreadable_image", "empty_manifest", "missing_batch",
                                  "wrong_id_column"])
def test_monitor_bad_input_exits_2(tiny_audit, case):
    from typer.testing import CliRunner

    store, audit_id, _, folder = tiny_audit
    bad = folder / f"bad_{case}"
    bad.mkdir(exist_ok=True)
    data = bad
    if case == "unknown_audit":
        audit_id = "no-such-audit"
        (bad / "x.png").write_bytes(b"")
    elif case == "missing_store":
        store = bad / "missing.duckdb"
        (bad / "x.png").write_bytes(b"")
    elif case == "unreadable_image":
        (bad / "broken.jpg").write_bytes(b"not a jpeg")
    elif case == "empty_manifest":
        data = bad / "batch.csv"
        data.write_text("image_id\n")
    elif case == "missing_batch":
        data = bad / "nowhere"
    elif case == "wrong_id_column":
        data = bad / "batch.csv"
        data.write_text("file\nISIC_1.jpg\n")
    result = CliRunner().invoke(monitor_app(), ["--audit", audit_id, "--data", str(data),
                                                "--store", str(store), "--out", str(bad / "out")])
    assert result.exit_code == 2, result.output
    # rich wraps the one-line message at the test terminal's width
    assert result.output.count("error:") == 1, result.output
    message = "".join(result.output.splitlines())
    expected = {"unknown_audit": "no-such-audit", "missing_store": "missing.duckdb",
                "empty_folder": "empty",
                "unreadable_image": "broken.jpg", "empty_manifest": "empty",
                "missing_batch": "nowhere",
                "wrong_id_column": "column 'image_id' not found; the manifest has file; name the "
                                   "image column with --id-column"}[case]
    assert expected in message
    if case == "missing_store":
        assert not store.exists()


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--recalibration", "temp",
     "error: --recalibration 'temp' is invalid: use one of platt, temperature, vector"),
    ("--score", "max_conf",
     "error: --score 'max_conf' is invalid: use one of max_confidence, negative_entropy"),
    ("--max-drift-p", "1.5", "error: --max-drift-p 1.5 is invalid: use a value above 0 and below 1"),
    ("--max-drift-p", "0", "error: --max-drift-p 0 is invalid: use a value above 0 and below 1"),
    ("--max-accuracy-drop", "-0.1",
     "error: --max-accuracy-drop -0.1 is invalid: use a fraction from 0 to 1"),
    ("--max-balanced-accuracy-drop", "2",
     "error: --max-balanced-accuracy-drop 2 is invalid: use a fraction from 0 to 1"),
])
def test_monitor_rejects_option_before_loading(tmp_path, option, value, expected):
    from typer.testing import CliRunner

    # Neither the store nor the batch exists: an error about them would mean loading started.
    store = tmp_path / "missing.duckdb"
    result = CliRunner().invoke(monitor_app(), ["--audit", "a1", "--data", str(tmp_path / "none"),
                                                "--store", str(store), option, value],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.output.strip() == expected
    assert not store.exists()


def test_monitor_help_lists_every_recalibration():
    from typer.testing import CliRunner

    from tools.calibration import SCALERS

    result = CliRunner().invoke(monitor_app(), ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    own_help = flattened(result.output).split("--recalibration", 1)[1].split(" --", 1)[0]
    assert "vector, temperature or platt (binary models only)" in own_help
    for kind in SCALERS:
        assert kind in own_help, kind


def flattened(output: str) -> str:
    """Join rich's wrapped lines and table borders into one line of single-spaced words."""
    return " ".join(output.replace("│", " ").split())


def test_monitor_states_whether_alerts_checked(tiny_audit, ham_dir):
    from typer.testing import CliRunner

    store, audit_id, test_ids, folder = tiny_audit
    batch = write_batch(folder / "unchecked", ham_dir, test_ids[:40], ("brightness", 4))
    args = ["--audit", audit_id, "--data", str(batch), "--store", str(store), "--bootstrap", "0"]

    unchecked = CliRunner().invoke(monitor_app(), [*args, "--out", str(folder / "m_unchecked")])
    assert unchecked.exit_code == 0, unchecked.output
    text = flattened(unchecked.output)
    assert ("Alerts not checked: no threshold is set, so this batch cannot raise an alert. Pass "
            "--max-accuracy-drop, --max-balanced-accuracy-drop or --max-drift-p, or audit with "
            "a spec whose monitor: section sets max_accuracy_drop, max_balanced_accuracy_drop "
            "or max_drift_p.") in text
    assert "No alerts" not in text
    assert ("Both estimates use the batch's probabilities after vector recalibration fitted on "
            "the calibration split.") in text
    assert "Raw confidence (top-class probability before recalibration): mean" in text
    record = json.loads(next((folder / "m_unchecked").glob("monitor-*.json")).read_text())
    assert record["estimator"]["recalibration"]["kind"] == "vector"
    assert 0 <= record["estimator"]["atc_images_above"] <= 40

    # A drop can never exceed 1 and no p-value is below 1e-300, so both checks run and pass.
    checked = CliRunner().invoke(monitor_app(), [*args, "--out", str(folder / "m_checked"),
                                                 "--max-accuracy-drop", "1",
                                                 "--max-drift-p", "1e-300"])
    assert checked.exit_code == 0, checked.output
    text = flattened(checked.output)
    assert text.endswith("No alerts.")
    assert "Alerts not checked" not in text
    record = json.loads(next((folder / "m_checked").glob("monitor-*.json")).read_text())
    assert record["thresholds"] == {"max_accuracy_drop": 1.0, "max_balanced_accuracy_drop": None,
                                    "max_drift_p": 1e-300}
    assert record["alerts"] == []


def test_monitor_help_shows_threshold_defaults():
    from typer.testing import CliRunner

    result = CliRunner().invoke(monitor_app(), ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = flattened(result.output)
    for option in ("--max-accuracy-drop", "--max-balanced-accuracy-drop", "--max-drift-p"):
        after = text.split(option, 1)[1]
        # Each option's own help, up to the next option, names the default.
        own_help = after.split(" --", 1)[0]
        assert "[default: (none: never alerts)]" in own_help, own_help
