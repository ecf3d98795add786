"""Benchmark of the label-free monitor on batches whose labels the estimators never see.

A small model is trained and audited on the vidir sites (vidir_modern, vidir_molemax) of
ham10000_subset. A fifth of the vidir images is held out of the audit altogether and serves as
the deployment pool. The monitor then checks these batches:

- the held-out pool as it is (no shift);
- the rosendahl and vienna_dias sites, loaded from a manifest as a user would pass them;
- the pool under each audited synthetic shift at each severity, shifted at the model's input
  size with another seed than the audit's.

For every batch the script prints the absolute error of each accuracy estimator against the
true accuracy (computed here from the labels), beside the naive estimate "same as the clean test
set", and whether the nearest audited condition names the shift that was applied.

Usage:
    .venv/bin/python evals/bench_monitor.py --data /path/to/ham10000_subset --out bench_out

With the defaults (64 px, 6 epochs, 6 shifts, 33 batches) a run on 2 CPU cores used about 12
minutes of CPU time: about 8.5 for training and the audit, 3.5 for monitoring. On a machine
shared with other jobs the wall-clock time was two to three times that. `--reuse` skips
training and auditing when --out already has them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
AUDIT_SITES = ("vidir_modern", "vidir_molemax")
BATCH_SITES = ("rosendahl", "vienna_dias")
DEFAULT_SHIFTS = ("gaussian_noise", "gaussian_blur", "brightness", "contrast", "saturation", "jpeg")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CLINAUDIT_DATA", Path(__file__).resolve().parents[2]
                                       / "shared" / "data")) / "ham10000_subset"
    parser.add_argument("--data", type=Path, default=default_data,
                        help="ham10000_subset folder with metadata.csv and images/")
    parser.add_argument("--out", type=Path, default=Path("bench_monitor_out"),
                        help="folder for the model, the store and results.json")
    parser.add_argument("--input-size", type=int, default=64, help="model input size in pixels")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap replicates for the audit and the monitor's intervals")
    parser.add_argument("--batch-images", type=int, default=300,
                        help="images per synthetic-shift batch, drawn from the held-out pool")
    parser.add_argument("--shifts", default=",".join(DEFAULT_SHIFTS),
                        help="comma-separated shifts, each audited and benchmarked at severities 1-5")
    parser.add_argument("--recalibration", default="vector",
                        help="recalibration before estimating: vector or temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the model and the audit of an earlier run in --out with the "
                             "same settings instead of training and auditing again")
    return parser.parse_args()


def write_manifests(data: Path, work: Path, seed: int) -> tuple[Path, Path, dict[str, Path]]:
    """Split ham10000_subset into the audit's manifest, a held-out vidir pool and site batches."""
    table = pd.read_csv(data / "metadata.csv")
    vidir = table[table["dataset"].isin(AUDIT_SITES)]
    rng = np.random.default_rng(seed)
    pool_mask = rng.random(len(vidir)) < 0.2
    work.mkdir(parents=True, exist_ok=True)
    audit_manifest = work / "vidir_audit.csv"
    pool_manifest = work / "vidir_pool.csv"
    vidir[~pool_mask].to_csv(audit_manifest, index=False)
    vidir[pool_mask].to_csv(pool_manifest, index=False)
    sites = {}
    for site in BATCH_SITES:
        sites[site] = work / f"{site}.csv"
        table[table["dataset"] == site].to_csv(sites[site], index=False)
    return audit_manifest, pool_manifest, sites


def train_model(spec, checkpoint: Path, epochs: int, seed: int) -> None:
    from tools.data import load_dataset
    from tools.models import save_checkpoint, train_classifier

    dataset = load_dataset(spec.data, CLASSES)
    train = dataset.part("train")
    model = train_classifier(spec.model.arch, train.images(spec.model.input_size), train.labels,
                             CLASSES, input_size=spec.model.input_size, epochs=epochs, seed=seed,
                             class_weights="balanced")
    save_checkpoint(model, checkpoint, {"arch": spec.model.arch, "classes": CLASSES,
                                        "input_size": spec.model.input_size, "outputs": "logits",
                                        "training_data_hash": dataset.data_hash})


def run_audit(spec, plan, store, classifier) -> str:
    from tools.data import load_dataset
    from tools.runner import AuditInputs, AuditRunner

    test = load_dataset(spec.data, classifier.classes).part("test")
    audit_id = store.create_audit("benchmark", spec.model_dump(mode="json"),
                                  plan.model_dump(mode="json"))
    AuditRunner(spec, plan, store, audit_id, AuditInputs(classifier, test, {})).run()
    store.update_audit(audit_id, status="finished")
    return audit_id


def true_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from tools.metrics import compute_metric

    return {metric: compute_metric(metric, probs, labels).value
            for metric in ("accuracy", "balanced_accuracy")}


