"""Quantizers, whole-model quantization and mixed precision."""
from .config import QuantConfig
from .mixed import (MixedPrecisionPlan, SensitivityTable, measure_sensitivity,
                    plan_mixed_precision)
from .model import QuantReport, quantize_model
from .shift import RecalibrationReport, ShiftReport, recalibrate, shift_report

__all__ = ["QuantConfig", "QuantReport", "quantize_model", "measure_sensitivity",
           "plan_mixed_precision", "SensitivityTable", "MixedPrecisionPlan", "shift_report",
           "ShiftReport", "recalibrate", "RecalibrationReport"]
