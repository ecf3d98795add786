"""Shared fixtures: the real data folder and one small model trained once per test run."""

from __future__ import annotations

import os
from pathlib import Path

# Must be set before torch is imported; see agent/cli.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("CLINAUDIT_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    folder = data_root() / "ham10000_subset"
    if not (folder / "metadata.csv").is_file():
        pytest.skip(f"ham10000_subset not found under {data_root()} (set CLINAUDIT_DATA)")
    return folder


HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="session")
def small_ham_manifest(ham_dir: Path, tmp_path_factory) -> Path:
    """A 700-image manifest of ham10000_subset: every class kept, nv reduced."""
    import pandas as pd

    table = pd.read_csv(ham_dir / "metadata.csv")
    rng = np.random.default_rng(0)
    parts = []
    for label, group in table.groupby("dx"):
        take = min(len(group), 200 if label == "nv" else 90)
        parts.append(group.iloc[np.sort(rng.choice(len(group), take, replace=False))])
    small = pd.concat(parts).sort_values("image_id")
    path = tmp_path_factory.mktemp("ham_small") / "metadata.csv"
    small.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_model(ham_dir: Path, small_ham_manifest: Path, tmp_path_factory) -> Path:
    """Checkpoint of mobilenetv3_small_050 trained for two epochs at 32 px on the small
    manifest's train split; shared by every end-to-end test."""
    from tools.data import load_dataset
    from tools.models import save_checkpoint, train_classifier
    from tools.spec import DataSpec

    data = DataSpec(manifest=small_ham_manifest, images=ham_dir / "images",
                    id_column="image_id", label_column="dx",
                    metadata=["dataset", "sex", "age", "localization"], group_column="lesion_id")
    dataset = load_dataset(data, HAM_CLASSES)
    train = dataset.part("train")
    model = train_classifier("mobilenetv3_small_050", train.images(32), train.labels,
                             HAM_CLASSES, input_size=32, epochs=2, seed=0,
                             class_weights="balanced")
    path = tmp_path_factory.mktemp("tiny_model") / "model.pt"
    save_checkpoint(model, path, {"arch": "mobilenetv3_small_050", "classes": HAM_CLASSES,
                                  "input_size": 32, "outputs": "logits",
                                  "training_data_hash": dataset.data_hash})
    return path
