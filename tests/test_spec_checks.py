"""Spec mistakes that must be rejected when the spec is loaded, before any image is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from tools.spec import SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]

# Every spec below fails before its data or model would be opened, so neither has to exist.
BASE = {"model": {"checkpoint": "model.pt", "classes": ["benign", "malignant"]},
        "data": {"manifest": "metadata.csv", "images": "images"}}

REGISTERED_METRICS = ("accuracy, aurc, auroc, auroc_f, average_precision, balanced_accuracy, "
                      "brier, brier_binary, ce_l2_top_label, cohen_kappa, cwce, eaurc, ece_kde, "
                      "ece_positive_class, ece_top_label, eci, eci_balance, expected_cost, f_beta, "
                      "kce, lr_plus, mcc, mce_top_label, net_benefit, nll, npv, oe_ratio, "
                      "oe_ratio_class, ppv, rbs, selective_risk, sensitivity, specificity")
REGISTERED_SHIFTS = ("bit_depth, brightness, contrast, dead_pixels, defocus_blur, downsample, "
                     "elastic, gamma, gaussian_blur, gaussian_noise, grid_lines, hair, hue, "
                     "ink_marks, jpeg, motion_blur, occlusion, perspective, rotation, ruler, "
                     "saturation, shot_noise, speckle_noise, specular_glare, stain_variation, "
                     "uneven_illumination, vignetting, white_balance, zoom")
PRESET_DOMAINS = "chest_radiography, dermatology, haematology, histopathology, ophthalmology"


def spec_error(**sections) -> str:
    with pytest.raises(SpecError) as caught:
        spec_from_dict({**BASE, **sections}, Path("."), source="spec.yaml")
    return str(caught.value)


def write_spec(folder: Path, **sections) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections}))
    return path


def test_registered_names_match_listed_names():
    from tools.metrics import REGISTRY
    from tools.shifts import DOMAIN_PRESETS, SHIFTS

    # The expected messages below spell the registries out, and this test shows which list went stale.
    assert ", ".join(sorted(REGISTRY)) == REGISTERED_METRICS
    assert ", ".join(sorted(SHIFTS)) == REGISTERED_SHIFTS
    assert ", ".join(sorted(DOMAIN_PRESETS)) == PRESET_DOMAINS


def test_plan_only_rejects_misspelt_gate_metric(tmp_path):
    spec = write_spec(tmp_path, gates=[{"metric": "balanced_acuracy", "condition": "any_shift",
                                        "max_drop": 0.05}])
    result = CliRunner().invoke(app, ["run", str(spec), "--plan-only",
                                      "--store", str(tmp_path / "a.duckdb")])

    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        (f"error: {spec}: gates[0].metric: unknown metric 'balanced_acuracy' (did you mean "
         f"'balanced_accuracy'?); known metrics: {REGISTERED_METRICS}")]


def test_gate_without_bound_is_rejected():
    message = spec_error(gates=[{"metric": "auroc", "condition": "clean"}])
    assert message == ("spec.yaml: gates[0]: the gate on auroc checks nothing: give max_drop, "
                       "min_value or both")


GATE_CONDITION_FORMS = ("clean, any, any_shift, any_subgroup, any_site, or one condition key: "
                        "shift:<shift>:<severity 1-5>, subgroup:<column>:<value>, "
                        "site:<column>:<value>, prevalence:<name>, reweight:<name> or "
                        "external:<name>")


def test_plan_only_rejects_misspelt_gate_condition(tmp_path):
    spec = write_spec(tmp_path, gates=[{"metric": "accuracy", "condition": "clean", "min_value": 0.5},
                                       {"metric": "sensitivity", "condition": "clena",
                                        "min_value": 0.8}])
    result = CliRunner().invoke(app, ["run", str(spec), "--plan-only",
                                      "--store", str(tmp_path / "a.duckdb")])

    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        (f"error: {spec}: gates[1].condition: unknown condition 'clena' (did you mean 'clean'?); "
         f"a gate condition is {GATE_CONDITION_FORMS}")]


@pytest.mark.parametrize("condition", [
    "clean", "any", "any_shift", "any_subgroup", "any_site", "shift:jpeg:5",
    "subgroup:age:40-59", "site:dataset:vidir:modern", "prevalence:rare_melanoma",
    "reweight:equal_dataset", "external:isic2019"])
def test_valid_gate_conditions_load(condition):
    spec = spec_from_dict({**BASE, "gates": [{"metric": "accuracy", "condition": condition,
                                              "min_value": 0.5}]}, Path("."))
    assert spec.gates[0].condition == condition


def test_gate_condition_with_misspelt_shift_is_rejected():
    message = spec_error(gates=[{"metric": "accuracy", "condition": "shift:jpg:5", "max_drop": 0.1}])
    assert message == ("spec.yaml: gates[0].condition: unknown shift 'jpg' (did you mean "
                       f"'jpeg'?); known shifts: {REGISTERED_SHIFTS}")


def test_gate_condition_severity_outside_range_is_rejected():
    message = spec_error(gates=[{"metric": "accuracy", "condition": "shift:jpeg:6", "max_drop": 0.1}])
    assert message == ("spec.yaml: gates[0].condition: condition 'shift:jpeg:6' has severity "
                       "'6'; shift severities are 1 to 5")


@pytest.mark.parametrize("condition", ["shift:jpeg", "subgroup:age", "external:"])
def test_incomplete_gate_condition_key_is_rejected(condition):
    kind = condition.split(":")[0]
    message = spec_error(gates=[{"metric": "accuracy", "condition": condition, "max_drop": 0.1}])
    assert message == (f"spec.yaml: gates[0].condition: condition {condition!r} is not a "
                       f"complete {kind} key; a gate condition is {GATE_CONDITION_FORMS}")


def test_plan_metric_id_is_checked():
    message = spec_error(plan={"metrics": [{"id": "accuracy"}, {"id": "ece_toplabel"}]})
    assert message == ("spec.yaml: plan.metrics[1].id: unknown metric 'ece_toplabel' (did you "
                       f"mean 'ece_top_label'?); known metrics: {REGISTERED_METRICS}")


def test_plan_primary_metric_is_checked():
    message = spec_error(plan={"primary_metric": "kappa_quadratic"})
    assert message == ("spec.yaml: plan.primary_metric: unknown metric 'kappa_quadratic'; "
                       f"known metrics: {REGISTERED_METRICS}")


def test_plan_shift_name_is_checked():
    message = spec_error(plan={"shifts": [{"name": "jpeg"}, {"name": "gausian_noise"}]})
    assert message == ("spec.yaml: plan.shifts[1].name: unknown shift 'gausian_noise' (did you "
                       f"mean 'gaussian_noise'?); known shifts: {REGISTERED_SHIFTS}")


def test_misspelt_domain_is_rejected():
    message = spec_error(context={"domain": "dermatolgy"})
    assert message == ("spec.yaml: context.domain: unknown domain 'dermatolgy' (did you mean "
                       f"'dermatology'?); domains with a shift preset: {PRESET_DOMAINS}; another "
                       "domain gets the generic shifts")


@pytest.mark.parametrize("domain", ["radiography", "dermatopathology", "hepatology", "other"])
def test_domain_without_preset_is_kept(domain):
    spec = spec_from_dict({**BASE, "context": {"domain": domain}}, Path("."))
    assert spec.context.domain == domain


def test_every_preset_name_and_alias_selects_its_preset():
    from agent.planners.rules import choose_shifts
    from agent.state import DatasetInfo
    from tools.shifts import DOMAIN_PRESETS
    from tools.spec import Context

    info = DatasetInfo(classes=["benign", "malignant"], class_counts={"benign": 50,
                       "malignant": 50}, metadata=[], n_train=0, n_calibration=0, n_test=100,
                       greyscale=False)
    for key, preset in DOMAIN_PRESETS.items():
        for name in (key, key.replace("_", " ").upper(), *preset.aliases):
            context = Context(domain=name)
            chosen = [shift.name for shift in choose_shifts(context, info)]
            assert chosen == [shift.name for shift in preset.shifts], name


def test_max_images_zero_is_rejected():
    message = spec_error(audit={"max_images": 0})
    assert message == ("spec.yaml: audit.max_images: must be at least 1, got 0; leave it out "
                       "(or null) to audit every test image")


def test_max_images_null_means_every_image():
    spec = spec_from_dict({**BASE, "audit": {"max_images": None}}, Path("."))
    assert spec.audit.max_images is None


def test_demo_rejects_max_images_zero(tmp_path, ham_dir):
    result = CliRunner().invoke(app, ["demo", "--data", str(ham_dir), "--max-images", "0",
                                      "--store", str(tmp_path / "a.duckdb"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        ("error: --max-images 0: must be at least 1, got 0; leave it out (or null) to "
         "audit every test image")]


@pytest.mark.parametrize("replicates", [-1, 0, 19])
def test_too_few_bootstrap_replicates_are_rejected(replicates):
    message = spec_error(audit={"bootstrap": replicates})
    assert message == (f"spec.yaml: audit.bootstrap: {replicates} replicates are too few: "
                       "temperature scaling and its check under shift need at least 20 "
                       "(default 1000)")


def test_twenty_bootstrap_replicates_fit_temperature():
    from tools.calibration import fit_temperature_arrays

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 3))
    labels = rng.integers(0, 3, 60)
    fit = fit_temperature_arrays(logits, labels, n_boot=20, seed=0)

    assert np.isfinite(fit.temperature)
    spec = spec_from_dict({**BASE, "audit": {"bootstrap": 20}}, Path("."))
    assert spec.audit.bootstrap == 20


def test_unknown_field_is_reported_before_other_errors():
    message = spec_error(audit={"bootstrap": 5, "bootsrap": 1000})
    assert message == "spec.yaml: audit.bootsrap: unknown field (and 1 more error)"


def shift_failures(side: int) -> list[str]:
    """Shift a random image of this side with every shift and severity; list what raises."""
    from tools.shifts import SHIFTS, shift_images

    images = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    failures = []
    for name in sorted(SHIFTS):
        for severity in range(1, 6):
            # Any exception counts, because albumentations and OpenCV raise their own types.
            try:
                shifted = shift_images(images, name, severity, seed=0)
            except Exception as error:  # noqa: BLE001
                failures.append(f"{name} {severity}: {type(error).__name__}")
                continue
            if shifted.shape != images.shape:
                failures.append(f"{name} {severity}: shape {shifted.shape}")
    return failures


def test_every_shift_works_at_smallest_input_size():
    assert shift_failures(13) == []
    assert shift_failures(12) != []


def test_input_size_below_shift_minimum_is_rejected():
    message = spec_error(model={**BASE["model"], "input_size": 12})
    assert message == ("spec.yaml: model.input_size: 12 px is too small: the image shifts need "
                       "an input size of at least 13 px")

    spec = spec_from_dict({**BASE, "model": {**BASE["model"], "input_size": 13}}, Path("."))
    assert spec.model.input_size == 13


def test_example_spec_sets_referral_target(monkeypatch):
    monkeypatch.setenv("CLINAUDIT_DATA", "/data")
    spec = load_spec(REPO / "examples" / "ham10000.yaml")

    assert spec.context.referral_target == 0.9
    assert spec.context.domain == "dermatology"
    assert spec.gates[0].metric == "balanced_accuracy"


def test_monitor_drop_above_one_is_rejected():
    message = spec_error(monitor={"max_accuracy_drop": 5})
    assert message == "spec.yaml: monitor.max_accuracy_drop: Input should be less than or equal to 1"
