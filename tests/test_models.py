"""Tests for tools.models: checkpoints and model cards, TorchScript, output kinds and training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from tools.models import (
    Classifier,
    ModelError,
    balanced_class_weights,
    load_classifier,
    resolve_device,
    save_checkpoint,
    train_classifier,
)
from tools.spec import ModelSpec

# torch.jit.script is deprecated in recent torch, but it is how the TorchScript test files are made.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

ARCH = "mobilenetv3_small_050"
CLASSES = ["benign", "malignant", "unclear"]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny model trained for one epoch on random 32 px images, saved with its model card."""
    images = random_images(24, 32)
    labels = np.arange(24) % 3
    model = train_classifier(ARCH, images, labels, CLASSES, input_size=32, epochs=1, batch_size=8, seed=0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(model, path, {"training_data_hash": "abc123"})
    return model, path


class MeanColourNet(torch.nn.Module):
    """Scores each class as a fixed linear function of the image's mean normalised colour."""

    def __init__(self, weight: np.ndarray, final: str = "none") -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight, dtype=torch.float32))
        self.final = final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.mean(dim=(2, 3)) @ self.weight
        if self.final == "softmax":
            return scores.softmax(dim=1)
        return scores


def expected_scores(images: np.ndarray, weight: np.ndarray) -> np.ndarray:
    normalised = (images.astype(np.float64) / 255.0 - MEAN) / STD
    return normalised.mean(axis=(1, 2)) @ weight


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints and model cards


def test_checkpoint_round_trip_gives_same_predictions(trained) -> None:
    model, path = trained
    images = random_images(10, 32, seed=5)
    in_memory = Classifier(model, CLASSES, 32).predict_proba(images)

    loaded = load_classifier(ModelSpec(checkpoint=path), device="cpu")

    assert loaded.classes == CLASSES
    assert loaded.input_size == 32
    np.testing.assert_allclose(loaded.predict_proba(images), in_memory, atol=1e-6)
    np.testing.assert_allclose(loaded.predict_proba(images).sum(axis=1), 1.0)


def test_model_card_records_training(trained) -> None:
    _, path = trained

    card = json.loads(path.with_suffix(".json").read_text())

    assert card["arch"] == ARCH
    assert card["classes"] == CLASSES
    assert card["input_size"] == 32
    assert card["normalization"] == {"mean": list(MEAN), "std": list(STD)}
    assert card["outputs"] == "logits"
    assert card["training_data_hash"] == "abc123"
    assert card["epochs"] == 1
    assert card["seed"] == 0
    assert "created_at" in card


def test_spec_fields_override_model_card(trained) -> None:
    _, path = trained
    spec = ModelSpec(checkpoint=path, input_size=48, classes=CLASSES)

    loaded = load_classifier(spec, device="cpu")

    assert loaded.input_size == 48
    assert loaded.classes == CLASSES
    assert loaded.predict_proba(random_images(2, 48)).shape == (2, 3)


def test_spec_class_order_must_match_model_card(trained) -> None:
    _, path = trained
    spec = ModelSpec(checkpoint=path, classes=["malignant", "benign", "unclear"])

    with pytest.raises(ModelError) as error:
        load_classifier(spec, device="cpu")

    assert str(error.value) == (
        "model.classes ['malignant', 'benign', 'unclear'] in the spec differs from classes "
        f"['benign', 'malignant', 'unclear'] in model card {path.with_suffix('.json')}; remove "
        "model.classes from the spec to use the card's list, or fix its order")


def test_spec_class_names_must_match_model_card(trained) -> None:
    _, path = trained
    spec = ModelSpec(checkpoint=path, classes=["a", "b", "c"])

    with pytest.raises(ModelError, match=r"model.classes \['a', 'b', 'c'\] in the spec differs"):
        load_classifier(spec, device="cpu")


def one_channel_checkpoint(folder: Path) -> Path:
    from tools.models import create_network

    path = folder / "gray.pt"
    torch.save(create_network(ARCH, 2, in_chans=1).state_dict(), path)
    return path


