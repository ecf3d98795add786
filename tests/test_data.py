"""Tests for tools.data: manifest and npz loading, splits, image decoding and bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tools.data import DataError, load_dataset, load_external, stratified_group_split
from tools.spec import DataSpec, ExternalSet, SplitSpec

DATA = Path(os.environ.get("CLINAUDIT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAM = DATA / "ham10000_subset"
PNEUMONIA = DATA / "pneumoniamnist" / "pneumoniamnist.npz"

needs_ham = pytest.mark.skipif(
    not (HAM / "metadata.csv").is_file(),
    reason=f"real data not found: {HAM} (set CLINAUDIT_DATA to the folder holding ham10000_subset/)",
)
needs_pneumonia = pytest.mark.skipif(
    not PNEUMONIA.is_file(),
    reason=f"real data not found: {PNEUMONIA} (set CLINAUDIT_DATA to the folder holding pneumoniamnist/)",
)

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
METADATA = ["dataset", "sex", "age", "localization"]


def ham_spec(folder: Path, **changes) -> DataSpec:
    fields = dict(  # noqa: C408 - keyword form reads like the DataSpec call it builds
        manifest=folder / "metadata.csv",
        images=folder / "images",
        id_column="image_id",
        label_column="dx",
        metadata=METADATA,
        group_column="lesion_id",
    )
    fields.update(changes)
    return DataSpec(**fields)


@pytest.fixture
def small_ham(tmp_path: Path) -> Path:
    """A copy of 28 real HAM10000 images, 4 lesions of each of the 7 classes, with their manifest rows."""
    table = pd.read_csv(HAM / "metadata.csv")
    first_per_lesion = table.drop_duplicates("lesion_id")
    rows = first_per_lesion.groupby("dx", sort=True).head(4).reset_index(drop=True)

    folder = tmp_path / "ham"
    (folder / "images").mkdir(parents=True)
    for image_id in rows["image_id"]:
        shutil.copy(HAM / "images" / f"{image_id}.jpg", folder / "images" / f"{image_id}.jpg")
    rows.to_csv(folder / "metadata.csv", index=False)
    return folder


# ----------------------------------------------------------------------------------------------
# Manifest loading


@needs_ham
def test_manifest_loads_labels_and_metadata(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")

    dataset = load_dataset(ham_spec(small_ham), classes=None)

    assert dataset.classes == HAM_CLASSES
    assert dataset.ids == list(table["image_id"])
    expected = np.array([HAM_CLASSES.index(dx) for dx in table["dx"]])
    np.testing.assert_array_equal(dataset.labels, expected)
    assert dataset.labels.dtype == np.int64
    assert list(dataset.metadata.columns) == METADATA + ["lesion_id"]
    assert list(dataset.metadata["sex"]) == list(table["sex"])
    assert isinstance(dataset.metadata.index, pd.RangeIndex)
    assert dataset.greyscale is False
    assert len(dataset) == 28


@needs_ham
def test_classes_argument_sets_label_order(small_ham: Path) -> None:
    order = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df", "extra"]
    table = pd.read_csv(small_ham / "metadata.csv")

    dataset = load_dataset(ham_spec(small_ham), classes=order)

    assert dataset.classes == order
    np.testing.assert_array_equal(dataset.labels, [order.index(dx) for dx in table["dx"]])


@needs_ham
def test_label_map_renames_dataset_labels(small_ham: Path) -> None:
    classes = ["other", "melanoma"]
    label_map = {dx: "other" for dx in HAM_CLASSES if dx != "mel"} | {"mel": "melanoma"}
    table = pd.read_csv(small_ham / "metadata.csv")

    dataset = load_dataset(ham_spec(small_ham, label_map=label_map), classes=classes)

    np.testing.assert_array_equal(dataset.labels, (table["dx"] == "mel").astype(int))


@needs_ham
def test_png_used_when_jpg_missing(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    image_id = table["image_id"][0]
    jpg = small_ham / "images" / f"{image_id}.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()

    dataset = load_dataset(ham_spec(small_ham), classes=None)

    assert dataset.paths[0] == jpg.with_suffix(".png")
    assert dataset.images(16).shape == (28, 16, 16, 3)


@needs_ham
def test_path_column_names_image_files(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    (small_ham / "images" / "nested").mkdir()
    for image_id in table["image_id"]:
        (small_ham / "images" / f"{image_id}.jpg").rename(small_ham / "images" / "nested" / f"{image_id}.jpg")
    table["file"] = "nested/" + table["image_id"] + ".jpg"
    table.to_csv(small_ham / "metadata.csv", index=False)

    dataset = load_dataset(ham_spec(small_ham, path_column="file"), classes=None)

    assert dataset.paths[3] == small_ham / "images" / "nested" / f"{table['image_id'][3]}.jpg"
    assert dataset.ids[3] == table["image_id"][3]


@needs_ham
def test_images_match_pil_resize_and_are_cached(small_ham: Path) -> None:
    dataset = load_dataset(ham_spec(small_ham), classes=None)
    calls: list[tuple[int, int]] = []

    images = dataset.images(32, progress=lambda done, total: calls.append((done, total)))

    assert images.shape == (28, 32, 32, 3)
    assert images.dtype == np.uint8
    with Image.open(dataset.paths[5]) as source:
        expected = np.asarray(source.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images[5], expected)
    assert calls[-1] == (28, 28)
    assert dataset.images(32) is images


@needs_ham
def test_subset_keeps_cached_rows(small_ham: Path) -> None:
    dataset = load_dataset(ham_spec(small_ham), classes=None)
    images = dataset.images(16)

    subset = dataset.subset(np.array([4, 2, 9]))

    assert subset.ids == [dataset.ids[4], dataset.ids[2], dataset.ids[9]]
    np.testing.assert_array_equal(subset.labels, dataset.labels[[4, 2, 9]])
    assert subset.metadata["sex"].tolist() == dataset.metadata["sex"].iloc[[4, 2, 9]].tolist()
    assert 16 in subset._cache
    np.testing.assert_array_equal(subset.images(16), images[[4, 2, 9]])


@needs_ham
def test_part_selects_one_split(small_ham: Path) -> None:
    dataset = load_dataset(ham_spec(small_ham), classes=None)

    test = dataset.part("test")

    assert len(test) == int((dataset.split == "test").sum())
    assert set(test.split) == {"test"}
    with pytest.raises(DataError, match="unknown split 'val'"):
        dataset.part("val")


@needs_ham
def test_data_hash_covers_manifest_and_images(small_ham: Path) -> None:
    first = load_dataset(ham_spec(small_ham), classes=None).data_hash
    again = load_dataset(ham_spec(small_ham), classes=None).data_hash
    image = next((small_ham / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")

    changed = load_dataset(ham_spec(small_ham), classes=None).data_hash

    assert len(first) == 64
    assert first == again
    assert changed != first


# ----------------------------------------------------------------------------------------------
# Splits


@needs_ham
def test_full_ham_split_keeps_lesions_together() -> None:
    dataset = load_dataset(ham_spec(HAM), classes=None)

    splits_per_lesion = pd.DataFrame({"lesion": dataset.metadata["lesion_id"], "split": dataset.split})
    assert splits_per_lesion.groupby("lesion")["split"].nunique().max() == 1
    for part in ("train", "calibration", "test"):
        present = set(dataset.labels[dataset.split == part].tolist())
        assert present == set(range(7)), part
    test_share = (dataset.split == "test").mean()
    calibration_share = (dataset.split == "calibration").mean()
    assert abs(test_share - 0.3) < 0.03
    assert abs(calibration_share - 0.2) < 0.03


def test_split_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    groups = np.array([f"g{i // 2}" for i in range(300)])

    first = stratified_group_split(labels, groups, test=0.3, calibration=0.2, seed=7)
    second = stratified_group_split(labels, groups, test=0.3, calibration=0.2, seed=7)
    other_seed = stratified_group_split(labels, groups, test=0.3, calibration=0.2, seed=8)

    np.testing.assert_array_equal(first, second)
    assert (first != other_seed).any()


def test_split_never_puts_a_group_in_two_parts() -> None:
    rng = np.random.default_rng(2)
    groups = np.array([f"patient{rng.integers(0, 60)}" for _ in range(400)])
    # Most images of a patient share a label, as lesions in HAM10000 do; a few do not.
    patient_label = {g: int(g[7:]) % 4 for g in set(groups)}
    labels = np.array([patient_label[g] if rng.random() > 0.05 else 0 for g in groups])

    split = stratified_group_split(labels, groups, test=0.25, calibration=0.25, seed=0)

    parts_per_group = pd.DataFrame({"g": groups, "s": split}).groupby("g")["s"].nunique()
    assert parts_per_group.max() == 1


def test_split_puts_every_class_in_every_part() -> None:
    # Class 2 has only 3 images: one goes to each part.
    labels = np.array([0] * 50 + [1] * 20 + [2] * 3)

    split = stratified_group_split(labels, None, test=0.3, calibration=0.2, seed=0)

    for part in ("train", "calibration", "test"):
        assert set(labels[split == part].tolist()) == {0, 1, 2}, part
    assert (split[:50] == "test").sum() == 15
    assert (split[:50] == "calibration").sum() == 10


def test_split_without_calibration_has_no_calibration_part() -> None:
    labels = np.array([0] * 10 + [1] * 10)

    split = stratified_group_split(labels, None, test=0.5, calibration=0.0, seed=3)

    assert set(split.tolist()) == {"train", "test"}
    assert (split == "test").sum() == 10


@needs_ham
def test_split_column_accepts_val_as_calibration(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table["part"] = ["train", "val", "test", "validation"] * 7
    table.to_csv(small_ham / "metadata.csv", index=False)

    dataset = load_dataset(ham_spec(small_ham, split=SplitSpec(column="part")), classes=None)

    assert dataset.split.tolist() == ["train", "calibration", "test", "calibration"] * 7


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    spec = DataSpec(manifest=tmp_path / "nothing.csv", images=tmp_path / "images")

    with pytest.raises(DataError, match="manifest not found: .*nothing.csv"):
        load_dataset(spec, classes=None)


@needs_ham
def test_missing_column_is_named(small_ham: Path) -> None:
    spec = ham_spec(small_ham, metadata=["dataset", "scanner"])

    with pytest.raises(DataError, match="column 'scanner' not found"):
        load_dataset(spec, classes=None)


@needs_ham
def test_unknown_label_names_line_value_and_classes(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table.loc[6, "dx"] = "melanoma?"
    table.to_csv(small_ham / "metadata.csv", index=False)

    with pytest.raises(DataError) as error:
        load_dataset(ham_spec(small_ham), classes=HAM_CLASSES)

    message = str(error.value)
    assert "line 8" in message
    assert "'melanoma?'" in message
    assert "akiec" in message
    assert "vasc" in message
    assert "\n" not in message


@needs_ham
def test_row_without_image_names_line_id_and_path(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    image_id = table["image_id"][10]
    (small_ham / "images" / f"{image_id}.jpg").unlink()

    with pytest.raises(DataError) as error:
        load_dataset(ham_spec(small_ham), classes=None)

    message = str(error.value)
    assert "line 12" in message
    assert repr(image_id) in message
    assert str(small_ham / "images" / f"{image_id}.jpg") in message


@needs_ham
def test_corrupt_image_names_file(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    broken = small_ham / "images" / f"{table['image_id'][3]}.jpg"
    broken.write_bytes(b"this is not a JPEG")
    dataset = load_dataset(ham_spec(small_ham), classes=None)

    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        dataset.images(16)


@needs_ham
def test_truncated_image_names_file(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    broken = small_ham / "images" / f"{table['image_id'][3]}.jpg"
    broken.write_bytes(broken.read_bytes()[:2000])
    dataset = load_dataset(ham_spec(small_ham), classes=None)

    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        dataset.images(16)


def test_empty_manifest_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("image_id,dx\n")
    spec = DataSpec(manifest=tmp_path / "metadata.csv", images=tmp_path / "images", label_column="dx")

    with pytest.raises(DataError, match="has no rows"):
        load_dataset(spec, classes=None)


@needs_ham
def test_split_missing_test_class_rejected(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table["part"] = np.where(table["dx"] == "df", "train", ["train", "test"] * 14)
    table.to_csv(small_ham / "metadata.csv", index=False)

    with pytest.raises(DataError, match="no test image for class 'df'"):
        load_dataset(ham_spec(small_ham, split=SplitSpec(column="part")), classes=None)


@needs_ham
def test_unknown_split_value_names_line(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table["part"] = "train"
    table.loc[4, "part"] = "holdout"
    table.to_csv(small_ham / "metadata.csv", index=False)

    with pytest.raises(DataError, match="line 6: split column 'part' has 'holdout'"):
        load_dataset(ham_spec(small_ham, split=SplitSpec(column="part")), classes=None)


# ----------------------------------------------------------------------------------------------
# npz and external sets


@needs_pneumonia
def test_pneumoniamnist_keeps_its_own_splits() -> None:
    raw = np.load(PNEUMONIA)

    dataset = load_dataset(DataSpec(npz=PNEUMONIA), classes=["normal", "pneumonia"])

    assert dataset.greyscale is True
    assert (dataset.split == "train").sum() == len(raw["train_labels"])
    assert (dataset.split == "calibration").sum() == len(raw["val_labels"])
    assert (dataset.split == "test").sum() == len(raw["test_labels"])
    np.testing.assert_array_equal(dataset.part("test").labels, raw["test_labels"].ravel())
    assert dataset.data_hash == hashlib.sha256(PNEUMONIA.read_bytes()).hexdigest()


@needs_pneumonia
def test_npz_greyscale_becomes_three_equal_channels() -> None:
    raw = np.load(PNEUMONIA)
    dataset = load_dataset(DataSpec(npz=PNEUMONIA), classes=None)

    images = dataset.images(28)

    assert dataset.classes == ["0", "1"]
    assert images.shape == (len(dataset), 28, 28, 3)
    np.testing.assert_array_equal(images[0, :, :, 0], raw["train_images"][0])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


@needs_pneumonia
def test_npz_class_names_and_label_map() -> None:
    spec = DataSpec(npz=PNEUMONIA, class_names=["normal", "pneumonia"], label_map={"pneumonia": "abnormal"})

    dataset = load_dataset(spec, classes=["abnormal", "normal"])

    raw_train = np.load(PNEUMONIA)["train_labels"].ravel()
    np.testing.assert_array_equal(dataset.part("train").labels, 1 - raw_train)


def test_npz_missing_array_is_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1), np.uint8))

    with pytest.raises(DataError, match="array 'val_images' not found"):
        load_dataset(DataSpec(npz=path), classes=None)


@needs_pneumonia
def test_external_npz_split_is_all_test() -> None:
    external = ExternalSet(name="pneumonia_val", npz=PNEUMONIA, npz_split="val")

    dataset = load_external(external, DataSpec(npz=PNEUMONIA), classes=["normal", "pneumonia"])

    assert len(dataset) == len(np.load(PNEUMONIA)["val_labels"])
    assert set(dataset.split) == {"test"}
    assert dataset.name == "pneumonia_val"


@needs_ham
def test_external_manifest_fills_missing_metadata(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv").drop(columns=["localization"])
    table.to_csv(small_ham / "other.csv", index=False)
    external = ExternalSet(name="clinic_b", manifest=small_ham / "other.csv", images=small_ham / "images")

    dataset = load_external(external, ham_spec(small_ham), classes=HAM_CLASSES)

    assert set(dataset.split) == {"test"}
    assert list(dataset.metadata.columns) == METADATA + ["lesion_id"]
    assert dataset.metadata["localization"].isna().all()
    assert dataset.metadata["sex"].tolist() == table["sex"].tolist()


@needs_ham
def test_repeated_image_id_is_rejected(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table.loc[9, "image_id"] = table.loc[2, "image_id"]
    table.to_csv(small_ham / "metadata.csv", index=False)

    with pytest.raises(DataError, match=f"line 11: image_id '{table.loc[2, 'image_id']}' already appears on line 4"):
        load_dataset(ham_spec(small_ham), classes=None)


@needs_ham
def test_empty_id_names_line(small_ham: Path) -> None:
    table = pd.read_csv(small_ham / "metadata.csv")
    table.loc[0, "image_id"] = None
    table.to_csv(small_ham / "metadata.csv", index=False)

    with pytest.raises(DataError, match="line 2: the column 'image_id' is empty"):
        load_dataset(ham_spec(small_ham), classes=None)


@needs_pneumonia
def test_npz_rejects_manifest_only_settings() -> None:
    with pytest.raises(DataError, match="data.split.column is 'fold'"):
        load_dataset(DataSpec(npz=PNEUMONIA, split=SplitSpec(column="fold")), classes=None)
    with pytest.raises(DataError, match="npz files have no metadata columns, but the spec names 'sex'"):
        load_dataset(DataSpec(npz=PNEUMONIA, metadata=["sex"]), classes=None)
