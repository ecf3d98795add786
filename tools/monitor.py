"""Label-free checks on deployment data, compared against an audit's clean test set.

A deployment batch arrives without labels. `monitor_batch` compares it with the audit it belongs
to and returns one JSON-serialisable record:

- input drift: per-image statistics (brightness, contrast, sharpness, colour, noise level,
  original size), each with a two-sample Kolmogorov-Smirnov test and a standardized mean
  difference against the clean test images;
- output drift: the confidence distribution (KS test) and the predicted class mix (chi-square
  test of the 2 x K contingency table);
- the class prevalence of the batch, corrected for the model's confusion on the calibration
  split by black-box shift estimation (BBSE) and by EM prior adjustment;
- accuracy and balanced accuracy estimated without labels, by average thresholded confidence
  (ATC) and by the mean recalibrated confidence, with bootstrap intervals;
- the nearest audited condition (clean, a shift at a severity, a site or an external set) and
  what the audit measured there.

Each record is stored as the artifact `monitor:<timestamp>` of the audit, so repeated batches
form a trend (`monitor_history`, `plot_trend`). Thresholds turn the record into alerts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

# (task description, done, total), the same form as the audit runner's progress callback.
Progress = Callable[[str, int, int], None]

RECORD_PREFIX = "monitor:"
CACHE_PREFIX = "monitor_cache:"
# Bump when the cached reference statistics change meaning, so old caches are recomputed.
CACHE_VERSION = 1

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")

# Statistics computed on every image at the model's input size; `original_size` is read from the
# file. Each group counts once in the nearest-condition distance, so the four colour statistics
# together weigh as much as brightness alone.
STATISTICS = ("brightness", "contrast", "sharpness", "red", "green", "blue", "saturation",
              "noise", "original_size")
DISTANCE_GROUPS = {
    "brightness": ("brightness",),
    "contrast": ("contrast",),
    "sharpness": ("sharpness",),
    "colour": ("red", "green", "blue", "saturation"),
    "noise": ("noise",),
    "confidence": ("confidence",),
}

# Candidate kinds for the nearest-condition match. A shift, a site or an external set changes the
# images, whereas subgroup and prevalence conditions only select clean images by patient or label.
NEAREST_KINDS = ("clean", "shift", "site", "external")

# Two conditions whose distances to the batch differ by less than this (relative to the larger,
# or 1e-9 absolute near zero) count as equally near, and clean then ranks first. Distances are
# means of a few float64 ratios, so the same profiles reached by different arithmetic differ far
# less than 1e-6, while a real difference shows in the second or third digit.
NEAREST_TIE_RELATIVE = 1e-6
NEAREST_TIE_ABSOLUTE = 1e-9

# Scores the ATC threshold can be learned on; see `confidence_scores`.
SCORES = ("max_confidence", "negative_entropy")


class MonitorError(ValueError):
    """A batch, audit or setting the monitor cannot use; the message names the file or value."""


class MonitorThresholds(BaseModel):
    """Alert thresholds; None switches a check off."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description=(
        "alert when the ATC accuracy estimate is more than this below the audited clean accuracy"))
    max_balanced_accuracy_drop: float | None = Field(None, ge=0, le=1, description=(
        "alert when the ATC balanced accuracy estimate is more than this below the audited clean "
        "balanced accuracy"))
    max_drift_p: float | None = Field(None, gt=0, lt=1, description=(
        "alert when a drift test's p-value (Benjamini-Hochberg adjusted over the input "
        "statistics) is below this"))


# ----------------------------------------------------------------------------------------------
# Batch loading


@dataclass
class Batch:
    """Unlabelled deployment images at the model's input size."""

    source: Path
    ids: list[str]
    paths: list[Path]
    images: np.ndarray  # uint8 (n, size, size, 3)
    original_sizes: np.ndarray  # (n, 2) width, height in pixels
    metadata: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __len__(self) -> int:
        return len(self.ids)


def load_batch(source: str | Path, size: int, *, greyscale_model: bool = False,
               id_column: str = "image_id", path_column: str | None = None,
               images_dir: str | Path | None = None, progress: Progress | None = None) -> Batch:
    """Load a deployment batch: an image folder, or a CSV manifest without labels.

    A manifest names each image by `path_column` (relative to `images_dir`) or by `id_column`
    (the file `<id>.jpg`, `.jpeg` or `.png` in `images_dir`). `images_dir` defaults to the
    folder `images/` beside the manifest when there is one, else the manifest's folder. Other
    columns are kept as metadata.

    Raises MonitorError for a missing source, an empty batch, an unreadable image, or a colour
    image when the model is grey-scale.
    """
    source = Path(source)
    if not source.exists():
        raise MonitorError(f"batch not found: {source}")

    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise MonitorError(f"batch {source} is empty: no image files "
                               f"({', '.join(IMAGE_SUFFIXES)}) in the folder")
        ids = [p.stem for p in paths]
        metadata = pd.DataFrame(index=pd.RangeIndex(len(paths)))
    else:
        ids, paths, metadata = _read_batch_manifest(source, id_column, path_column, images_dir)

    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    original_sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        images[i], original_sizes[i] = _decode_batch_image(path, size, greyscale_model)
        if progress is not None:
            progress("Loading batch images", i + 1, len(paths))
    return Batch(source, ids, paths, images, original_sizes, metadata)