def test_one_channel_model_gets_grayscale_normalization(tmp_path: Path) -> None:
    path = one_channel_checkpoint(tmp_path)
    spec = ModelSpec(checkpoint=path, classes=["normal", "pneumonia"], input_size=32, in_chans=1)

    loaded = load_classifier(spec, device="cpu")

    # The means of ImageNet's three channel means (0.485, 0.456, 0.406) and stds (0.229, 0.224, 0.225).
    np.testing.assert_allclose(loaded.normalization["mean"], [0.449], atol=5e-4)
    np.testing.assert_allclose(loaded.normalization["std"], [0.226], atol=5e-4)
    assert loaded.predict_proba(random_images(3, 32)).shape == (3, 2)


def test_one_channel_model_keeps_spec_normalization(tmp_path: Path) -> None:
    path = one_channel_checkpoint(tmp_path)
    spec = ModelSpec.model_validate({
        "checkpoint": path, "classes": ["normal", "pneumonia"], "input_size": 32, "in_chans": 1,
        "normalization": {"mean": [0.5]}})

    loaded = load_classifier(spec, device="cpu")

    assert loaded.normalization == {"mean": [0.5], "std": [0.226]}


def test_normalization_length_names_spec_field(tmp_path: Path) -> None:
    path = one_channel_checkpoint(tmp_path)
    spec = ModelSpec.model_validate({
        "checkpoint": path, "classes": ["normal", "pneumonia"], "input_size": 32, "in_chans": 1,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25]}})

    with pytest.raises(ModelError) as error:
        load_classifier(spec, device="cpu")

    assert str(error.value) == ("model.normalization in the spec: mean has 3 values, but the "
                                "model has in_chans 1; give 1 value")


def test_model_card_input_size_too_small(trained, tmp_path: Path) -> None:
    import shutil

    _, path = trained
    copy = tmp_path / "small.pt"
    shutil.copy(path, copy)
    card = json.loads(path.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**card, "input_size": 7}))

    with pytest.raises(ModelError, match=r"small.json: input_size 7 is invalid: .* at least 13 px"):
        load_classifier(ModelSpec(checkpoint=copy), device="cpu")


def test_mismatched_checkpoint_names_file_and_key(trained, tmp_path: Path) -> None:
    _, trained_path = trained
    # A copy without the model card, so that only the checkpoint contradicts the four classes.
    path = tmp_path / "bare.pt"
    path.write_bytes(trained_path.read_bytes())
    spec = ModelSpec(checkpoint=path, classes=["a", "b", "c", "d"])

    with pytest.raises(ModelError) as error:
        load_classifier(spec, device="cpu")

    message = str(error.value)
    assert str(path) in message
    assert "'classifier.weight'" in message
    assert "(3, 1024)" in message
    assert "(4, 1024)" in message


def test_checkpoint_of_other_architecture_is_rejected(trained) -> None:
    _, path = trained

    with pytest.raises(ModelError, match=f"{path}: checkpoint does not fit resnet10t"):
        load_classifier(ModelSpec(checkpoint=path, arch="resnet10t"), device="cpu")


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"

    with pytest.raises(ModelError, match=f"model file not found: {missing}"):
        load_classifier(ModelSpec(checkpoint=missing, classes=CLASSES), device="cpu")


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torch file")

    with pytest.raises(ModelError, match=f"{path}: cannot read the checkpoint"):
        load_classifier(ModelSpec(checkpoint=path, classes=CLASSES), device="cpu")


def test_checkpoint_without_classes_or_card_is_rejected(trained, tmp_path: Path) -> None:
    _, path = trained
    bare = tmp_path / "bare.pt"
    bare.write_bytes(path.read_bytes())

    with pytest.raises(ModelError, match="set model.classes"):
        load_classifier(ModelSpec(checkpoint=bare), device="cpu")


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({}, path)

    with pytest.raises(ModelError, match="unknown timm architecture 'no_such_net'"):
        load_classifier(ModelSpec(checkpoint=path, arch="no_such_net", classes=CLASSES), device="cpu")


