"""Augment-and-retrain: turn an audit's damaging shifts into training augmentations, fine-tune,
re-audit with the same plan, and measure how much of the lost performance came back.

Recovered fraction per shift condition, on the audit's primary metric:
    (after − before) / (clean − before)
where `clean` is the audited model on the clean test set, `before` the audited model under the
shift and `after` the retrained model under the same shift on the same images (signs flipped for
metrics where lower is better). Only a condition with a clear loss in the audit, a paired drop
(clean − before) whose 95 % interval excludes zero, gets a fraction; it is negative when the
retrained model is worse than the audited one. `recovery_table` defines the overall fraction,
which also counts falls after retraining on the other conditions as negative.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from tools.spec import AuditPlan, spec_from_dict
from tools.store import Store

Progress = Callable[[str, int, int], None]

# Share of training images that get one damaging shift; the rest stay clean, so the model keeps
# seeing in-distribution images. Which shift an image gets is drawn in proportion to the drop
# that shift caused in the audit.
AUGMENT_PROBABILITY = 0.6


class AugmentationStep(BaseModel):
    shift: str
    probability: float = Field(gt=0, le=1, description="share of training images that get "
                               "this shift")
    severities: list[int]
    reason: str


class AugmentationPolicy(BaseModel):
    metric: str
    steps: list[AugmentationStep]


def policy_from_audit(store: Store, audit_id: str, min_drop: float | None = None
                      ) -> AugmentationPolicy:
    """Choose the shifts that hurt the primary metric and how often and how hard to apply them.

    A shift is chosen when its worst paired drop over the audited severities is at least
    `min_drop` (default: the audit's `min_relevant_difference`). A training image gets at most
    one shift: shift i with probability AUGMENT_PROBABILITY · drop_i / Σ drop, at a severity
    drawn uniformly from 1 up to the highest audited severity.
    """
    from tools.metrics import REGISTRY

    audit = store.audit(audit_id)
    plan = AuditPlan.model_validate(audit["plan"] or {})
    metric = plan.primary_metric
    higher_is_better = REGISTRY[metric].higher_is_better
    if min_drop is None:
        min_drop = (audit["spec"] or {}).get("audit", {}).get("min_relevant_difference", 0.05)

    worst: dict[str, tuple[float, int]] = {}
    highest: dict[str, int] = {}
    for row in store.differences(audit_id):
        if not row["condition"].startswith("shift:") or row["metric"] != metric:
            continue
        _, name, severity = row["condition"].split(":")
        severity = int(severity)
        highest[name] = max(highest.get(name, 0), severity)
        if row["delta"] is None or not np.isfinite(row["delta"]):
            continue
        drop = -row["delta"] if higher_is_better else row["delta"]
        if drop > worst.get(name, (-np.inf, 0))[0]:
            worst[name] = (float(drop), severity)

    chosen = [(name, drop, severity) for name, (drop, severity)
              in sorted(worst.items(), key=lambda item: -item[1][0]) if drop >= min_drop]
    total = sum(max(drop, 1e-6) for _, drop, _ in chosen)
    steps = [AugmentationStep(
        shift=name, probability=AUGMENT_PROBABILITY * max(drop, 1e-6) / total,
        severities=list(range(1, highest[name] + 1)),
        reason=f"{metric} dropped by {drop:.3f} at severity {severity}")
        for name, drop, severity in chosen]
    return AugmentationPolicy(metric=metric, steps=steps)


def make_augment(policy: AugmentationPolicy) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Build the training-time augmentation: each step applies its shift through the shift
    registry (albumentations transforms where the registry uses them) with its probability."""
    from tools.shifts import apply_shift

    cumulative = np.cumsum([step.probability for step in policy.steps])

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = batch.copy()
        for i in range(len(out)):
            # One draw picks at most one step; past the last cumulative share the image stays
            # clean.
            pick = int(np.searchsorted(cumulative, rng.random(), side="right"))
            if pick >= len(policy.steps):
                continue
            step = policy.steps[pick]
            severity = int(rng.choice(step.severities))
            out[i] = apply_shift(out[i], step.shift, severity,
                                 seed=int(rng.integers(0, 2**31 - 1)))
        return out

    return augment


class AugmentRetrainInput(BaseModel):
    audit_id: str
    store: Path
    out_dir: Path
    epochs: int = Field(5, ge=1, le=200)
    time_limit_s: float = Field(1800, gt=0)
    from_scratch: bool = False
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    min_drop: float | None = None
    # Reserved by the caller so that out_dir can be named after the new audit before it exists.
    new_audit_id: str | None = None


class ConditionRecovery(BaseModel):
    condition: str
    clean: float
    before: float
    after: float
    drop_low: float | None
    drop_high: float | None
    recovered_fraction: float | None
    note: str


class AugmentRetrainOutput(BaseModel):
    audit_id: str
    new_audit_id: str
    checkpoint: Path
    metric: str
    policy: AugmentationPolicy
    clean_before: float
    clean_after: float
    conditions: list[ConditionRecovery]
    overall_recovered_fraction: float | None
    train_seconds: float


def recovery_table(store: Store, before_id: str, after_id: str, metric: str
                   ) -> tuple[list[ConditionRecovery], float | None, float, float]:
    """Compute the recovery of every shift condition audited in both audits, and overall.

    With the metric oriented so that higher is better, a condition has
    loss = clean − before and gain = after − before. It has a clear loss when loss > 0 and the
    95 % interval of its paired drop in audit `before_id` excludes zero, and only then does it
    get a recovered fraction, gain / loss. Each row's note is:

    - "worse after retraining" when gain < 0, whether or not the loss was clear;
    - "nothing to recover" when the loss was not clear and retraining did not make it worse;
    - "no clear loss in <metric>; audit findings on <metrics>" in place of "nothing to recover"
      when the audit stored findings for the condition on other metrics only;
    - "" for a clear loss that retraining reduced or left unchanged.

    The overall recovered fraction is

        (Σ_clear gain + Σ_other min(gain, 0)) / Σ_clear loss

    over the conditions with a clear loss (clear) and the rest (other), so a fall after
    retraining anywhere counts against it and a gain where nothing was lost adds nothing. It is
    None when no condition has a clear loss. Returns the rows, the overall fraction, and the
    metric on the clean test set before and after retraining.
    """
    from tools.metrics import REGISTRY

    sign = 1.0 if REGISTRY[metric].higher_is_better else -1.0

    def values(audit_id: str) -> dict[str, float]:
        return {r["condition"]: r["value"] for r in store.results(audit_id)
                if r["metric"] == metric and r["class"] is None}

    before, after = values(before_id), values(after_id)
    drops = {d["condition"]: d for d in store.differences(before_id) if d["metric"] == metric}
    other_findings: dict[str, set[str]] = {}
    for finding in store.findings(before_id):
        if finding["metric"] != metric:
            other_findings.setdefault(finding["condition"], set()).add(finding["metric"])
    clean = before["clean"]

    rows, gained, lost = [], 0.0, 0.0
    for key in sorted(k for k in before if k.startswith("shift:") and k in after):
        drop_low, drop_high = _drop_interval(drops.get(key, {}), sign)
        lost_here = sign * (clean - before[key])
        gained_here = sign * (after[key] - before[key])
        clear_loss = drop_low is not None and drop_low > 0 and lost_here > 0

        if clear_loss:
            gained += gained_here
            lost += lost_here
            fraction = gained_here / lost_here
        else:
            gained += min(gained_here, 0.0)
            fraction = None

        if gained_here < 0:
            note = "worse after retraining"
        elif clear_loss:
            note = ""
        elif key in other_findings:
            note = (f"no clear loss in {metric}; audit findings on "
                    f"{', '.join(sorted(other_findings[key]))}")
        else:
            note = "nothing to recover"
        rows.append(ConditionRecovery(condition=key, clean=clean, before=before[key],
                                      after=after[key], drop_low=drop_low, drop_high=drop_high,
                                      recovered_fraction=fraction, note=note))
    overall = gained / lost if lost > 0 else None
    return rows, overall, clean, after.get("clean", float("nan"))


def _drop_interval(difference: dict[str, Any], sign: float) -> tuple[float | None, float | None]:
    """Return the 95 % interval of the drop (clean − condition, oriented by `sign` so that a
    loss is positive) from a stored difference row, or (None, None) when it has none."""
    low, high = difference.get("low"), difference.get("high")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return None, None
    # The stored interval bounds delta = condition − clean, and the drop is −sign · delta.
    drop_low, drop_high = sorted((-sign * low, -sign * high))
    return float(drop_low), float(drop_high)


def augment_and_retrain(request: AugmentRetrainInput, progress: Progress | None = None
                        ) -> AugmentRetrainOutput:
    """Retrain against the audit's damaging shifts, re-audit with the same plan, and store the
    recovery as the new audit's `mitigation` artifact."""
    from tools.data import load_dataset
    from tools.models import load_classifier, resolve_device, save_checkpoint, train_classifier
    from tools.runner import AuditInputs, AuditRunner, find_and_store_findings

    progress = progress or (lambda task, done, total: None)
    with Store(request.store) as store:
        audit = store.audit(request.audit_id)
        policy = policy_from_audit(store, request.audit_id, request.min_drop)
    spec = spec_from_dict(audit["spec"], Path("."))
    plan = AuditPlan.model_validate(audit["plan"])
    if not policy.steps:
        raise ValueError(f"audit {request.audit_id}: no shift lowered {policy.metric} by the "
                         "minimum relevant difference, so there is nothing to train against")

    classifier = load_classifier(spec.model, device=spec.audit.device)
    dataset = load_dataset(spec.data, classifier.classes)
    train = dataset.part("train")
    images = train.images(classifier.input_size,
                          progress=lambda d, t: progress("Loading training images", d, t))
    started = time.perf_counter()
    model = train_classifier(
        classifier.card.get("arch") or spec.model.arch, images, train.labels, dataset.classes,
        input_size=classifier.input_size, epochs=request.epochs, lr=request.lr,
        seed=request.seed, device=resolve_device(spec.audit.device),
        augment=make_augment(policy), class_weights="balanced",
        init_from=None if request.from_scratch else spec.model.checkpoint,
        time_limit_s=request.time_limit_s, normalization=spec.model.normalization.model_dump(),
        progress=lambda d, t: progress("Retraining with augmentations", d, t))
    train_seconds = time.perf_counter() - started

    checkpoint = Path(request.out_dir) / "model" / "mitigated.pt"
    # The new training run's own record comes from train_classifier; only what describes the
    # model and its origin is carried over from the audited card.
    card = {"arch": classifier.card.get("arch") or spec.model.arch,
            "normalization": spec.model.normalization.model_dump(),
            "outputs": classifier.card.get("outputs", "logits"),
            "classes": dataset.classes, "input_size": classifier.input_size,
            "mitigation_of": request.audit_id, "augmentation": policy.model_dump(),
            "epochs": request.epochs, "from_scratch": request.from_scratch,
            "training_data_hash": dataset.data_hash}
    save_checkpoint(model, checkpoint, card)

    new_spec = spec.model_copy(deep=True)
    new_spec.model.checkpoint = checkpoint.resolve()
    new_classifier = load_classifier(new_spec.model, device=spec.audit.device)
    test = dataset.part("test")
    if spec.audit.max_images and len(test.ids) > spec.audit.max_images:
        rng = np.random.default_rng(spec.audit.seed)
        test = test.subset(np.sort(rng.choice(len(test.ids), spec.audit.max_images, replace=False)))

    with Store(request.store) as store:
        new_id = store.create_audit(
            "image", json.loads(new_spec.model_dump_json()), plan.model_dump(mode="json"),
            meta={**audit["meta"], "mitigation_of": request.audit_id},
            audit_id=request.new_audit_id)
        with store.status_on_error(new_id):
            AuditRunner(new_spec, plan, store, new_id, AuditInputs(new_classifier, test, {}),
                        progress=progress).run()
            find_and_store_findings(store, new_id, new_spec)
        rows, overall, clean_before, clean_after = recovery_table(
            store, request.audit_id, new_id, policy.metric)
        result = AugmentRetrainOutput(
            audit_id=request.audit_id, new_audit_id=new_id, checkpoint=checkpoint,
            metric=policy.metric, policy=policy, clean_before=clean_before,
            clean_after=clean_after, conditions=rows, overall_recovered_fraction=overall,
            train_seconds=train_seconds)
        store.save_artifact(new_id, "mitigation", json.loads(result.model_dump_json()))
        store.update_audit(new_id, status="finished")
    return result


def describe_recovery(result: AugmentRetrainOutput) -> dict[str, Any]:
    """Summarise the recovery in aggregate numbers for the planner and the terminal."""
    return {
        "metric": result.metric,
        "shifts_trained_against": [s.shift for s in result.policy.steps],
        "clean_before": result.clean_before,
        "clean_after": result.clean_after,
        "overall_recovered_fraction": result.overall_recovered_fraction,
    }