def _read_batch_manifest(manifest: Path, id_column: str, path_column: str | None,
                         images_dir: str | Path | None) -> tuple[list[str], list[Path], pd.DataFrame]:
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        if isinstance(error, pd.errors.EmptyDataError):
            raise MonitorError(f"batch {manifest} is empty: the manifest has no rows") from None
        raise MonitorError(f"{manifest}: cannot read the manifest as CSV ({error})") from None
    if len(table) == 0:
        raise MonitorError(f"batch {manifest} is empty: the manifest has no rows")

    column = path_column or id_column
    if column not in table.columns:
        option = "--path-column" if path_column else "--id-column"
        raise MonitorError(f"{manifest}: column {column!r} not found; the manifest has "
                           f"{', '.join(map(str, table.columns))}; name the image column with "
                           f"{option}")

    if images_dir is None:
        beside = manifest.parent / "images"
        images_dir = beside if beside.is_dir() else manifest.parent
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise MonitorError(f"image folder not found: {images_dir}")

    paths = []
    for row, value in enumerate(table[column]):
        path = _batch_image_path(images_dir, value, by_path=path_column is not None)
        if path is None:
            # Row numbers count the header as line 1, as a spreadsheet shows them.
            raise MonitorError(f"{manifest}, line {row + 2}: no image for {column} {value!r} "
                               f"in {images_dir}")
        paths.append(path)
    ids = [Path(v).stem if path_column else v for v in table[column]]
    metadata = table.drop(columns=[column]).reset_index(drop=True)
    return ids, paths, metadata


def _batch_image_path(images_dir: Path, value: str, by_path: bool) -> Path | None:
    if not value:
        return None
    if by_path:
        path = Path(value) if Path(value).is_absolute() else images_dir / value
        return path if path.is_file() else None
    for suffix in (".jpg", ".jpeg", ".png"):
        path = images_dir / f"{value}{suffix}"
        if path.is_file():
            return path
    return None


def _decode_batch_image(path: Path, size: int, greyscale_model: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image as RGB at `size` x `size`, the way the audit's data loader does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            original = image.size
            colour = image.mode not in GREY_MODES
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise MonitorError(f"cannot read batch image {path} ({type(error).__name__}: {error})") from None

    # An RGB file whose three channels agree is grey-scale content stored as colour.
    if colour and greyscale_model and np.ptp(array.astype(np.int16), axis=2).max() > 2:
        raise MonitorError(f"batch image {path} is a colour image, but the audited model reads "
                           "grey-scale images; convert the batch to grey-scale first")
    return array, original


# ----------------------------------------------------------------------------------------------
# Image statistics


def image_statistics(images: np.ndarray, original_sizes: np.ndarray | None = None,
                     chunk: int = 256) -> dict[str, np.ndarray]:
    """Compute per-image statistics of uint8 RGB images (n, H, W, 3); each value an (n,) array.

    Intensities are on a 0..1 scale. Luma is Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601).

    - brightness: mean luma; contrast: standard deviation of luma (RMS contrast);
    - sharpness: log10(1e-6 + variance of the 3x3 Laplacian of luma) over interior pixels,
      a log because the variance spans orders of magnitude between blurred and sharp images;
    - red, green, blue: channel means; saturation: mean HSV saturation (max - min) / max;
    - noise: Immerkaer's estimate of the standard deviation of additive Gaussian noise in luma,
      sigma = sqrt(pi / 2) / (6 (W - 2) (H - 2)) * sum |Y * N| with N the 3x3 kernel
      [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] (Computer Vision and Image Understanding 64(2),
      1996), chosen because it is one convolution for the whole batch;
    - original_size: sqrt(width * height) of the source file in pixels, NaN when unknown.
    """
    from scipy import ndimage

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise MonitorError(f"images must be uint8 with shape (n, H, W, 3), got {images.dtype} "
                           f"{images.shape}")
    n, height, width = images.shape[:3]
    if height < 3 or width < 3:
        raise MonitorError(f"images must be at least 3 x 3 pixels, got {height} x {width}")

    out = {name: np.empty(n, dtype=np.float64) for name in STATISTICS}
    laplacian = np.array([[[0, 1, 0], [1, -4, 1], [0, 1, 0]]], dtype=np.float32)
    noise_kernel = np.array([[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]], dtype=np.float32)
    noise_scale = math.sqrt(math.pi / 2) / (6 * (width - 2) * (height - 2))

    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        rgb = images[rows].astype(np.float32) / 255.0
        luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]

        out["brightness"][rows] = luma.mean(axis=(1, 2))
        out["contrast"][rows] = luma.std(axis=(1, 2))

        edges = ndimage.convolve(luma, laplacian, mode="reflect")[:, 1:-1, 1:-1]
        out["sharpness"][rows] = np.log10(1e-6 + edges.var(axis=(1, 2)))

        for channel, name in enumerate(("red", "green", "blue")):
            out[name][rows] = rgb[..., channel].mean(axis=(1, 2))
        high = rgb.max(axis=3)
        low = rgb.min(axis=3)
        saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
        out["saturation"][rows] = saturation.mean(axis=(1, 2))

        residual = ndimage.convolve(luma, noise_kernel, mode="reflect")[:, 1:-1, 1:-1]
        out["noise"][rows] = noise_scale * np.abs(residual).sum(axis=(1, 2))

    if original_sizes is None:
        out["original_size"][:] = np.nan
    else:
        sizes = np.asarray(original_sizes, dtype=np.float64).reshape(n, 2)
        out["original_size"] = np.sqrt(sizes[:, 0] * sizes[:, 1])
    return out


def standardized_mean_difference(reference: np.ndarray, batch: np.ndarray) -> float:
    """Return (mean(batch) - mean(reference)) / pooled standard deviation (Cohen's d).

    NaN when both samples are constant, because the difference has no scale then.
    """
    reference = np.asarray(reference, dtype=np.float64)
    batch = np.asarray(batch, dtype=np.float64)
    n_ref, n_batch = len(reference), len(batch)
    if n_ref < 2 or n_batch < 2:
        return float("nan")
    pooled = ((n_ref - 1) * reference.var(ddof=1) + (n_batch - 1) * batch.var(ddof=1)) / (
        n_ref + n_batch - 2)
    if pooled <= 0:
        return 0.0 if batch.mean() == reference.mean() else float("nan")
    return float((batch.mean() - reference.mean()) / math.sqrt(pooled))