# ----------------------------------------------------------------------------------------------
# TorchScript and output kinds


def test_torchscript_model_predicts_hand_computed_scores(tmp_path: Path) -> None:
    weight = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5], [-1.0, 0.0, 1.0]])
    path = tmp_path / "scripted.pt"
    torch.jit.script(MeanColourNet(weight)).save(str(path))
    images = random_images(7, 20, seed=3)

    classifier = load_classifier(ModelSpec(torchscript=path, classes=CLASSES, input_size=20), device="cpu")

    np.testing.assert_allclose(classifier.predict_logits(images), expected_scores(images, weight), atol=1e-5)


def test_probability_outputs_pass_through(tmp_path: Path) -> None:
    weight = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, -0.5], [-1.0, 0.0, 1.0]])
    path = tmp_path / "softmax.pt"
    torch.jit.script(MeanColourNet(weight, final="softmax")).save(str(path))
    images = random_images(5, 16, seed=4)
    spec = ModelSpec(torchscript=path, classes=CLASSES, input_size=16, outputs="probabilities")

    probs = load_classifier(spec, device="cpu").predict_proba(images)

    np.testing.assert_allclose(probs, softmax_rows(expected_scores(images, weight)), atol=1e-5)


def test_binary_logit_gives_sigmoid_probabilities() -> None:
    weight = np.array([[1.5], [-2.0], [0.7]])
    images = random_images(6, 16, seed=6)
    classifier = Classifier(MeanColourNet(weight), ["normal", "pneumonia"], 16, outputs="binary_logit")

    logits = classifier.predict_logits(images)
    probs = classifier.predict_proba(images)

    z = expected_scores(images, weight)[:, 0]
    np.testing.assert_allclose(logits[:, 0], 0.0)
    np.testing.assert_allclose(logits[:, 1], z, atol=1e-5)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-z)), atol=1e-6)
    np.testing.assert_allclose(probs[:, 0], 1 / (1 + np.exp(z)), atol=1e-6)


def test_binary_logit_checkpoint_has_one_output(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "binary.pt"
    torch.save(timm.create_model(ARCH, pretrained=False, num_classes=1).state_dict(), path)
    spec = ModelSpec(checkpoint=path, classes=["normal", "pneumonia"], outputs="binary_logit", input_size=32)

    probs = load_classifier(spec, device="cpu").predict_proba(random_images(3, 32))

    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_output_column_count_must_match_classes() -> None:
    classifier = Classifier(MeanColourNet(np.ones((3, 2))), CLASSES, 16)

    with pytest.raises(ModelError, match="returned 2 columns but the class list has 3"):
        classifier.predict_logits(random_images(2, 16))


def test_prediction_rejects_float_images() -> None:
    classifier = Classifier(MeanColourNet(np.ones((3, 3))), CLASSES, 16)

    with pytest.raises(ModelError, match="must be uint8"):
        classifier.predict_logits(np.zeros((2, 16, 16, 3), dtype=np.float32))


def test_prediction_reports_progress_per_batch() -> None:
    classifier = Classifier(MeanColourNet(np.ones((3, 3))), CLASSES, 16)
    calls: list[tuple[int, int]] = []

    classifier.predict_logits(random_images(10, 16), batch_size=4, progress=lambda d, t: calls.append((d, t)))

    assert calls == [(4, 10), (8, 10), (10, 10)]


def test_resolve_device_auto_picks_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"

    assert resolve_device("auto") == expected
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        resolve_device("tpu")


# ----------------------------------------------------------------------------------------------
# Training


def test_training_is_reproducible_for_a_seed() -> None:
    images = random_images(16, 24)
    labels = np.arange(16) % 2
    first = train_classifier(ARCH, images, labels, ["a", "b"], input_size=24, epochs=1, batch_size=8, seed=3)
    second = train_classifier(ARCH, images, labels, ["a", "b"], input_size=24, epochs=1, batch_size=8, seed=3)

    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key], msg=key)


