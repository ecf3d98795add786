"""Loaded models and datasets, kept outside the checkpointed graph state.

The graph state must stay JSON-serialisable, so nodes look the heavy objects up here by the
spec they were loaded from. A second node that needs them in the same process reuses them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent.state import ColumnSummary, DatasetInfo
from tools.spec import AuditSpec


@dataclass
class Loaded:
    classifier: Any
    dataset: Any
    externals: dict[str, Any]


_cache: dict[str, Loaded] = {}

# Categorical columns with more distinct values than this are described by name and count only.
MAX_DESCRIBED_VALUES = 20


def _key(spec: AuditSpec) -> str:
    return json.dumps(spec.model.model_dump(mode="json"), sort_keys=True) + json.dumps(
        spec.data.model_dump(mode="json"), sort_keys=True)


def load(spec: AuditSpec) -> Loaded:
    """Load (once per process) the classifier, the dataset and the external test sets."""
    from tools.data import load_dataset, load_external
    from tools.models import load_classifier

    key = _key(spec)
    if key in _cache:
        return _cache[key]
    classifier = load_classifier(spec.model, device=spec.audit.device)
    dataset = load_dataset(spec.data, classifier.classes)
    externals = {ext.name: load_external(ext, spec.data, classifier.classes)
                 for ext in spec.data.external}
    _cache[key] = Loaded(classifier, dataset, externals)
    return _cache[key]


def describe(loaded: Loaded, group_column: str | None = None,
             max_images: int | None = None) -> DatasetInfo:
    """Summarise the data as aggregates only: counts, column names, common values.

    The group column (patient or lesion id) is left out. max_images is the spec's
    audit.max_images, which the plan's cost estimate counts instead of the whole test split.
    """
    dataset = loaded.dataset
    split = list(dataset.split)
    counts = Counter(dataset.labels.tolist())
    columns = []
    for name in dataset.metadata.columns:
        if name == group_column:
            # Patient or lesion identifiers: never described, not even by count.
            continue
        series = dataset.metadata[name]
        numeric = series.dtype.kind in "if"
        distinct = int(series.nunique())
        # Values are shared only for categorical columns with few levels (site, sex, body site);
        # a column with many distinct values may hold identifiers.
        top = {} if numeric or distinct > MAX_DESCRIBED_VALUES else {
            str(k): int(v) for k, v in series.value_counts().items()}
        maximum = float(series.max()) if numeric and series.notna().any() else None
        columns.append(ColumnSummary(name=str(name), numeric=numeric, distinct=distinct,
                                     top_values=top, max_value=maximum))
    return DatasetInfo(
        classes=list(dataset.classes),
        class_counts={c: int(counts.get(i, 0)) for i, c in enumerate(dataset.classes)},
        n_train=split.count("train"), n_calibration=split.count("calibration"),
        n_test=split.count("test"), max_images=max_images,
        greyscale=bool(dataset.greyscale), metadata=columns,
        input_size=loaded.classifier.input_size, externals=list(loaded.externals),
    )