def input_drift(reference: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Test each image statistic of the batch against the reference (the clean test images).

    Returns one row per statistic: the two means, the KS statistic D and its p-value
    (`scipy.stats.ks_2samp`), the Benjamini-Hochberg adjusted p-value over all statistics
    (`q_value`) and the standardized mean difference (`smd`). Statistics missing on either side
    (an unknown original size) are left out.
    """
    from scipy.stats import false_discovery_control, ks_2samp

    rows = []
    for name in STATISTICS:
        ref = np.asarray(reference.get(name, []), dtype=np.float64)
        new = np.asarray(batch.get(name, []), dtype=np.float64)
        ref, new = ref[np.isfinite(ref)], new[np.isfinite(new)]
        if len(ref) == 0 or len(new) == 0:
            continue
        test = ks_2samp(ref, new)
        rows.append({"statistic": name, "reference_mean": float(ref.mean()),
                     "batch_mean": float(new.mean()), "ks_statistic": float(test.statistic),
                     "p_value": float(test.pvalue),
                     "smd": standardized_mean_difference(ref, new)})
    if rows:
        q_values = false_discovery_control([row["p_value"] for row in rows])
        for row, q in zip(rows, q_values):
            row["q_value"] = float(q)
    return rows


def output_drift(reference_probs: np.ndarray, batch_probs: np.ndarray,
                 classes: list[str]) -> dict[str, Any]:
    """Compare the batch's predictions with those on the clean test set.

    Confidence (the top-class probability): KS test. Predicted class mix: chi-square test of
    the 2 x K table of predicted-class counts (`scipy.stats.chi2_contingency`, classes that
    neither set predicts left out) and the total variation distance between the two mixes.
    """
    from scipy.stats import chi2_contingency, ks_2samp

    reference_probs = _check_probs(reference_probs, "reference_probs", len(classes))
    batch_probs = _check_probs(batch_probs, "batch_probs", len(classes))
    ref_conf, new_conf = reference_probs.max(axis=1), batch_probs.max(axis=1)
    confidence_test = ks_2samp(ref_conf, new_conf)

    k = len(classes)
    ref_counts = np.bincount(reference_probs.argmax(axis=1), minlength=k)
    new_counts = np.bincount(batch_probs.argmax(axis=1), minlength=k)
    table = np.vstack([ref_counts, new_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        chi2, p_value = 0.0, 1.0
    else:
        chi2, p_value = chi2_contingency(table)[:2]
    ref_mix = ref_counts / ref_counts.sum()
    new_mix = new_counts / new_counts.sum()
    return {
        "confidence": {"reference_mean": float(ref_conf.mean()),
                       "batch_mean": float(new_conf.mean()),
                       "ks_statistic": float(confidence_test.statistic),
                       "p_value": float(confidence_test.pvalue),
                       "smd": standardized_mean_difference(ref_conf, new_conf)},
        "class_mix": {"classes": list(classes), "reference": ref_mix.tolist(),
                      "batch": new_mix.tolist(), "chi2": float(chi2), "p_value": float(p_value),
                      "total_variation": float(0.5 * np.abs(ref_mix - new_mix).sum())},
    }


# ----------------------------------------------------------------------------------------------
# Prevalence under label shift


def _check_probs(probs: np.ndarray, name: str, k: int | None = None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise MonitorError(f"{name} must be a non-empty (n, K) array, got shape {probs.shape}")
    if k is not None and probs.shape[1] != k:
        raise MonitorError(f"{name} has {probs.shape[1]} columns, expected {k}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise MonitorError(f"{name} must hold finite non-negative probabilities")
    return probs


def _check_labels(labels: np.ndarray, n: int, k: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise MonitorError(f"{name} must have shape ({n},), got {labels.shape}")
    bad = (labels < 0) | (labels >= k)
    if bad.any():
        raise MonitorError(f"{name} has {int(bad.sum())} values outside 0..{k - 1} "
                           f"(first at row {int(np.flatnonzero(bad)[0])})")
    return labels.astype(np.int64)


def confusion_joint(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the joint confusion matrix C[i, j] = P(predicted i, true j) of labelled data."""
    probs = _check_probs(probs, "probs")
    k = probs.shape[1]
    labels = _check_labels(labels, len(probs), k)
    joint = np.zeros((k, k))
    np.add.at(joint, (probs.argmax(axis=1), labels), 1.0)
    return joint / len(labels)


def bbse_prevalence(calibration_probs: np.ndarray, calibration_labels: np.ndarray,
                    batch_probs: np.ndarray) -> np.ndarray:
    """Estimate the batch's class prevalence by black-box shift estimation (BBSE).

    Under label shift P(x | y) stays fixed, so the predicted-class distribution of the batch is
    mu = C w, with C the joint confusion matrix of the calibration split and w_j = q(y=j) /
    p(y=j) the importance weights (Lipton, Wang and Smola, ICML 2018). w is solved by
    non-negative least squares (`scipy.optimize.nnls`), the constrained form of solving and
    clipping negative weights to zero; q = w * p is then renormalised to sum to 1. Returns q
    with shape (K,); the calibration prevalence when every weight comes out zero.
    """
    from scipy.optimize import nnls

    joint = confusion_joint(calibration_probs, calibration_labels)
    k = joint.shape[0]
    batch_probs = _check_probs(batch_probs, "batch_probs", k)
    predicted_mix = np.bincount(batch_probs.argmax(axis=1), minlength=k) / len(batch_probs)
    source_prior = joint.sum(axis=0)

    weights, _ = nnls(joint, predicted_mix)
    prevalence = weights * source_prior
    if prevalence.sum() <= 0:
        return source_prior
    return prevalence / prevalence.sum()


def em_prevalence(batch_probs: np.ndarray, source_prior: np.ndarray, max_iter: int = 1000,
                  tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Estimate the batch's class prevalence by EM prior adjustment.

    Saerens, Latinne and Decaestecker (Neural Computation 14, 2002): starting from the source
    prior p, alternate the posterior update p'(y|x) proportional to p(y|x) q(y) / p(y) with the
    prior update q(y) = mean over the batch of p'(y|x), until q moves by less than `tol`.
    `batch_probs` should be calibrated posteriors under the source prior. Returns (q (K,),
    adjusted posteriors (n, K)). Classes with zero source prior keep zero prevalence.
    """
    batch_probs = _check_probs(batch_probs, "batch_probs")
    source_prior = np.asarray(source_prior, dtype=np.float64)
    if source_prior.shape != (batch_probs.shape[1],) or source_prior.min() < 0 or source_prior.sum() <= 0:
        raise MonitorError(f"source_prior must be {batch_probs.shape[1]} non-negative shares, "
                           f"got {source_prior.tolist()}")
    source_prior = source_prior / source_prior.sum()
    present = source_prior > 0

    prevalence = source_prior.copy()
    adjusted = batch_probs
    for _ in range(max_iter):
        ratio = np.where(present, prevalence / np.where(present, source_prior, 1.0), 0.0)
        adjusted = batch_probs * ratio
        totals = adjusted.sum(axis=1, keepdims=True)
        adjusted = np.divide(adjusted, totals, out=np.full_like(adjusted, 1.0 / adjusted.shape[1]),
                             where=totals > 0)
        updated = adjusted.mean(axis=0)
        converged = np.abs(updated - prevalence).max() < tol
        prevalence = updated
        if converged:
            break
    return prevalence, adjusted


# ----------------------------------------------------------------------------------------------
# Accuracy without labels


def confidence_scores(probs: np.ndarray, score: str = "max_confidence",
                      predicted: np.ndarray | None = None) -> np.ndarray:
    """Return one score per row: "max_confidence" or "negative_entropy".

    "max_confidence" is the probability of the `predicted` class, the top class when None. A
    recalibration map may move the top class, so the model's own prediction is passed here.
    """
    probs = _check_probs(probs, "probs")
    if score == "max_confidence":
        if predicted is None:
            return probs.max(axis=1)
        return probs[np.arange(len(probs)), predicted]
    if score == "negative_entropy":
        logs = np.log(np.clip(probs, 1e-300, None))
        return (probs * logs).sum(axis=1)
    raise MonitorError(f"score {score!r} is invalid; use one of {', '.join(SCORES)}")


def atc_threshold(scores: np.ndarray, correct: np.ndarray) -> float:
    """Learn the average-thresholded-confidence (ATC) threshold on labelled data.

    Garg et al. (ICLR 2022): t is chosen so that the share of scores above t equals the
    accuracy, mean(scores > t) = mean(correct). With k = round(accuracy * n) correct rows, t is
    the (k+1)-th largest score, so exactly k scores lie above it when scores are distinct;
    -inf when every row is correct and the largest score when none is.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if scores.ndim != 1 or len(scores) == 0 or scores.shape != correct.shape:
        raise MonitorError(f"scores and correct must be non-empty (n,) arrays of one length, got "
                           f"{scores.shape} and {correct.shape}")
    k = round(correct.mean() * len(scores))
    descending = np.sort(scores)[::-1]
    if k >= len(scores):
        return float("-inf")
    return float(descending[k])


@dataclass
class LabelFreeEstimator:
    """Recalibration map, ATC threshold and source prior learned from the calibration split."""

    scaler: Any  # a fitted tools.calibration scaler
    threshold: float
    score: str
    source_prior: np.ndarray  # (K,) class shares of the calibration split
    calibration_probs: np.ndarray  # (n, K) before recalibration
    calibration_labels: np.ndarray  # (n,)

    def recalibrate(self, probs: np.ndarray) -> np.ndarray:
        """Apply the fitted scaler to probabilities, with their logs serving as logits."""
        logits = np.log(np.clip(_check_probs(probs, "probs"), 1e-300, None))
        return np.exp(self.scaler.log_proba(logits))

    def point_estimates(self, batch_probs: np.ndarray) -> dict[str, float]:
        """Estimate the model's accuracy and balanced accuracy on one batch; see `fit_estimator`."""
        probs = self.recalibrate(batch_probs)
        return self.estimates_from(probs, batch_probs.argmax(axis=1),
                                   em_prevalence(probs, self.source_prior)[0])

    def estimates_from(self, probs: np.ndarray, predicted: np.ndarray,
                       prevalence: np.ndarray) -> dict[str, float]:
        """Estimate from recalibrated probabilities, the model's predicted classes (argmax
        before recalibration) and the batch's EM prevalence estimate."""
        n, k = probs.shape
        above = confidence_scores(probs, self.score, predicted) > self.threshold
        confidence = probs[np.arange(n), predicted]

        # NOTE: for a weak model (clean balanced accuracy 0.22) under strong shifts, these balanced
        # accuracy estimates erred more than assuming the clean value did (mean absolute error 0.10
        # against 0.06 in evals/bench_monitor.py). Few predictions pass the threshold there, and EM
        # can put most of the prevalence on classes the model never predicts.
        expected_counts = prevalence * n
        atc_correct = np.bincount(predicted, weights=above.astype(float), minlength=k)
        confidence_correct = np.bincount(predicted, weights=confidence, minlength=k)
        # A class expected to have less than half an image in the batch has no recall to speak of.
        counted = expected_counts >= 0.5
        if counted.any():
            atc_recall = np.minimum(1.0, atc_correct[counted] / expected_counts[counted])
            confidence_recall = np.minimum(1.0, confidence_correct[counted] / expected_counts[counted])
            atc_balanced = float(atc_recall.mean())
            confidence_balanced = float(confidence_recall.mean())
        else:
            atc_balanced = confidence_balanced = float("nan")
        return {
            "accuracy_atc": float(above.mean()),
            "accuracy_confidence": float(confidence.mean()),
            "balanced_accuracy_atc": atc_balanced,
            "balanced_accuracy_confidence": confidence_balanced,
        }


def fit_estimator(calibration_probs: np.ndarray, calibration_labels: np.ndarray,
                  score: str = "max_confidence",
                  recalibration: str = "vector") -> LabelFreeEstimator:
    """Fit the label-free estimators on the labelled calibration split.

    A recalibration map is fitted by NLL with log probabilities as logits. The default is
    "vector" scaling (a scale and a bias per class, `tools.calibration.VectorScaler`), because
    its biases also correct a model whose class priors are off after class-weighted training.
    A single temperature ("temperature") cannot do that. The ATC threshold is learned on the
    recalibrated scores. On a batch the estimators are then:

    - accuracy, ATC: the share of batch scores above the threshold;
    - accuracy, confidence: the mean recalibrated probability of the model's predicted class;
    - balanced accuracy: the mean over classes of (estimated correct predictions of class k) /
      (estimated images of class k). The numerator counts predictions of class k above the
      threshold (ATC) or sums their recalibrated confidence; the denominator is n times the EM
      prevalence estimate.
    """
    from tools.calibration import CalibrationError, make_scaler

    probs = _check_probs(calibration_probs, "calibration_probs")
    k = probs.shape[1]
    labels = _check_labels(calibration_labels, len(probs), k, "calibration_labels")
    if len(np.unique(labels)) < 2:
        raise MonitorError("the calibration split contains a single class; the label-free "
                           "estimators need labelled images of at least two classes")

    try:
        scaler = make_scaler(recalibration)
    except CalibrationError as error:
        raise MonitorError(f"recalibration {recalibration!r} is invalid ({error})") from None
    try:
        scaler.fit(np.log(np.clip(probs, 1e-300, None)), labels)
    except CalibrationError as error:
        raise MonitorError(f"recalibration {recalibration!r} failed to fit on the calibration "
                           f"split ({error})") from None
    estimator = LabelFreeEstimator(scaler, 0.0, score, np.bincount(labels, minlength=k) / len(labels),
                                   probs, labels)
    # Accuracy is that of the model's own predictions, which recalibration must not change.
    predicted = probs.argmax(axis=1)
    scores = confidence_scores(estimator.recalibrate(probs), score, predicted)
    estimator.threshold = atc_threshold(scores, predicted == labels)
    return estimator


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def estimate_batch(estimator: LabelFreeEstimator, batch_probs: np.ndarray, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Estimate performance and prevalence of a batch, with 95 % percentile bootstrap intervals.

    The bootstrap resamples the batch's images. The calibration split, the recalibration map and
    the ATC threshold stay fixed, so the intervals leave out the calibration split's own sampling
    error.
    """
    batch_probs = _check_probs(batch_probs, "batch_probs", len(estimator.source_prior))
    if n_boot < 0:
        raise MonitorError(f"n_boot must be 0 or more, got {n_boot}")
    recalibrated = estimator.recalibrate(batch_probs)
    predicted = batch_probs.argmax(axis=1)

    def estimates(rows: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        prevalence = {
            "bbse": bbse_prevalence(estimator.calibration_probs, estimator.calibration_labels,
                                    batch_probs[rows]),
            "em": em_prevalence(recalibrated[rows], estimator.source_prior)[0],
        }
        performance = estimator.estimates_from(recalibrated[rows], predicted[rows],
                                               prevalence["em"])
        return performance, prevalence

    n = len(batch_probs)
    point, point_prevalence = estimates(np.arange(n))
    above = confidence_scores(recalibrated, estimator.score, predicted) > estimator.threshold

    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in point}
    prevalence_draws: dict[str, list[np.ndarray]] = {name: [] for name in point_prevalence}
    for _ in range(n_boot):
        performance_draw, prevalence_draw = estimates(rng.integers(0, n, n))
        for name, value in performance_draw.items():
            draws[name].append(value)
        for name, value in prevalence_draw.items():
            prevalence_draws[name].append(value)

    performance = {}
    for name, value in point.items():
        low, high = _interval(np.array(draws[name])) if n_boot else (None, None)
        performance[name] = {"value": value, "low": low, "high": high}
    prevalence = {"source": estimator.source_prior.tolist()}
    for name, value in point_prevalence.items():
        entry: dict[str, Any] = {"value": value.tolist(), "low": None, "high": None}
        if n_boot:
            stacked = np.vstack(prevalence_draws[name])
            entry["low"] = np.percentile(stacked, 2.5, axis=0).tolist()
            entry["high"] = np.percentile(stacked, 97.5, axis=0).tolist()
        prevalence[name] = entry
    return {"performance": performance, "prevalence": prevalence,
            "recalibration": estimator.scaler.to_dict(), "atc_threshold": estimator.threshold,
            "atc_score": estimator.score, "atc_images_above": int(above.sum()), "n_boot": n_boot}


# ----------------------------------------------------------------------------------------------
# Nearest audited condition


def profile_distance(candidate: dict[str, np.ndarray], batch: dict[str, np.ndarray],
                     scale: dict[str, float]) -> dict[str, float]:
    """Measure how far a condition's distributions lie from the batch's.

    For every statistic (and the confidence) the 1-Wasserstein distance between the two
    samples (`scipy.stats.wasserstein_distance`) is divided by the statistic's standard
    deviation on the clean test set. Statistics are averaged within their group
    (`DISTANCE_GROUPS`), and the distance is the mean over groups. Returns the per-group parts
    and their mean under "distance".
    """
    from scipy.stats import wasserstein_distance

    parts = {}
    for group, names in DISTANCE_GROUPS.items():
        values = []
        for name in names:
            a = np.asarray(candidate.get(name, []), dtype=np.float64)
            b = np.asarray(batch.get(name, []), dtype=np.float64)
            a, b = a[np.isfinite(a)], b[np.isfinite(b)]
            if len(a) == 0 or len(b) == 0 or not scale.get(name):
                continue
            values.append(wasserstein_distance(a, b) / scale[name])
        if values:
            parts[group] = float(np.mean(values))
    parts["distance"] = float(np.mean(list(parts.values()))) if parts else float("nan")
    return parts


def nearest_condition(profiles: dict[str, dict[str, np.ndarray]], batch: dict[str, np.ndarray],
                      reference: str = "clean") -> dict[str, Any]:
    """Rank audited conditions by `profile_distance` to the batch; the first is the nearest.

    `profiles` maps condition keys to their statistics and confidences; the scale of each
    statistic is its standard deviation under `reference`. A condition tied with `reference`
    (see `NEAREST_TIE_RELATIVE`) ranks after it.
    """
    if reference not in profiles:
        raise MonitorError(f"the reference condition {reference!r} has no profile")
    scale = {name: float(np.nanstd(values)) for name, values in profiles[reference].items()
             if len(values) > 1}
    ranking = []
    for key, profile in profiles.items():
        parts = profile_distance(profile, batch, scale)
        ranking.append({"condition": key, **parts})
    ranking.sort(key=lambda row: (not math.isfinite(row["distance"]), row["distance"]))
    _rank_reference_first_on_ties(ranking, reference)
    return {"condition": ranking[0]["condition"], "distance": ranking[0]["distance"],
            "ranking": ranking,
            "method": "mean over groups (brightness, contrast, sharpness, colour, noise, "
                      "confidence) of the 1-Wasserstein distance divided by the clean test "
                      "set's standard deviation"}


def _rank_reference_first_on_ties(ranking: list[dict[str, Any]], reference: str) -> None:
    """Move `reference` in the sorted `ranking` ahead of the conditions tied with it."""
    position = next(i for i, row in enumerate(ranking) if row["condition"] == reference)
    row = ranking[position]
    if not math.isfinite(row["distance"]):
        return

    first_tied = position
    while first_tied > 0 and math.isclose(ranking[first_tied - 1]["distance"], row["distance"],
                                          rel_tol=NEAREST_TIE_RELATIVE,
                                          abs_tol=NEAREST_TIE_ABSOLUTE):
        first_tied -= 1
    ranking.insert(first_tied, ranking.pop(position))


def measured_at(store, audit_id: str, key: str) -> list[dict[str, Any]]:
    """Return the whole-set results the audit stored for a condition, with the change from clean."""
    differences = {(d["metric"]): d for d in store.differences(audit_id)
                   if d["condition"] == key and d["reference"] == "clean"}
    rows = []
    for result in store.results(audit_id):
        if result["condition"] != key or result["class"] is not None:
            continue
        difference = differences.get(result["metric"])
        rows.append({"metric": result["metric"], "params": result["params"],
                     "value": result["value"], "low": result["low"], "high": result["high"],
                     "delta_vs_clean": difference["delta"] if difference else None,
                     "reason": result["reason"]})
    return rows


# ----------------------------------------------------------------------------------------------
# The audit's reference data


@dataclass
class AuditReference:
    """Reference data of one audit: classes, clean and calibration predictions, and the
    statistics of every candidate condition."""

    classes: list[str]
    input_size: int
    greyscale: bool
    clean_probs: np.ndarray
    calibration_probs: np.ndarray
    calibration_labels: np.ndarray
    statistics: dict[str, dict[str, np.ndarray]]  # condition key -> statistic -> values
    confidences: dict[str, np.ndarray]  # condition key -> top-class probabilities
    seed: int


def load_audit_spec(store, audit_id: str):
    """Rebuild the audit's spec from the store; raises StoreError for an unknown audit id."""
    from tools.spec import spec_from_dict

    audit = store.audit(audit_id)
    if not audit["spec"]:
        raise MonitorError(f"audit {audit_id} has no stored spec, so its data cannot be rebuilt")
    return spec_from_dict(audit["spec"], Path.cwd(), source=f"audit {audit_id} spec")


def load_classifier_for(spec, device: str | None = None):
    """Load the audit's classifier on `device` (the spec's audit.device when None)."""
    from tools.models import load_classifier

    return load_classifier(spec.model, device=device or spec.audit.device)


def build_reference(store, audit_id: str, spec, classifier, *, sample: int = 200,
                    batch_size: int = 256, progress: Progress | None = None) -> AuditReference:
    """Collect the audit's reference data, computing and caching what the store lacks.

    The calibration split's predictions and the statistics of the clean test images, of each
    site and of each audited shift are cached as artifacts of the audit. Shifted statistics
    come from re-shifting `sample` clean test images (seeded by the audit seed) with
    `tools.shifts.shift_images`; confidences come from the predictions the audit stored.
    """
    report = progress or (lambda task, done, total: None)
    clean = store.predictions(audit_id, "clean")
    conditions = [c for c in store.conditions(audit_id)
                  if c.kind in NEAREST_KINDS and not c.too_small]
    seed = spec.audit.seed

    cache_name = f"{CACHE_PREFIX}reference"
    cache = store.artifact(audit_id, cache_name)
    cache_key = {"version": CACHE_VERSION, "sample": sample, "seed": seed,
                 "input_size": classifier.input_size}
    if not cache or {k: cache.get(k) for k in cache_key} != cache_key:
        cache = dict(cache_key)
    statistics = {key: {name: np.asarray(values, dtype=np.float64) for name, values in stats.items()}
                  for key, stats in cache.get("statistics", {}).items()}
    greyscale = cache.get("greyscale")

    missing = [c for c in conditions if c.key not in statistics]
    calibration = cache.get("calibration")
    if missing or calibration is None or greyscale is None:
        dataset = _load_audit_data(spec, classifier)
        greyscale = bool(dataset.greyscale)
        test = _audit_test_set(dataset, clean["ids"], audit_id)
        if calibration is None:
            calibration = _predict_calibration(dataset, classifier, batch_size, report)
        if missing:
            statistics.update(_condition_statistics(store, audit_id, missing, test, classifier,
                                                    clean["ids"], sample, seed, report, spec))
        cache.update({"greyscale": greyscale, "calibration": calibration,
                      "statistics": {key: {name: values.tolist() for name, values in stats.items()}
                                     for key, stats in statistics.items()}})
        store.save_artifact(audit_id, cache_name, _json_safe(cache))

    confidences = {c.key: store.predictions(audit_id, c.key)["probs"].max(axis=1)
                   for c in conditions}
    return AuditReference(
        classes=list(classifier.classes), input_size=classifier.input_size,
        greyscale=bool(greyscale) or getattr(classifier, "in_chans", 3) == 1,
        clean_probs=clean["probs"],
        calibration_probs=np.asarray(calibration["probs"], dtype=np.float64),
        calibration_labels=np.asarray(calibration["labels"], dtype=np.int64),
        statistics={c.key: statistics[c.key] for c in conditions if c.key in statistics},
        confidences=confidences, seed=seed)


def _load_audit_data(spec, classifier):
    from tools.data import load_dataset

    return load_dataset(spec.data, classifier.classes)


def _audit_test_set(dataset, stored_ids: np.ndarray, audit_id: str):
    """Return the audit's test images in the order of its stored clean predictions."""
    test = dataset.part("test")
    position = {image_id: i for i, image_id in enumerate(test.ids)}
    missing = [image_id for image_id in stored_ids if image_id not in position]
    if missing:
        raise MonitorError(f"test image {missing[0]} of audit {audit_id} is no longer in the "
                           f"dataset's test split ({len(missing)} missing); the data changed "
                           "since the audit")
    return test.subset(np.array([position[image_id] for image_id in stored_ids], dtype=np.int64))


def _predict_calibration(dataset, classifier, batch_size: int, report: Progress) -> dict[str, Any]:
    calibration = dataset.part("calibration")
    if len(calibration) == 0:
        raise MonitorError("the audit's data has no calibration split; the label-free "
                           "estimators need one (set data.split.calibration above 0)")
    images = calibration.images(classifier.input_size,
                                progress=lambda d, t: report("Loading calibration images", d, t))
    probs = classifier.predict_proba(images, batch_size=batch_size,
                                     progress=lambda d, t: report("Predicting calibration split", d, t))
    return {"ids": list(calibration.ids), "labels": calibration.labels.tolist(), "probs": probs.tolist()}


def _original_sizes(dataset) -> np.ndarray | None:
    """Read width and height of each source file from its header; None for array datasets."""
    from PIL import Image

    if dataset.paths is None:
        if dataset.source_array is None:
            return None
        height, width = dataset.source_array.shape[1:3]
        return np.tile([width, height], (len(dataset), 1))
    sizes = np.empty((len(dataset), 2), dtype=np.int64)
    for i, path in enumerate(dataset.paths):
        with Image.open(path) as image:
            sizes[i] = image.size
    return sizes


def _condition_statistics(store, audit_id: str, conditions, test, classifier,
                          stored_ids: np.ndarray, sample: int, seed: int,
                          report: Progress, spec) -> dict[str, dict[str, np.ndarray]]:
    from tools.shifts import shift_images

    images = test.images(classifier.input_size,
                         progress=lambda d, t: report("Loading test images", d, t))
    clean_stats = image_statistics(images, _original_sizes(test))
    position = {image_id: i for i, image_id in enumerate(stored_ids)}

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(images), min(sample, len(images)), replace=False))
    sample_images = np.ascontiguousarray(images[rows])

    out = {}
    for done, condition in enumerate(conditions):
        report("Statistics of audited conditions", done, len(conditions))
        if condition.kind == "clean":
            out[condition.key] = clean_stats
        elif condition.kind == "site":
            ids = store.predictions(audit_id, condition.key)["ids"]
            keep = np.array([position[i] for i in ids if i in position], dtype=np.int64)
            out[condition.key] = {name: values[keep] for name, values in clean_stats.items()}
        elif condition.kind == "external":
            out[condition.key] = _external_statistics(spec, condition.name, audit_id, classifier)
        else:
            shifted = shift_images(sample_images, condition.name, int(condition.severity), seed)
            stats = image_statistics(shifted)
            stats["original_size"] = clean_stats["original_size"][rows]
            out[condition.key] = stats
    report("Statistics of audited conditions", len(conditions), len(conditions))
    return out


def _external_statistics(spec, name: str, audit_id: str, classifier) -> dict[str, np.ndarray]:
    """Compute the image statistics of the audit's external set `name`, loaded again from its spec."""
    from tools.data import DataError, load_external

    external = next((e for e in spec.data.external if e.name == name), None)
    if external is None:
        raise MonitorError(f"external set {name!r} not found under data.external in the stored "
                           f"spec of audit {audit_id}")
    try:
        dataset = load_external(external, spec.data, classifier.classes)
        images = dataset.images(classifier.input_size)
    except DataError as error:
        raise MonitorError(f"external set {name!r} of audit {audit_id} failed to load ({error}); "
                           "restore its files where the audit read them") from None
    return image_statistics(images, _original_sizes(dataset))


# ----------------------------------------------------------------------------------------------
# One batch


def monitor_batch(store, audit_id: str, batch: Batch, reference: AuditReference, classifier, *,
                  thresholds: MonitorThresholds | None = None, n_boot: int = 1000,
                  score: str = "max_confidence", recalibration: str = "vector",
                  batch_size: int = 256,
                  progress: Progress | None = None, save: bool = True) -> dict[str, Any]:
    """Compare one unlabelled batch with the audit, store the record and return it.

    The record contains input and output drift, prevalence and performance estimates, the nearest
    audited condition with the audit's results there, and the alerts the thresholds raise.
    """
    report = progress or (lambda task, done, total: None)
    if len(batch) == 0:
        raise MonitorError(f"batch {batch.source} is empty")
    if batch.images.shape[1] != reference.input_size:
        raise MonitorError(f"batch images are {batch.images.shape[1]} px but the model reads "
                           f"{reference.input_size} px; load the batch at the model's input size")

    probs = classifier.predict_proba(batch.images, batch_size=batch_size,
                                     progress=lambda d, t: report("Predicting batch", d, t))
    batch_stats = image_statistics(batch.images, batch.original_sizes)

    estimator = fit_estimator(reference.calibration_probs, reference.calibration_labels, score,
                              recalibration)
    estimates = estimate_batch(estimator, probs, n_boot=n_boot, seed=reference.seed)

    profiles = {key: {**stats, "confidence": reference.confidences[key]}
                for key, stats in reference.statistics.items()}
    nearest = nearest_condition(profiles, {**batch_stats, "confidence": probs.max(axis=1)})
    nearest["measured"] = measured_at(store, audit_id, nearest["condition"])

    created = datetime.now(timezone.utc)
    record = {
        "audit_id": audit_id,
        "created_at": created.isoformat(),
        "batch": {"source": str(batch.source), "n": len(batch),
                  "metadata_columns": [str(c) for c in batch.metadata.columns]},
        "classes": reference.classes,
        "input_drift": input_drift(reference.statistics["clean"], batch_stats),
        "output_drift": output_drift(reference.clean_probs, probs, reference.classes),
        "prevalence": estimates["prevalence"],
        "performance": estimates["performance"],
        "estimator": {key: estimates[key] for key in ("recalibration", "atc_threshold", "atc_score",
                                                      "atc_images_above", "n_boot")},
        "audited_clean": _audited_clean(store, audit_id),
        "nearest": nearest,
        "thresholds": (thresholds or MonitorThresholds()).model_dump(),
    }
    record["alerts"] = check_alerts(record, thresholds or MonitorThresholds())
    record = _json_safe(record)
    if save:
        record["name"] = f"{RECORD_PREFIX}{created:%Y%m%dT%H%M%S.%fZ}"
        store.save_artifact(audit_id, record["name"], record)
    return record


def _audited_clean(store, audit_id: str) -> dict[str, float | None]:
    values = {}
    for result in store.results(audit_id):
        if result["condition"] == "clean" and result["class"] is None and not result["params"]:
            values[result["metric"]] = result["value"]
    return {"accuracy": values.get("accuracy"), "balanced_accuracy": values.get("balanced_accuracy")}


def check_alerts(record: dict[str, Any], thresholds: MonitorThresholds) -> list[str]:
    """Return one message per threshold the record breaks."""
    alerts = []
    clean = record["audited_clean"]
    performance = record["performance"]
    drops = [("accuracy", thresholds.max_accuracy_drop),
             ("balanced_accuracy", thresholds.max_balanced_accuracy_drop)]
    for metric, limit in drops:
        if limit is None:
            continue
        audited = clean.get(metric)
        estimate = performance[f"{metric}_atc"]["value"]
        if audited is None:
            alerts.append(f"{metric}: the audit stored no clean {metric}, so the drop limit "
                          f"{limit:.3f} cannot be checked")
        elif estimate is not None and math.isfinite(estimate) and audited - estimate > limit:
            alerts.append(f"{metric}: estimated {estimate:.3f} (ATC) is {audited - estimate:.3f} "
                          f"below the audited clean {audited:.3f}, more than the allowed {limit:.3f}")

    if thresholds.max_drift_p is not None:
        limit = thresholds.max_drift_p
        for row in record["input_drift"]:
            if row.get("q_value") is not None and row["q_value"] < limit:
                alerts.append(f"input drift in {row['statistic']}: adjusted p = {row['q_value']:.2g} "
                              f"< {limit:g} (standardized mean difference {_format(row['smd'])})")
        output = record["output_drift"]
        if output["confidence"]["p_value"] < limit:
            alerts.append(f"confidence drift: KS p = {output['confidence']['p_value']:.2g} < {limit:g}")
        if output["class_mix"]["p_value"] < limit:
            alerts.append(f"predicted class mix drift: chi-square p = "
                          f"{output['class_mix']['p_value']:.2g} < {limit:g}")
    return alerts


def _format(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2f}"


def _json_safe(value: Any) -> Any:
    """Convert numpy values to Python ones and NaN or infinity to None, for JSON storage."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------
# History and trend


def monitor_history(store, audit_id: str) -> list[dict[str, Any]]:
    """Return the audit's stored monitoring records, oldest first."""
    import json

    store.require_audit(audit_id)
    rows = store.con.execute(
        "SELECT name, value FROM artifacts WHERE audit_id = ? AND starts_with(name, ?) ORDER BY name",
        [audit_id, RECORD_PREFIX]).fetchall()
    return [json.loads(value) for _, value in rows]


def plot_trend(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw the accuracy estimates and drift of each batch over time; SVG or PNG by suffix."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not history:
        raise MonitorError("no monitoring records to plot")
    x = np.arange(1, len(history) + 1)
    labels = [record["created_at"][:19].replace("T", " ") for record in history]

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for key, label, marker in (("accuracy_atc", "accuracy (ATC)", "o"),
                               ("accuracy_confidence", "accuracy (mean confidence)", "s"),
                               ("balanced_accuracy_atc", "balanced accuracy (ATC)", "^")):
        values = np.array([_nan(r["performance"][key]["value"]) for r in history])
        low = np.array([_nan(r["performance"][key]["low"]) for r in history])
        high = np.array([_nan(r["performance"][key]["high"]) for r in history])
        errors = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
        top.errorbar(x, values, yerr=np.nan_to_num(errors), marker=marker, capsize=3, label=label)
    clean = history[-1]["audited_clean"]
    if clean.get("accuracy") is not None:
        top.axhline(clean["accuracy"], color="grey", linestyle="--", label="audited clean accuracy")
        limit = history[-1]["thresholds"].get("max_accuracy_drop")
        if limit is not None:
            top.axhline(clean["accuracy"] - limit, color="red", linestyle=":",
                        label="alert below this accuracy")
    top.set_ylabel("estimated value")
    top.set_ylim(0, 1.02)
    top.legend(fontsize=7, loc="lower left")
    top.set_title("Label-free estimates per batch")

    largest_d = [max((row["ks_statistic"] for row in r["input_drift"]), default=np.nan)
                 for r in history]
    confidence_d = [r["output_drift"]["confidence"]["ks_statistic"] for r in history]
    bottom.plot(x, largest_d, marker="o", label="largest KS statistic D over image statistics")
    bottom.plot(x, confidence_d, marker="s", label="KS statistic D, confidence")
    bottom.set_ylabel("drift (KS D)")
    bottom.set_ylim(0, 1.02)
    bottom.legend(fontsize=7, loc="upper left")
    bottom.set_xticks(x)
    bottom.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
