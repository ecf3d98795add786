"""Build the report's data (one JSON-serialisable dict) from the store.

The HTML, Markdown and JSON reports are all rendered from this dict, so they carry the same
numbers. Patient images enter it only as the shift contact sheet, and only when the spec allows.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tools.store import Store

REPORT_SCHEMA_VERSION = 1

_PACKAGES = ["clinaudit", "torch", "torchvision", "timm", "albumentations", "numpy", "scipy",
             "duckdb", "langgraph", "pydantic", "scikit-image"]


def _clean_number(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, datetime) and obj.tzinfo is None:
        # The store writes UTC timestamps without a zone, so the zone is added here.
        return obj.replace(tzinfo=timezone.utc).isoformat()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return _clean_number(obj)


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: str | Path | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metrics_info(metric_ids: set[str]) -> dict[str, dict[str, Any]]:
    from tools.metrics import REGISTRY

    info = {}
    for metric_id in sorted(metric_ids):
        entry = REGISTRY.get(metric_id)
        if entry is None:
            continue
        info[metric_id] = {"display": entry.display, "family": entry.family,
                           "higher_is_better": entry.higher_is_better, "reading": entry.reading}
    return info


def build_report_data(store: Store, audit_id: str, narrative: str | None = None,
                      include_images: bool = True) -> dict[str, Any]:
    """Collect everything the report shows for one audit."""
    audit = store.audit(audit_id)
    spec = audit["spec"] or {}
    meta = audit["meta"] or {}
    dataset = meta.get("dataset", {})
    model_spec = spec.get("model", {})
    conditions = store.conditions(audit_id)
    results = store.results(audit_id)

    contact_sheet = store.artifact(audit_id, "contact_sheet_png") if include_images else None
    created, finished = audit["created_at"], audit["finished_at"]
    wall = (finished - created).total_seconds() if created and finished else meta.get("run_seconds")

    data = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "audit": {"id": audit_id, "created_at": created, "kind": audit["kind"],
                  "status": audit["status"], "planner": meta.get("planner"),
                  "wall_seconds": wall},
        "context": spec.get("context", {}),
        "model": {"arch": model_spec.get("arch"), "checkpoint": model_spec.get("checkpoint"),
                  "torchscript": model_spec.get("torchscript"),
                  "checkpoint_sha256": meta.get("checkpoint_sha256")
                  or file_sha256(model_spec.get("checkpoint") or model_spec.get("torchscript")),
                  "classes": dataset.get("classes") or model_spec.get("classes"),
                  "input_size": model_spec.get("input_size")},
        "data": {"name": meta.get("data_name"), "n_train": dataset.get("n_train"),
                 "n_calibration": dataset.get("n_calibration"), "n_test": dataset.get("n_test"),
                 "class_counts": dataset.get("class_counts"),
                 "data_hash": meta.get("data_hash"), "greyscale": dataset.get("greyscale")},
        "plan": audit["plan"] or {},
        "conditions": [{"key": c.key, "kind": c.kind, "name": c.name,
                        "severity": c.params.get("severity"), "params": c.params, "n": c.n,
                        "effective_n": c.effective_n, "too_small": c.too_small}
                       for c in conditions],
        "results": results,
        "differences": store.differences(audit_id),
        "findings": store.findings(audit_id),
        "thin_class_conditions": store.artifact(audit_id, "thin_class_conditions") or [],
        "gates": store.artifact(audit_id, "gates"),
        "reliability": store.artifact(audit_id, "reliability", {}),
        "metrics_info": metrics_info({r["metric"] for r in results}),
        "contact_sheet_png": contact_sheet,
        "narrative": narrative if narrative is not None else store.artifact(audit_id, "narrative"),
        "reviews": store.reviews(audit_id),
        "reproducibility": {"spec": spec, "packages": _package_versions(),
                            "seed": spec.get("audit", {}).get("seed"),
                            "bootstrap": spec.get("audit", {}).get("bootstrap"),
                            "data_hash": meta.get("data_hash"),
                            "timings": meta.get("timings")},
    }
    # The audited test set may be a sample of the test split (audit.max_images).
    clean = next((c for c in conditions if c.key == "clean"), None)
    if clean is not None:
        data["data"]["n_test_split"] = data["data"]["n_test"]
        data["data"]["n_test"] = clean.n
    for name in ("calibration", "referral", "mitigation"):
        value = store.artifact(audit_id, name)
        if value is not None:
            data[name] = value
    return _clean(data)


def aggregate_summary(store: Store, audit_id: str) -> dict[str, Any]:
    """The aggregate view the planner may narrate: context, plan, whole-set results, findings.

    No image ids, labels or per-image predictions are included.
    """
    audit = store.audit(audit_id)
    return _clean({
        "context": (audit["spec"] or {}).get("context", {}),
        "plan": audit["plan"],
        "results": [r for r in store.results(audit_id) if r["class"] is None],
        "findings": store.findings(audit_id),
    })


def contact_sheet_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")
