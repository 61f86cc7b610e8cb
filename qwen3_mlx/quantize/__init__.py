"""Quantization: in-memory (tests, benchmarks), the bounded-memory exporter, its quality report and checker."""

from .check import check_export
from .convert import ConvertResult, Plan, convert, plan_export
from .core import quantization_dict, quantize_model
from .quality import QualityReport, quality_report
from .recipes import FIT_CANDIDATES, RECIPES, QuantizeError, QuantSpec

__all__ = [
    "FIT_CANDIDATES",
    "RECIPES",
    "ConvertResult",
    "Plan",
    "QualityReport",
    "QuantSpec",
    "QuantizeError",
    "check_export",
    "convert",
    "plan_export",
    "quality_report",
    "quantization_dict",
    "quantize_model",
]
