"""Classifiers under audit: a timm architecture with a state-dict checkpoint, or a TorchScript file.

A model card (JSON beside the checkpoint, same name with `.json`) records the class order,
input size, normalisation and architecture, and fills what the spec leaves unset. Prediction
takes uint8 RGB images and returns log-space scores whose softmax is the class probabilities.
Published timm weights are never downloaded here: architectures are always built with
`pretrained=False`.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.spec import ModelSpec

# With OpenMP's default active waiting, torch's threads spin while another process uses the
# cores, and a training step on a busy 2-core machine measured 40x slower. This only takes
# effect when it runs before the first `import torch` in the process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# A 1-channel model receives the mean of the R, G and B channels (see `to_tensor`), whose mean under
# ImageNet statistics is the mean of the three channel means. The std is the mean of the three
# stds, an approximation that ignores the correlation between channels.
IMAGENET_GRAYSCALE_NORMALIZATION = {"mean": [0.449], "std": [0.226]}
OUTPUT_KINDS = ("logits", "probabilities", "binary_logit")

# One-cycle schedule factors; the same as the defaults of torch.optim.lr_scheduler.OneCycleLR
# except for a warm-up of a quarter of training instead of 30 %.
_ONE_CYCLE_DIV = 25.0
_ONE_CYCLE_FINAL_DIV = 1e4
_ONE_CYCLE_WARMUP = 0.25

# Probabilities are clipped to this before taking their log, so a hard 0 stays finite.
_MIN_PROBABILITY = 1e-12


class ModelError(ValueError):
    """A model that cannot be loaded or run; the message names the file or setting at fault."""


def resolve_device(name: str) -> str:
    """Return the torch device for `name`: "auto" picks "cuda" when available, else "cpu"."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda") or name == "mps"):
        raise ModelError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    return name


