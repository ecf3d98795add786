"""Execute an audit plan: predict every condition, compute its metrics, store it, find failures.

Clean predictions are computed once and reused as the paired reference of every shift and as the
source of every subgroup, site and prevalence condition. Each condition is stored in one
transaction when it finishes, so a resumed audit skips what is already in the store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tools.spec import AuditPlan, AuditSpec, SpecError
from tools.store import Condition, DifferenceRow, ResultRow, Store

# (task description, done, total); the CLI turns it into progress bars.
Progress = Callable[[str, int, int], None]

# Per-class sensitivity is stored for every condition so the report can speak in natural
# frequencies ("about 1 in 8 melanomas ... would be missed").
PER_CLASS_METRIC = "sensitivity"

# Accuracy the accepted predictions must reach when the user stated no referral target.
DEFAULT_REFERRAL_TARGET = 0.95


@dataclass
class AuditInputs:
    """Inputs of an audit run besides the spec: the loaded model and the evaluation data."""

    classifier: Any  # tools.models.Classifier
    test: Any  # tools.data.Dataset, the test split
    externals: dict[str, Any]  # name -> tools.data.Dataset
    calibration: Any = None  # tools.data.Dataset, the calibration split; None skips recalibration


def metric_entries(plan: AuditPlan) -> list[tuple[str, dict]]:
    return [(choice.id, dict(choice.params)) for choice in plan.metrics]


def metric_key(metric_id: str, params: dict) -> str:
    if not params:
        return metric_id
    return metric_id + "@" + ",".join(f"{k}={params[k]}" for k in sorted(params))


def _per_class_sensitivity(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                           weights: np.ndarray | None = None) -> list[ResultRow]:
    predicted = probs.argmax(axis=1)
    weights = np.ones(len(labels)) if weights is None else weights
    rows = []
    for k, name in enumerate(classes):
        positives = labels == k
        total = float(weights[positives].sum())
        if total == 0:
            rows.append(ResultRow(PER_CLASS_METRIC, float("nan"), class_name=name,
                                  reason=f"class {name} is absent from this condition"))
            continue
        hit = float(weights[positives & (predicted == k)].sum())
        rows.append(ResultRow(PER_CLASS_METRIC, hit / total, class_name=name,
                              params={"count": int(positives.sum())}))
    return rows


@contextmanager
def _cores_left_for_worker():
    """Leave one core to the shift worker while predicting: with every core given to torch,
    the two compete and CPU inference slows down several-fold (measured with
    evals/bench_shifts.py on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if cores > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(before, cores - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AuditRunner:
    """Runs one audit's conditions in order and writes each to the store."""

    def __init__(self, spec: AuditSpec, plan: AuditPlan, store: Store, audit_id: str,
                 inputs: AuditInputs, progress: Progress | None = None):
        self.spec = spec
        self.plan = plan
        self.store = store
        self.audit_id = audit_id
        self.inputs = inputs
        self.progress = progress or (lambda task, done, total: None)
        self.settings = spec.audit
        self.metrics = metric_entries(plan)
        self.classes = inputs.classifier.classes
        self.done = store.finished_conditions(audit_id)
        self.reliability: dict[str, Any] = store.artifact(audit_id, "reliability", {}) or {}
        self.timings: dict[str, float] = {}

    # helpers

    def _bootstrap(self, probs, labels, weights=None):
        from tools.metrics import bootstrap_metrics

        return bootstrap_metrics(self.metrics, probs, labels, n_boot=self.settings.bootstrap,
                                 seed=self.settings.seed, weights=weights)

    def _result_rows(self, estimates, probs, labels, weights=None) -> list[ResultRow]:
        rows = []
        for metric_id, params in self.metrics:
            estimate = estimates[metric_key(metric_id, params)]
            rows.append(ResultRow(metric_id, estimate.value, estimate.low, estimate.high,
                                  params=params, reason=estimate.reason))
        rows.extend(_per_class_sensitivity(probs, labels, self.classes, weights))
        return rows

    def _difference_rows(self, differences, reference: str, paired: bool) -> list[DifferenceRow]:
        rows = []
        for metric_id, params in self.metrics:
            d = differences[metric_key(metric_id, params)]
            rows.append(DifferenceRow(metric_id, reference, d.delta, d.low, d.high, d.p_value,
                                      paired, d.reference, d.condition))
        return rows

    def _record_reliability(self, key: str, probs, labels) -> None:
        from tools.metrics import reliability_bins

        self.reliability[key] = reliability_bins(probs, labels, n_bins=15)
        self.store.save_artifact(self.audit_id, "reliability", self.reliability)

    # conditions

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self.plan.shifts:
            from tools.shifts.batches import start_worker_server

            # The shift worker's first start imports OpenCV and albumentations; let it run
            # alongside the clean predictions.
            start_worker_server()
        test = self.inputs.test
        labels = test.labels
        images = test.images(self.inputs.classifier.input_size,
                             progress=lambda d, t: self.progress("Loading test images", d, t))

        clean_probs = self._clean(images, labels)
        self._shifts(images, labels, clean_probs)
        self._subgroups(labels, clean_probs)
        self._prevalence(labels, clean_probs)
        self._reweight(labels, clean_probs)
        self._externals(clean_probs, labels)
        if self.inputs.calibration is not None and len(self.inputs.calibration.ids):
            self._recalibration()
            self._referral()

        self.timings["total_seconds"] = time.perf_counter() - started
        return {"timings": self.timings}

    def _clean(self, images, labels) -> np.ndarray:
        test = self.inputs.test
        if "clean" in self.done:
            return self.store.predictions(self.audit_id, "clean")["probs"]
        started = time.perf_counter()
        probs = self.inputs.classifier.predict_proba(
            images, batch_size=self.settings.batch_size,
            progress=lambda d, t: self.progress("Predicting clean test set", d, t))
        self.timings["clean_predict_seconds"] = time.perf_counter() - started
        estimates = self._bootstrap(probs, labels)
        condition = Condition("clean", "clean", "clean", {}, n=len(labels))
        self.store.save_condition(self.audit_id, condition, test.ids, labels, probs,
                                  self._result_rows(estimates, probs, labels))
        self._record_reliability("clean", probs, labels)
        return probs

    def _shifts(self, images, labels, clean_probs) -> None:
        from tools.shifts import validate_shift

        test = self.inputs.test
        jobs = []
        for choice in self.plan.shifts:
            for severity in choice.severities:
                validate_shift(choice.name, severity, greyscale=test.greyscale)
                if f"shift:{choice.name}:{severity}" not in self.done:
                    jobs.append((choice.name, severity))
        if not jobs:
            return
        self._contact_sheet(images)

        started = time.perf_counter()
        with _cores_left_for_worker():
            self._shift_loop(images, labels, clean_probs, jobs)
        self.timings["shift_seconds"] = time.perf_counter() - started

    def _shift_loop(self, images, labels, clean_probs, jobs: list[tuple[str, int]]) -> None:
        """Predict the shifted batches as the worker delivers them and store each condition
        once all its rows are in."""
        from tools.metrics import paired_bootstrap
        from tools.shifts import iter_shifted_batches

        test = self.inputs.test
        n = len(labels)
        total = len(jobs) * n
        done_rows = 0
        buffers: dict[tuple[str, int], np.ndarray] = {}
        for name, severity, start, batch in iter_shifted_batches(
                images, jobs, seed=self.settings.seed, batch_size=self.settings.batch_size):
            key = (name, severity)
            if key not in buffers:
                buffers[key] = np.empty((n, len(self.classes)), dtype=np.float64)
            buffers[key][start:start + len(batch)] = self.inputs.classifier.predict_proba(
                batch, batch_size=self.settings.batch_size)
            done_rows += len(batch)
            self.progress("Shifting and predicting", done_rows, total)
            if start + len(batch) < n:
                continue

            probs = buffers.pop(key)
            estimates = self._bootstrap(probs, labels)
            differences = paired_bootstrap(self.metrics, clean_probs, probs, labels,
                                           n_boot=self.settings.bootstrap, seed=self.settings.seed)
            condition = Condition(f"shift:{name}:{severity}", "shift", name,
                                  {"severity": severity}, n=n)
            self.store.save_condition(
                self.audit_id, condition, test.ids, labels, probs,
                self._result_rows(estimates, probs, labels),
                self._difference_rows(differences, "clean", paired=True))
            self._record_reliability(condition.key, probs, labels)

    def _contact_sheet(self, images) -> None:
        """Store one test image under every planned shift and severity, unless the spec keeps
        patient images out of the report."""
        import base64

        from tools.shifts import contact_sheet

        if not self.spec.report.include_images or self.store.artifact(self.audit_id,
                                                                      "contact_sheet_png"):
            return
        names = [choice.name for choice in self.plan.shifts]
        png = contact_sheet(images[0], names, seed=self.settings.seed)
        self.store.save_artifact(self.audit_id, "contact_sheet_png",
                                 base64.b64encode(png).decode("ascii"))

    def _subgroup_condition(self, kind: str, column: str, value: str, mask: np.ndarray,
                            labels, clean_probs) -> None:
        from tools.metrics import unpaired_bootstrap

        key = f"{kind}:{column}:{value}"
        if key in self.done:
            return
        n = int(mask.sum())
        too_small = n < self.plan.min_subgroup_size
        condition = Condition(key, kind, str(value), {"column": column, "value": str(value)},
                              n=n, effective_n=float(n), too_small=too_small)
        test = self.inputs.test
        ids = [test.ids[i] for i in np.flatnonzero(mask)]
        if too_small:
            # Reported as too small, not as numbers: intervals on a handful of images mislead.
            self.store.save_condition(self.audit_id, condition, ids, labels[mask],
                                      clean_probs[mask], [])
            return
        estimates = self._bootstrap(clean_probs[mask], labels[mask])
        rest = ~mask
        differences = []
        if rest.sum() > 0:
            diff = unpaired_bootstrap(self.metrics, clean_probs[rest], labels[rest],
                                      clean_probs[mask], labels[mask],
                                      n_boot=self.settings.bootstrap, seed=self.settings.seed)
            differences = self._difference_rows(diff, "rest of test set", paired=False)
        self.store.save_condition(self.audit_id, condition, ids, labels[mask], clean_probs[mask],
                                  self._result_rows(estimates, clean_probs[mask], labels[mask]),
                                  differences)

    def _subgroups(self, labels, clean_probs) -> None:
        from tools.shifts.population import subgroup_masks

        metadata = self.inputs.test.metadata
        groups = [("subgroup", choice.column, choice.bands) for choice in self.plan.subgroups]
        if self.plan.site_column:
            groups.append(("site", self.plan.site_column, None))
        total = len(groups)
        for done, (kind, column, bands) in enumerate(groups):
            self.progress("Subgroups and sites", done, total)
            for value, mask in subgroup_masks(metadata, column, bands).items():
                self._subgroup_condition(kind, column, value, np.asarray(mask, bool), labels,
                                         clean_probs)
        self.progress("Subgroups and sites", total, total)

    def _prevalence(self, labels, clean_probs) -> None:
        from tools.metrics import unpaired_bootstrap
        from tools.shifts.population import prevalence_indices

        test = self.inputs.test
        for choice in self.plan.prevalence:
            key = f"prevalence:{choice.name}"
            if key in self.done:
                continue
            unknown = [c for c in choice.class_mix if c not in self.classes]
            if unknown:
                raise SpecError(f"plan.prevalence[{choice.name}]: class {unknown[0]!r} is not "
                                f"one of the model's classes {self.classes}")
            mix = {self.classes.index(c): share for c, share in choice.class_mix.items()}
            indices = prevalence_indices(labels, mix, seed=self.settings.seed)
            probs, sub_labels = clean_probs[indices], labels[indices]
            ids = [test.ids[i] for i in indices]
            condition = Condition(key, "prevalence", choice.name,
                                  {"class_mix": choice.class_mix}, n=len(indices),
                                  effective_n=float(len(indices)),
                                  too_small=len(indices) < self.plan.min_subgroup_size)
            if condition.too_small:
                self.store.save_condition(self.audit_id, condition, ids, sub_labels, probs, [])
                continue
            estimates = self._bootstrap(probs, sub_labels)
            diff = unpaired_bootstrap(self.metrics, clean_probs, labels, probs, sub_labels,
                                      n_boot=self.settings.bootstrap, seed=self.settings.seed)
            self.store.save_condition(self.audit_id, condition, ids, sub_labels, probs,
                                      self._result_rows(estimates, probs, sub_labels),
                                      self._difference_rows(diff, "clean", paired=False))

    def _reweight(self, labels, clean_probs) -> None:
        """Covariate shift: the clean test predictions weighted to a target metadata mix."""
        from tools.metrics import unpaired_bootstrap
        from tools.shifts.population import effective_sample_size, reweight_weights

        test = self.inputs.test
        for choice in self.plan.reweight:
            key = f"reweight:{choice.name}"
            if key in self.done:
                continue
            weights = reweight_weights(test.metadata, choice.column, choice.target, choice.bands)
            ess = effective_sample_size(weights)
            condition = Condition(key, "reweight", choice.name,
                                  {"column": choice.column, "target": choice.target},
                                  n=int((weights > 0).sum()), effective_n=ess,
                                  too_small=ess < self.plan.min_subgroup_size)
            if condition.too_small:
                self.store.save_condition(self.audit_id, condition, test.ids, labels,
                                          clean_probs, [], weights=weights)
                continue
            estimates = self._bootstrap(clean_probs, labels, weights=weights)
            diff = unpaired_bootstrap(self.metrics, clean_probs, labels, clean_probs, labels,
                                      n_boot=self.settings.bootstrap, seed=self.settings.seed,
                                      weights_b=weights)
            self.store.save_condition(self.audit_id, condition, test.ids, labels, clean_probs,
                                      self._result_rows(estimates, clean_probs, labels, weights),
                                      self._difference_rows(diff, "clean", paired=False),
                                      weights=weights)

    def _externals(self, clean_probs, labels) -> None:
        from tools.metrics import unpaired_bootstrap

        for name, dataset in self.inputs.externals.items():
            key = f"external:{name}"
            if key in self.done:
                continue
            images = dataset.images(self.inputs.classifier.input_size)
            probs = self.inputs.classifier.predict_proba(
                images, batch_size=self.settings.batch_size,
                progress=partial(self.progress, f"Predicting external set {name}"))
            estimates = self._bootstrap(probs, dataset.labels)
            diff = unpaired_bootstrap(self.metrics, clean_probs, labels, probs, dataset.labels,
                                      n_boot=self.settings.bootstrap, seed=self.settings.seed)
            condition = Condition(key, "external", name, {}, n=len(dataset.labels))
            self.store.save_condition(self.audit_id, condition, dataset.ids, dataset.labels, probs,
                                      self._result_rows(estimates, probs, dataset.labels),
                                      self._difference_rows(diff, "clean", paired=False))
            self._record_reliability(key, probs, dataset.labels)


    def _calibration_split_probs(self) -> np.ndarray:
        """Predict the calibration split once; the probabilities are kept as an artifact."""
        stored = self.store.artifact(self.audit_id, "calibration_split_probs")
        if stored is not None:
            return np.asarray(stored, dtype=np.float64)
        calibration = self.inputs.calibration
        images = calibration.images(self.inputs.classifier.input_size)
        probs = self.inputs.classifier.predict_proba(
            images, batch_size=self.settings.batch_size,
            progress=lambda d, t: self.progress("Predicting calibration split", d, t))
        self.store.save_artifact(self.audit_id, "calibration_split_probs", probs)
        return probs

    def _recalibration(self) -> None:
        """Fit temperature scaling on the calibration split, then check under every condition
        whether it helped or harmed calibration."""
        from tools.calibration import (
            clinical_sentence,
            evaluate_recalibration,
            fit_temperature_arrays,
            recalibration_findings,
            scaler_from_dict,
        )

        if self.store.artifact(self.audit_id, "calibration") is not None:
            return
        self.progress("Temperature scaling", 0, 2)
        calibration = self.inputs.calibration
        # Log-probabilities are logits up to a per-row constant, which softmax ignores.
        cal_logits = np.log(np.clip(self._calibration_split_probs(), 1e-300, None))
        fit = fit_temperature_arrays(cal_logits, calibration.labels,
                                     n_boot=min(self.settings.bootstrap, 200) or 20,
                                     seed=self.settings.seed)
        scaler = scaler_from_dict(fit.scaler)

        conditions, severity_of = {}, {}
        for condition in self.store.conditions(self.audit_id):
            if condition.too_small or condition.kind in ("prevalence", "reweight"):
                continue
            stored = self.store.predictions(self.audit_id, condition.key)
            conditions[condition.key] = (np.log(np.clip(stored["probs"], 1e-300, None)),
                                         stored["labels"])
            if condition.kind == "shift":
                severity_of[condition.key] = (condition.name, condition.params["severity"])
        self.progress("Temperature scaling", 1, 2)
        verdicts = evaluate_recalibration(scaler, conditions, n_boot=self.settings.bootstrap,
                                          seed=self.settings.seed)
        candidates = recalibration_findings(
            verdicts, severity_of=severity_of, model_direction=fit.direction,
            min_effect=self.settings.min_relevant_difference)
        recalibrated = {key: (scaler.transform(z), y) for key, (z, y) in conditions.items()}
        sentence = clinical_sentence(recalibrated)
        self.store.save_artifact(self.audit_id, "calibration", {
            "method": "temperature",
            "temperature": fit.temperature, "low": fit.low, "high": fit.high,
            "direction": fit.direction, "nll_before": fit.nll_before, "nll_after": fit.nll_after,
            "n_calibration": fit.n, "sentence": sentence,
            "verdicts": [v.model_dump(mode="json") for v in verdicts],
        })
        self.store.save_artifact(self.audit_id, "calibration_candidates", candidates)
        self.progress("Temperature scaling", 2, 2)


    def _referral(self) -> None:
        """Learn the referral threshold on the calibration split and check it everywhere."""
        from tools.referral import referral_report

        if self.store.artifact(self.audit_id, "referral") is not None:
            return
        self.progress("Referral rule", 0, 1)
        conditions = {}
        for condition in self.store.conditions(self.audit_id):
            if condition.too_small or condition.kind in ("prevalence", "reweight"):
                continue
            stored = self.store.predictions(self.audit_id, condition.key)
            conditions[condition.key] = (stored["probs"], stored["labels"])
        context = self.spec.context
        target = context.referral_target or DEFAULT_REFERRAL_TARGET
        positive = (self.classes.index(context.positive_class)
                    if context.positive_class in self.classes else None)
        report, candidates = referral_report(
            self._calibration_split_probs(), self.inputs.calibration.labels, conditions, target,
            n_boot=self.settings.bootstrap, seed=self.settings.seed,
            metric=context.referral_metric, positive=positive,
            positive_name=context.positive_class)
        self.store.save_artifact(self.audit_id, "referral", report)
        self.store.save_artifact(self.audit_id, "referral_candidates", candidates)
        self.progress("Referral rule", 1, 1)


# A metric of one class (its sensitivity, say) is not tested under a condition with fewer rows of
# that class than this. With 3 melanomas a site's sensitivity can only be 0, 1/3, 2/3 or 1, so
# its bootstrap interval often collapses to a point.
MIN_CLASS_ROWS = 10

# Metrics whose value rests on the rows of the positive class, and the one that rests on the
# rows predicted as that class.
_POSITIVE_ROW_METRICS = {"sensitivity", "lr_plus", "f_beta", "auroc", "average_precision",
                         "ece_positive_class", "oe_ratio_class"}
_PREDICTED_ROW_METRICS = {"ppv"}


def thin_class_conditions(store: Store, audit_id: str, plan: dict) -> list[dict[str, Any]]:
    """List (condition, metric) pairs whose class has fewer than MIN_CLASS_ROWS rows there.

    Only metrics planned with a positive class are checked. Returns dicts with condition,
    metric, positive_class (index), rows (the count) and counted ("labels" or "predictions").
    """
    classes = {m["id"]: m.get("params", {}).get("positive_class") for m in plan.get("metrics", [])}
    checked = {metric: k for metric, k in classes.items() if isinstance(k, int)
               and metric in _POSITIVE_ROW_METRICS | _PREDICTED_ROW_METRICS}
    if not checked:
        return []
    thin = []
    for condition in store.conditions(audit_id):
        if condition.too_small:
            continue
        stored = store.predictions(audit_id, condition.key)
        predicted = stored["probs"].argmax(axis=1)
        for metric, k in checked.items():
            by_prediction = metric in _PREDICTED_ROW_METRICS
            rows = int(np.sum((predicted if by_prediction else stored["labels"]) == k))
            if rows < MIN_CLASS_ROWS:
                thin.append({"condition": condition.key, "metric": metric, "positive_class": k,
                             "rows": rows, "counted": "predictions" if by_prediction else "labels"})
    return thin


def find_and_store_findings(store: Store, audit_id: str, spec: AuditSpec) -> list[dict[str, Any]]:
    """Run failure-mode detection over every stored difference of the audit and store it.

    Differences of a one-class metric under a condition with fewer than MIN_CLASS_ROWS rows of
    that class are left out and listed in the artifact "thin_class_conditions".
    """
    from tools.findings import detect_findings
    from tools.metrics import REGISTRY

    def info(metric_id: str) -> tuple[str, str, bool]:
        entry = REGISTRY.get(metric_id)
        if entry is None:
            return metric_id, "performance", True
        return entry.display, entry.family, entry.higher_is_better

    conditions = {c.key: {"key": c.key, "kind": c.kind, "name": c.name, "params": c.params,
                          "too_small": c.too_small} for c in store.conditions(audit_id)}
    extra = (store.artifact(audit_id, "calibration_candidates") or []) + (
        store.artifact(audit_id, "referral_candidates") or [])
    thin = thin_class_conditions(store, audit_id, store.audit(audit_id)["plan"] or {})
    store.save_artifact(audit_id, "thin_class_conditions", thin)
    skipped = {(t["condition"], t["metric"]) for t in thin}
    differences = [d for d in store.differences(audit_id)
                   if (d["condition"], d["metric"]) not in skipped]
    findings = detect_findings(differences, conditions, info,
                               spec.audit.min_relevant_difference, spec.audit.fdr,
                               extra_candidates=extra)
    store.save_findings(audit_id, findings)
    return findings
