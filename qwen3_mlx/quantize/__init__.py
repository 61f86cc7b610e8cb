"""Quantization: in-memory (for tests and benchmarks) and the bounded-memory exporter."""

from .core import quantize_model

__all__ = ["quantize_model"]
