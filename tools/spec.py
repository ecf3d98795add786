"""The audit spec (`AuditSpec`) and the audit plan (`AuditPlan`), loaded from YAML.

Unknown fields are rejected with their path. Every field has a default so that older specs keep
loading when sections grow. Relative paths resolve against the spec file's folder and `${VAR}`
expands from the environment.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec that cannot be loaded; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The smallest model input side at which every registered shift runs at every severity. The
# elastic shift smooths with sigma = 8 % of the side, and albumentations rejects sigma below 1.
# This was measured by shifting random uint8 images of every side from 1 to 40 px, and of 48,
# 64, 128 and 224 px, with every shift and severity. tests/test_spec_checks.py repeats the
# measurement at 12 and 13 px.
MIN_INPUT_SIZE = 13

# The minimum number of bootstrap replicates that tools/calibration.py accepts for the
# temperature fit and the recalibration check, which every audit with a calibration split runs.
MIN_BOOTSTRAP = 20

# A context.domain that matches no preset but is this close to a preset's name (difflib ratio)
# is taken for a misspelling. One wrong letter in "dermatology" scores 0.91 to 0.95, while real
# domains without a preset score less, such as "hepatology" (0.86) and "dermatopathology" (0.82).
_DOMAIN_TYPO_RATIO = 0.9


def _unknown_name_message(kind: str, value: str, known: list[str]) -> str:
    """Describe an unknown registry name with its closest match and every valid name."""
    close = difflib.get_close_matches(value, known, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {value!r}{suggestion}; known {kind}s: {', '.join(sorted(known))}"


def _check_metric_id(value: str) -> str:
    # Imported here because the metric registry pulls in scipy, which loading a spec does not need.
    from tools.metrics import REGISTRY

    if value not in REGISTRY:
        raise ValueError(_unknown_name_message("metric", value, list(REGISTRY)))
    return value


def _check_shift_name(value: str) -> str:
    from tools.shifts import SHIFTS

    if value not in SHIFTS:
        raise ValueError(_unknown_name_message("shift", value, list(SHIFTS)))
    return value


def _check_domain(value: str | None) -> str | None:
    """Accept a domain the rules planner finds a preset for, and reject near misses of one.

    The rules planner takes a preset when the lower-case domain, with spaces as underscores, is a
    preset name, or when it equals one of the preset's aliases. Any other domain gets the generic
    shifts, which is right for a domain without a preset ("radiography") but silently wrong for a
    misspelt one ("dermatolgy").
    """
    if value is None:
        return None
    from tools.shifts import DOMAIN_PRESETS

    domain = value.strip()
    lowered = domain.lower()
    if lowered.replace(" ", "_") in DOMAIN_PRESETS:
        return domain
    if any(lowered in preset.aliases for preset in DOMAIN_PRESETS.values()):
        return domain

    names = sorted(DOMAIN_PRESETS)
    close = difflib.get_close_matches(lowered.replace(" ", "_"), names, n=1,
                                      cutoff=_DOMAIN_TYPO_RATIO)
    if close:
        raise ValueError(
            f"unknown domain {value!r} (did you mean {close[0]!r}?); domains with a shift preset: "
            f"{', '.join(names)}; another domain gets the generic shifts")
    return domain


# Gate condition selectors, each matching a group of conditions. tools/gates.py applies them.
GATE_SELECTORS = ("clean", "any", "any_shift", "any_subgroup", "any_site")

# The condition keys an audit stores, by kind, and how many parts follow the kind. A subgroup or
# site value may itself contain ":", so the last part takes the rest of the key.
_CONDITION_KEY_PARTS = {"shift": 2, "subgroup": 2, "site": 2, "prevalence": 1, "reweight": 1,
                        "external": 1}
_GATE_CONDITION_FORMS = ("clean, any, any_shift, any_subgroup, any_site, or one condition key: "
                         "shift:<shift>:<severity 1-5>, subgroup:<column>:<value>, "
                         "site:<column>:<value>, prevalence:<name>, reweight:<name> or "
                         "external:<name>")


def _check_gate_condition(value: str) -> str:
    """Accept a gate selector or a condition key the audit can produce, so a typo fails at load."""
    if value in GATE_SELECTORS:
        return value

    kind, _, rest = value.partition(":")
    if kind not in _CONDITION_KEY_PARTS:
        close = difflib.get_close_matches(value, GATE_SELECTORS, n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown condition {value!r}{suggestion}; a gate condition is "
                         f"{_GATE_CONDITION_FORMS}")

    parts = rest.split(":", _CONDITION_KEY_PARTS[kind] - 1)
    if len(parts) != _CONDITION_KEY_PARTS[kind] or not all(parts):
        raise ValueError(f"condition {value!r} is not a complete {kind} key; a gate condition is "
                         f"{_GATE_CONDITION_FORMS}")
    if kind == "shift":
        _check_shift_name(parts[0])
        if parts[1] not in {"1", "2", "3", "4", "5"}:
            raise ValueError(f"condition {value!r} has severity {parts[1]!r}; shift severities "
                             "are 1 to 5")
    return value


class Normalization(_Strict):
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]


class ModelSpec(_Strict):
    arch: str | None = "mobilenetv3_small_050"
    checkpoint: Path | None = None
    torchscript: Path | None = None
    classes: list[str] = []
    input_size: int = 64
    normalization: Normalization = Normalization()
    outputs: Literal["logits", "probabilities", "binary_logit"] = "logits"
    in_chans: int = 3

    @field_validator("input_size")
    @classmethod
    def _input_size_fits_shifts(cls, value: int) -> int:
        if value < MIN_INPUT_SIZE:
            raise ValueError(f"{value} px is too small: the image shifts need an input size of at "
                             f"least {MIN_INPUT_SIZE} px")
        return value


class SplitSpec(_Strict):
    column: str | None = None
    test: float = Field(0.3, gt=0, lt=1)
    calibration: float = Field(0.2, ge=0, lt=1)
    seed: int = 0


class ExternalSet(_Strict):
    """A labelled test set from elsewhere, evaluated as its own condition."""

    name: str
    manifest: Path | None = None
    images: Path | None = None
    npz: Path | None = None
    npz_split: str = "test"


class DataSpec(_Strict):
    manifest: Path | None = None
    images: Path | None = None
    npz: Path | None = None
    id_column: str = "image_id"
    path_column: str | None = None
    label_column: str = "label"
    label_map: dict[str, str] = {}
    metadata: list[str] = []
    group_column: str | None = None
    split: SplitSpec = SplitSpec()
    external: list[ExternalSet] = []
    # MedMNIST-style .npz files carry integer labels; their names come from here or model.classes.
    class_names: list[str] = []

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.npz is None and self.manifest is None:
            raise ValueError("data needs either `manifest` (with `images`) or `npz`")
        if self.manifest is not None and self.images is None:
            raise ValueError("data.images is missing: it names the folder the manifest's images are in")
        return self


class Context(_Strict):
    domain: str | None = None
    intended_use: str | None = None
    deployment: str | None = None
    positive_class: str | None = None
    malignant_classes: list[str] = []
    costlier_error: Literal["false_negative", "false_positive", "equal"] | None = None
    ordinal: bool | None = None
    referral_target: float | None = Field(None, gt=0, le=1)
    # What the accepted predictions must reach: accuracy, or sensitivity for positive_class.
    referral_metric: Literal["accuracy", "sensitivity"] = "accuracy"
    cost_matrix: list[list[float]] | None = None

    @field_validator("domain")
    @classmethod
    def _domain_is_not_misspelt(cls, value: str | None) -> str | None:
        return _check_domain(value)


class MetricChoice(_Strict):
    id: str
    params: dict[str, Any] = {}
    reason: str = ""

    @field_validator("id")
    @classmethod
    def _id_is_registered(cls, value: str) -> str:
        return _check_metric_id(value)


class ShiftChoice(_Strict):
    name: str
    severities: list[int] = [1, 2, 3, 4, 5]
    reason: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_registered(cls, value: str) -> str:
        return _check_shift_name(value)

    @field_validator("severities")
    @classmethod
    def _severities_in_range(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"severity {bad[0]} is outside 1..5")
        return sorted(set(value))


class SubgroupChoice(_Strict):
    column: str
    # Numeric columns are cut at these edges into bands such as "40-59"; None keeps values as-is.
    bands: list[float] | None = None
    reason: str = ""


class PrevalenceChoice(_Strict):
    name: str
    class_mix: dict[str, float]
    reason: str = ""


class ReweightChoice(_Strict):
    """A covariate shift: the test set reweighted so a metadata column has a target mix."""

    name: str
    column: str
    target: dict[str, float]
    bands: list[float] | None = None
    reason: str = ""


class PlanCost(_Strict):
    conditions: int
    images_predicted: int
    estimated_seconds: float
    note: str = ""


class AuditPlan(_Strict):
    metrics: list[MetricChoice] = []
    primary_metric: str = "balanced_accuracy"
    primary_reason: str = ""
    shifts: list[ShiftChoice] = []
    subgroups: list[SubgroupChoice] = []
    site_column: str | None = None
    prevalence: list[PrevalenceChoice] = []
    reweight: list[ReweightChoice] = []
    min_subgroup_size: int = 30
    cost: PlanCost | None = None
    planner: str = "rules"

    @field_validator("primary_metric")
    @classmethod
    def _primary_is_registered(cls, value: str) -> str:
        return _check_metric_id(value)


class AuditSettings(_Strict):
    bootstrap: int = 1000
    seed: int = 0
    # None audits every test image.
    max_images: int | None = None
    device: str = "auto"
    batch_size: int = Field(256, gt=0)
    min_relevant_difference: float = Field(0.05, ge=0)
    fdr: float = Field(0.05, gt=0, lt=1)

    @field_validator("bootstrap")
    @classmethod
    def _enough_replicates(cls, value: int) -> int:
        if value < MIN_BOOTSTRAP:
            raise ValueError(f"{value} replicates are too few: temperature scaling and its check "
                             f"under shift need at least {MIN_BOOTSTRAP} (default 1000)")
        return value

    @field_validator("max_images")
    @classmethod
    def _at_least_one_image(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}; leave it out (or null) to audit "
                             "every test image")
        return value


class ReportSettings(_Strict):
    include_images: bool = True


class Gate(_Strict):
    metric: str
    condition: str = "any_shift"
    max_drop: float | None = None
    min_value: float | None = None

    @field_validator("metric")
    @classmethod
    def _metric_is_registered(cls, value: str) -> str:
        return _check_metric_id(value)

    @field_validator("condition")
    @classmethod
    def _condition_is_known(cls, value: str) -> str:
        return _check_gate_condition(value)

    @model_validator(mode="after")
    def _has_a_bound(self) -> Gate:
        if self.max_drop is None and self.min_value is None:
            raise ValueError(f"the gate on {self.metric} checks nothing: give max_drop, "
                             "min_value or both")
        return self


class MonitorSettings(_Strict):
    """Alert thresholds for `clinaudit monitor`; None leaves a check off."""

    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    max_balanced_accuracy_drop: float | None = Field(None, ge=0, le=1)
    max_drift_p: float | None = Field(None, gt=0, lt=1)


class AuditSpec(_Strict):
    model: ModelSpec = ModelSpec()
    data: DataSpec
    context: Context = Context()
    plan: AuditPlan | None = None
    audit: AuditSettings = AuditSettings()
    report: ReportSettings = ReportSettings()
    gates: list[Gate] = []
    monitor: MonitorSettings = MonitorSettings()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise SpecError(f"{where}: environment variable {name} is not set; export it "
                                f"(for example {name}=/path/to/folder) or write the path in "
                                "the spec")
            return os.environ[name]

        return _VAR.sub(replace, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _resolve_paths(spec: AuditSpec, base: Path) -> AuditSpec:
    def fix(path: Path | None) -> Path | None:
        if path is None or path.is_absolute():
            return path
        return (base / path).resolve()

    spec.model.checkpoint = fix(spec.model.checkpoint)
    spec.model.torchscript = fix(spec.model.torchscript)
    spec.data.manifest = fix(spec.data.manifest)
    spec.data.images = fix(spec.data.images)
    spec.data.npz = fix(spec.data.npz)
    for external in spec.data.external:
        external.manifest = fix(external.manifest)
        external.images = fix(external.images)
        external.npz = fix(external.npz)
    return spec


def _field_path(loc: tuple[int | str, ...]) -> str:
    """Join a pydantic error location as `gates[1].metric`, with zero-based list indices."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def format_validation_error(error: ValidationError, source: str) -> str:
    """Format one pydantic error as one line: `source: field.path: message`.

    An unknown field is reported before the other errors; the rest are counted.
    """
    errors = error.errors()
    # A misspelt field name often explains the other errors, so unknown fields come first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "value_error" and "error" in first.get("ctx", {}):
        # The validators' own messages, without pydantic's "Value error, " prefix.
        message = str(first["ctx"]["error"])
    more = len(errors) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    path = _field_path(first["loc"]) or "(top level)"
    return f"{source}: {path}: {message}{suffix}"


def spec_from_dict(raw: dict[str, Any], base: Path, source: str = "spec") -> AuditSpec:
    """Validate a spec given as a dict; relative paths resolve against `base`."""
    raw = _expand(raw, "spec")
    try:
        spec = AuditSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None
    return _resolve_paths(spec, base)


def load_spec(path: str | Path) -> AuditSpec:
    """Load and validate an audit spec from a YAML file.

    Raises SpecError with a one-line message naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping with at least a `data` section")
    return spec_from_dict(raw, path.parent.resolve(), source=str(path))