def test_training_stops_at_time_limit() -> None:
    images = random_images(32, 24)
    labels = np.arange(32) % 2
    calls: list[tuple[int, int]] = []

    model = train_classifier(
        ARCH, images, labels, ["a", "b"], input_size=24, epochs=5, batch_size=8,
        time_limit_s=0.0, progress=lambda d, t: calls.append((d, t)),
    )

    assert model.clinaudit_card["steps"] == 1
    assert model.clinaudit_card["stopped_by_time_limit"] is True
    assert calls == [(1, 20)]


def test_training_calls_augment_on_uint8_batches() -> None:
    seen: list[tuple[tuple[int, ...], np.dtype]] = []

    def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seen.append((batch.shape, batch.dtype))
        return 255 - batch

    train_classifier(
        ARCH, random_images(12, 24), np.arange(12) % 2, ["a", "b"], input_size=24, epochs=1,
        batch_size=5, augment=augment,
    )

    # 12 images in batches of 5: 5, 5 and a last batch of 2.
    assert seen == [((5, 24, 24, 3), np.uint8), ((5, 24, 24, 3), np.uint8), ((2, 24, 24, 3), np.uint8)]


def test_training_rejects_labels_outside_classes() -> None:
    with pytest.raises(ModelError, match=r"labels has 1 values outside 0..1 \(first at row 3: 2\)"):
        train_classifier(ARCH, random_images(4, 24), np.array([0, 1, 0, 2]), ["a", "b"], input_size=24, epochs=1)


def test_balanced_class_weights_match_sklearn() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [3] * 7)

    weights = balanced_class_weights(labels, 4)

    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels)
    np.testing.assert_allclose(weights[[0, 1, 3]], expected)
    assert weights[2] == 0.0


def test_training_from_init_checkpoint_starts_there(trained) -> None:
    model, path = trained
    images = random_images(24, 32)

    resumed = train_classifier(
        ARCH, images, np.arange(24) % 3, CLASSES, input_size=32, epochs=1, batch_size=8,
        lr=1e-12, init_from=path,
    )

    # With a negligible learning rate only batch-norm statistics move.
    weight = "classifier.weight"
    torch.testing.assert_close(resumed.state_dict()[weight], model.state_dict()[weight])


def test_one_cycle_rate_follows_torch_one_cycle() -> None:
    from tools.models import learning_rate

    total, peak = 400, 3e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total, pct_start=0.25)
    torch_rates = []
    for _ in range(total):
        torch_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    ours = [learning_rate("onecycle", peak, step / total) for step in range(total)]

    # torch places the peak one step earlier, so the two agree to within a step's change.
    np.testing.assert_allclose(ours, torch_rates, atol=peak * 0.02)
    assert learning_rate("onecycle", peak, 1.0) == pytest.approx(peak / 25e4)
    assert learning_rate("cosine", peak, 0.5) == pytest.approx(peak / 2)


def test_augment_returning_floats_is_rejected() -> None:
    def to_float(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return batch / 255.0

    with pytest.raises(ModelError, match="augment must return a uint8 batch of shape"):
        train_classifier(
            ARCH, random_images(8, 24), np.arange(8) % 2, ["a", "b"], input_size=24, epochs=1,
            batch_size=4, augment=to_float,
        )


def test_model_card_supplies_architecture(tmp_path: Path) -> None:
    model = train_classifier(
        "resnet10t", random_images(8, 32), np.arange(8) % 2, ["a", "b"], input_size=32, epochs=1, batch_size=4
    )
    path = tmp_path / "resnet.pt"
    save_checkpoint(model, path, {})

    loaded = load_classifier(ModelSpec(checkpoint=path), device="cpu")

    assert loaded.card["arch"] == "resnet10t"
    assert type(loaded.module).__name__ == "ResNet"
    assert loaded.classes == ["a", "b"]
