"""Errors of calibration: each message is one line meant for the converter's ``error:`` output."""


class CalibrationError(ValueError):
    """Calibration cannot run on this input."""


class UnsupportedModelError(CalibrationError):
    """No recipe for the architecture, or a layout AQUA-KV does not handle (sliding window, hybrid, ...)."""


class CalibrationTextError(CalibrationError):
    """The calibration text is missing, empty or too short."""