def evaluate_batch(store, audit_id, reference, classifier, batch, labels, name: str,
                   applied: str | None, n_boot: int, recalibration: str) -> dict:
    """Monitor one batch and compare the estimates with the truth from its labels."""
    from tools.monitor import estimate_batch, fit_estimator, monitor_batch

    record = monitor_batch(store, audit_id, batch, reference, classifier, n_boot=n_boot,
                           recalibration=recalibration, save=False)
    probs = classifier.predict_proba(batch.images)
    truth = true_scores(probs, labels)
    entropy_estimator = fit_estimator(reference.calibration_probs, reference.calibration_labels,
                                      score="negative_entropy", recalibration=recalibration)
    entropy = estimate_batch(entropy_estimator, probs, n_boot=0)["performance"]

    row = {"batch": name, "n": len(batch), "applied": applied,
           "nearest": record["nearest"]["condition"]}
    for metric in ("accuracy", "balanced_accuracy"):
        estimates = {
            "naive": record["audited_clean"][metric],
            "atc": record["performance"][f"{metric}_atc"]["value"],
            "atc_entropy": entropy[f"{metric}_atc"]["value"],
            "confidence": record["performance"][f"{metric}_confidence"]["value"],
        }
        row[f"{metric}_true"] = truth[metric]
        for estimator, value in estimates.items():
            row[f"{metric}_{estimator}"] = value
            row[f"{metric}_{estimator}_error"] = (None if value is None
                                                  else abs(value - truth[metric]))
        interval = record["performance"][f"{metric}_atc"]
        row[f"{metric}_atc_covers"] = (interval["low"] is not None
                                       and interval["low"] <= truth[metric] <= interval["high"])
    if applied is None:
        row["match_name"] = row["match_exact"] = None
    else:
        row["match_exact"] = row["nearest"] == applied
        row["match_name"] = row["nearest"].split(":")[:2] == applied.split(":")[:2]
    return row


def pool_batch(pool, images: np.ndarray, rows: np.ndarray, name: str):
    from tools.monitor import Batch

    return Batch(Path(name), [pool.ids[i] for i in rows], [], np.ascontiguousarray(images[rows]),
                 np.tile([224, 224], (len(rows), 1)))


def format_table(rows: list[dict]) -> str:
    header = ("| batch | n | true acc | naive err | ATC err | ATC-NE err | conf err | true bal acc "
              "| naive err | ATC err | ATC-NE err | conf err | nearest condition | match |")
    lines = [header, "|" + "---|" * 14]

    def err(row: dict, metric: str, estimator: str) -> str:
        value = row[f"{metric}_{estimator}_error"]
        return "n/a" if value is None else f"{value:.3f}"

    for row in rows:
        if row["match_name"] is None:
            match = ""
        elif row["match_exact"]:
            match = "exact"
        elif row["match_name"]:
            match = "shift only"
        else:
            match = "no"
        lines.append(
            f"| {row['batch']} | {row['n']} | {row['accuracy_true']:.3f} | "
            + " | ".join(err(row, "accuracy", e) for e in ("naive", "atc", "atc_entropy", "confidence"))
            + f" | {row['balanced_accuracy_true']:.3f} | "
            + " | ".join(err(row, "balanced_accuracy", e) for e in ("naive", "atc", "atc_entropy", "confidence"))
            + f" | {row['nearest']} | {match} |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    groups = {"sites": [r for r in rows if r["batch"].startswith("site:")],
              "synthetic shifts": [r for r in rows if r["applied"] is not None]}
    for severity in range(1, 6):
        groups[f"  severity {severity}"] = [r for r in rows if r["applied"] is not None
                                            and r["applied"].endswith(f":{severity}")]
    groups["all batches"] = rows
    lines = [("| group | batches | acc MAE naive | ATC | ATC-NE | conf | bal acc MAE naive | ATC "
              "| ATC-NE | conf | shift named | exact severity |"), "|" + "---|" * 12]

    def mae(members: list[dict], metric: str, estimator: str) -> str:
        errors = [r[f"{metric}_{estimator}_error"] for r in members
                  if r[f"{metric}_{estimator}_error"] is not None]
        return f"{np.mean(errors):.3f}" if errors else "n/a"

    for name, members in groups.items():
        if not members:
            continue

        shifted = [r for r in members if r["applied"] is not None]
        named = f"{sum(r['match_name'] for r in shifted)}/{len(shifted)}" if shifted else ""
        exact = f"{sum(r['match_exact'] for r in shifted)}/{len(shifted)}" if shifted else ""
        lines.append(f"| {name} | {len(members)} | "
                     + " | ".join(mae(members, "accuracy", e) for e in ("naive", "atc", "atc_entropy", "confidence"))
                     + " | "
                     + " | ".join(mae(members, "balanced_accuracy", e)
                                  for e in ("naive", "atc", "atc_entropy", "confidence"))
                     + f" | {named} | {exact} |")
    return "\n".join(lines)


