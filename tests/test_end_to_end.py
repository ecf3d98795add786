"""End-to-end: the CLI audits a small real model on ham10000_subset and writes a report whose
numbers agree with the store and with metrics recomputed independently from stored predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from tools.compare import compare_audits
from tools.store import Store

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]

pytestmark = pytest.mark.e2e

REDUCED_PLAN = {
    "metrics": [{"id": "balanced_accuracy"}, {"id": "accuracy"}, {"id": "auroc"},
                {"id": "brier"}, {"id": "nll"}, {"id": "ece_top_label", "params": {"n_bins": 15}}],
    "primary_metric": "balanced_accuracy",
    "shifts": [{"name": "gaussian_noise", "severities": [2, 5]},
               {"name": "gaussian_blur", "severities": [5]}],
    "subgroups": [{"column": "sex"}],
    "site_column": "dataset",
    "prevalence": [{"name": "nv_mel_even", "class_mix": {"nv": 0.5, "mel": 0.5}}],
    "reweight": [{"name": "equal_sex", "column": "sex",
                  "target": {"male": 0.5, "female": 0.5}}],
    "min_subgroup_size": 30,
}


def write_spec(folder: Path, ham_dir: Path, manifest: Path, checkpoint: Path, **changes) -> Path:
    spec = {
        "model": {"arch": "mobilenetv3_small_050", "checkpoint": str(checkpoint),
                  "classes": HAM_CLASSES, "input_size": 32},
        "data": {"manifest": str(manifest), "images": str(ham_dir / "images"),
                 "id_column": "image_id", "label_column": "dx",
                 "metadata": ["dataset", "sex", "age", "localization"],
                 "group_column": "lesion_id"},
        "context": {"domain": "dermatology", "intended_use": "second opinion",
                    "positive_class": "mel", "malignant_classes": ["mel", "bcc", "akiec"]},
        "plan": REDUCED_PLAN,
        "audit": {"bootstrap": 100, "seed": 0},
    }
    for key, value in changes.items():
        spec[key] = value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory, ham_dir, small_ham_manifest, tiny_model):
    folder = tmp_path_factory.mktemp("e2e")
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model)
    store = folder / "audits.duckdb"
    out = folder / "report"
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Store(store) as db:
        audit_id = db.list_audits()[-1]["id"]
    return {"folder": folder, "spec": spec, "store": store, "out": out, "audit_id": audit_id,
            "output": result.output}


def test_run_writes_all_three_reports(audited):
    for name in ("report.html", "report.md", "report.json"):
        assert (audited["out"] / name).is_file(), name


def test_report_json_matches_store(audited):
    report = json.loads((audited["out"] / "report.json").read_text())
    with Store(audited["store"]) as db:
        stored = db.results(audited["audit_id"])
        findings = db.findings(audited["audit_id"])
    assert report["audit"]["id"] == audited["audit_id"]

    def whole_set(rows):
        return {(r["condition"], r["metric"]): r["value"] for r in rows
                if r["class"] is None and r["value"] is not None}

    assert whole_set(report["results"]) == pytest.approx(whole_set(stored))
    assert [f["id"] for f in report["findings"]] == [f["id"] for f in findings]
    expected_keys = {"clean", "shift:gaussian_noise:2", "shift:gaussian_noise:5",
                     "shift:gaussian_blur:5"}
    assert expected_keys <= {c["key"] for c in report["conditions"]}


@pytest.mark.parametrize("condition", ["clean", "shift:gaussian_noise:5"])
def test_ece_and_brier_match_independent_recomputation(audited, condition):
    import torch
    from sklearn.metrics import brier_score_loss
    from torchmetrics.functional.classification import multiclass_calibration_error

    with Store(audited["store"]) as db:
        predictions = db.predictions(audited["audit_id"], condition)
        stored = {r["metric"]: r["value"] for r in db.results(audited["audit_id"])
                  if r["condition"] == condition and r["class"] is None}
    probs, labels = predictions["probs"], predictions["labels"]

    ece = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels),
                                       num_classes=len(HAM_CLASSES), n_bins=15, norm="l1")
    brier = brier_score_loss(labels, probs, labels=list(range(len(HAM_CLASSES))))
    by_hand = np.mean(np.sum((probs - np.eye(len(HAM_CLASSES))[labels]) ** 2, axis=1))

    # torchmetrics accumulates the bins in float32, hence the looser tolerance.
    assert stored["ece_top_label"] == pytest.approx(float(ece), abs=1e-6)
    assert stored["brier"] == pytest.approx(by_hand, abs=1e-12)
    # scikit-learn >= 1.7 sums over classes for multiclass input, as the engine does.
    assert brier == pytest.approx(by_hand, abs=1e-12)


def test_html_report_shows_clean_balanced_accuracy(audited):
    report = json.loads((audited["out"] / "report.json").read_text())
    value = next(r["value"] for r in report["results"] if r["condition"] == "clean"
                 and r["metric"] == "balanced_accuracy" and r["class"] is None)
    html = (audited["out"] / "report.html").read_text()
    assert f"{value:.3f}" in html


def test_subgroups_and_sites_are_conditions(audited):
    with Store(audited["store"]) as db:
        conditions = {c.key: c for c in db.conditions(audited["audit_id"])}
    assert "subgroup:sex:male" in conditions
    sites = [c for c in conditions.values() if c.kind == "site"]
    assert {c.name for c in sites} <= {"vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"}
    assert all(c.too_small == (c.n < 30) for c in conditions.values() if c.kind in ("site", "subgroup"))


def test_failing_gate_exits_one_and_lists_it(audited, ham_dir, small_ham_manifest, tiny_model):
    folder = audited["folder"] / "gate"
    folder.mkdir()
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model,
                      gates=[{"metric": "balanced_accuracy", "condition": "clean",
                              "min_value": 0.99}],
                      plan={**REDUCED_PLAN, "shifts": [], "subgroups": [], "site_column": None})
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(audited["store"]),
                                      "--out", str(folder / "out")])
    assert result.exit_code == 1, result.output
    assert "balanced_accuracy" in result.output
    assert "below 0.99" in result.output


def test_unknown_spec_field_exits_two_naming_it(audited, ham_dir, small_ham_manifest, tiny_model):
    folder = audited["folder"] / "unknown"
    folder.mkdir()
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model,
                      audit={"bootstrap": 10, "bootsrap": 5})
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(audited["store"])])
    assert result.exit_code == 2
    assert "audit.bootsrap: unknown field" in result.output


def test_missing_image_exits_two_and_keeps_store(audited, ham_dir, small_ham_manifest, tiny_model):
    import pandas as pd

    folder = audited["folder"] / "missing"
    folder.mkdir()
    table = pd.read_csv(small_ham_manifest)
    table.loc[3, "image_id"] = "ISIC_does_not_exist"
    manifest = folder / "metadata.csv"
    table.to_csv(manifest, index=False)
    spec = write_spec(folder, ham_dir, manifest, tiny_model)
    with Store(audited["store"]) as db:
        before = len(db.list_audits())
        results_before = len(db.results(audited["audit_id"]))

    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(audited["store"])])

    assert result.exit_code == 2
    assert "ISIC_does_not_exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with Store(audited["store"]) as db:
        assert len(db.list_audits()) == before
        assert len(db.results(audited["audit_id"])) == results_before


def test_checkpoint_for_other_architecture_exits_two(audited, ham_dir, small_ham_manifest,
                                                     tiny_model):
    folder = audited["folder"] / "arch"
    folder.mkdir()
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model,
                      model={"arch": "resnet18", "checkpoint": str(tiny_model),
                             "classes": HAM_CLASSES, "input_size": 32})
    result = CliRunner().invoke(app, ["run", str(spec), "--store", str(audited["store"])])
    assert result.exit_code == 2
    assert str(tiny_model) in result.output.replace("\n", "")


def test_demo_without_data_explains_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CLINAUDIT_DATA", raising=False)
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "ham10000_subset" in result.output


def test_compare_review_and_delete_on_two_audits(audited, ham_dir, small_ham_manifest,
                                                 tiny_model):
    folder = audited["folder"] / "second"
    folder.mkdir()
    plan = {**REDUCED_PLAN, "shifts": [{"name": "gaussian_noise", "severities": [5]}],
            "subgroups": [], "site_column": None}
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model, plan=plan,
                      audit={"bootstrap": 100, "seed": 1})
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(spec), "--store", str(audited["store"]),
                               "--out", str(folder / "out")]).exit_code == 0
    with Store(audited["store"]) as db:
        second = db.list_audits()[-1]["id"]
        first_clean = {r["metric"]: r["value"] for r in db.results(audited["audit_id"])
                       if r["condition"] == "clean" and r["class"] is None}

    compared = runner.invoke(app, ["compare", audited["audit_id"], second,
                                   "--store", str(audited["store"])])
    assert compared.exit_code == 0, compared.output
    assert second in compared.output
    with Store(audited["store"]) as db:
        rows = compare_audits(db, audited["audit_id"], second, n_boot=100)
    # Same model, same images: the clean predictions are identical, so nothing changed.
    clean = next(r for r in rows if r["condition"] == "clean"
                 and r["metric"] == "balanced_accuracy")
    assert clean["paired"]
    assert clean["a"] == pytest.approx(first_clean["balanced_accuracy"])
    assert clean["delta"] == 0
    assert clean["verdict"] == "no clear change"
    assert {r["condition"] for r in rows} == {"clean", "shift:gaussian_noise:5",
                                             "prevalence:nv_mel_even", "reweight:equal_sex"}

    reviewed = runner.invoke(app, ["review", second, "--reviewer", "Dr Ada Lovelace",
                                   "--verdict", "changes", "--comment", "check noise",
                                   "--store", str(audited["store"])])
    assert reviewed.exit_code == 0, reviewed.output
    rendered = runner.invoke(app, ["report", second, "--store", str(audited["store"]),
                                   "--out", str(folder / "again")])
    assert rendered.exit_code == 0, rendered.output
    assert "Dr Ada Lovelace" in (folder / "again" / "report.html").read_text()

    bad_verdict = runner.invoke(app, ["review", second, "--reviewer", "X", "--verdict", "ok",
                                      "--store", str(audited["store"])])
    assert bad_verdict.exit_code == 2

    unconfirmed = runner.invoke(app, ["delete", second, "--store", str(audited["store"])])
    assert unconfirmed.exit_code == 2
    assert "pass --yes" in unconfirmed.output
    with Store(audited["store"]) as db:
        assert second in {a["id"] for a in db.list_audits()}

    deleted = runner.invoke(app, ["delete", second, "--yes", "--store", str(audited["store"])])
    assert deleted.exit_code == 0
    with Store(audited["store"]) as db:
        assert second not in {a["id"] for a in db.list_audits()}
        assert db.results(audited["audit_id"])


def test_retrain_policy_and_recovery_follow_their_definitions(audited):
    from tools.metrics import REGISTRY
    from tools.retrain import (
        AugmentRetrainInput,
        augment_and_retrain,
        policy_from_audit,
        recovery_table,
    )

    with Store(audited["store"]) as db:
        drops = {}
        for row in db.differences(audited["audit_id"]):
            if row["metric"] == "balanced_accuracy" and row["condition"].startswith("shift:"):
                name = row["condition"].split(":")[1]
                drops[name] = max(drops.get(name, -1.0), -row["delta"])
        policy = policy_from_audit(db, audited["audit_id"], min_drop=0.0)
    assert REGISTRY["balanced_accuracy"].higher_is_better
    expected = sorted((n for n, d in drops.items() if d >= 0.0), key=lambda n: -drops[n])
    assert [step.shift for step in policy.steps] == expected
    total = sum(max(drops[step.shift], 1e-6) for step in policy.steps)
    for step in policy.steps:
        assert step.probability == pytest.approx(0.6 * max(drops[step.shift], 1e-6) / total)
    assert sum(step.probability for step in policy.steps) == pytest.approx(0.6)
    if not policy.steps:
        pytest.skip("the tiny model lost nothing under the reduced plan's shifts")

    result = augment_and_retrain(AugmentRetrainInput(
        audit_id=audited["audit_id"], store=audited["store"], out_dir=audited["folder"] / "mit",
        epochs=1, min_drop=0.0))
    assert result.checkpoint.is_file()
    with Store(audited["store"]) as db:
        rows, overall, clean_before, _ = recovery_table(db, audited["audit_id"],
                                                        result.new_audit_id, "balanced_accuracy")
        stored = db.artifact(result.new_audit_id, "mitigation")
    assert stored["new_audit_id"] == result.new_audit_id
    # Balanced accuracy: higher is better, so the gain is after - before. Conditions without a
    # clear loss add nothing, except a fall after retraining, which counts against the total.
    gained = lost = 0.0
    for row in rows:
        gain = row.after - row.before
        if row.recovered_fraction is None:
            assert row.note in ("nothing to recover", "worse after retraining") \
                or row.note.startswith("no clear loss")
            gained += min(gain, 0.0)
            continue
        assert row.recovered_fraction == pytest.approx(gain / (clean_before - row.before))
        gained += gain
        lost += clean_before - row.before
    if lost:
        assert overall == pytest.approx(gained / lost)


def test_augment_applies_at_most_one_shift_per_image():
    from tools.retrain import AugmentationPolicy, AugmentationStep, make_augment

    policy = AugmentationPolicy(metric="balanced_accuracy", steps=[
        AugmentationStep(shift="brightness", probability=0.3, severities=[5], reason=""),
        AugmentationStep(shift="contrast", probability=0.3, severities=[5], reason="")])
    # A textured image, because contrast leaves a flat one unchanged.
    batch = np.tile(np.random.default_rng(1).integers(40, 216, (1, 8, 8, 3), dtype=np.uint8),
                    (2000, 1, 1, 1))
    out = make_augment(policy)(batch, np.random.default_rng(0))
    changed = np.any(out != batch, axis=(1, 2, 3))
    # 60 % of images get a shift, drawn once per image.
    assert changed.mean() == pytest.approx(0.6, abs=0.04)


def test_population_shifts_match_hand_computation(audited, small_ham_manifest):
    import pandas as pd

    with Store(audited["store"]) as db:
        conditions = {c.key: c for c in db.conditions(audited["audit_id"])}
        reweighted = db.predictions(audited["audit_id"], "reweight:equal_sex")
        resampled = db.predictions(audited["audit_id"], "prevalence:nv_mel_even")
        results = {(r["condition"], r["metric"]): r["value"]
                   for r in db.results(audited["audit_id"]) if r["class"] is None}

    weights = reweighted["weights"]
    sex = pd.read_csv(small_ham_manifest).set_index("image_id")["sex"]
    sexes = sex.loc[list(reweighted["ids"])].to_numpy()
    assert weights[sexes == "male"].sum() == pytest.approx(weights[sexes == "female"].sum())
    assert weights[(sexes != "male") & (sexes != "female")].sum() == 0
    # Kish's effective sample size, by hand.
    ess = weights.sum() ** 2 / (weights ** 2).sum()
    assert conditions["reweight:equal_sex"].effective_n == pytest.approx(ess)
    correct = reweighted["probs"].argmax(axis=1) == reweighted["labels"]
    weighted_accuracy = (weights * correct).sum() / weights.sum()
    assert results[("reweight:equal_sex", "accuracy")] == pytest.approx(weighted_accuracy)

    nv, mel = HAM_CLASSES.index("nv"), HAM_CLASSES.index("mel")
    counts = np.bincount(resampled["labels"], minlength=len(HAM_CLASSES))
    assert counts[nv] == counts[mel]
    assert counts.sum() == counts[nv] + counts[mel]


def test_recalibration_verdicts_agree_with_recomputed_ece(audited):
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    with Store(audited["store"]) as db:
        calibration = db.artifact(audited["audit_id"], "calibration")
        clean = db.predictions(audited["audit_id"], "clean")
        noisy = db.predictions(audited["audit_id"], "shift:gaussian_noise:5")
    assert calibration is not None
    temperature = calibration["temperature"]
    assert calibration["low"] <= temperature <= calibration["high"]
    expected_direction = ("overconfident" if calibration["low"] > 1 else
                          "underconfident" if calibration["high"] < 1 else "well calibrated")
    assert calibration["direction"] == expected_direction

    def ece(probs, labels):
        return float(multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels),
                                                  num_classes=len(HAM_CLASSES), n_bins=15))

    def scaled(probs):
        logits = np.log(np.clip(probs, 1e-300, None)) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    verdicts = {v["condition"]: v for v in calibration["verdicts"]}
    for key, predictions in [("clean", clean), ("shift:gaussian_noise:5", noisy)]:
        change = next(c for c in verdicts[key]["changes"] if c["metric"] == "ece_top_label")
        assert change["before"] == pytest.approx(ece(predictions["probs"], predictions["labels"]),
                                                 abs=1e-6)
        assert change["after"] == pytest.approx(
            ece(scaled(predictions["probs"]), predictions["labels"]), abs=1e-6)
        expected = ("helped" if change["high"] < 0 else "harmed" if change["low"] > 0
                    else "no clear change")
        assert verdicts[key]["verdict"] == expected


def test_unknown_positive_class_exits_two(audited, ham_dir, small_ham_manifest, tiny_model):
    folder = audited["folder"] / "positive"
    folder.mkdir()
    spec = write_spec(folder, ham_dir, small_ham_manifest, tiny_model,
                      context={"domain": "dermatology", "positive_class": "melanoma"})
    for extra in ([], ["--plan-only"]):
        result = CliRunner().invoke(app, ["run", str(spec), "--store", str(audited["store"]),
                                          *extra])
        assert result.exit_code == 2, result.output
        assert "context.positive_class: 'melanoma' is not one of" in result.output


def test_compare_population_rows_match_stored_results(audited):
    """An audit compared with itself shows, for reweight and prevalence conditions, the values
    the audit stored, and those match a weighted accuracy computed here with numpy."""
    with Store(audited["store"]) as db:
        rows = compare_audits(db, audited["audit_id"], audited["audit_id"], n_boot=20)
        stored = {(r["condition"], r["metric"]): r["value"]
                  for r in db.results(audited["audit_id"]) if r["class"] is None}
        predictions = {key: db.predictions(audited["audit_id"], key)
                       for key in ("clean", "reweight:equal_sex", "prevalence:nv_mel_even")}
    compared = {(r["condition"], r["metric"]): r for r in rows}

    for key, condition_predictions in predictions.items():
        correct = (condition_predictions["probs"].argmax(axis=1)
                   == condition_predictions["labels"])
        weights = condition_predictions["weights"]
        by_hand = float((weights * correct).sum() / weights.sum())
        row = compared[(key, "accuracy")]
        assert row["paired"], key
        assert row["a"] == pytest.approx(by_hand, abs=1e-12), key
        assert row["a"] == pytest.approx(stored[(key, "accuracy")], abs=1e-12), key
        assert row["delta"] == 0, key
    for metric in ("balanced_accuracy", "brier", "ece_top_label"):
        key = ("reweight:equal_sex", metric)
        assert compared[key]["a"] == pytest.approx(stored[key], abs=1e-12), metric


def test_cli_summary_lists_the_reports_top_findings(audited):
    import re

    markdown = (audited["out"] / "report.md").read_text()
    top_section = markdown[markdown.index("## 2 Top findings"):markdown.index("## 3 ")]
    top_ids = re.findall(r"^### (?:RED|AMBER) (F\d+):", top_section, re.MULTILINE)
    with Store(audited["store"]) as db:
        stored = {f["id"]: f for f in db.findings(audited["audit_id"])}
    recalibration = {"recalibration_harms", "recalibration_overconfidence_grows",
                     "subgroup_calibration_differs"}
    about_model = [f for f in stored.values() if f["kind"] not in recalibration]
    output = " ".join(audited["output"].split())

    assert f"{len(about_model)} findings about the audited model" in output
    assert top_ids
    for finding_id in top_ids:
        assert finding_id in output


def test_mitigate_names_report_folder_after_new_audit(audited, tmp_path, monkeypatch):
    import tools.retrain

    original = tools.retrain.policy_from_audit

    def any_loss(store, audit_id, *args, **kwargs):
        # The tiny model's losses are below the default minimum drop; train against any loss.
        return original(store, audit_id, min_drop=0.0)

    with Store(audited["store"]) as db:
        if not any_loss(db, audited["audit_id"]).steps:
            pytest.skip("the tiny model lost nothing under the reduced plan's shifts")
    monkeypatch.setattr(tools.retrain, "policy_from_audit", any_loss)
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(app, ["mitigate", audited["audit_id"], "--epochs", "1",
                                      "--store", str(audited["store"])])

    assert result.exit_code == 0, result.output
    with Store(audited["store"]) as db:
        new = [a for a in db.list_audits() if a["meta"].get("mitigation_of") == audited["audit_id"]]
        assert db.audit(new[-1]["id"])["status"] == "finished"
    assert (tmp_path / "audits" / new[-1]["id"] / "report.html").is_file()
