"""Quantizers and whole-model quantization."""
from .config import QuantConfig
from .model import QuantReport, quantize_model

__all__ = ["QuantConfig", "QuantReport", "quantize_model"]
