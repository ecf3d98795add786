"""Datasets for an audit: an image folder with a CSV manifest, or a MedMNIST-style `.npz` file.

A `Dataset` carries image ids, integer labels, the class list, the metadata columns kept for
subgroups, and a train/calibration/test split. Images are decoded only when `Dataset.images` is
called, once per size, and kept in memory as a uint8 array.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tools.spec import DataSpec, ExternalSet

Progress = Callable[[int, int], None]

SPLITS = ("train", "calibration", "test")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")

# Values accepted in a user's split column, mapped to the split names used here.
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "calibration": "calibration",
    "val": "calibration",
    "valid": "calibration",
    "validation": "calibration",
    "test": "test",
    "testing": "test",
}

# MedMNIST files store their splits under these key prefixes; `val` serves as calibration.
_NPZ_SPLITS = {"train": "train", "val": "calibration", "test": "test"}


class DataError(ValueError):
    """A dataset that cannot be loaded; the message names the file, row or column."""


@dataclass(eq=False)
class Dataset:
    """Labelled images with metadata and a train/calibration/test split.

    `labels` are indices into `classes`; `metadata` has one row per image (a RangeIndex);
    `split` is "train", "calibration" or "test" for every image.
    """

    name: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    metadata: pd.DataFrame
    split: np.ndarray
    greyscale: bool
    data_hash: str
    # Exactly one image source is set: file paths (manifest) or an in-memory array (npz).
    paths: list[Path] | None = field(default=None, repr=False)
    source_array: np.ndarray | None = field(default=None, repr=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def images(self, size: int, progress: Progress | None = None) -> np.ndarray:
        """Load every image as RGB resized to `size` x `size`; uint8 array (n, size, size, 3).

        The result is cached per size, so a second call costs nothing. Grey-scale sources are
        repeated into three channels. Raises DataError naming the file of an unreadable image.
        """
        if size <= 0:
            raise DataError(f"image size must be a positive number of pixels, got {size}")
        if size in self._cache:
            if progress is not None:
                progress(len(self), len(self))
            return self._cache[size]

        if self.source_array is not None:
            array = _resize_array(self.source_array, size, progress)
        else:
            array = _decode_files(self.paths or [], size, progress)
        array.setflags(write=False)
        self._cache[size] = array
        return array

    def subset(self, indices: np.ndarray) -> Dataset:
        """Return the rows at `indices` (integer positions) as a new Dataset, keeping the image cache."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise DataError(f"subset indices must be one-dimensional, got shape {indices.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise DataError(f"subset indices must lie in 0..{len(self) - 1}, got {indices.min()}..{indices.max()}")

        cache = {size: array[indices] for size, array in self._cache.items()}
        for array in cache.values():
            array.setflags(write=False)
        return Dataset(
            name=self.name,
            ids=[self.ids[i] for i in indices],
            labels=self.labels[indices],
            classes=list(self.classes),
            metadata=self.metadata.iloc[indices].reset_index(drop=True),
            split=self.split[indices],
            greyscale=self.greyscale,
            data_hash=self.data_hash,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            source_array=self.source_array[indices] if self.source_array is not None else None,
            _cache=cache,
        )

    def part(self, split: str) -> Dataset:
        """Return the images of one split: "train", "calibration" or "test"."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.subset(np.flatnonzero(self.split == split))


def load_dataset(data: DataSpec, classes: list[str] | None, name: str | None = None) -> Dataset:
    """Load the dataset a spec's `data` section describes, with its train/calibration/test split.

    `classes` fixes the class order (the model's output order); when None, the sorted unique
    labels become the classes. Raises DataError with a one-line message naming the file, row
    or column at fault.
    """
    if data.npz is not None:
        _check_npz_settings(data)
        dataset = _load_npz(data.npz, data, classes, parts=tuple(_NPZ_SPLITS), name=name)
    else:
        dataset = _load_manifest(data.manifest, data.images, data, classes, name=name, split_from_spec=True)

    _check_test_covers_classes(dataset, data)
    return dataset


def load_external(external: ExternalSet, data: DataSpec, classes: list[str]) -> Dataset:
    """Load a labelled external test set; every image is in the "test" split.

    Column names, the label map and the metadata list come from the main `data` section.
    Metadata columns that the external manifest lacks are filled with missing values, because
    a set from another site often records less.
    """
    if external.npz is not None:
        if external.npz_split not in _NPZ_SPLITS:
            raise DataError(
                f"external set {external.name!r}: npz_split {external.npz_split!r} is not one of "
                f"{', '.join(_NPZ_SPLITS)}"
            )
        dataset = _load_npz(external.npz, data, classes, parts=(external.npz_split,), name=external.name)
        dataset.split = np.full(len(dataset), "test", dtype=object)
        return dataset

    if external.manifest is None or external.images is None:
        raise DataError(
            f"external set {external.name!r} needs either `npz` or both `manifest` and `images`"
        )
    return _load_manifest(
        external.manifest, external.images, data, classes, name=external.name, split_from_spec=False
    )


# ----------------------------------------------------------------------------------------------
# Manifest datasets


def _load_manifest(
    manifest: Path,
    images_dir: Path,
    data: DataSpec,
    classes: list[str] | None,
    name: str | None,
    split_from_spec: bool,
) -> Dataset:
    manifest = Path(manifest)
    images_dir = Path(images_dir)
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    if not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir}")

    table = _read_manifest(manifest, data)
    if len(table) == 0:
        raise DataError(f"{manifest}: the manifest has no rows")

    required = [data.label_column, data.path_column or data.id_column]
    if split_from_spec and data.split.column:
        required.append(data.split.column)
    if split_from_spec and data.group_column:
        required.append(data.group_column)
    if split_from_spec:
        required.extend(data.metadata)
    for column in required:
        if column not in table.columns:
            raise DataError(
                f"{manifest}: column {column!r} not found; the manifest has {', '.join(map(str, table.columns))}"
            )

    id_column = data.id_column if data.id_column in table.columns else data.path_column
    for row, value in enumerate(table[id_column]):
        if pd.isna(value) or str(value).strip() == "":
            raise DataError(f"{manifest}, {_line(row)}: the column {id_column!r} is empty")
    ids = [str(value).strip() for value in table[id_column]]
    _check_unique_ids(ids, id_column, manifest)
    label_names = _map_labels(table[data.label_column], data.label_map, manifest)
    classes = _resolve_classes(classes, label_names)
    labels = _label_indices(label_names, classes, manifest)
    paths = _image_paths(table, ids, images_dir, data, manifest)

    metadata = _metadata_frame(table, data)
    if split_from_spec and data.split.column:
        split = _split_from_column(table[data.split.column], data.split.column, manifest)
    elif split_from_spec:
        groups = table[data.group_column].astype(str).to_numpy() if data.group_column else None
        split = stratified_group_split(labels, groups, data.split.test, data.split.calibration, data.split.seed)
    else:
        split = np.full(len(ids), "test", dtype=object)

    return Dataset(
        name=name or manifest.parent.name,
        ids=ids,
        labels=labels,
        classes=classes,
        metadata=metadata,
        split=split,
        greyscale=False,
        data_hash=_hash_files(manifest, paths),
        paths=paths,
    )


def _read_manifest(manifest: Path, data: DataSpec) -> pd.DataFrame:
    # Ids, paths and labels stay strings: "007" must not become the number 7.
    text_columns = {data.id_column, data.label_column}
    if data.path_column:
        text_columns.add(data.path_column)
    try:
        return pd.read_csv(manifest, dtype={column: str for column in text_columns})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{manifest}: cannot parse the manifest as CSV ({message})") from None


def _line(row: int) -> str:
    # Row 0 of the table is line 2 of the file, below the header.
    return f"line {row + 2}"


def _check_unique_ids(ids: list[str], column: str, manifest: Path) -> None:
    # The same image twice could land in train and test, so repeated ids are rejected.
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(ids):
        if image_id in first_row:
            raise DataError(
                f"{manifest}, {_line(row)}: {column} {image_id!r} already appears on "
                f"{_line(first_row[image_id])}; each image may be listed once"
            )
        first_row[image_id] = row


def _map_labels(column: pd.Series, label_map: dict[str, str], manifest: Path) -> list[str]:
    names = []
    for row, value in enumerate(column):
        if pd.isna(value) or str(value).strip() == "":
            raise DataError(f"{manifest}, {_line(row)}: the label column {column.name!r} is empty")
        text = str(value).strip()
        names.append(label_map.get(text, text))
    return names


def _resolve_classes(classes: list[str] | None, label_names: list[str]) -> list[str]:
    if classes:
        if len(set(classes)) != len(classes):
            raise DataError(f"the class list has duplicates: {classes}")
        return list(classes)
    return sorted(set(label_names))


def _label_indices(label_names: list[str], classes: list[str], source: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(label_names), dtype=np.int64)
    for row, name in enumerate(label_names):
        if name not in index:
            raise DataError(
                f"{source}, {_line(row)}: label {name!r} is not one of the classes {classes}; "
                "add it to the classes or map it with data.label_map"
            )
        labels[row] = index[name]
    return labels


def _image_paths(table: pd.DataFrame, ids: list[str], images_dir: Path, data: DataSpec, manifest: Path) -> list[Path]:
    paths = []
    for row, image_id in enumerate(ids):
        if data.path_column:
            value = table[data.path_column].iloc[row]
            if pd.isna(value) or str(value).strip() == "":
                raise DataError(f"{manifest}, {_line(row)}: the path column {data.path_column!r} is empty")
            candidates = [images_dir / str(value).strip()]
        elif Path(image_id).suffix.lower() in IMAGE_SUFFIXES:
            candidates = [images_dir / image_id]
        else:
            candidates = [images_dir / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]

        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            looked = ", ".join(str(path) for path in candidates)
            raise DataError(f"{manifest}, {_line(row)}: no image for id {image_id!r} (looked for {looked})")
        paths.append(found)
    return paths


def _metadata_frame(table: pd.DataFrame, data: DataSpec) -> pd.DataFrame:
    columns = list(data.metadata)
    if data.group_column and data.group_column not in columns:
        columns.append(data.group_column)
    frame = pd.DataFrame(index=pd.RangeIndex(len(table)))
    for column in columns:
        frame[column] = table[column].to_numpy() if column in table.columns else pd.NA
    return frame


def _split_from_column(column: pd.Series, name: str, manifest: Path) -> np.ndarray:
    split = np.empty(len(column), dtype=object)
    for row, value in enumerate(column):
        key = str(value).strip().lower() if not pd.isna(value) else ""
        if key not in _SPLIT_ALIASES:
            raise DataError(
                f"{manifest}, {_line(row)}: split column {name!r} has {value!r}; "
                "expected train, calibration (or val, validation) or test"
            )
        split[row] = _SPLIT_ALIASES[key]
    return split


def _hash_files(manifest: Path, paths: list[Path]) -> str:
    digest = hashlib.sha256()
    digest.update(manifest.read_bytes())
    for path in paths:
        # The name goes in too, so two files swapping contents changes the hash.
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# MedMNIST-style npz datasets


def _load_npz(path: Path, data: DataSpec, classes: list[str] | None, parts: tuple[str, ...], name: str | None) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the npz file ({error})") from None

    with archive:
        images, raw_labels, split, ids = [], [], [], []
        for part in parts:
            for key in (f"{part}_images", f"{part}_labels"):
                if key not in archive.files:
                    raise DataError(f"{path}: array {key!r} not found; the file has {', '.join(archive.files)}")
            part_images = archive[f"{part}_images"]
            part_labels = np.asarray(archive[f"{part}_labels"]).reshape(len(part_images), -1)
            if part_labels.shape[1] != 1:
                raise DataError(
                    f"{path}: {part}_labels has {part_labels.shape[1]} columns; only single-label "
                    "(one column) data is supported"
                )
            images.append(part_images)
            raw_labels.append(part_labels[:, 0])
            split.extend([_NPZ_SPLITS[part]] * len(part_images))
            ids.extend(f"{part}-{i:05d}" for i in range(len(part_images)))

    array = np.concatenate(images)
    greyscale = array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 1)
    if array.ndim == 4 and array.shape[-1] not in (1, 3):
        raise DataError(f"{path}: images have {array.shape[-1]} channels; expected 1 or 3")
    if array.ndim not in (3, 4):
        raise DataError(f"{path}: images have shape {array.shape}; expected (n, H, W) or (n, H, W, C)")
    if len(array) == 0:
        raise DataError(f"{path}: the file contains no images")

    label_names = _npz_label_names(np.concatenate(raw_labels), data, classes, path)
    classes = _resolve_classes(classes, label_names)
    labels = _label_indices_npz(label_names, classes, split, path)

    return Dataset(
        name=name or path.stem,
        ids=ids,
        labels=labels,
        classes=classes,
        metadata=pd.DataFrame(index=pd.RangeIndex(len(ids))),
        split=np.array(split, dtype=object),
        greyscale=greyscale,
        data_hash=hashlib.sha256(path.read_bytes()).hexdigest(),
        source_array=array,
    )


def _check_npz_settings(data: DataSpec) -> None:
    # An npz file has only images and labels, so settings that need manifest columns cannot apply.
    if data.split.column:
        raise DataError(
            f"{data.npz}: data.split.column is {data.split.column!r}, but npz files carry their own "
            "train/val/test splits; remove data.split.column"
        )
    if data.metadata or data.group_column:
        column = data.group_column or data.metadata[0]
        raise DataError(
            f"{data.npz}: npz files have no metadata columns, but the spec names {column!r}; "
            "remove data.metadata and data.group_column"
        )


def _npz_label_names(raw: np.ndarray, data: DataSpec, classes: list[str] | None, path: Path) -> list[str]:
    """Name integer labels: by data.class_names, else by the model's classes, else as digits."""
    names = data.class_names or (classes if classes and not data.label_map else None)
    result = []
    for value in raw.astype(np.int64):
        if names:
            if not 0 <= value < len(names):
                raise DataError(f"{path}: label {value} has no name in the class list {names}")
            text = names[value]
        else:
            text = str(value)
        result.append(data.label_map.get(text, text))
    return result


def _label_indices_npz(label_names: list[str], classes: list[str], split: list[str], path: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(label_names), dtype=np.int64)
    for row, name in enumerate(label_names):
        if name not in index:
            raise DataError(
                f"{path}: {split[row]} image {row} has label {name!r}, which is not one of the "
                f"classes {classes}"
            )
        labels[row] = index[name]
    return labels


# ----------------------------------------------------------------------------------------------
# Splitting


def stratified_group_split(
    labels: np.ndarray,
    groups: np.ndarray | None,
    test: float,
    calibration: float,
    seed: int,
) -> np.ndarray:
    """Assign each image to "train", "calibration" or "test", stratified by class.

    Whole groups (patients, lesions) go to one split, so a group never crosses splits. A group
    is stratified by its most frequent label. Within each class the groups are shuffled with
    `seed`. They fill test until it contains its fraction of the class's images, then
    calibration in the same way, and the rest go to train. A class with at least one group gets one in test, with two or
    more one in train, and with three or more one in calibration (when `calibration` > 0).
    The same inputs always give the same split.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if groups is None:
        groups = np.arange(n).astype(str)
    groups = np.asarray(groups).astype(str)

    group_names, group_of_row = np.unique(groups, return_inverse=True)
    group_sizes = np.bincount(group_of_row, minlength=len(group_names))
    group_label = np.empty(len(group_names), dtype=np.int64)
    for g in range(len(group_names)):
        values, counts = np.unique(labels[group_of_row == g], return_counts=True)
        group_label[g] = values[np.argmax(counts)]

    group_split = np.empty(len(group_names), dtype=object)
    rng = np.random.default_rng(seed)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        order = members[rng.permutation(len(members))]
        group_split[order] = _fill_splits(group_sizes[order], test, calibration)

    return group_split[group_of_row].astype(object)


def _fill_splits(sizes: np.ndarray, test: float, calibration: float) -> list[str]:
    total = int(sizes.sum())
    n_groups = len(sizes)
    test_target = test * total
    calibration_target = calibration * total
    want_calibration = calibration > 0 and n_groups >= 3

    assigned = []
    test_count = calibration_count = train_count = 0
    for i, size in enumerate(sizes):
        remaining = n_groups - i
        # While train (or calibration) is still empty, keep enough groups back to give it one.
        train_reserve = 1 if n_groups >= 2 and train_count == 0 else 0
        calibration_reserve = 1 if want_calibration and calibration_count == 0 else 0

        test_has_room = test_count == 0 or test_count + size / 2 <= test_target
        if test_has_room and remaining > train_reserve + calibration_reserve:
            assigned.append("test")
            test_count += size
            continue

        calibration_has_room = calibration_count == 0 or calibration_count + size / 2 <= calibration_target
        if want_calibration and calibration_has_room and remaining > train_reserve:
            assigned.append("calibration")
            calibration_count += size
            continue

        assigned.append("train")
        train_count += size
    return assigned


def _check_test_covers_classes(dataset: Dataset, data: DataSpec) -> None:
    present = set(np.unique(dataset.labels).tolist())
    in_test = set(np.unique(dataset.labels[dataset.split == "test"]).tolist())
    missing = [dataset.classes[i] for i in sorted(present - in_test)]
    if missing:
        how = f"split column {data.split.column!r}" if data.split.column else f"split seed {data.split.seed}"
        raise DataError(
            f"{dataset.name}: the {how} leaves no test image for class {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; every class in the data needs test images"
        )


# ----------------------------------------------------------------------------------------------
# Decoding and resizing


def _decode_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                # PIL's bilinear filter widens its support when shrinking, so it averages areas
                # instead of sampling single pixels.
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error})") from None


def _decode_files(paths: list[Path], size: int, progress: Progress | None) -> np.ndarray:
    import os

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    total = len(paths)
    step = max(1, total // 100)
    workers = min(8, (os.cpu_count() or 1) * 2)
    # PIL releases the GIL while decoding JPEG and PNG, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, array in enumerate(pool.map(lambda path: _decode_one(path, size), paths)):
            out[i] = array
            if progress is not None and ((i + 1) % step == 0 or i + 1 == total):
                progress(i + 1, total)
    if total == 0 and progress is not None:
        progress(0, 0)
    return out


def _resize_array(source: np.ndarray, size: int, progress: Progress | None) -> np.ndarray:
    from PIL import Image

    if source.ndim == 4 and source.shape[-1] == 1:
        source = source[..., 0]
    source = np.asarray(source, dtype=np.uint8)
    total = len(source)
    out = np.empty((total, size, size, 3), dtype=np.uint8)
    step = max(1, total // 100)
    for i in range(total):
        image = Image.fromarray(source[i])
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        out[i] = array[..., None] if array.ndim == 2 else array
        if progress is not None and ((i + 1) % step == 0 or i + 1 == total):
            progress(i + 1, total)
    return out
