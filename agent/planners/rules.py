"""The offline planner: a guided interview and the Metrics Reloaded decision rules.

It needs no network and gives the same plan for the same context and data every time, so
scripted audits and CI gates are deterministic.
"""

from __future__ import annotations

from typing import Any

from agent.state import AskFn, DatasetInfo
from tools.spec import (
    AuditPlan,
    Context,
    MetricChoice,
    PlanCost,
    PrevalenceChoice,
    ReweightChoice,
    ShiftChoice,
    SubgroupChoice,
)

# The first-slice shifts, used when the domain has no preset.
GENERIC_SHIFTS = ["gaussian_noise", "gaussian_blur", "brightness", "contrast", "jpeg", "rotation"]

# Metadata column names that usually hold the acquisition site; the first present one is used.
SITE_COLUMNS = ["site", "dataset", "hospital", "centre", "center", "scanner", "camera", "device",
                "source"]
SUBGROUP_COLUMNS = ["sex", "gender", "age", "localization", "body_site", "skin_type", "ethnicity"]
AGE_BANDS = [0, 30, 45, 60, 75, 200]

# Below this share of the smallest class against the largest, accuracy misleads.
IMBALANCE_RATIO = 0.5
# Below this share of all cases a class is rare, and AUROC alone overstates how useful the
# model's positive calls are.
RARE_CLASS_SHARE = 0.05

# Seconds per image for one forward pass plus one shift on a CPU, for the plan's cost estimate.
# NOTE: measured for mobilenetv3_small_050 at 64 px on 2 CPU cores (evals/bench_shifts.py);
# larger models or inputs cost more, so the estimate is a lower bound there.
SECONDS_PER_IMAGE = 0.0012


def _interview_questions(context: Context, info: DatasetInfo) -> list[tuple[str, str, list[str] | None]]:
    """Questions for the context fields still missing, in the order a reviewer would ask them."""
    questions = []
    if not context.domain:
        questions.append(("Which clinical domain is this model for?", "domain",
                          ["dermatology", "histopathology", "chest_radiography", "ophthalmology",
                           "haematology", "other"]))
    if not context.intended_use:
        questions.append(("What is the model's intended use (who uses it, for what decision)?",
                          "intended_use", None))
    if not context.deployment:
        questions.append((("Where will it be deployed, and how do the images there differ "
                           "(device, site, population)?"), "deployment", None))
    if context.positive_class is None:
        questions.append(("Which class is the one that must not be missed (the positive class)?",
                          "positive_class", info.classes + ["none"]))
    if context.costlier_error is None:
        questions.append(("Which error costs patients more?", "costlier_error",
                          ["false_negative", "false_positive", "equal"]))
    if context.ordinal is None and len(info.classes) > 2:
        questions.append(("Are the classes ordered grades (for example severity levels)?",
                          "ordinal", ["yes", "no"]))
    return questions


def apply_answer(context: Context, field: str, answer: str) -> Context:
    """Return the context with one answered field set, parsing yes/no and lists."""
    answer = answer.strip()
    update: dict[str, Any] = {}
    if field == "ordinal":
        update["ordinal"] = answer.lower() in ("yes", "y", "true")
    elif field == "positive_class":
        update["positive_class"] = None if answer.lower() in ("", "none") else answer
    elif field == "malignant_classes":
        update["malignant_classes"] = [a.strip() for a in answer.split(",") if a.strip()]
    elif field == "referral_target":
        update["referral_target"] = float(answer.rstrip("%")) / (100 if answer.endswith("%") else 1)
    else:
        update[field] = answer or None
    return context.model_copy(update=update)


def _is_strongly_imbalanced(info: DatasetInfo) -> bool:
    counts = [c for c in info.class_counts.values() if c > 0]
    return bool(counts) and min(counts) / sum(counts) < RARE_CLASS_SHARE


def _is_imbalanced(info: DatasetInfo) -> bool:
    counts = [c for c in info.class_counts.values() if c > 0]
    return bool(counts) and min(counts) / max(counts) < IMBALANCE_RATIO


def _positive_index(context: Context, info: DatasetInfo) -> int | None:
    """Index of the positive class: the named one, else class 1 of a binary task."""
    if context.positive_class in info.classes:
        return info.classes.index(context.positive_class)
    return 1 if len(info.classes) == 2 else None