def main() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from tools.data import load_external
    from tools.models import load_classifier
    from tools.monitor import build_reference, load_batch
    from tools.shifts import shift_images
    from tools.spec import AuditPlan, ExternalSet, spec_from_dict
    from tools.store import Store

    args = parse_args()
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"error: {args.data} has no metadata.csv; pass --data PATH/ham10000_subset")
    started = time.perf_counter()
    shifts = [name.strip() for name in args.shifts.split(",") if name.strip()]
    work = args.out.resolve()
    audit_manifest, pool_manifest, sites = write_manifests(args.data, work, args.seed)

    checkpoint = work / "model" / "model.pt"
    raw = {
        "model": {"arch": "mobilenetv3_small_050", "checkpoint": str(checkpoint),
                  "classes": CLASSES, "input_size": args.input_size},
        "data": {"manifest": str(audit_manifest), "images": str(args.data / "images"),
                 "id_column": "image_id", "label_column": "dx",
                 "metadata": ["dataset", "sex", "age", "localization"],
                 "group_column": "lesion_id", "split": {"test": 0.3, "calibration": 0.2,
                                                        "seed": args.seed}},
        "audit": {"bootstrap": args.bootstrap, "seed": args.seed, "device": "cpu"},
        "report": {"include_images": False},
    }
    spec = spec_from_dict(raw, work)
    plan = AuditPlan.model_validate({
        "metrics": [{"id": "accuracy"}, {"id": "balanced_accuracy"}],
        "shifts": [{"name": name, "severities": [1, 2, 3, 4, 5]} for name in shifts],
    })

    if not (args.reuse and checkpoint.is_file()):
        print(f"Training on the vidir sites ({args.epochs} epochs, {args.input_size} px)...",
              flush=True)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        train_model(spec, checkpoint, args.epochs, args.seed)
    trained = time.perf_counter()

    store_file = work / "bench.duckdb"
    reusable = args.reuse and store_file.is_file()
    if not reusable:
        store_file.unlink(missing_ok=True)
    classifier = load_classifier(spec.model, device="cpu")
    rows = []
    with Store(store_file) as store:
        finished_audits = [a["id"] for a in store.list_audits() if a["status"] == "finished"]
        if reusable and finished_audits:
            audit_id = finished_audits[-1]
        else:
            print(f"Auditing {len(shifts)} shifts at severities 1-5...", flush=True)
            audit_id = run_audit(spec, plan, store, classifier)
        audited = time.perf_counter()
        reference = build_reference(store, audit_id, spec, classifier, sample=200)

        pool = load_external(ExternalSet(name="vidir_pool", manifest=pool_manifest,
                                         images=args.data / "images"), spec.data, CLASSES)
        pool_images = pool.images(args.input_size)
        rng = np.random.default_rng(args.seed + 1)
        draw = np.sort(rng.choice(len(pool), min(args.batch_images, len(pool)), replace=False))

        print("Monitoring batches...", flush=True)
        batch = pool_batch(pool, pool_images, np.arange(len(pool)), "vidir_pool")
        rows.append(evaluate_batch(store, audit_id, reference, classifier, batch, pool.labels,
                                   "vidir held-out pool", None, args.bootstrap, args.recalibration))
        for site, manifest in sites.items():
            labelled = load_external(ExternalSet(name=site, manifest=manifest,
                                                 images=args.data / "images"), spec.data, CLASSES)
            batch = load_batch(manifest, args.input_size, images_dir=args.data / "images")
            rows.append(evaluate_batch(store, audit_id, reference, classifier, batch,
                                       labelled.labels, f"site:{site}", None, args.bootstrap, args.recalibration))
        for name in shifts:
            for severity in range(1, 6):
                shifted = shift_images(pool_images[draw], name, severity, seed=args.seed + 1)
                batch = pool_batch(pool, shifted, np.arange(len(draw)), f"{name}:{severity}")
                rows.append(evaluate_batch(store, audit_id, reference, classifier, batch,
                                           pool.labels[draw], f"shift:{name}:{severity}",
                                           f"shift:{name}:{severity}", args.bootstrap, args.recalibration))
                print(f"  {rows[-1]['batch']}: nearest {rows[-1]['nearest']}", flush=True)
        clean = {r["metric"]: r["value"] for r in store.results(audit_id)
                 if r["condition"] == "clean" and r["class"] is None}

    finished = time.perf_counter()
    table = format_table(rows)
    summary = summarise(rows)
    print()
    print(f"Audited clean test set: accuracy {clean['accuracy']:.3f}, balanced accuracy "
          f"{clean['balanced_accuracy']:.3f}.")
    print(table)
    print()
    print(summary)
    print(f"\nTraining {trained - started:.0f} s, audit {audited - trained:.0f} s, monitoring "
          f"{finished - audited:.0f} s, total {finished - started:.0f} s.")
    (work / "results.json").write_text(json.dumps(
        {"rows": rows, "clean": clean, "args": {k: str(v) for k, v in vars(args).items()},
         "seconds": finished - started}, indent=2))
    (work / "results.md").write_text(table + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
