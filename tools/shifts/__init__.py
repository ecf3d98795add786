"""Shift generator: image corruptions by severity and population shifts from metadata."""

from tools.shifts.base import SEVERITIES, ShiftError, ShiftInfo
from tools.shifts.registry import SHIFTS, apply_shift, shift_images, validate_shift

__all__ = ["SEVERITIES", "SHIFTS", "ShiftError", "ShiftInfo", "apply_shift", "shift_images",
           "validate_shift"]