def _cost_metrics(context: Context, info: DatasetInfo) -> list[MetricChoice]:
    """Metrics for unequal error costs: the costlier error's rate on the positive class, and
    the expected cost when a cost matrix is given."""
    metrics = []
    positive = _positive_index(context, info)
    name = info.classes[positive] if positive is not None else None
    if positive is not None and context.costlier_error == "false_negative":
        metrics.append(MetricChoice(id="sensitivity", params={"positive_class": positive},
                                    reason=f"A missed {name} costs more than a false alarm, so "
                                    "its sensitivity is tracked on its own."))
    if positive is not None and context.costlier_error == "false_positive":
        metrics.append(MetricChoice(id="specificity", params={"positive_class": positive},
                                    reason=f"A false alarm for {name} costs more than a miss, "
                                    "so specificity is tracked on its own."))
    if context.cost_matrix is not None:
        metrics.append(MetricChoice(id="expected_cost",
                                    params={"cost_matrix": context.cost_matrix},
                                    reason="The user gave the cost of each kind of error, so "
                                    "the average cost per patient is measured directly."))
    return metrics


def choose_metrics(context: Context, info: DatasetInfo) -> tuple[list[MetricChoice], str, str]:
    """Pick metrics by the Metrics Reloaded rules; return them, the primary id and its reason."""
    binary = len(info.classes) == 2
    imbalanced = _is_imbalanced(info)
    metrics = [
        MetricChoice(id="balanced_accuracy", reason=(
            "Class frequencies are unequal, so accuracy alone would reward ignoring rare classes."
            if imbalanced else "Mean per-class sensitivity; robust to the class mix.")),
        MetricChoice(id="accuracy", reason="Share of correct predictions, for reference."),
        MetricChoice(id="auroc", reason=(
            "Threshold-free discrimination" + ("." if binary else ", one-vs-rest macro average."))),
        MetricChoice(id="brier", reason="Proper score: rewards probabilities that are both "
                     "discriminative and calibrated."),
        MetricChoice(id="nll", reason="Proper score that punishes confident mistakes without bound."),
        MetricChoice(id="ece_top_label", params={"n_bins": 15}, reason=(
            "Clinicians read the confidence as a probability; this checks that it matches how "
            "often the model is right (15 equal-width bins).")),
    ]
    primary, primary_reason = "balanced_accuracy", (
        "Balanced accuracy weighs every class equally, so a model that misses rare but "
        "dangerous classes cannot hide behind the common ones.")
    if context.ordinal:
        metrics.append(MetricChoice(id="cohen_kappa", params={"weighting": "quadratic"}, reason=(
            "Classes are ordered grades: quadratic weighted kappa penalises a miss by two grades "
            "more than a miss by one.")))
        primary, primary_reason = "cohen_kappa", (
            "For ordered grades the size of the error matters, which weighted kappa measures.")
    metrics.extend(_cost_metrics(context, info))
    if _is_strongly_imbalanced(info):
        metrics.append(MetricChoice(id="average_precision", reason=(
            "One class is rare, where AUROC looks good even with many false alarms; average "
            "precision shows how many flagged cases are real.")))
    # Failure detection is measured for every audit. A prediction is actionable only if a
    # wrong one can be distinguished from a right one, and under shift this breaks first.
    metrics.append(MetricChoice(id="auroc_f", reason=(
        "Can the model's confidence tell its right answers from its wrong ones? (AUROC of "
        "correct against incorrect.)")))
    metrics.append(MetricChoice(id="aurc", reason=(
        "Uncertain cases can be referred to a human; the area under the risk-coverage curve "
        "measures how well confidence ranks the model's own errors" + (
            "." if context.referral_target is None else
            f", for the stated referral target of {context.referral_target:.0%}."))))
    metrics.append(MetricChoice(id="eaurc", reason=(
        "AURC minus the best possible for this accuracy, so models of different accuracy "
        "compare on ranking alone.")))
    return metrics, primary, primary_reason


def choose_shifts(context: Context, info: DatasetInfo) -> list[ShiftChoice]:
    """Take the domain preset's shifts (or the generic set), leaving out colour shifts on
    grey-scale data."""
    from tools.shifts import DOMAIN_PRESETS, SHIFTS

    preset = DOMAIN_PRESETS.get((context.domain or "").lower().replace(" ", "_"))
    if preset is None:
        for candidate in DOMAIN_PRESETS.values():
            if (context.domain or "").lower() in [a.lower() for a in getattr(candidate, "aliases", [])]:
                preset = candidate
                break
    choices = []
    if preset is not None:
        for entry in preset.shifts:
            if info.greyscale and SHIFTS[entry.name].colour:
                continue
            choices.append(ShiftChoice(name=entry.name, severities=list(entry.severities),
                                       reason=entry.where))
    else:
        for name in GENERIC_SHIFTS:
            choices.append(ShiftChoice(name=name, reason=(
                f"Generic acquisition change ({SHIFTS[name].description}); no preset exists for "
                f"domain {context.domain!r}.")))
    return choices