class Classifier:
    """A loaded image classifier with its class order, input size and normalisation.

    `outputs` names what the network returns: "logits" (n, K), "probabilities" (n, K) or
    "binary_logit" (n, 1), the logit of class 1 of two classes.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        classes: list[str],
        input_size: int,
        normalization: dict[str, list[float]] | None = None,
        outputs: str = "logits",
        device: str = "cpu",
        card: dict[str, Any] | None = None,
        in_chans: int = 3,
    ) -> None:
        if outputs not in OUTPUT_KINDS:
            raise ModelError(f"model outputs {outputs!r} is not one of {', '.join(OUTPUT_KINDS)}")
        if outputs == "binary_logit" and len(classes) != 2:
            raise ModelError(f"a binary_logit model needs exactly 2 classes, got {len(classes)}: {classes}")
        if not classes:
            raise ModelError("the model has no class list; set model.classes or provide a model card")
        if not normalization:
            normalization = IMAGENET_GRAYSCALE_NORMALIZATION if in_chans == 1 else IMAGENET_NORMALIZATION
        for key in ("mean", "std"):
            if len(normalization[key]) not in (1, in_chans):
                raise ModelError(
                    f"normalization {key} has {len(normalization[key])} values; expected 1 or {in_chans}"
                )

        self.module = module.to(device).eval()
        self.classes = list(classes)
        self.input_size = int(input_size)
        self.normalization = {key: [float(v) for v in normalization[key]] for key in ("mean", "std")}
        self.outputs = outputs
        self.device = device
        self.card = dict(card or {})
        self.in_chans = in_chans

    def predict_logits(self, images: np.ndarray, batch_size: int = 256, progress: Progress | None = None) -> np.ndarray:
        """Score uint8 RGB images (n, H, W, 3); float64 array (n, K) in log space.

        Logits stay as they are; probability outputs become log(p); a binary logit z becomes
        the row [0, z]. Softmax of a row is therefore always the class probabilities. Images of
        another size than `input_size` are resized (bilinear, antialiased) first.
        """
        import torch

        images = _check_images(images)
        if batch_size <= 0:
            raise ModelError(f"batch_size must be positive, got {batch_size}")
        n = len(images)
        out = np.empty((n, len(self.classes)), dtype=np.float64)

        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size]
                tensor = to_tensor(batch, self.normalization, self.input_size, self.device, self.in_chans)
                raw = self.module(tensor)
                if isinstance(raw, (tuple, list)):
                    raw = raw[0]
                out[start : start + len(batch)] = self._to_log_scores(raw.float().cpu().numpy())
                if progress is not None:
                    progress(min(start + batch_size, n), n)
        if n == 0 and progress is not None:
            progress(0, 0)
        return out

    def predict_proba(self, images: np.ndarray, batch_size: int = 256, progress: Progress | None = None) -> np.ndarray:
        """Predict class probabilities (n, K) for uint8 RGB images (n, H, W, 3); rows sum to 1."""
        return softmax(self.predict_logits(images, batch_size=batch_size, progress=progress))

    def _to_log_scores(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.float64).reshape(len(raw), -1)
        k = len(self.classes)
        if self.outputs == "binary_logit":
            if raw.shape[1] != 1:
                raise ModelError(f"a binary_logit model must return 1 column, but it returned {raw.shape[1]}")
            return np.concatenate([np.zeros_like(raw), raw], axis=1)
        if raw.shape[1] != k:
            raise ModelError(
                f"the model returned {raw.shape[1]} columns but the class list has {k} ({', '.join(self.classes)})"
            )
        if self.outputs == "probabilities":
            return np.log(np.clip(raw, _MIN_PROBABILITY, None))
        return raw


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, K) scores, computed stably in float64."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def to_tensor(
    images: np.ndarray,
    normalization: dict[str, list[float]],
    input_size: int,
    device: str,
    in_chans: int = 3,
) -> torch.Tensor:
    """Convert uint8 (b, H, W, 3) images into a normalised float32 NCHW tensor on `device`."""
    import torch
    import torch.nn.functional as F

    # torch cannot wrap a read-only array (the dataset cache is read-only), so copy it.
    if not images.flags.writeable or not images.flags.c_contiguous:
        images = np.array(images, copy=True, order="C")
    tensor = torch.from_numpy(images).to(device)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    if tensor.shape[-1] != input_size or tensor.shape[-2] != input_size:
        tensor = F.interpolate(tensor, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    if in_chans == 1:
        tensor = tensor.mean(dim=1, keepdim=True)
    mean = torch.tensor(normalization["mean"], device=device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalization["std"], device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return (tensor - mean) / std


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ModelError(f"images must have shape (n, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ModelError(f"images must be uint8 (0..255), got {images.dtype}")
    return images


# ----------------------------------------------------------------------------------------------
# Loading


def read_model_card(path: Path) -> dict[str, Any]:
    """Read the model card beside a checkpoint (`path` with the suffix `.json`); {} when absent."""
    card_path = Path(path).with_suffix(".json")
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{card_path}: cannot read the model card ({error})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: a model card must be a JSON object")
    return card


def load_classifier(spec: ModelSpec, device: str = "auto") -> Classifier:
    """Load the classifier a spec's `model` section names.

    Fields the spec does not set (classes, input_size, normalization, arch, outputs, in_chans)
    come from the model card when there is one. A spec class list that differs from the card's
    raises ModelError. Raises ModelError naming the checkpoint file when it is
    missing, unreadable or does not fit the architecture.
    """
    device = resolve_device(device)
    source = spec.torchscript or spec.checkpoint
    if source is None:
        raise ModelError("model needs either `checkpoint` (with `arch`) or `torchscript`")
    source = Path(source)
    if not source.is_file():
        raise ModelError(f"model file not found: {source}")

    card = read_model_card(source)
    settings = _settings_from_spec_and_card(spec, card, source)

    if spec.torchscript is not None:
        module = _load_torchscript(source, device)
    else:
        module = _build_from_checkpoint(source, settings)

    return Classifier(
        module,
        classes=settings["classes"],
        input_size=settings["input_size"],
        normalization=settings["normalization"],
        outputs=settings["outputs"],
        device=device,
        card=card,
        in_chans=settings["in_chans"],
    )


def _settings_from_spec_and_card(spec: ModelSpec, card: dict[str, Any], source: Path) -> dict[str, Any]:
    # A field the user wrote in the spec wins; otherwise the card's value; otherwise the default.
    chosen = spec.model_fields_set
    settings: dict[str, Any] = {}
    for key in ("arch", "input_size", "outputs", "in_chans"):
        value = getattr(spec, key)
        if key not in chosen and card.get(key) is not None:
            value = card[key]
        settings[key] = value
    from tools.spec import MIN_INPUT_SIZE

    if not isinstance(settings["input_size"], int) or settings["input_size"] < MIN_INPUT_SIZE:
        raise ModelError(f"model card {source.with_suffix('.json')}: input_size "
                         f"{settings['input_size']!r} is invalid: the image shifts need an integer "
                         f"of at least {MIN_INPUT_SIZE} px")

    settings["normalization"] = _normalization_from_spec_and_card(
        spec, card, source, settings["in_chans"])
    settings["classes"] = _classes_from_spec_and_card(spec, card, source)
    return settings


def _normalization_from_spec_and_card(spec: ModelSpec, card: dict[str, Any], source: Path,
                                      in_chans: int) -> dict[str, list[float]]:
    # Fields left out of the spec or the card keep the default for the model's channel count.
    default = IMAGENET_GRAYSCALE_NORMALIZATION if in_chans == 1 else IMAGENET_NORMALIZATION
    normalization = dict(default)
    if "normalization" in spec.model_fields_set:
        where = "model.normalization in the spec"
        spec_fields = spec.normalization.model_fields_set
        normalization.update({key: getattr(spec.normalization, key) for key in spec_fields})
    elif isinstance(card.get("normalization"), dict):
        where = f"normalization in model card {source.with_suffix('.json')}"
        normalization.update(card["normalization"])
    else:
        where = "the default normalization"

    allowed = "1 value" if in_chans == 1 else f"1 or {in_chans} values"
    for key in ("mean", "std"):
        values = normalization[key]
        if not isinstance(values, list):
            raise ModelError(f"{where}: {key} is {values!r}, not a list; give {allowed}")
        if len(values) not in (1, in_chans):
            raise ModelError(f"{where}: {key} has {len(values)} values, but the model has "
                             f"in_chans {in_chans}; give {allowed}")
    return normalization


def _classes_from_spec_and_card(spec: ModelSpec, card: dict[str, Any], source: Path) -> list[str]:
    card_classes = [str(name) for name in card.get("classes", [])]
    spec_classes = list(spec.classes)
    if spec_classes and card_classes and spec_classes != card_classes:
        # The class order fixes which output column is which class, so a mismatch would put
        # every per-class result under the wrong name.
        raise ModelError(
            f"model.classes {spec_classes} in the spec differs from classes {card_classes} in "
            f"model card {source.with_suffix('.json')}; remove model.classes from the spec to "
            "use the card's list, or fix its order"
        )

    classes = spec_classes or card_classes
    if not classes:
        raise ModelError(
            f"no class list for {source}: set model.classes in the spec or put a model card at "
            f"{source.with_suffix('.json')}"
        )
    return classes


def _load_torchscript(path: Path, device: str) -> torch.nn.Module:
    import torch

    try:
        with warnings.catch_warnings():
            # torch 2.10+ marks TorchScript as deprecated, but models exported as TorchScript still
            # load and run, and auditing them is a supported input.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.*deprecated")
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: cannot load as TorchScript ({first})") from None


def create_network(arch: str, num_outputs: int, in_chans: int = 3) -> torch.nn.Module:
    """Build a timm architecture with random weights; published weights are never fetched."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_outputs, in_chans=in_chans)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ModelError(f"unknown timm architecture {arch!r}; see timm.list_models()") from None
        raise


