"""The audit spec (`AuditSpec`) and the audit plan (`AuditPlan`), loaded from YAML.

Unknown fields are rejected with their path. Every field has a default so that older specs keep
loading when sections grow. Relative paths resolve against the spec file's folder and `${VAR}`
expands from the environment.
"""

from __future__ import annotations

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


class MetricChoice(_Strict):
    id: str
    params: dict[str, Any] = {}
    reason: str = ""


class ShiftChoice(_Strict):
    name: str
    severities: list[int] = [1, 2, 3, 4, 5]
    reason: str = ""

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


class AuditSettings(_Strict):
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    max_images: int | None = None
    device: str = "auto"
    batch_size: int = Field(256, gt=0)
    min_relevant_difference: float = Field(0.05, ge=0)
    fdr: float = Field(0.05, gt=0, lt=1)


class ReportSettings(_Strict):
    include_images: bool = True


class Gate(_Strict):
    metric: str
    condition: str = "any_shift"
    max_drop: float | None = None
    min_value: float | None = None


class MonitorSettings(_Strict):
    """Alert thresholds for `clinaudit monitor`; None leaves a check off."""

    max_accuracy_drop: float | None = Field(None, ge=0)
    max_balanced_accuracy_drop: float | None = Field(None, ge=0)
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
                raise SpecError(f"{where}: environment variable {name} is not set")
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


def format_validation_error(error: ValidationError, source: str) -> str:
    """Format the first pydantic error as one line: `source: field.path: message`."""
    first = error.errors()[0]
    path = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
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
