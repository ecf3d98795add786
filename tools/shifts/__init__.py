"""Shift generator: image corruptions by severity and population shifts from metadata."""

from tools.shifts.base import SEVERITIES, ShiftError, ShiftInfo
from tools.shifts.batches import iter_shifted_batches, start_worker_server
from tools.shifts.presets import DOMAIN_PRESETS, DomainPreset, PresetShift, find_domain_preset
from tools.shifts.registry import SHIFTS, apply_shift, shift_images, validate_shift
from tools.shifts.sheet import contact_sheet

__all__ = ["DOMAIN_PRESETS", "SEVERITIES", "SHIFTS", "DomainPreset", "PresetShift", "ShiftError",
           "ShiftInfo", "apply_shift", "contact_sheet", "find_domain_preset",
           "iter_shifted_batches", "shift_images", "start_worker_server", "validate_shift"]
