"""Benchmark: does the auditor's targeted augmentation recover performance lost to a real site
shift better than no augmentation and a generic strong policy?

Data: ham10000_subset, classes bcc, bkl, mel and nv. In distribution: the vidir_molemax and
vidir_modern sites, split into train / calibration / test (grouped by lesion, stratified).
Out of distribution: every image of the rosendahl site. No synthetic corruption was tuned on
rosendahl.

Arms, each trained from scratch with the same epochs, input size and model:
  none      flips only
  generic   torchvision TrivialAugmentWide
  targeted  the shifts an audit of the `none` model found damaging, on in-distribution data only
Metrics: balanced accuracy and macro AUROC with bootstrap 95 % intervals, on the in-distribution
test split and on rosendahl. Recovered fraction of an arm = (arm OOD − none OOD) /
(none ID − none OOD), per seed and as the mean over seeds.

Usage: .venv/bin/python evals/bench_recovery.py [--epochs 8] [--seeds 0 1 2] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ["bcc", "bkl", "mel", "nv"]
ID_SITES = ["vidir_molemax", "vidir_modern"]
OOD_SITE = "rosendahl"
ARCH = "mobilenetv3_small_050"


def write_manifests(ham: Path, folder: Path) -> tuple[Path, Path]:
    """Write the in-distribution manifest (with a split column) and the rosendahl manifest."""
    import pandas as pd

    from tools.data import stratified_group_split

    table = pd.read_csv(ham / "metadata.csv")
    table = table[table["dx"].isin(CLASSES)]
    inside = table[table["dataset"].isin(ID_SITES)].reset_index(drop=True)
    labels = inside["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    inside["split"] = stratified_group_split(labels, inside["lesion_id"].to_numpy(), test=0.25,
                                             calibration=0.1, seed=0)
    outside = table[table["dataset"] == OOD_SITE].reset_index(drop=True)
    outside["split"] = "test"
    id_path, ood_path = folder / "id.csv", folder / "ood.csv"
    inside.to_csv(id_path, index=False)
    outside.to_csv(ood_path, index=False)
    return id_path, ood_path


def load(manifest: Path, ham: Path):
    from tools.data import load_dataset
    from tools.spec import DataSpec

    spec = DataSpec(manifest=manifest, images=ham / "images", id_column="image_id",
                    label_column="dx", metadata=["dataset", "sex", "age", "localization"],
                    group_column="lesion_id", split={"column": "split"})
    return spec, load_dataset(spec, CLASSES)


def trivial_augment():
    import torch
    from torchvision.transforms import v2

    transform = v2.TrivialAugmentWide()

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
        tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        out = torch.stack([transform(image) for image in tensor])
        return out.permute(0, 2, 3, 1).numpy()

    return augment


def evaluate(model_path: Path, size: int, datasets: dict, n_boot: int) -> dict:
    from tools.metrics import bootstrap_metrics
    from tools.models import load_classifier
    from tools.spec import ModelSpec

    classifier = load_classifier(ModelSpec(arch=ARCH, checkpoint=model_path, classes=CLASSES,
                                           input_size=size), device="cpu")
    out = {}
    for name, dataset in datasets.items():
        probs = classifier.predict_proba(dataset.images(size))
        estimates = bootstrap_metrics(["balanced_accuracy", "auroc"], probs, dataset.labels,
                                      n_boot=n_boot, seed=0)
        out[name] = {k: {"value": e.value, "low": e.low, "high": e.high}
                     for k, e in estimates.items()}
    return out


def audit_policy(model_path: Path, size: int, id_spec, folder: Path):
    """Audit the no-augmentation model on in-distribution data only and derive the policy."""
    from agent import resources
    from agent.planners.rules import RulesPlanner
    from tools.retrain import policy_from_audit
    from tools.runner import AuditInputs, AuditRunner, find_and_store_findings
    from tools.spec import AuditSpec, Context, ModelSpec
    from tools.store import Store

    spec = AuditSpec(model=ModelSpec(arch=ARCH, checkpoint=model_path, classes=CLASSES,
                                     input_size=size),
                     data=id_spec, context=Context(domain="dermatology"),
                     audit={"bootstrap": 200, "seed": 0, "device": "cpu"})
    loaded = resources.load(spec)
    info = resources.describe(loaded, id_spec.group_column)
    plan = RulesPlanner().plan(spec.context, info, n_boot=200)
    plan = plan.model_copy(update={"subgroups": [], "site_column": None})
    with Store(folder / "audit.duckdb") as store:
        audit_id = store.create_audit("image", spec.model_dump(mode="json"),
                                      plan.model_dump(mode="json"))
        AuditRunner(spec, plan, store, audit_id,
                    AuditInputs(loaded.classifier, loaded.dataset.part("test"), {})).run()
        find_and_store_findings(store, audit_id, spec)
        return policy_from_audit(store, audit_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "out" / "recovery.json")
    args = parser.parse_args()

    from tools.models import save_checkpoint, train_classifier
    from tools.retrain import make_augment

    ham = Path(os.environ.get("CLINAUDIT_DATA", REPO.parent / "shared" / "data")) / "ham10000_subset"
    folder = Path(tempfile.mkdtemp(prefix="bench_recovery_"))
    id_manifest, ood_manifest = write_manifests(ham, folder)
    id_spec, id_data = load(id_manifest, ham)
    _, ood_data = load(ood_manifest, ham)
    train = id_data.part("train")
    test_sets = {"id": id_data.part("test"), "ood": ood_data.part("test")}
    print(f"train {len(train)}, id test {len(test_sets['id'])}, ood test {len(test_sets['ood'])}")
    images = train.images(args.size)

    def fit(arm: str, seed: int, augment) -> Path:
        started = time.perf_counter()
        model = train_classifier(ARCH, images, train.labels, CLASSES, input_size=args.size,
                                 epochs=args.epochs, seed=seed, device="cpu", augment=augment,
                                 class_weights="balanced")
        path = folder / f"{arm}-{seed}.pt"
        save_checkpoint(model, path, {"arch": ARCH, "classes": CLASSES, "input_size": args.size})
        print(f"  {arm} seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        return path

    results: dict = {"none": {}, "generic": {}, "targeted": {}}
    policy = None
    for seed in args.seeds:
        none_path = fit("none", seed, None)
        results["none"][seed] = evaluate(none_path, args.size, test_sets, args.bootstrap)
        if policy is None:
            policy = audit_policy(none_path, args.size, id_spec, folder)
            print("targeted policy:", json.dumps(policy.model_dump()), flush=True)
        results["generic"][seed] = evaluate(fit("generic", seed, trivial_augment()), args.size,
                                            test_sets, args.bootstrap)
        results["targeted"][seed] = evaluate(fit("targeted", seed, make_augment(policy)),
                                             args.size, test_sets, args.bootstrap)

    print()
    print(f"{'arm':<9} {'metric':<18} {'ID mean (sd)':<16} {'OOD mean (sd)':<16} "
          f"{'recovered mean (per seed)'}")
    summary = {}
    for arm in results:
        for metric in ("balanced_accuracy", "auroc"):
            ids = np.array([results[arm][s]["id"][metric]["value"] for s in args.seeds])
            oods = np.array([results[arm][s]["ood"][metric]["value"] for s in args.seeds])
            lost = np.array([results["none"][s]["id"][metric]["value"]
                             - results["none"][s]["ood"][metric]["value"] for s in args.seeds])
            base = np.array([results["none"][s]["ood"][metric]["value"] for s in args.seeds])
            recovered = (oods - base) / lost
            summary[(arm, metric)] = recovered.mean()
            per_seed = ", ".join(f"{r:+.0%}" for r in recovered)
            print(f"{arm:<9} {metric:<18} {ids.mean():.3f} ({ids.std(ddof=1) if len(ids) > 1 else 0:.3f})"
                  f"   {oods.mean():.3f} ({oods.std(ddof=1) if len(oods) > 1 else 0:.3f})"
                  f"   {recovered.mean():+.0%} ({per_seed})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "policy": policy.model_dump() if policy else None,
                                    "results": results}, indent=1, default=float))
    print(f"\nper-seed values with intervals: {args.out}")


if __name__ == "__main__":
    main()