def _build_from_checkpoint(path: Path, settings: dict[str, Any]) -> torch.nn.Module:
    if not settings["arch"]:
        raise ModelError(f"no architecture for checkpoint {path}: set model.arch in the spec")
    num_outputs = 1 if settings["outputs"] == "binary_logit" else len(settings["classes"])
    module = create_network(settings["arch"], num_outputs, settings["in_chans"])
    state = _read_state_dict(path)
    _check_state_dict_fits(module, state, path, settings["arch"])
    module.load_state_dict(state)
    return module


def _read_state_dict(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: cannot read the checkpoint ({first})") from None

    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: the checkpoint is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_state_dict_fits(module: torch.nn.Module, state: dict[str, Any], path: Path, arch: str) -> None:
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ModelError(f"{path}: checkpoint does not fit {arch}: key {key!r} is missing")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{path}: checkpoint does not fit {arch}: {key!r} has shape {tuple(state[key].shape)}, "
                f"the architecture expects {tuple(tensor.shape)}"
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ModelError(f"{path}: checkpoint does not fit {arch}: unexpected key {unexpected[0]!r}")


# ----------------------------------------------------------------------------------------------
# Training


def train_classifier(
    arch: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    input_size: int,
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    augment: Augment | None = None,
    init_from: Path | None = None,
    time_limit_s: float | None = None,
    progress: Progress | None = None,
    normalization: dict[str, list[float]] | None = None,
    class_weights: str | None = None,
    schedule: str = "onecycle",
    weight_decay: float = 0.05,
    flips: bool = True,
) -> torch.nn.Module:
    """Train a timm classifier from scratch (or from `init_from`) on uint8 images (n, H, W, 3).

    AdamW with a one-cycle (or "cosine") learning-rate schedule and plain cross entropy. With
    `time_limit_s` the schedule advances by whichever is further along, steps or time, and
    training stops when the time is up, so a shortened run still ends at a low rate.
    `class_weights="balanced"` weights the loss by `balanced_class_weights`.
    Random horizontal and vertical flips are on by default. `augment(batch, rng)` then runs on
    each uint8 batch and must return a uint8 batch of the same shape. The returned
    module is in eval mode and carries a `clinaudit_card` dict that `save_checkpoint` writes.
    """
    import torch

    images = _check_images(images)
    labels = np.asarray(labels, dtype=np.int64)
    _check_training_arguments(images, labels, classes, epochs, batch_size, lr, class_weights, schedule)
    normalization = normalization or IMAGENET_NORMALIZATION
    device = resolve_device(device)
    if device == "cpu":
        torch.set_num_threads(_cpu_count())

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = create_network(arch, len(classes))
    if init_from is not None:
        init_from = Path(init_from)
        if not init_from.is_file():
            raise ModelError(f"checkpoint to start from not found: {init_from}")
        state = _read_state_dict(init_from)
        _check_state_dict_fits(module, state, init_from, arch)
        module.load_state_dict(state)
    module.to(device).train()

    weight = _class_weight_tensor(labels, len(classes), class_weights, device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    batches_per_epoch = _batches_per_epoch(len(labels), batch_size)
    total_steps = epochs * batches_per_epoch

    start = time.monotonic()
    step = 0
    epochs_done = 0
    stopped_early = False
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for b in range(batches_per_epoch):
            index = np.sort(order[b * batch_size : (b + 1) * batch_size])
            batch = _augmented_batch(images[index], rng, flips, augment)
            x = to_tensor(batch, normalization, input_size, device)
            y = torch.from_numpy(labels[index]).to(device)

            elapsed = time.monotonic() - start
            fraction = step / total_steps
            if time_limit_s is not None:
                fraction = max(fraction, elapsed / max(time_limit_s, 1e-9))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(schedule, lr, fraction)

            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            if progress is not None:
                progress(step, total_steps)
            out_of_time = time_limit_s is not None and time.monotonic() - start > time_limit_s
            if out_of_time and step < total_steps:
                stopped_early = True
                break
        if stopped_early:
            break
        epochs_done += 1

    module.eval()
    module.clinaudit_card = {
        "arch": arch,
        "classes": list(classes),
        "input_size": int(input_size),
        "normalization": {key: list(map(float, normalization[key])) for key in ("mean", "std")},
        "outputs": "logits",
        "in_chans": 3,
        "epochs": int(epochs),
        "epochs_completed": epochs_done,
        "steps": step,
        "stopped_by_time_limit": stopped_early,
        "batch_size": int(batch_size),
        "lr": float(lr),
        "schedule": schedule,
        "weight_decay": float(weight_decay),
        "class_weights": class_weights,
        "seed": int(seed),
        "n_train": len(labels),
        "train_seconds": round(time.monotonic() - start, 2),
        "init_from": str(init_from) if init_from is not None else None,
    }
    return module


def _check_training_arguments(images, labels, classes, epochs, batch_size, lr, class_weights, schedule) -> None:
    if len(images) != len(labels):
        raise ModelError(f"images has {len(images)} rows but labels has {len(labels)}")
    if len(images) < 2:
        raise ModelError(f"training needs at least 2 images, got {len(images)}")
    if len(classes) < 2:
        raise ModelError(f"training needs at least 2 classes, got {classes}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if len(bad):
        raise ModelError(
            f"labels has {len(bad)} values outside 0..{len(classes) - 1} (first at row {bad[0]}: {labels[bad[0]]})"
        )
    if epochs < 1:
        raise ModelError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise ModelError(f"batch_size must be at least 2 (batch norm needs 2 images), got {batch_size}")
    if not lr > 0:
        raise ModelError(f"lr must be positive, got {lr}")
    if class_weights not in (None, "balanced"):
        raise ModelError(f"class_weights must be None or 'balanced', got {class_weights!r}")
    if schedule not in ("onecycle", "cosine"):
        raise ModelError(f"schedule must be 'onecycle' or 'cosine', got {schedule!r}")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _batches_per_epoch(n: int, batch_size: int) -> int:
    # A last batch of a single image is dropped, because batch norm cannot train on one image.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Weight each class by n / (K * count), as scikit-learn's "balanced" does; 0 for absent classes.

    K counts only the classes present, so a present class gets the same weight as in
    scikit-learn's `compute_class_weight("balanced", ...)`.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = int((counts > 0).sum())
    return np.where(counts > 0, len(labels) / (present * np.maximum(counts, 1)), 0.0)


def _class_weight_tensor(labels: np.ndarray, k: int, class_weights: str | None, device: str):
    import torch

    if class_weights is None:
        return None
    return torch.tensor(balanced_class_weights(labels, k), dtype=torch.float32, device=device)


def learning_rate(schedule: str, lr: float, fraction: float) -> float:
    """Return the learning rate at `fraction` (0..1) of training for a peak rate `lr`.

    "onecycle" rises from lr/25 to lr over the first quarter and falls to lr/25e4 by the end,
    both along half cosines, as torch's OneCycleLR does with its default factors. "cosine"
    falls from lr to 0 along a half cosine. Training computes the schedule from a fraction,
    not from a step count, so a time limit can shorten it and still end at a low rate.
    """
    fraction = min(max(fraction, 0.0), 1.0)
    if schedule == "cosine":
        return _cosine_between(lr, 0.0, fraction)

    start, low = lr / _ONE_CYCLE_DIV, lr / (_ONE_CYCLE_DIV * _ONE_CYCLE_FINAL_DIV)
    if fraction < _ONE_CYCLE_WARMUP:
        return _cosine_between(start, lr, fraction / _ONE_CYCLE_WARMUP)
    return _cosine_between(lr, low, (fraction - _ONE_CYCLE_WARMUP) / (1 - _ONE_CYCLE_WARMUP))


def _cosine_between(high: float, low: float, fraction: float) -> float:
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * fraction))


def _augmented_batch(batch: np.ndarray, rng: np.random.Generator, flips: bool, augment: Augment | None) -> np.ndarray:
    if flips:
        batch = _random_flips(batch, rng)
    if augment is None:
        return batch

    result = np.asarray(augment(batch, rng))
    if result.shape != batch.shape or result.dtype != np.uint8:
        raise ModelError(
            f"augment must return a uint8 batch of shape {batch.shape}, got {result.dtype} {result.shape}"
        )
    return result


def _random_flips(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    batch = batch.copy()
    horizontal = rng.random(len(batch)) < 0.5
    vertical = rng.random(len(batch)) < 0.5
    batch[horizontal] = batch[horizontal, :, ::-1]
    batch[vertical] = batch[vertical, ::-1]
    return batch


def save_checkpoint(model: torch.nn.Module, path: Path, card: dict[str, Any]) -> None:
    """Write the model's state dict to `path` and its model card to `path` with suffix `.json`.

    The card starts from what `train_classifier` recorded on the model; entries in `card`
    (for example `training_data_hash`) override it, and `created_at` is added when absent.
    """
    import torch

    path = Path(path)
    if path.suffix == ".json":
        raise ModelError(f"checkpoint path {path} ends in .json, which is where the model card goes")
    path.parent.mkdir(parents=True, exist_ok=True)

    merged = {**getattr(model, "clinaudit_card", {}), **card}
    merged.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for key in ("arch", "classes", "input_size"):
        if key not in merged:
            raise ModelError(f"the model card for {path} needs {key!r}")

    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, path)
    path.with_suffix(".json").write_text(json.dumps(_json_safe(merged), indent=2) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