def choose_subgroups(info: DatasetInfo) -> tuple[list[SubgroupChoice], str | None]:
    columns = {c.name.lower(): c for c in info.metadata}
    site = next((columns[name].name for name in SITE_COLUMNS if name in columns), None)
    subgroups = []
    for name in SUBGROUP_COLUMNS:
        column = columns.get(name)
        if column is None or column.name == site:
            continue
        bands = age_bands(column.max_value) if name == "age" and column.numeric else None
        subgroups.append(SubgroupChoice(column=column.name, bands=bands, reason=(
            f"Performance can differ by {column.name}; each group is compared with the rest "
            "of the test set.")))
    return subgroups, site


def choose_prevalence(info: DatasetInfo) -> list[PrevalenceChoice]:
    """Choose a test set resampled to equal class shares, because deployment sites rarely see
    the training prevalence and metrics such as accuracy and PPV move with it."""
    if len(info.classes) < 2:
        return []
    share = round(1 / len(info.classes), 6)
    return [PrevalenceChoice(name="balanced", class_mix={c: share for c in info.classes},
                             reason="Equal class shares, as a screening population with a "
                             "different case mix would have; shows how much the headline numbers "
                             "owe to the test set's prevalence.")]


def choose_reweight(info: DatasetInfo, site: str | None) -> list[ReweightChoice]:
    """Reweight the test set to equal acquisition-site shares, without retraining."""
    if site is None:
        return []
    column = next((c for c in info.metadata if c.name == site), None)
    if column is None or not column.top_values or len(column.top_values) < 2:
        return []
    share = round(1 / len(column.top_values), 6)
    return [ReweightChoice(name=f"equal_{site}", column=site,
                           target={value: share for value in column.top_values},
                           reason=f"Every {site} weighted equally, as a deployment spread evenly "
                           "over the sites would be; the effective sample size is reported.")]


def age_bands(oldest: float | None) -> list[float]:
    """Age band edges, the last one just above the oldest patient so it reads "75-85"."""
    top = AGE_BANDS[-1] if oldest is None else max(int(oldest) + 1, AGE_BANDS[-2] + 1)
    return [*AGE_BANDS[:-1], top]


def estimate_cost(plan: AuditPlan, info: DatasetInfo, n_boot: int) -> PlanCost:
    shift_conditions = sum(len(s.severities) for s in plan.shifts)
    audited = info.n_test if info.max_images is None else min(info.n_test, info.max_images)
    images = audited * (1 + shift_conditions)
    conditions = 1 + shift_conditions + len(plan.subgroups) * 3 + (5 if plan.site_column else 0)
    # Bootstrap cost is about linear in replicates and conditions; ~2 ms per replicate measured
    # for six metrics on a few thousand images.
    seconds = images * SECONDS_PER_IMAGE + conditions * n_boot * 0.002
    return PlanCost(conditions=conditions, images_predicted=images,
                    estimated_seconds=round(seconds, 1),
                    note="estimate for a small CNN on CPU; subgroup count is approximate")


class RulesPlanner:
    """Offline planner that requests the missing context, then plans by fixed, documented rules."""

    name = "rules"

    def interview(self, context: Context, info: DatasetInfo, ask: AskFn | None) -> Context:
        for question, field, choices in _interview_questions(context, info):
            if ask is None:
                continue
            answer = ask(question, field, choices)
            if answer is not None:
                context = apply_answer(context, field, answer)
        return context

    def plan(self, context: Context, info: DatasetInfo, n_boot: int = 1000) -> AuditPlan:
        metrics, primary, primary_reason = choose_metrics(context, info)
        subgroups, site = choose_subgroups(info)
        plan = AuditPlan(metrics=metrics, primary_metric=primary, primary_reason=primary_reason,
                         shifts=choose_shifts(context, info), subgroups=subgroups,
                         site_column=site, prevalence=choose_prevalence(info),
                         reweight=choose_reweight(info, site), planner=self.name)
        plan.cost = estimate_cost(plan, info, n_boot)
        return plan

    def narrate(self, summary: dict[str, Any]) -> str | None:
        return None
